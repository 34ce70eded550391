"""Workers on several hosts judge leases, `unknown_since` and the reconcile grace on their own
clocks: a host whose clock runs ahead would look an unclear send up in Sent Items before the
first copy can show there, and send it again. A dispatcher on PostgreSQL therefore compares its
host's clock with the database server's and refuses to dispatch when they disagree.

The host clock is injected (``Clock.real`` shifted), the database's is PostgreSQL's own
``clock_timestamp()``. On SQLite (the database is a file on the dispatching host) the same
tests check that nothing is compared and a shifted clock dispatches.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import factories
import pytest
from engine_helpers import TEST_PARTNER_ID
from sandbox_fixtures import SandboxApp
from test_outbox import status_of

from comms.campaign import load_campaign
from comms.config import Settings
from comms.delivery.outbox_dir import OutboxDirTransport
from comms.errors import ClockSkewed
from comms.outbox import Clock, Dispatcher
from comms.sandbox import Sandbox
from comms.services import worker
from comms.store.clocks import ClockReading, check_clock, skew_problem
from comms.store.db import Database, open_database

T = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
AHEAD = timedelta(seconds=45)


# --- the comparison ------------------------------------------------------------------------


def _reading(host_offset: float, round_trip: float = 0.02) -> ClockReading:
    """The server read ``T``; the host's clock read ``host_offset`` s off, around it."""
    mid = T + timedelta(seconds=host_offset)
    half = timedelta(seconds=round_trip / 2)
    return ClockReading(before=mid - half, database=T, after=mid + half)


def test_skew_is_database_time_minus_the_midpoint_of_the_host_readings() -> None:
    reading = ClockReading(before=T, database=T + timedelta(seconds=1),
                           after=T + timedelta(seconds=2))
    assert reading.skew == timedelta(0)
    assert reading.uncertainty == timedelta(seconds=1)
    assert _reading(45).skew == -AHEAD  # host ahead: the database is behind it
    assert _reading(-7).skew == timedelta(seconds=7)


def test_clocks_within_the_bound_dispatch() -> None:
    assert skew_problem(_reading(0)) == ""
    assert skew_problem(_reading(4.9)) == ""
    assert skew_problem(_reading(-4.9)) == ""
    # 6 s apart as read, but the server read its clock somewhere in a 4 s round trip.
    assert skew_problem(_reading(6, round_trip=4)) == ""


def test_a_host_clock_ahead_is_refused_with_both_clocks_and_the_fix() -> None:
    problem = skew_problem(_reading(45))
    assert problem.startswith(
        "This host's clock is 45.0 s ahead of the database server's (host 2026-12-02 "
        "08:00:45.000 UTC, database 2026-12-02 08:00:00.000 UTC; at most 5 s allowed).")
    assert "a worker on this host could send a message twice" in problem
    assert "with NTP (chrony or systemd-timesyncd" in problem
    assert skew_problem(_reading(6, round_trip=0.1)) != ""


def test_a_host_clock_behind_is_refused_too() -> None:
    problem = skew_problem(_reading(-30), max_skew=timedelta(seconds=10))
    assert problem.startswith("This host's clock is 30.0 s behind the database server's (")
    assert "at most 10 s allowed" in problem


