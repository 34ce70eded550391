"""The outbox: queue, claim, dispatch, reconcile — the exactly-once loop of DESIGN.md §6.

A message row moves through these statuses::

    queued ──claim──> sending ──202──────────────> sent
      ^                 │  ├──definite rejection──> failed
      │                 │  ├──429 (not accepted)──> queued (send_after = now + Retry-After)
      │                 │  └──timeout/reset/5xx───> unknown
      │                 └──lease expired (worker killed)──> unknown
      │                                                       │
      └──── not in Sent Items after the grace period ─────────┤
                               found in Sent Items ──> sent ──┘
    queued ──stage change / opt-out──> withdrawn

1. Planning inserts rows with a unique key (customer, message, sequence), in the same
   transaction as the decision: planning twice cannot queue twice.
2. A claim takes a pacing slot and flips one row queued -> sending with a lease, in one
   transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's write lock otherwise).
3. Every request carries the row's send id (``x-comms-send-id`` and an extended property).
4. An ambiguous outcome is never retried blindly: the send id is looked up in the sender's Sent
   Items first; without Mail.Read the row waits for `comms outbox resolve`.

Leases, slots and the reconciliation grace run on the real clock; ``send_after``/``sent_at`` on
the run's clock (the real clock, or a simulated one with ``comms run --now``).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from comms import pacing, planner
from comms.campaign import SendWindow
from comms.config import Settings
from comms.delivery.base import (
    SEND_ID_HEADER,
    Address,
    LookupUnavailable,
    Outcome,
    OutgoingEmail,
    Reconciler,
    SendResult,
    Transport,
)
from comms.errors import CommsError, NotFound
from comms.store.db import Database
from comms.store.models import Customer, CustomerTag, Message, Suppression

PENDING = ("queued",)
# error_code of an `unknown` row that waits for an operator's `comms outbox resolve`.
HELD = "held_for_operator"
OPEN = ("queued", "sending", "unknown")


class Clock:
    """The run's clock: real time, or real time shifted to start at a simulated ``start``."""

    def __init__(self, start: datetime | None = None) -> None:
        self._offset = (start - datetime.now(UTC)) if start is not None else timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    @staticmethod
    def real() -> datetime:
        return datetime.now(UTC)


