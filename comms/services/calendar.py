"""The local calendar of `comms status` and the report: day and ISO-week bounds in a time
zone, fractional days between instants, and the ``--now`` option of every command (a value
without an offset is local time in ``[defaults] time_zone``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from comms.errors import UsageError
from comms.timezones import zone

SECONDS_PER_DAY = 86_400.0

__all__ = ["aware_utc", "day_bounds", "days_between", "local_midnight", "parse_now",
           "week_bounds"]


def aware_utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError(f"naive datetime {now!r}; pass an aware one")
    return now.astimezone(UTC)


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    """The instant (UTC) local ``day`` begins in ``tz``."""
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def day_bounds(now: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """[start, end) of the local calendar day containing ``now``, in UTC."""
    today = now.astimezone(tz).date()
    return local_midnight(today, tz), local_midnight(today + timedelta(days=1), tz)


def week_bounds(now: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """[start, end) of the local ISO week (Monday 00:00 to next Monday 00:00), in UTC."""
    today = now.astimezone(tz).date()
    monday = today - timedelta(days=today.weekday())
    return local_midnight(monday, tz), local_midnight(monday + timedelta(days=7), tz)


def days_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() / SECONDS_PER_DAY


def parse_now(text: str | None, time_zone: str) -> datetime | None:
    """The one reading of every command's ``--now``: an ISO 8601 date-time as an aware UTC
    datetime; without an offset it is local time in ``time_zone`` (``[defaults] time_zone``:
    a partner's operator thinks in local time). None when not given (the real clock).
    """
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--now {text!r} is not an ISO 8601 date-time; use e.g. 2026-03-02T09:30 (read in "
            f"{time_zone}, [defaults] time_zone) or 2026-03-02T09:30:00+00:00."
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone(time_zone))
    check_now_range(value, text)
    return value.astimezone(UTC)


# Weeks, reminders and history are computed around --now: near datetime's limits (year 1 or
# 9999) that arithmetic overflows, so such a moment is refused as a usage error.
NOW_MIN, NOW_MAX = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)


def check_now_range(value: datetime, text: str) -> None:
    try:
        inside = NOW_MIN <= value <= NOW_MAX
    except OverflowError:
        inside = False
    if not inside:
        raise UsageError(
            f"--now {text!r} is out of range; give a moment between 1970 and 9000 "
            "(e.g. 2026-03-02T09:30)."
        )