def test_sqlite_is_on_this_host_and_is_not_compared(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        assert check_clock(db, lambda: datetime.now(UTC) + timedelta(days=1)) is None
    finally:
        db.dispose()


# --- the dispatcher: refused on PostgreSQL, nothing to compare on SQLite --------------------


class HostClock(Clock):
    """This host's clock, ``skew`` away from true time (what an unsynchronised host reads)."""

    def __init__(self, start: datetime | None = None, skew: timedelta = AHEAD) -> None:
        super().__init__(start)
        self.skew = skew

    def now(self) -> datetime:
        return super().now() + self.skew

    def real(self) -> datetime:  # type: ignore[override]
        return datetime.now(UTC) + self.skew


def _settings(folder: Path) -> Settings:
    return Settings.model_validate({
        "senders": [{"address": "a@fabrikam.example"}],
        "delivery": {"transport": "outbox_dir", "outbox_dir": str(folder),
                     "time_scale": 0.001},
    })


def _queued(db: Database, key: str = "C1") -> int:
    return factories.queued(db, factories.customer(db, key, time_zone="UTC"), send_before=None)


def _sent(folder: Path) -> int:
    return len(list(folder.glob("*.eml"))) if folder.exists() else 0


def test_this_hosts_clock_agrees_with_the_database(db: Database) -> None:
    reading = check_clock(db, Clock.real)
    if db.is_sqlite:
        assert reading is None
    else:
        assert reading is not None and abs(reading.skew) < timedelta(seconds=1)


def test_dispatch_from_a_host_whose_clock_is_ahead_is_refused(
    db: Database, tmp_path: Path
) -> None:
    settings = _settings(tmp_path / "eml")
    mid = _queued(db)
    d = Dispatcher(db, settings, OutboxDirTransport(settings), clock=HostClock(factories.T0),
                   worker="hostB:1")
    if db.is_sqlite:  # one database file on this host: one clock
        assert d.run(deadline=time.monotonic() + 5).sent == 1
        return
    with pytest.raises(ClockSkewed) as info:
        d.run(deadline=time.monotonic() + 5)
    assert info.value.exit_code == 3
    assert str(info.value).startswith("This host's clock is 45.")
    assert "ahead of the database server's (host " in str(info.value)
    assert _sent(tmp_path / "eml") == 0
    row = status_of(db, mid)
    assert (row.status, row.attempts) == ("queued", 0)
    in_step = Dispatcher(db, settings, OutboxDirTransport(settings),
                         clock=HostClock(factories.T0, timedelta(0)), worker="hostA:1")
    assert in_step.run(deadline=time.monotonic() + 5).sent == 1


def test_a_worker_checks_again_while_it_runs(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first rounds pass; once the host's clock jumps, the next check stops the worker
    before the message queued meanwhile is sent."""
    monkeypatch.setattr("comms.outbox.dispatcher.CLOCK_CHECK_SECONDS", 0.0)
    settings = _settings(tmp_path / "eml")
    clock = HostClock(factories.T0, timedelta(0))
    stop = threading.Event()
    rounds: list[int] = []

    def on_round(report: worker.DispatchReport) -> None:
        rounds.append(report.sent)
        if len(rounds) == 2:
            clock.skew = AHEAD  # the host's clock jumps 45 s ahead
            _queued(db)
        if len(rounds) == 3:
            stop.set()

    def run() -> worker.WorkerTotals:
        return worker.run(db, settings, load_campaign(), OutboxDirTransport(settings),
                          clock=clock, max_minutes=1, stop=stop, on_round=on_round)

    if db.is_sqlite:
        assert run().sent == 1 and rounds == [0, 0, 1]
        return
    with pytest.raises(ClockSkewed, match=r"^This host's clock is 45\.\d s ahead"):
        run()
    assert rounds == [0, 0]
    assert _sent(tmp_path / "eml") == 0


def test_comms_worker_exits_3_naming_the_clocks(
    db: Database, sandbox: Sandbox, sandbox_app: SandboxApp, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {**sandbox_app.env, "COMMS_PARTNER_ID": TEST_PARTNER_ID}.items():
        monkeypatch.setenv(name, value)
    mid = _queued(db)
    monkeypatch.setattr(Clock, "real", staticmethod(lambda: datetime.now(UTC) + AHEAD))
    result = cli("worker", "--once")
    if db.is_sqlite:
        assert result.exit_code == 0, result.output
        assert status_of(db, mid).status == "sent" and len(sandbox.sent()) == 1
        return
    assert result.exit_code == 3
    assert "This host's clock is 45." in result.stderr
    assert "Synchronise the clocks of this host and of the database server" in result.stderr
    assert sandbox.sent() == []
    assert status_of(db, mid).status == "queued"