def _withdraw(session: Session, customer_id: int, reason: str, at: datetime,
              *conditions: Any) -> int:
    result = session.execute(
        sa.update(Message)
        .where(col(Message.customer_id) == customer_id, col(Message.status).in_(PENDING),
               *conditions)
        .values(status="withdrawn", last_error=reason, updated_at=at)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def withdraw_stale(session: Session, customer_id: int, stage: str, at: datetime) -> int:
    """Withdraw queued messages planned for another stage than ``stage`` (a stage change
    makes them moot: an approved customer gets no more invitation reminders)."""
    return _withdraw(session, customer_id, f"stage changed to {stage}", at,
                     col(Message.stage) != stage)


def withdraw_all_queued(session: Session, customer_id: int, reason: str, at: datetime) -> int:
    """Withdraw every queued message of a customer (opted out, lost)."""
    return _withdraw(session, customer_id, reason, at)


# --------------------------------------------------------------------------- queueing


def insert_messages(session: Session, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert planned rows; a row whose (customer, message, sequence) exists is skipped.
    Returns the ids of the rows inserted."""
    if not rows:
        return []
    dialect = session.get_bind().dialect.name
    table = Message.__table__  # type: ignore[attr-defined]
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(table).on_conflict_do_nothing(
            index_elements=["customer_id", "message", "sequence"]
        )
    else:
        stmt = sqlite.insert(table).on_conflict_do_nothing(
            index_elements=["customer_id", "message", "sequence"]
        )
    result = session.execute(stmt.returning(table.c.id), list(rows))
    return [int(i) for i in result.scalars().all()]


def addresses_json(items: Iterable[tuple[str, str]]) -> str:
    return json.dumps([{"address": a, "name": n} for a, n in items], ensure_ascii=False)


def _addresses(raw: str) -> tuple[Address, ...]:
    return tuple(Address(d["address"], d.get("name", "")) for d in json.loads(raw or "[]"))


# --------------------------------------------------------------------------- reports


@dataclass
class DispatchReport:
    sent: int = 0
    failed: int = 0
    throttled: int = 0
    unknown: int = 0
    withdrawn: int = 0
    deferred: int = 0  # waited past its send window: moved to the customer's next window
    confirmed: int = 0  # unknown -> sent, found in Sent Items
    requeued: int = 0  # unknown -> queued, not found after the grace period
    held: int = 0  # unknown that needs an operator (no Mail.Read)
    # Mailboxes the circuit breaker stopped this run, with why.
    tripped: dict[str, str] = field(default_factory=dict)
    # Why messages waited (a limit's name) and when that limit frees up next (the latest seen).
    waiting: dict[str, datetime] = field(default_factory=dict)
    failures: list[tuple[int, str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


# --------------------------------------------------------------------------- claim / record


@dataclass(frozen=True)
class Claimed:
    message_id: int
    attempts: int
    slot: pacing.Slot
    email: OutgoingEmail
    customer_key: str
    message: str


def _claim_filter(only_ids: frozenset[int] | None, tag: str | None) -> list[Any]:
    """Restrict to some outbox rows (a one-off send) or to a tagged group's customers (a
    subquery, so a wave of any size stays one parameter)."""
    conds: list[Any] = []
    if only_ids is not None:
        conds.append(col(Message.id).in_(sorted(only_ids)))
    if tag is not None:
        conds.append(col(Message.customer_id).in_(
            select(CustomerTag.customer_id).where(CustomerTag.tag == tag)
        ))
    return conds


def claim(
    db: Database,
    limits: pacing.Limits,
    *,
    settings: Settings,
    clock: Clock,
    worker: str,
    lease: timedelta,
    only_ids: frozenset[int] | None = None,
    tag: str | None = None,
    report: DispatchReport | None = None,
    window: SendWindow | None = None,
) -> Claimed | pacing.Wait | None:
    """Take a pacing slot on ``limits.mailbox`` and claim the next due message, atomically.

    Returns the claim, a ``Wait`` when the mailbox has no slot now, or None when no message is
    due. Messages whose customer may no longer be mailed are withdrawn on the way; with a
    ``window``, messages whose send window closed while they waited move to the next one.
    """
    real = clock.real()
    with db.session(immediate=True) as s:
        due = (
            select(Message)
            .where(
                col(Message.status) == "queued",
                col(Message.send_after) <= clock.now(),
                *_claim_filter(only_ids, tag),
            )
            .order_by(col(Message.send_after), col(Message.id))
            .limit(1)
        )
        if db.engine.dialect.name == "postgresql":
            # One row at a time: other workers skip only what is really being claimed.
            due = due.with_for_update(skip_locked=True, of=Message)
        for _ in range(50):  # rows withdrawn or re-timed on the way, at most
            msg = s.exec(due).first()
            if msg is None:
                return None
            assert msg.id is not None
            customer = s.get(Customer, msg.customer_id)
            reason = _unsendable(s, msg, customer)
            if reason:
                msg.status, msg.last_error, msg.updated_at = "withdrawn", reason, clock.now()
                s.add(msg)
                if report:
                    report.add(withdrawn=1)
                continue
            assert customer is not None
            if window is not None and msg.send_before is not None and (
                clock.now() > msg.send_before
            ):
                # Its send window closed while it waited: wait for the customer's next one.
                msg.send_after = planner.next_window_start(clock.now(), window,
                                                           customer.time_zone)
                msg.send_before = planner.window_end(msg.send_after, window, customer.time_zone)
                msg.updated_at = clock.now()
                s.add(msg)
                if report:
                    report.add(deferred=1)
                continue
            to, cc = _deliverable(s, msg, clock.now())
            external = (limits.tenant.external([a.address for a in (*to, *cc)])
                        if limits.tenant is not None else 0)
            slot = pacing.try_acquire(
                s, limits, now=real, lease=lease, recipients=len(to) + len(cc),
                external=external,
            )
            if isinstance(slot, pacing.Wait):
                return slot
            msg.status = "sending"
            msg.sender = limits.mailbox
            msg.attempts += 1
            msg.claimed_by = worker
            msg.lease_until = real + lease
            msg.updated_at = clock.now()
            s.add(msg)
            sender = next(x for x in settings.senders if x.address == limits.mailbox)
            email = OutgoingEmail(
                send_id=msg.send_id,
                sender=limits.mailbox,
                to=to,
                cc=cc,
                reply_to=(Address(msg.reply_to, sender.name),) if msg.reply_to else (),
                subject=msg.subject,
                html=msg.body_html(),
                text=msg.body_text(),
                headers=((SEND_ID_HEADER, msg.send_id),),
            )
            return Claimed(msg.id, msg.attempts, slot, email, customer.key, msg.message)
        return pacing.Wait(None, "many rows withdrawn or re-timed; claiming again")


def _unsendable(s: Session, msg: Message, customer: Customer | None) -> str:
    if customer is None:
        return "customer deleted"
    if msg.internal:
        return ""  # internal notes go to the account manager regardless of customer flags
    if customer.opted_out:
        return "customer opted out"
    if customer.lost:
        return "customer marked lost"
    to = _addresses(msg.to_json)
    suppressed = _suppressed(s, msg) if to else set()
    if to and all(a.address.lower() in suppressed for a in to):
        cc = _addresses(msg.cc_json)
        if all(a.address.lower() in suppressed for a in cc):
            return "every recipient is on the suppression list"
        return "every To recipient is on the suppression list (a Cc alone is not mailed)"
    return ""


def _suppressed(s: Session, msg: Message) -> set[str]:
    """The row's recipients (lower-cased) that must not be mailed (opted out, bounced)."""
    if msg.internal:
        return set()
    everyone = sorted({a.address.lower() for a in (*_addresses(msg.to_json),
                                                   *_addresses(msg.cc_json))})
    if not everyone:
        return set()
    found = s.exec(select(Suppression.email)
                   .where(sa.func.lower(col(Suppression.email)).in_(everyone))).all()
    return {e.lower() for e in found}


def _deliverable(s: Session, msg: Message, now: datetime
                 ) -> tuple[tuple[Address, ...], tuple[Address, ...]]:
    """To and Cc without suppressed addresses. An address suppressed after the message was
    queued (an opt-out, a bounce) is dropped here, and the row records who it now goes to."""
    to, cc = _addresses(msg.to_json), _addresses(msg.cc_json)
    suppressed = _suppressed(s, msg)
    if not suppressed:
        return to, cc
    keep_to = tuple(a for a in to if a.address.lower() not in suppressed)
    keep_cc = tuple(a for a in cc if a.address.lower() not in suppressed)
    dropped = [a.address for a in (*to, *cc) if a.address.lower() in suppressed]
    msg.to_json = addresses_json((a.address, a.name) for a in keep_to)
    msg.cc_json = addresses_json((a.address, a.name) for a in keep_cc)
    msg.note = (msg.note + " not sent to suppressed " + ", ".join(dropped) + ".").strip()
    msg.updated_at = now
    return keep_to, keep_cc


def record(
    db: Database, claimed: Claimed, result: SendResult, *, clock: Clock, worker: str,
    report: DispatchReport, server_hold: timedelta = timedelta(0),
) -> None:
    """Write one send's outcome and give the pacing slot back, in one transaction.

    ``server_hold``: after a client-side timeout the request may still run at Exchange for
    this long; its concurrency slot stays taken until then."""
    real = clock.real()
    now = clock.now()
    with db.session(immediate=True) as s:
        pacing.release(s, claimed.slot, now=real, message_id=claimed.message_id,
                       in_flight_until=real + server_hold if result.maybe_in_flight else None)
        msg = s.get(Message, claimed.message_id)
        assert msg is not None
        mine = msg.status == "sending" and msg.claimed_by == worker and (
            msg.attempts == claimed.attempts
        )
        if result.outcome is Outcome.SENT:
            # Accepted is the truth even if our lease ran out meanwhile.
            msg.status, msg.sent_at, msg.request_id = "sent", now, result.request_id
            msg.last_error, msg.error_code, msg.lease_until = "", "", None
            s.execute(
                sa.update(Customer)
                .where(
                    col(Customer.id) == msg.customer_id,
                    sa.or_(col(Customer.next_due_at).is_(None), col(Customer.next_due_at) > now),
                )
                .values(next_due_at=now)
            )
            report.add(sent=1)
        elif not mine:
            return  # someone else owns this row now (lease expired); leave it to them
        elif result.outcome is Outcome.THROTTLED:
            wait = timedelta(seconds=result.retry_after if result.retry_after else 5.0)
            msg.status, msg.send_after, msg.lease_until = "queued", now + wait, None
            msg.last_error = f"throttled: {result.message}".strip()
            msg.error_code = result.error_code
            pacing.block(s, claimed.slot.mailbox, real + wait)
            report.add(throttled=1)
        elif result.outcome is Outcome.FAILED:
            msg.status, msg.lease_until = "failed", None
            msg.last_error, msg.error_code = result.message, result.error_code
            report.add(failed=1)
            with report.lock:
                report.failures.append(
                    (claimed.message_id, claimed.customer_key, claimed.message,
                     f"{result.error_code}: {result.message}" if result.error_code
                     else result.message)
                )
        else:  # UNKNOWN
            msg.status, msg.lease_until, msg.unknown_since = "unknown", None, real
            msg.ambiguous_from = _with_mailbox(msg.ambiguous_from, claimed.slot.mailbox)
            msg.last_error = f"outcome unknown: {result.message}".strip()
            msg.error_code = result.error_code
            if result.retry_after:
                pacing.block(s, claimed.slot.mailbox, real + timedelta(seconds=result.retry_after))
            report.add(unknown=1)
        msg.updated_at = now
        s.add(msg)


def put_back(db: Database, claimed: Claimed, *, clock: Clock, worker: str) -> None:
    """Undo a claim whose request never left (the transport refused to start it)."""
    with db.session(immediate=True) as s:
        pacing.release(s, claimed.slot, now=clock.real(), message_id=claimed.message_id)
        s.execute(
            sa.update(Message)
            .where(col(Message.id) == claimed.message_id, col(Message.status) == "sending",
                   col(Message.claimed_by) == worker)
            .values(status="queued", lease_until=None, attempts=Message.attempts - 1,
                    updated_at=clock.now())
        )


# --------------------------------------------------------------------------- leases, reconcile


def expire_leases(db: Database, *, clock: Clock) -> int:
    """Rows left in `sending` by a worker that died: their outcome is unknown."""
    real = clock.real()
    with db.session(immediate=True) as s:
        stale = s.exec(
            select(Message)
            .where(col(Message.status) == "sending", col(Message.lease_until) < real)
            .order_by(col(Message.id))
        ).all()
        for msg in stale:
            msg.status, msg.unknown_since, msg.lease_until = "unknown", real, None
            msg.ambiguous_from = _with_mailbox(msg.ambiguous_from, msg.sender or "")
            msg.last_error = "lease expired: the worker stopped mid-send"
            msg.updated_at = clock.now()
            s.add(msg)
        return len(stale)


def _with_mailbox(mailboxes: str, mailbox: str) -> str:
    """Add ``mailbox`` to a space-separated set, keeping the order of first attempts."""
    known = mailboxes.split()
    if mailbox and mailbox not in known:
        known.append(mailbox)
    return " ".join(known)


def ambiguous_mailboxes(msg: Message) -> list[str]:
    """Every mailbox that may hold ``msg`` in its Sent Items (its ambiguous attempts)."""
    boxes = msg.ambiguous_from.split()
    if msg.sender and msg.sender not in boxes:  # rows from before migration 0003
        boxes.append(msg.sender)
    return boxes


@dataclass(frozen=True)
class Episode:
    """One ambiguous outcome of one row, as a reconcile pass read it: its verdict applies to
    this episode only (same attempts, same unknown_since), never to a later one."""

    message_id: int
    send_id: str
    attempts: int
    unknown_since: datetime | None
    mailboxes: tuple[str, ...]
    token: str


@dataclass
class ReconcileLimits:
    """What a reconcile pass needs to pace its Sent Items reads like any other request."""

    limits: dict[str, pacing.Limits]
    lease: timedelta  # how long a row stays with this pass; longer than its lookups take
    server_hold: timedelta = timedelta(0)


def _take_episode(
    db: Database, *, clock: Clock, grace: timedelta, worker: str, lease: timedelta,
    only_ids: frozenset[int] | None, tag: str | None, skip: set[int],
) -> Episode | None:
    """Lease the next `unknown` row to this pass, so one pass at a time looks a row up."""
    real = clock.real()
    token = f"reconcile:{worker}:{uuid.uuid4().hex[:12]}"
    with db.session(immediate=True) as s:
        due = (
            select(Message)
            .where(
                col(Message.status) == "unknown",
                col(Message.error_code) != HELD,
                # Sent Items can lag a 202, and a request we gave up on may still be running
                # at Exchange: look only once the grace period has passed.
                sa.or_(col(Message.unknown_since).is_(None),
                       col(Message.unknown_since) <= real - grace),
                sa.or_(col(Message.lease_until).is_(None), col(Message.lease_until) < real),
                col(Message.id).not_in(sorted(skip)),
                *_claim_filter(only_ids, tag),
            )
            .order_by(col(Message.id))
            .limit(1)
        )
        if db.engine.dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True, of=Message)
        msg = s.exec(due).first()
        if msg is None:
            return None
        assert msg.id is not None
        msg.claimed_by, msg.lease_until = token, real + lease
        s.add(msg)
        return Episode(msg.id, msg.send_id, msg.attempts, msg.unknown_since,
                       tuple(ambiguous_mailboxes(msg)), token)


