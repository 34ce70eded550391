"""The send window holds for every dispatcher but `comms send`'s own, and one customer's
unloadable time zone stops only that customer: real SQLite ledger, real Graph transport to the
sandbox over HTTPS, `comms run` through the CLI."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from engine_helpers import exported_env, statuses
from sqlmodel import col, select

from comms.campaign import load_campaign
from comms.config import load_settings
from comms.outbox import Clock
from comms.render import Renderer
from comms.services import one_off, sending
from comms.store.db import Database
from comms.store.models import Customer, Message

NY = "America/New_York"
LONDON = datetime(2024, 3, 5, 10, 0, tzinfo=UTC)  # a Tuesday, 10:00 in London


def ny(day: int, hour: int, minute: int = 0) -> datetime:
    """March 2024 in New York (the 5th is a Tuesday), as UTC."""
    return datetime(2024, 3, day, hour, minute, tzinfo=ZoneInfo(NY)).astimezone(UTC)


@pytest.fixture
def env(tmp_path: Path, database_url: str, sandbox_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return exported_env(sandbox_factory, tmp_path, database_url, monkeypatch)


def _import(cli: Any, tmp_path: Path, rows: list[tuple[str, str]], at: datetime) -> None:
    path = tmp_path / "customers.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "time_zone", "stage", "tags",
                    "primary_contact_name", "primary_contact_email"])
        for key, tz in rows:
            w.writerow([key, f"{key} Ltd", 5, tz, "invited", "w1", "Admin",
                        f"admin@{key.lower()}.example"])
    r = cli("customers", "import", str(path), "--now", at.isoformat())
    assert r.exit_code == 0, r.output


def _queue_one_off(db: Database, keys: list[str], at: datetime) -> list[int]:
    """What `comms send` queues before it dispatches; stopping it there (Ctrl-C, a crash)
    leaves the rows queued, as does a dispatch that runs out of time or meets a 429."""
    settings, campaign = load_settings(), load_campaign()
    plan = sending.prepare_send(db, settings, campaign, Renderer(settings), keys=keys,
                                tag=None, clock=Clock(at))
    return one_off.queue_prepared(db, plan.prepared, by="op", now=at)


def _rows(db: Database) -> dict[str, Message]:
    with db.session() as s:
        rows = s.exec(select(Message, Customer.key)
                      .join(Customer, col(Customer.id) == col(Message.customer_id))).all()
    return {k: m for m, k in rows}


def test_a_leftover_of_comms_send_waits_for_the_customers_send_window(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(cli, tmp_path, [("NY1", NY)], ny(5, 10))
    assert len(_queue_one_off(db, ["NY1"], ny(5, 10))) == 1  # queued 10:00 New York
    # The next cron run comes at 03:00 New York time: it sent the leftover there and then.
    r = cli("run", "--now", ny(6, 3).isoformat(), "--json")
    assert r.exit_code == 0, r.output
    assert env["sandbox"].sent() == [], f"sent at 03:00 New York time: {statuses(db)}"
    assert json.loads(r.stdout)["moved_to_next_window"] == 1
    row = _rows(db)["NY1"]
    assert row.status == "queued" and row.send_after == ny(6, 9)  # when the window opens
    r = cli("run", "--now", ny(6, 9, 5).isoformat(), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["sent"] == 1
    assert len(env["sandbox"].sent()) == 1


def test_a_leftover_goes_out_later_in_the_window_it_was_queued_in(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(cli, tmp_path, [("NY1", NY)], ny(5, 10))
    _queue_one_off(db, ["NY1"], ny(5, 10))
    assert _rows(db)["NY1"].send_before == ny(5, 17)  # the window's end that day
    r = cli("run", "--now", ny(5, 14).isoformat(), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["sent"] == 1, r.output


def test_comms_send_outside_the_window_still_sends_at_once_but_not_its_leftover(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(cli, tmp_path, [("NY1", NY), ("NY2", NY)], ny(5, 10))
    # The operator decided: the immediate send goes out at 03:00.
    r = cli("send", "NY1", "--yes", "--now", ny(6, 3).isoformat())
    assert r.exit_code == 0, r.output
    assert "OUTSIDE the send window" in r.stdout and "sent 1, failed 0" in r.stdout
    assert [m["to"][0] for m in env["sandbox"].sent()] == ["admin@ny1.example"]
    # The same decision for NY2, stopped before its dispatch: a run half an hour later holds
    # it to 09:00 (the operator's "now" covers the command's own dispatch, not the night).
    _queue_one_off(db, ["NY2"], ny(6, 3))
    assert _rows(db)["NY2"].send_before == ny(6, 3, 10)
    r = cli("run", "--now", ny(6, 3, 30).isoformat(), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["sent"] == 0, r.output
    assert _rows(db)["NY2"].send_after == ny(6, 9)
    assert len(env["sandbox"].sent()) == 1


def _break_zone(db: Database, key: str, **values: Any) -> None:
    with db.session() as s:
        s.execute(sa.update(Customer).where(col(Customer.key) == key)
                  .values(time_zone="Mars/Base", **values))


def test_an_unloadable_time_zone_skips_that_customer_only(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(cli, tmp_path, [("A", "Europe/London"), ("B", "Europe/London")], LONDON)
    _break_zone(db, "A")  # tzdata older on the cron host, or an edited row
    with db.session() as s:
        due_before = s.exec(select(Customer.next_due_at).where(Customer.key == "A")).one()
    r = cli("run", "--now", LONDON.isoformat(), "--json")
    assert r.exit_code == 1, r.output  # a problem to look at, not a configuration error (3)
    data = json.loads(r.stdout)
    assert data["sent"] == 1 and data["customers_planned"] == 1
    assert [m["to"][0] for m in env["sandbox"].sent()] == ["admin@b.example"]
    [problem] = data["time_zone_problems"]
    assert problem["customer"] == "A" and "Mars/Base" in problem["error"]
    assert problem["fix"] == "re-import with a valid time_zone"
    with db.session() as s:
        assert s.exec(select(Customer.next_due_at).where(Customer.key == "A")).one() == due_before
    text = cli("run", "--now", (LONDON + timedelta(minutes=5)).isoformat())
    assert text.exit_code == 1
    assert "skipped A: Unknown time zone 'Mars/Base'" in text.stderr
    assert "re-import with a valid time_zone" in text.stderr


def test_an_unloadable_time_zone_holds_that_customers_queued_mail_only(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(cli, tmp_path, [("A", "Europe/London"), ("B", "Europe/London")], LONDON)
    _queue_one_off(db, ["A"], LONDON)  # a leftover of `comms send`, until 17:00 London
    # Planning does not see A (not due); the dispatcher's window check needs its local time.
    _break_zone(db, "A", next_due_at=LONDON + timedelta(days=30))
    next_day = LONDON + timedelta(days=1)
    r = cli("run", "--now", next_day.isoformat(), "--json")
    assert r.exit_code == 1, r.output
    data = json.loads(r.stdout)
    assert [m["to"][0] for m in env["sandbox"].sent()] == ["admin@b.example"]
    assert [p["customer"] for p in data["time_zone_problems"]] == ["A"]
    row = _rows(db)["A"]
    held = next_day + timedelta(hours=1)  # looked at again in an hour (the clock runs on)
    assert row.status == "queued" and held <= row.send_after < held + timedelta(minutes=1)
    assert "re-import customer A with a valid time_zone" in row.last_error


def test_wave_stage_and_send_commands_name_the_customer_with_an_unloadable_time_zone(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    """A command that looks at customers one by one stops, naming the customer and the fix
    (it used to say only "Unknown time zone 'Mars/Base'", whoever's it was)."""
    _import(cli, tmp_path, [("A", "Europe/London"), ("B", "Europe/London")], LONDON)
    _break_zone(db, "A")
    now = ("--now", LONDON.isoformat())
    for args in (("wave", "list"), ("wave", "proof", "w1", "--to", "op@partner.example", *now),
                 ("customers", "set-stage", "A", "approved", "--dry-run", *now),
                 ("send", "A", "--dry-run", *now)):
        r = cli(*args)
        assert r.exit_code == 3, (args, r.output)
        assert "Customer A: Unknown time zone 'Mars/Base'" in r.output, (args, r.output)
        assert "re-import with a valid time_zone" in r.output, (args, r.output)
    assert env["sandbox"].sent() == []
