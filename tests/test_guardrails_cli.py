"""Issue 11 guard rails through the real CLI: out-of-stage sends refused or forced (and the
staged message still sent later), what `send` shows before confirming, `run --dry-run`'s table,
`set-stage --dry-run`'s messages, the demo's folder safety, --version, 80-column tables and
plurals. Real SQLite/PostgreSQL, sending through the real Graph transport to the sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, exported_env, seed
from sqlmodel import select

from comms.cli.present import human_minutes, plural
from comms.store.db import Database
from comms.store.models import Customer, Message, StageEvent

NOW = T0.isoformat()


@pytest.fixture
def env(tmp_path: Path, database_url: str, sandbox_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return exported_env(sandbox_factory, tmp_path, database_url, monkeypatch, COLUMNS="80")


def _set(db: Database, key: str, **values: Any) -> None:
    with db.session() as s:
        row = s.exec(select(Customer).where(Customer.key == key)).one()
        for k, v in values.items():
            setattr(row, k, v)
        s.add(row)
        s.commit()


def test_out_of_stage_send_is_refused_naming_the_stage(env: dict[str, Any], db: Database,
                                                      tmp_path: Path, cli: Any) -> None:
    seed(db, tmp_path, 1)  # K0000 is in `invited`
    for message, stage in (("cancel_instructions", "awaiting_cancellation"),
                           ("transition_complete", "completed"), ("kickoff", "announced")):
        r = cli("send", "K0000", "--message", message, "--yes", "--now", NOW)
        assert r.exit_code == 1, r.output
        assert f"{message} belongs to stage {stage!r}; K0000 is in stage 'invited'" in r.stderr
        assert "--force --note" in r.stderr
    no_note = cli("send", "K0000", "--message", "cancel_instructions", "--force", "--yes")
    assert no_note.exit_code == 2 and "--force needs --note" in no_note.stderr
    assert env["sandbox"].sent() == []
    with db.session() as s:
        assert s.exec(select(Message)).all() == []


def test_forced_send_is_recorded_and_the_staged_message_still_goes_out(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    seed(db, tmp_path, 1)
    forced = cli("send", "K0000", "--message", "cancel_instructions", "--force", "--note",
                 "customer asked for the steps early", "--yes", "--now", NOW)
    assert forced.exit_code == 0, forced.output
    assert len(env["sandbox"].sent()) == 1
    with db.session() as s:
        rows = s.exec(select(Message).where(Message.message == "cancel_instructions")).all()
        events = s.exec(select(StageEvent).where(StageEvent.kind == "forced_send")).all()
    assert [(m.sequence, m.status) for m in rows] == [(-1, "sent")]
    assert "forced out of stage invited: customer asked for the steps early" in rows[0].note
    assert len(events) == 1 and "customer asked for the steps early" in events[0].note
    # The customer reaches the stage later: its staged cancel_instructions still goes out.
    for stage in ("approved", "awaiting_cancellation"):
        moved = cli("customers", "set-stage", "K0000", stage, "--yes", "--now", NOW)
        assert moved.exit_code == 0, moved.output
    run = cli("run", "--now", "2026-12-02T10:00:00+00:00", "--json")
    assert run.exit_code == 0, run.output
    with db.session() as s:
        got = s.exec(select(Message.sequence, Message.status)
                     .where(Message.message == "cancel_instructions")).all()
    assert sorted(got) == [(-1, "sent"), (0, "sent")]
    # The forced one and the staged one (approved was passed through before any run).
    assert len(env["sandbox"].sent()) == 2


def test_send_shows_local_time_window_and_locale_fallback(env: dict[str, Any], db: Database,
                                                         tmp_path: Path, cli: Any) -> None:
    seed(db, tmp_path, 1)
    _set(db, "K0000", locale="fr", time_zone="America/New_York")
    r = cli("send", "K0000", "--dry-run", "--now", "2026-12-01T12:00:00+00:00")
    assert r.exit_code == 0, r.output
    assert ("K0000: local time Tue 2026-12-01 07:00 (America/New_York), OUTSIDE the send "
            "window; no 'fr' template, falls back to 'en'") in r.stdout
    inside = cli("send", "K0000", "--dry-run", "--now", "2026-12-01T15:00:00+00:00")
    assert "10:00 (America/New_York), inside the send window" in inside.stdout
    # Shown before the question, and nothing is sent on "no".
    # Shown before the confirmation; without a terminal and --yes it stops there (usage: 2).
    asked = cli("send", "K0000", "--now", "2026-12-01T15:00:00+00:00")
    assert "inside the send window" in asked.stdout
    assert asked.exit_code == 2 and "Send 1 message? Refusing" in asked.stderr
    assert env["sandbox"].sent() == []


def test_a_run_warns_when_no_holiday_is_left(env: dict[str, Any], db: Database,
                                             tmp_path: Path, cli: Any) -> None:
    seed(db, tmp_path, 1)
    quiet = cli("run", "--dry-run", "--now", NOW)
    assert "holidays" not in quiet.output
    late = cli("run", "--dry-run", "--now", "2028-01-04T10:00:00+00:00")
    assert late.exit_code == 0, late.output
    assert "warning: [window] holidays in the campaign lists no date after 2028-01-04" \
        in late.output


def test_dry_run_lists_who_gets_what_when(env: dict[str, Any], db: Database, tmp_path: Path,
                                         cli: Any) -> None:
    seed(db, tmp_path, 3)
    _set(db, "K0002", time_zone="Asia/Tokyo")  # 19:00 in Tokyo: deferred to tomorrow 09:00
    r = cli("run", "--dry-run", "--now", NOW)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines if "│" in line)
    assert any("K0000" in x and "partner_invitation" in x and "2026-12-01 10:00 GMT" in x
               for x in lines)
    assert any("K0002" in x and "2026-12-02 09:00 JST" in x for x in lines)
    assert ("Dry run: 2 messages would be queued now for 3 customers (1 more when the send "
            "window opens)") in r.stdout
    assert "Forecast: 3 at 60 a minute: under a minute (mailbox rate binds)." in r.stdout
    assert "Nothing was queued" not in r.stdout and "This was a dry run" in r.stdout
    data = json.loads(cli("run", "--dry-run", "--now", NOW, "--json").stdout)
    rows = {(m["customer"], m["message"]): m for m in data["messages"]}
    assert rows[("K0002", "partner_invitation")]["send_after_local"] == \
        "2026-12-02T09:00:00+09:00"
    assert rows[("K0000", "partner_invitation")]["recipients"] == ["admin0@customer0.example"]
    assert rows[("K0000", "partner_invitation")]["locale"] == "en"
    assert data["forecast"]["binding"] == "mailbox rate"
    with db.session() as s:
        assert s.exec(select(Message)).all() == []


def test_dry_run_forecast_names_the_tenant_budget_when_it_binds(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(db, tmp_path, 30)
    monkeypatch.setenv("COMMS_TENANT_EXTERNAL_RECIPIENTS_PER_DAY", "20")
    monkeypatch.setenv("COMMS_TENANT_SHARE", "0.5")
    r = cli("run", "--dry-run", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert ("Forecast: 30 external recipients at 10 a day: about 3.0 days (tenant budget "
            "binds).") in r.stdout


def test_set_stage_dry_run_names_the_messages(env: dict[str, Any], db: Database,
                                             tmp_path: Path, cli: Any) -> None:
    seed(db, tmp_path, 1)
    r = cli("customers", "set-stage", "K0000", "approved", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "would send" in r.stdout and "lose_access_warning" in r.stdout
    assert "Dry run: 1 customer would move to approved; nothing changed." in r.stdout


def test_demo_refuses_a_folder_it_did_not_create(tmp_path: Path, cli: Any) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work", encoding="utf-8")
    r = cli("demo", "--dir", str(mine))
    assert r.exit_code == 2
    assert "is not empty and was not created by `comms demo`" in r.stderr
    assert (mine / "thesis.txt").read_text(encoding="utf-8") == "years of work"
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]


def test_demo_workdir_is_marked_and_reused(tmp_path: Path) -> None:
    from comms.services.demo import MARKER, prepare_workdir

    work = tmp_path / "demo"
    prepare_workdir(work)
    (work / "old.db").write_text("x", encoding="utf-8")
    prepare_workdir(work)  # an earlier demo's folder: wiped and marked again
    assert sorted(p.name for p in work.iterdir()) == [MARKER]


def test_version(cli: Any) -> None:
    from comms import __version__

    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"comms {__version__}"


def test_usage_refusals_exit_2(env: dict[str, Any], db: Database, tmp_path: Path,
                               cli: Any) -> None:
    seed(db, tmp_path, 2)
    both = cli("customers", "set-stage", "K0000", "approved", "--where-stage", "invited")
    assert both.exit_code == 2 and "not both" in both.stderr
    no_yes = cli("customers", "set-stage", "K0000", "K0001", "approved")
    assert no_yes.exit_code == 2 and "add --yes" in no_yes.stderr


def test_tables_keep_keys_whole_at_80_columns(env: dict[str, Any], db: Database,
                                              tmp_path: Path, cli: Any) -> None:
    seed(db, tmp_path, 2)
    long_key = "CUSTOMER-000123456789"
    with db.session() as s:
        row = s.exec(select(Customer).where(Customer.key == "K0000")).one()
        row.key = long_key
        s.add(row)
        s.commit()
    r = cli("run", "--dry-run", "--now", NOW)
    assert long_key in r.stdout and all(len(x) <= 80 for x in r.stdout.splitlines() if "│" in x)
    moved = cli("customers", "set-stage", long_key, "K0001", "approved", "--dry-run")
    assert long_key in moved.stdout
    listed = cli("customers", "list")
    assert long_key in listed.stdout
    assert all(len(x) <= 80 for x in listed.stdout.splitlines() if "│" in x)
    assert cli("run", "--now", NOW, "--limit", "0").exit_code == 0
    queued = cli("outbox", "list")
    assert long_key in queued.stdout
    assert all(len(x) <= 80 for x in queued.stdout.splitlines() if "│" in x)


def test_plurals() -> None:
    assert plural(1, "message") == "1 message" and plural(2, "message") == "2 messages"
    assert plural(1, "licence") == "1 licence" and plural(1_240, "customer") == "1,240 customers"
    assert plural(1, "mailbox") == "1 mailbox" and plural(3, "mailbox") == "3 mailboxes"
    assert human_minutes(0.2) == "under a minute"
    assert human_minutes(1.2) == "about 1 minute" and human_minutes(21) == "about 21 minutes"
    assert human_minutes(150) == "about 2.5 hours" and human_minutes(1.7 * 1440) == \
        "about 1.7 days"


def test_every_file_output_takes_out(db: Database, tmp_path: Path, cli: Any) -> None:
    """Issue 11: `--out FILE` for every file output (the positional FILE still works)."""
    seed(db, tmp_path, 2)
    outputs = [(("customers", "export"), "c.csv"), (("outbox", "export"), "o.csv"),
               (("report",), "r.html")]
    if db.is_sqlite:  # `db backup` copies SQLite ledgers (PostgreSQL: pg_dump)
        outputs.append((("db", "backup"), "b.db"))
    for args, name in outputs:
        target = tmp_path / "out" / name
        target.parent.mkdir(exist_ok=True)
        r = cli(*args, "--out", str(target))
        assert r.exit_code == 0, (args, r.output)
        assert target.exists() and target.stat().st_size > 0, args
    both = cli("customers", "export", str(tmp_path / "a.csv"), "--out", str(tmp_path / "b.csv"))
    assert both.exit_code == 2 and "Give the file once" in both.stderr
    neither = cli("outbox", "export")
    assert neither.exit_code == 2 and "--out FILE" in neither.stderr
    shown = json.loads(cli("customers", "show", "K0001", "--json").stdout)
    assert shown["key"] == "K0001" and isinstance(shown["timeline"], list)


def test_no_file_output_replaces_the_ledger(db: Database, tmp_path: Path, cli: Any) -> None:
    """An export, report, backup or preview written to the SQLite ledger or its -wal, -shm or
    -journal file (by any spelling of the path) is refused with exit 2 and nothing written;
    overwriting an earlier report or export stays allowed (cron rewrites the same file)."""
    seed(db, tmp_path, 2)
    if db.is_sqlite:
        _refused_over_the_ledger(db, tmp_path, cli)
    else:  # PostgreSQL: the ledger is no file on this host; nothing to refuse
        assert db.ledger_files() == ()
    assert "K0001" in cli("customers", "list").stdout
    report = tmp_path / "daily" / "report.html"
    for _ in range(2):  # the same path every day
        assert cli("report", "--out", str(report)).exit_code == 0
        assert cli("outbox", "export", "--out", str(report.with_suffix(".csv"))).exit_code == 0


def _refused_over_the_ledger(db: Database, tmp_path: Path, cli: Any) -> None:
    """Every file output aimed at the SQLite ledger or a companion, by any spelling: exit 2,
    nothing written."""
    ledger = Path(db.engine.url.database or "")
    (tmp_path / "link").symlink_to(ledger.parent, target_is_directory=True)
    companions = [ledger.with_name(ledger.name + c) for c in ("-wal", "-shm", "-journal")]
    before = {p: p.read_bytes() for p in companions if p.exists()}
    spellings = [str(ledger), str(tmp_path / "link" / ledger.name),
                 str(ledger.parent / ".." / ledger.parent.name / ledger.name),
                 *map(str, companions)]
    commands = [("outbox", "export", "--out"), ("report", "--out"),
                ("customers", "export", "--out"), ("db", "backup", "--force", "--out"),
                ("preview", "K0000", "--message", "kickoff", "--out")]
    for args in commands:
        for target in spellings:
            r = cli(*args, target)
            assert r.exit_code == 2, (args, target, r.output)
            assert "Refusing to write" in r.stderr and "destroy the ledger" in r.stderr, r.stderr
    assert ledger.read_bytes().startswith(b"SQLite format 3")
    assert not companions[2].exists()  # no -journal file was made up
    for p, data in before.items():
        assert not p.exists() or p.read_bytes()[:4] == data[:4], p