def _same_episode(ep: Episode) -> list[Any]:
    """Conditions that hold only while the row is still in the episode ``ep`` looked up."""
    since = (col(Message.unknown_since).is_(None) if ep.unknown_since is None
             else col(Message.unknown_since) == ep.unknown_since)
    return [col(Message.id) == ep.message_id, col(Message.status) == "unknown",
            col(Message.attempts) == ep.attempts, col(Message.claimed_by) == ep.token, since]


class _Busy(Exception):
    """A mailbox has no free request slot (or is throttled) now: look again on a later pass."""


def _lookup(
    db: Database, reconciler: Reconciler, mailbox: str, send_id: str, *, clock: Clock,
    paced: ReconcileLimits,
) -> bool | None:
    """One Sent Items read, inside the mailbox's concurrency limit like any request."""
    limits = paced.limits.get(mailbox)
    slot: pacing.Slot | None = None
    if limits is not None:  # a mailbox no longer configured is read unpaced, rarely
        with db.session(immediate=True) as s:
            got = pacing.try_acquire(s, limits, now=clock.real(), lease=paced.lease,
                                     kind=pacing.LOOKUP)
        if isinstance(got, pacing.Wait):
            raise _Busy(got.reason)
        slot = got
    hold: datetime | None = None
    try:
        return reconciler.find_sent(mailbox, send_id)
    except LookupUnavailable as exc:
        if exc.maybe_in_flight:
            hold = clock.real() + paced.server_hold
        if exc.retry_after and slot is not None:
            with db.session(immediate=True) as s:
                pacing.block(s, mailbox, clock.real() + timedelta(seconds=exc.retry_after))
        raise
    finally:
        if slot is not None:
            with db.session(immediate=True) as s:
                pacing.release(s, slot, now=clock.real(), in_flight_until=hold)


