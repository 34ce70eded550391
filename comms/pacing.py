"""Pacing per sender mailbox, shared by every process through the database.

Exchange Online allows each mailbox about 30 messages a minute, 4 concurrent requests and 10,000
recipients a rolling day. Each send takes a *slot* (a ``send_slots`` row) before its request and
gives it back after; a slot is granted only when, for that mailbox,

- fewer than ``max_concurrent`` requests are in flight (sends and Sent Items lookups alike:
  Exchange counts every request against the mailbox's concurrency). A request is in flight
  until it finished, or until its lease ran out (a killed worker); a request we gave up on
  (client timeout) stays in flight until Exchange can no longer be working on it
  (``release(..., in_flight_until=...)``),
- the last start is at least ``interval`` ago (60 s / messages_per_minute, a little slack), and
  fewer than ``messages_per_minute`` slots started in the last minute,
- the recipients of the last day plus this message stay within ``recipients_per_day``,
- Graph has not throttled the mailbox (``blocked_until``),
- and, tenant-wide across every mailbox, worker and host: the external recipients of the last
  day plus this message's stay within the partner tenant's budget (a share of Exchange's
  tenant external recipient rate limit, TERRL; ``TenantBudget``).

Decisions are serialised per database: SQLite takes its write lock at BEGIN (``immediate``),
PostgreSQL locks the mailbox row ``FOR UPDATE``. So N workers on N hosts never exceed a limit.
Time here is always the real clock (Exchange's limits are real time), scaled by ``time_scale``
only against the sandbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from comms.config import SenderSettings, Settings
from comms.store.models import SenderMailbox, SendSlot

# Aim just under the limit: requests leave here at exact intervals but reach Exchange with
# jitter, and a request that lands early in Exchange's window costs a 429 and a wait.
RATE_SLACK = 1.02
MINUTE = 60.0
DAY = 86_400.0


@dataclass(frozen=True)
class Slot:
    id: int
    mailbox: str


SEND = "send"  # a sendMail request: rate, recipients and concurrency
LOOKUP = "lookup"  # a Sent Items read: concurrency only


@dataclass(frozen=True)
class Wait:
    """No slot now; the earliest moment one may free up (None: blocked by in-flight sends)."""

    until: datetime | None
    reason: str


@dataclass(frozen=True)
class TenantBudget:
    """External recipients the whole partner tenant may send per rolling (scaled) day."""

    per_day: int
    accepted_domains: frozenset[str]
    time_scale: float = 1.0

    @property
    def day(self) -> timedelta:
        return timedelta(seconds=DAY * self.time_scale)

    def external(self, addresses: Sequence[str]) -> int:
        """How many of ``addresses`` Exchange counts toward the tenant limit."""
        return sum(1 for a in addresses
                   if a.rsplit("@", 1)[-1].lower() not in self.accepted_domains)

    @classmethod
    def of(cls, settings: Settings) -> TenantBudget:
        return cls(settings.tenant.budget, settings.accepted_domains,
                   settings.delivery.time_scale)


@dataclass(frozen=True)
class Limits:
    mailbox: str
    messages_per_minute: int
    max_concurrent: int
    recipients_per_day: int
    time_scale: float = 1.0
    tenant: TenantBudget | None = None

    @property
    def minute(self) -> timedelta:
        return timedelta(seconds=MINUTE * self.time_scale)

    @property
    def day(self) -> timedelta:
        return timedelta(seconds=DAY * self.time_scale)

    @property
    def interval(self) -> timedelta:
        return timedelta(seconds=MINUTE * self.time_scale * RATE_SLACK / self.messages_per_minute)

    @classmethod
    def of(cls, sender: SenderSettings, time_scale: float,
           tenant: TenantBudget | None = None) -> Limits:
        return cls(
            sender.address, sender.messages_per_minute, sender.max_concurrent,
            sender.recipients_per_day, time_scale, tenant,
        )


def ensure_mailboxes(session: Session, addresses: Sequence[str]) -> None:
    existing = set(session.exec(select(SenderMailbox.address)).all())
    for address in addresses:
        if address not in existing:
            session.add(SenderMailbox(address=address))
    session.flush()


def _lock_mailbox(session: Session, mailbox: str) -> SenderMailbox | None:
    stmt = select(SenderMailbox).where(SenderMailbox.address == mailbox)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return session.exec(stmt).first()


def in_flight(session: Session, mailbox: str, now: datetime) -> int:
    """Requests that may still be running at Exchange for ``mailbox``."""
    return int(session.exec(
        select(sa.func.count()).select_from(SendSlot).where(
            col(SendSlot.mailbox) == mailbox,
            sa.func.coalesce(col(SendSlot.finished_at), col(SendSlot.lease_until)) > now,
        )
    ).one())


def mailbox_wait(session: Session, limits: Limits, *, now: datetime, kind: str = SEND
                 ) -> Wait | None:
    """Lock the mailbox's row and check what needs no message: Graph's block, concurrency and,
    for a ``SEND``, the rate. A ``Wait`` if any binds now, else None (the lock is kept until
    the transaction ends, so the answer stays true for ``try_acquire`` in the same session).

    A claim asks this first: when a mailbox is at its limit (most of the time, with many
    workers) the answer costs three small queries and no message row is touched."""
    box = _lock_mailbox(session, limits.mailbox)
    if box is None:
        box = SenderMailbox(address=limits.mailbox)
        session.add(box)
        session.flush()
    if box.blocked_until is not None and box.blocked_until > now:
        return Wait(box.blocked_until, "throttled by Graph")
    if in_flight(session, limits.mailbox, now) >= limits.max_concurrent:
        return Wait(None, "concurrency limit")
    if kind == LOOKUP:
        return None
    recent = session.exec(
        select(SendSlot.started_at)
        .where(col(SendSlot.mailbox) == limits.mailbox,
               col(SendSlot.started_at) > now - limits.minute, col(SendSlot.kind) == SEND)
        .order_by(col(SendSlot.started_at).desc())
    ).all()
    if recent:
        next_by_interval = recent[0] + limits.interval
        if next_by_interval > now:
            return Wait(next_by_interval, "rate limit")
        if len(recent) >= limits.messages_per_minute:
            oldest_in_window = recent[limits.messages_per_minute - 1]
            return Wait(oldest_in_window + limits.minute, "rate limit")
    return None


def try_acquire(
    session: Session, limits: Limits, *, now: datetime, lease: timedelta, recipients: int = 1,
    kind: str = SEND, external: int = 0, checked: bool = False,
) -> Slot | Wait:
    """Take a slot on one mailbox if its limits allow (call inside an immediate session).

    A ``LOOKUP`` slot counts toward concurrency only; a ``SEND`` slot toward every limit.
    ``checked``: ``mailbox_wait`` already answered None in this session."""
    if not checked:
        wait = mailbox_wait(session, limits, now=now, kind=kind)
        if wait is not None:
            return wait
    if kind == LOOKUP:
        return _grant(session, limits, now=now, lease=lease, recipients=0, kind=LOOKUP)
    is_send = col(SendSlot.kind) == SEND
    day_recipients = session.exec(
        select(sa.func.coalesce(sa.func.sum(SendSlot.recipients), 0)).where(
            col(SendSlot.mailbox) == limits.mailbox, col(SendSlot.started_at) > now - limits.day,
            is_send,
        )
    ).one()
    if int(day_recipients) + recipients > limits.recipients_per_day:
        first = session.exec(
            select(sa.func.min(SendSlot.started_at)).where(
                col(SendSlot.mailbox) == limits.mailbox,
                col(SendSlot.started_at) > now - limits.day, is_send,
            )
        ).one()
        return Wait((first or now) + limits.day, "daily recipient limit")
    if external and limits.tenant is not None:
        wait = _tenant_wait(session, limits.tenant, now=now, external=external)
        if wait is not None:
            return wait
    return _grant(session, limits, now=now, lease=lease, recipients=recipients, kind=SEND,
                  external=external)


TENANT_LOCK = 0x636F6D6D73  # PostgreSQL advisory lock key for the tenant-wide budget ("comms")


def _tenant_wait(session: Session, tenant: TenantBudget, *, now: datetime,
                 external: int) -> Wait | None:
    """None if ``external`` more external recipients fit the tenant's rolling day."""
    if session.get_bind().dialect.name == "postgresql":
        # Claims on different mailboxes lock different mailbox rows: the tenant-wide sum
        # needs one lock of its own (taken after the mailbox's, always in that order).
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(TENANT_LOCK)))
    since = now - tenant.day
    window = session.exec(
        select(SendSlot.started_at, SendSlot.external)
        .where(col(SendSlot.started_at) > since, col(SendSlot.external) > 0)
        .order_by(col(SendSlot.started_at))
    ).all()
    used = sum(n for _, n in window)
    if used + external <= tenant.per_day:
        return None
    freed = 0
    for started, n in window:  # the moment enough of the window has aged out
        freed += n
        if used - freed + external <= tenant.per_day:
            return Wait(started + tenant.day, "tenant external-recipient budget")
    return Wait(now + tenant.day, "tenant external-recipient budget")


