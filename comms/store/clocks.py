"""Is this host's clock close enough to the database server's?

Leases, ``unknown_since``, pacing slots and the reconciliation grace are written and compared on
each host's own clock. With workers on several hosts sharing one PostgreSQL database, a host
whose clock runs ahead sees another host's lease as expired, or its unclear send as past its
grace, before it is: it looks the send id up in Sent Items before the first copy can show there,
and sends the message again. So a host whose clock is off refuses to dispatch. SQLite lives on
the dispatching host itself: one clock, nothing to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from comms.errors import ClockSkewed
from comms.store.db import Database

# Far below the shortest lease and grace period (two request timeouts), far above what NTP
# keeps a synchronised host to (milliseconds).
MAX_CLOCK_SKEW = timedelta(seconds=5)
_SAMPLES = 3  # readings taken; the one with the shortest round trip counts


@dataclass(frozen=True)
class ClockReading:
    """The host's clock just ``before`` and ``after`` asking the database server its time."""

    before: datetime
    database: datetime
    after: datetime

    @property
    def host(self) -> datetime:
        """The host's time when the server read its clock (at best guess: the midpoint)."""
        return self.before + (self.after - self.before) / 2

    @property
    def skew(self) -> timedelta:
        """Database time minus host time: negative when the host's clock is ahead."""
        return self.database - self.host

    @property
    def uncertainty(self) -> timedelta:
        """Half the round trip: the server read its clock somewhere in it."""
        return (self.after - self.before) / 2


def skew_problem(reading: ClockReading, max_skew: timedelta = MAX_CLOCK_SKEW) -> str:
    """Why this host may not dispatch, or "" when its clock agrees with the database's within
    ``max_skew`` (allowing for the round trip of the question)."""
    off = abs(reading.skew)
    if off - reading.uncertainty <= max_skew:
        return ""
    way = "ahead of" if reading.skew < timedelta(0) else "behind"
    return (
        f"This host's clock is {off.total_seconds():.1f} s {way} the database server's "
        f"(host {_utc(reading.host)}, database {_utc(reading.database)}; at most "
        f"{max_skew.total_seconds():g} s allowed). Leases and the wait before an unclear send is "
        "looked up in Sent Items are judged on each host's clock, so a worker on this host could "
        "send a message twice. Synchronise the clocks of this host and of the database server "
        "with NTP (chrony or systemd-timesyncd; `chronyc tracking` or `timedatectl` shows the "
        "state), then start again."
    )


def _utc(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def read_clocks(db: Database, host_clock: Callable[[], datetime]) -> ClockReading | None:
    """The database server's clock against ``host_clock``; None on SQLite (same host)."""
    if db.is_sqlite:
        return None
    best: ClockReading | None = None
    with db.session() as s:
        for _ in range(_SAMPLES):
            before = host_clock()
            # clock_timestamp(), not now(): now() is the start of the transaction.
            server = s.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
            after = host_clock()
            reading = ClockReading(before, server, after)
            if best is None or reading.uncertainty < best.uncertainty:
                best = reading
    return best


def check_clock(db: Database, host_clock: Callable[[], datetime], *,
                max_skew: timedelta = MAX_CLOCK_SKEW) -> ClockReading | None:
    """Raise ``ClockSkewed`` when ``host_clock`` and the PostgreSQL server's clock disagree by
    more than ``max_skew``; the reading (None on SQLite) otherwise."""
    reading = read_clocks(db, host_clock)
    if reading is not None:
        problem = skew_problem(reading, max_skew)
        if problem:
            raise ClockSkewed(problem)
    return reading


__all__ = ["MAX_CLOCK_SKEW", "ClockReading", "check_clock", "read_clocks", "skew_problem"]