def _verdict(
    db: Database, reconciler: Reconciler | None, ep: Episode, *, clock: Clock,
    paced: ReconcileLimits,
) -> bool | str | None:
    """True: found in one of the mailboxes. False: in none of them. None: some mailbox cannot
    be read (no Mail.Read) and none had it. "later": a read failed for now."""
    if reconciler is None or not ep.mailboxes:
        return None
    verdict: bool | None = False
    for mailbox in ep.mailboxes:
        try:
            found = _lookup(db, reconciler, mailbox, ep.send_id, clock=clock, paced=paced)
        except (LookupUnavailable, _Busy):
            return "later"
        if found is True:
            return True
        if found is None:
            verdict = None
    return verdict


def reconcile(
    db: Database,
    reconciler: Reconciler | None,
    *,
    clock: Clock,
    grace: timedelta,
    report: DispatchReport,
    worker: str = "reconcile",
    paced: ReconcileLimits | None = None,
    only_ids: frozenset[int] | None = None,
    tag: str | None = None,
    batch: int = 200,
) -> int:
    """Resolve `unknown` rows by looking their send id up in Sent Items.

    Each row is leased to one pass at a time, looked up in every mailbox that may have
    accepted it (each read paced like a request), and its verdict is written only if the row
    is still in the episode that was looked up (same attempts, unknown_since and lease):
    found in any mailbox -> sent; in none once the grace period has passed -> queued again
    (same send id); a mailbox that cannot be read and no copy found -> held for an operator.
    """
    paced = paced or ReconcileLimits({}, timedelta(seconds=60))
    resolved = 0
    seen: set[int] = set()
    while len(seen) < batch:
        ep = _take_episode(db, clock=clock, grace=grace, worker=worker, lease=paced.lease,
                           only_ids=only_ids, tag=tag, skip=seen)
        if ep is None:
            break
        seen.add(ep.message_id)
        verdict = _verdict(db, reconciler, ep, clock=clock, paced=paced)
        now = clock.now()
        values: dict[str, Any]
        if verdict == "later":
            values = {"lease_until": None, "claimed_by": ""}  # the next pass asks again
        elif verdict is True:
            values = {"status": "sent", "sent_at": now, "lease_until": None,
                      "note": sa.func.trim(col(Message.note) +
                                           " confirmed in Sent Items after an unknown outcome.")}
        elif verdict is False:
            values = {"status": "queued", "send_after": now, "lease_until": None,
                      "claimed_by": "",
                      "last_error": "not found in Sent Items of "
                      f"{', '.join(ep.mailboxes)} after the grace period; sending again"}
        else:
            values = {"error_code": HELD, "lease_until": None, "claimed_by": "",
                      "last_error": "outcome unknown and Sent Items cannot be checked (no "
                      "Mail.Read?): decide with `comms outbox resolve "
                      f"{ep.message_id} --sent` or `--resend`"}
        with db.session(immediate=True) as s:
            changed = s.execute(
                sa.update(Message).where(*_same_episode(ep)).values(updated_at=now, **values)
            ).rowcount  # type: ignore[attr-defined]
        if not changed or verdict == "later":
            continue  # another pass or a new attempt owns the row now: our verdict is stale
        if verdict is True:
            report.add(confirmed=1)
            resolved += 1
        elif verdict is False:
            report.add(requeued=1)
            resolved += 1
        else:
            report.add(held=1)
    return resolved


