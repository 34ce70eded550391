"""`--now` means the same in every command, and imports and stage moves accept it, so a run on
a simulated clock plans the customers imported or moved on it (issue 17)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from engine_helpers import sandbox_env, write_customers_csv
from sqlmodel import col, select

from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.models import Customer, Message, StageEvent

# A Tuesday in the past: a run "then" plans nothing imported at the real clock's today.
X = datetime(2024, 3, 5, 10, 0, tzinfo=UTC)
# The commands that record a moment besides import, set-stage and the sending ones.
SIDE_COMMANDS = (["customers", "pause"], ["customers", "resume"], ["customers", "opt-out"],
                 ["contacts", "opt-out"], ["contacts", "opt-in"], ["outbox", "retry"],
                 ["outbox", "withdraw"], ["outbox", "resolve"], ["wave", "hold"])


@pytest.fixture
def env(tmp_path: Path, database_url: str, sandbox_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    sb: Sandbox = sandbox_factory(time_scale=0.005)
    values = sandbox_env(sb, tmp_path, database_url, senders=["transition@fabrikam.example"],
                         time_scale=0.005)
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return sb


def test_import_and_run_on_the_same_simulated_clock(env: Sandbox, db: Database, tmp_path: Path,
                                                    cli: Any) -> None:
    csv_path = write_customers_csv(tmp_path / "c.csv", 3, stage="invited")
    r = cli("customers", "import", str(csv_path), "--now", X.isoformat())
    assert r.exit_code == 0, r.output
    with db.session() as s:
        entered = s.exec(select(Customer.stage_entered_at)).all()
        events = s.exec(select(StageEvent.at)).all()
    assert {e.replace(tzinfo=UTC) if e.tzinfo is None else e for e in entered} == {X}
    assert events and {e.replace(tzinfo=UTC) if e.tzinfo is None else e for e in events} == {X}

    run = cli("run", "--now", X.isoformat(), "--json")
    assert run.exit_code == 0, run.output
    data = json.loads(run.stdout)
    assert (data["queued"], data["sent"]) == (3, 3)


def test_set_stage_at_a_simulated_time_and_run_then(env: Sandbox, db: Database, tmp_path: Path,
                                                    cli: Any) -> None:
    csv_path = write_customers_csv(tmp_path / "c.csv", 2, stage="imported")
    assert cli("customers", "import", str(csv_path), "--now", X.isoformat()).exit_code == 0
    later = X + timedelta(days=1)
    r = cli("customers", "set-stage", "K0000", "invited", "--now", later.isoformat(), "--yes")
    assert r.exit_code == 0, r.output
    with db.session() as s:
        row = s.exec(select(Customer).where(col(Customer.key) == "K0000")).one()
    assert row.stage == "invited"
    assert row.stage_entered_at.replace(tzinfo=UTC) == later

    run = cli("run", "--now", later.isoformat(), "--json")
    assert run.exit_code == 0, run.output
    with db.session() as s:
        msgs = s.exec(select(Message.message, Message.status)).all()
    assert msgs == [("partner_invitation", "sent")]


def test_now_without_an_offset_is_the_default_time_zone_in_run_and_status(
    env: Sandbox, db: Database, tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 19:00 in Tokyo is 10:00 UTC: the same instant for the import, the run and status.
    monkeypatch.setenv("COMMS_DEFAULTS_TIME_ZONE", "Asia/Tokyo")
    local = "2024-03-05T19:00"
    csv_path = write_customers_csv(tmp_path / "c.csv", 2, stage="invited")
    assert cli("customers", "import", str(csv_path), "--now", local).exit_code == 0
    run = cli("run", "--now", local, "--limit", "0", "--json")
    assert run.exit_code == 0, run.output
    with db.session() as s:
        created = s.exec(select(Message.created_at)).all()
    assert len(created) == 2
    for c in created:
        assert abs(c.replace(tzinfo=UTC) - X) < timedelta(minutes=1)
    status = cli("status", "--json", "--now", local)
    assert status.exit_code == 0, status.output
    assert datetime.fromisoformat(json.loads(status.stdout)["now"]) == X


def test_every_now_help_says_how_a_time_without_offset_is_read(cli: Any) -> None:
    for command in (["run"], ["send"], ["worker"], ["status"], ["report"], ["sync"],
                    ["customers", "import"], ["customers", "set-stage"], *SIDE_COMMANDS,
                    ["inbox", "sync"], ["wave", "list"], ["wave", "proof"],
                    ["wave", "approve"]):
        r = cli(*command, "--help")
        flat = " ".join(r.stdout.replace("│", " ").split())
        assert "without an offset it is read in [defaults] time_zone" in flat, command


def test_a_bad_now_is_a_usage_error_everywhere(db: Database, cli: Any) -> None:
    for command in (["run", "--dry-run"], ["status"], ["inbox", "sync"],
                    ["customers", "resume", "K0000"], ["contacts", "opt-in", "a@b.example"],
                    ["outbox", "retry", "1"], ["wave", "hold", "wave-1"]):
        r = cli(*command, "--now", "tomorrow")
        assert r.exit_code == 2, (command, r.output)
        assert "--now 'tomorrow' is not an ISO 8601 date-time" in r.stderr


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def test_pause_resume_opt_out_and_opt_in_at_a_simulated_time_and_run_then(
    env: Sandbox, db: Database, tmp_path: Path, cli: Any
) -> None:
    # Resume and opt-in make a customer due at their moment: at the real clock, a run at an
    # earlier simulated time planned nothing for it.
    csv_path = write_customers_csv(tmp_path / "c.csv", 3, stage="invited")
    assert cli("customers", "import", str(csv_path), "--now", X.isoformat()).exit_code == 0
    at = X.isoformat()
    for command in (["customers", "pause", "K0000"], ["customers", "resume", "K0000"],
                    ["customers", "opt-out", "K0002"],
                    ["contacts", "opt-out", "admin1@customer1.example"],
                    ["contacts", "opt-in", "admin1@customer1.example"]):
        r = cli(*command, "--note", "test", "--now", at)
        assert r.exit_code == 0, (command, r.output)
    with db.session() as s:
        due = dict(s.exec(select(Customer.key, Customer.next_due_at)).all())
        events = s.exec(select(StageEvent.at)).all()
    assert _utc(due["K0000"]) == X and _utc(due["K0001"]) == X
    assert {_utc(e) for e in events} == {X}  # the import, and every side action's audit entry

    run = cli("run", "--now", (X + timedelta(hours=1)).isoformat(), "--json")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["queued"] == 2  # K0000 and K0001; K0002 opted out


def _message(db: Database) -> Message:
    with db.session() as s:
        return s.exec(select(Message)).one()


def _set_status(db: Database, status: str) -> None:
    with db.session() as s:
        s.execute(sa.update(Message).values(status=status))


def test_outbox_and_wave_commands_act_at_a_simulated_time(
    env: Sandbox, db: Database, tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    csv_path = write_customers_csv(tmp_path / "c.csv", 1, stage="invited")
    assert cli("customers", "import", str(csv_path), "--now", X.isoformat()).exit_code == 0
    assert cli("run", "--now", X.isoformat(), "--limit", "0").exit_code == 0
    mid = str(_message(db).id)
    later, latest = X + timedelta(hours=1), X + timedelta(hours=2)

    _set_status(db, "failed")
    assert cli("outbox", "retry", mid, "--now", later.isoformat()).exit_code == 0
    assert _utc(_message(db).send_after) == later  # the next run at `later` sends it
    _set_status(db, "unknown")
    assert cli("outbox", "resolve", mid, "--sent", "--now", latest.isoformat()).exit_code == 0
    assert _utc(_message(db).sent_at) == latest
    _set_status(db, "queued")
    assert cli("outbox", "withdraw", mid, "--now", X.isoformat()).exit_code == 0
    assert _utc(_message(db).updated_at) == X

    # A time without an offset is read in [defaults] time_zone, as in every command.
    monkeypatch.setenv("COMMS_DEFAULTS_TIME_ZONE", "Asia/Tokyo")
    r = cli("wave", "hold", "wave-2", "--now", "2024-03-05T19:00")
    assert r.exit_code == 0, r.output
    assert "held at 2024-03-05 10:00 UTC" in r.stdout