def tenant_usage(session: Session, tenant: TenantBudget, *, now: datetime
                 ) -> tuple[int, datetime | None]:
    """External recipients sent in the rolling day, and when the oldest of them ages out."""
    since = now - tenant.day
    used, oldest = session.exec(
        select(sa.func.coalesce(sa.func.sum(SendSlot.external), 0),
               sa.func.min(SendSlot.started_at))
        .where(col(SendSlot.started_at) > since, col(SendSlot.external) > 0)
    ).one()
    return int(used), (oldest + tenant.day if oldest is not None else None)


def _grant(session: Session, limits: Limits, *, now: datetime, lease: timedelta,
           recipients: int, kind: str, external: int = 0) -> Slot:
    slot = SendSlot(mailbox=limits.mailbox, started_at=now, lease_until=now + lease,
                    recipients=recipients, kind=kind, external=external)
    session.add(slot)
    session.flush()
    assert slot.id is not None
    return Slot(slot.id, limits.mailbox)


def release(session: Session, slot: Slot, *, now: datetime, message_id: int | None = None,
            in_flight_until: datetime | None = None) -> None:
    """The request ended. ``in_flight_until``: we stopped waiting (client timeout) but Exchange
    may still be working on it until then, so it keeps counting toward concurrency."""
    finished = max(now, in_flight_until) if in_flight_until is not None else now
    session.execute(
        sa.update(SendSlot)
        .where(col(SendSlot.id) == slot.id)
        .values(finished_at=finished, message_id=message_id)
    )


def block(session: Session, mailbox: str, until: datetime) -> None:
    """Graph throttled this mailbox: nobody sends from it before ``until``."""
    box = _lock_mailbox(session, mailbox)
    if box is None:
        session.add(SenderMailbox(address=mailbox, blocked_until=until))
    elif box.blocked_until is None or box.blocked_until < until:
        box.blocked_until = until
        session.add(box)
    session.flush()


def prune(session: Session, *, now: datetime, keep: timedelta) -> int:
    """Forget finished slots older than ``keep`` (they no longer count toward any window)."""
    result = session.execute(
        sa.delete(SendSlot).where(
            col(SendSlot.started_at) < now - keep,
            sa.func.coalesce(col(SendSlot.finished_at), col(SendSlot.lease_until)) < now,
        )
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def forecast_minutes(messages: int, senders: Sequence[SenderSettings]) -> float:
    """Minutes to send ``messages`` at the mailboxes' combined rate (for dry-run forecasts)."""
    per_minute = sum(s.messages_per_minute for s in senders) / RATE_SLACK
    return messages / per_minute if per_minute else float("inf")