def resolve(db: Database, message_id: int, *, sent: bool, by: str, now: datetime) -> Message:
    """An operator's decision on an `unknown` row: it was sent, or send it again."""
    with db.session(immediate=True) as s:
        msg = s.get(Message, message_id)
        if msg is None:
            raise NotFound(f"No outbox message {message_id}. See `comms outbox list`.")
        if msg.status != "unknown":
            raise CommsError(
                f"Message {message_id} is {msg.status}, not unknown; only unknown outcomes "
                "are resolved by hand."
            )
        msg.error_code = ""
        if sent:
            msg.status, msg.sent_at = "sent", now
            msg.note = (msg.note + f" marked sent by {by}.").strip()
        else:
            msg.status, msg.send_after = "queued", now
            msg.note = (msg.note + f" resend decided by {by}.").strip()
        msg.updated_at = now
        s.add(msg)
        return msg


# --------------------------------------------------------------------------- the dispatcher


ProgressFn = Callable[[DispatchReport], None]


class Dispatcher:
    """Sends due messages through one transport within each sender mailbox's limits."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        transport: Transport,
        *,
        clock: Clock,
        worker: str,
        on_progress: ProgressFn | None = None,
        window: SendWindow | None = None,
    ) -> None:
        self.db = db
        self.window = window
        self.settings = settings
        self.transport = transport
        self.clock = clock
        self.worker = worker
        self.on_progress = on_progress
        scale = settings.delivery.time_scale
        tenant = pacing.TenantBudget.of(settings)
        self.limits = [pacing.Limits.of(s, scale, tenant) for s in settings.senders]
        # A lease must outlast any request, or a live worker's row could look abandoned.
        self.lease = timedelta(
            seconds=max(settings.delivery.lease_seconds, 2 * settings.graph.timeout_seconds + 1)
        )
        graph = settings.graph
        # A request we gave up on (client timeout) may still run at Exchange until
        # server_timeout after it started: its concurrency slot stays taken that long.
        self.server_hold = timedelta(
            seconds=max(graph.server_timeout - graph.timeout_seconds, 0.0))
        # Only after the grace period does "not in Sent Items" mean "not sent": never shorter
        # than two request timeouts, nor than Exchange may still be working on a request.
        self.grace = timedelta(seconds=max(graph.reconcile_grace_seconds,
                                           2 * graph.timeout_seconds,
                                           graph.server_timeout))
        # A reconcile pass holds one row while it reads every mailbox that may have sent it.
        self.paced = ReconcileLimits(
            {lim.mailbox: lim for lim in self.limits},
            lease=timedelta(seconds=2 * graph.timeout_seconds * max(len(self.limits), 1) + 5),
            server_hold=self.server_hold,
        )
        reconciler = transport if isinstance(transport, Reconciler) else None
        self.reconciler = reconciler if settings.graph.reconcile else None
        with db.session(immediate=True) as s:
            pacing.ensure_mailboxes(s, [lim.mailbox for lim in self.limits])

    def pending(
        self, only_ids: frozenset[int] | None, tag: str | None
    ) -> Counter[str]:
        with self.db.session() as s:
            rows = s.exec(
                select(Message.status, sa.func.count())
                .where(col(Message.status).in_(OPEN), *_claim_filter(only_ids, tag))
                .group_by(col(Message.status))
            ).all()
        return Counter({status: int(n) for status, n in rows})

    def run(
        self,
        *,
        deadline: float,
        only_ids: frozenset[int] | None = None,
        tag: str | None = None,
        limit: int | None = None,
        report: DispatchReport | None = None,
        stop: threading.Event | None = None,
    ) -> DispatchReport:
        """Dispatch until nothing is due (or sendable before ``deadline``, a monotonic time).

        Setting ``stop`` (a signal handler does) ends the run cleanly: nothing new is claimed,
        requests in flight finish and their outcomes are recorded, then it returns."""
        report = report or DispatchReport()
        requested = stop or threading.Event()
        budget = [limit if limit is not None else -1]
        budget_lock = threading.Lock()
        halt = threading.Event()  # an error, or every mailbox tripped
        threads_n = max(1, min(sum(lim.max_concurrent for lim in self.limits), 8))
        errors: list[BaseException] = []

        def take_budget() -> bool:
            with budget_lock:
                if budget[0] == 0:
                    return False
                if budget[0] > 0:
                    budget[0] -= 1
                return True

        def give_back() -> None:
            with budget_lock:
                if budget[0] >= 0:
                    budget[0] += 1

        # Per-mailbox "not before" hints (monotonic): a local shortcut that spares the
        # database a claim attempt on a mailbox that is known to be at its limit. The
        # database stays the authority; other processes' sends only make a hint optimistic.
        hints: dict[str, float] = {lim.mailbox: 0.0 for lim in self.limits}
        hints_lock = threading.Lock()

        # Circuit breaker: ambiguous outcomes in a row per mailbox; past the limit the
        # mailbox sends nothing more this run (Graph may be down: each further try would
        # only add an unknown outcome to reconcile).
        streak: dict[str, int] = dict.fromkeys(hints, 0)
        trip_after = self.settings.delivery.max_consecutive_unknown

        def note_outcome(mailbox: str, outcome: Outcome) -> None:
            with hints_lock:
                streak[mailbox] = streak[mailbox] + 1 if outcome is Outcome.UNKNOWN else 0
                if streak[mailbox] >= trip_after and mailbox not in report.tripped:
                    report.tripped[mailbox] = (
                        f"{streak[mailbox]} ambiguous outcomes in a row (timeouts/5xx): "
                        "stopped sending from it for this run")
                    hints[mailbox] = float("inf")
                    if len(report.tripped) == len(hints):
                        halt.set()  # nothing left to send from

        def candidates() -> tuple[list[pacing.Limits], float]:
            now_m = time.monotonic()
            with hints_lock:
                ready = [lim for lim in self.limits if hints[lim.mailbox] <= now_m]
                soonest = min(hints.values())
            ready.sort(key=lambda lim: hints[lim.mailbox])
            return ready, soonest - now_m

        def worker_loop(index: int) -> None:
            try:
                while (not halt.is_set() and not requested.is_set()
                       and time.monotonic() < deadline):
                    if not take_budget():
                        return
                    claimed: Claimed | None = None
                    nothing_due = False
                    ready, wait_for = candidates()
                    # Spread threads over the ready mailboxes.
                    if ready:
                        shift = index % len(ready)
                        ready = ready[shift:] + ready[:shift]
                    for lim in ready:
                        got = claim(
                            self.db, lim, settings=self.settings, clock=self.clock,
                            worker=self.worker, lease=self.lease, only_ids=only_ids,
                            tag=tag, report=report, window=self.window,
                        )
                        if isinstance(got, Claimed):
                            claimed = got
                            break
                        if got is None:
                            nothing_due = True
                            break  # nothing due on any mailbox
                        pause = (
                            (got.until - self.clock.real()).total_seconds()
                            if got.until is not None else 0.01
                        )
                        if got.until is not None and pause > 1.0:
                            with report.lock:
                                report.waiting[got.reason] = got.until
                        with hints_lock:
                            hints[lim.mailbox] = time.monotonic() + max(pause, 0.0)
                    if claimed is None:
                        give_back()
                        if nothing_due:
                            return
                        if ready:
                            _, wait_for = candidates()
                        if time.monotonic() + wait_for >= deadline:
                            return  # nothing can be claimed before the deadline
                        time.sleep(min(max(wait_for, 0.002), 0.5))
                        continue
                    try:
                        result = self.transport.send(claimed.email)
                    except CommsError:
                        # The transport cannot be used at all (no token, bad config): nothing
                        # was accepted. Put the row back and stop the run with that error.
                        put_back(self.db, claimed, clock=self.clock, worker=self.worker)
                        raise
                    except Exception as exc:  # a transport bug must not strand the row
                        result = SendResult(
                            Outcome.UNKNOWN, error_code=type(exc).__name__,
                            message=f"the transport failed unexpectedly ({exc}); the request "
                            "may have left: Sent Items is checked before any resend",
                        )
                    record(self.db, claimed, result, clock=self.clock, worker=self.worker,
                           report=report, server_hold=self.server_hold)
                    note_outcome(claimed.slot.mailbox, result.outcome)
                    if result.outcome is not Outcome.SENT:
                        give_back()
                    if self.on_progress:
                        self.on_progress(report)
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)
                halt.set()

        while time.monotonic() < deadline and not halt.is_set() and not requested.is_set():
            expire_leases(self.db, clock=self.clock)
            reconcile(self.db, self.reconciler, clock=self.clock, grace=self.grace,
                      report=report, worker=self.worker, paced=self.paced,
                      only_ids=only_ids, tag=tag)
            if requested.is_set():
                break
            threads = [threading.Thread(target=worker_loop, args=(i,), daemon=True)
                       for i in range(threads_n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            if budget[0] == 0:
                break
            if min(hints.values()) >= deadline:
                break  # every mailbox waits for a limit past the deadline: the next run sends
            # Once a mailbox tripped, unknown outcomes are left to the next run: Graph is not
            # answering, and waiting for it must not keep a scheduled run alive.
            pause = self._more_to_do(only_ids, tag, deadline,
                                     wait_for_unknown=not report.tripped)
            if pause is None:
                break
            requested.wait(pause)
        return report

    def _more_to_do(
        self, only_ids: frozenset[int] | None, tag: str | None,
        deadline: float, *, wait_for_unknown: bool = True,
    ) -> float | None:
        """Seconds to wait before work may be possible again, or None when nothing can
        get out before the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        now = self.clock.now()
        real = self.clock.real()
        horizon = now + timedelta(seconds=left)
        flt = _claim_filter(only_ids, tag)
        with self.db.session() as s:
            next_queued = s.exec(
                select(sa.func.min(Message.send_after)).where(
                    col(Message.status) == "queued", col(Message.send_after) <= horizon, *flt
                )
            ).one()
            sending = s.exec(
                select(sa.func.count()).select_from(Message).where(
                    col(Message.status) == "sending", *flt
                )
            ).one()
            oldest_unknown = s.exec(
                select(sa.func.min(Message.unknown_since)).where(
                    col(Message.status) == "unknown", col(Message.error_code) != HELD, *flt
                )
            ).one()
        waits: list[float] = []
        if next_queued is not None:
            waits.append((next_queued - now).total_seconds())
        if sending:
            waits.append(0.5)  # another worker's send, or a lease still to expire
        if oldest_unknown is not None and self.reconciler is not None and wait_for_unknown:
            waits.append((oldest_unknown + self.grace - real).total_seconds())
        if not waits:
            return None
        wait = max(min(waits), 0.02)
        return min(wait, left, 1.0)
