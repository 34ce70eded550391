"""Claiming a due row with a pacing slot, recording a send's outcome, and leases: the
steps one send goes through (see ``comms.outbox`` for the state machine)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from comms import pacing, planner
from comms.campaign import SendWindow
from comms.config import Settings
from comms.delivery.base import (
    Address,
    Outcome,
    OutgoingEmail,
    SendResult,
    compose_email,
)
from comms.errors import UnknownTimeZone
from comms.outbox.queue import Clock, _addresses, addresses_json
from comms.store.db import Database
from comms.store.inbox_models import reminder_holds
from comms.store.models import Customer, CustomerTag, Message, Suppression

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
    # Customers whose time zone cannot be loaded (key -> why): their rows past the window wait.
    zone_problems: dict[str, str] = field(default_factory=dict)
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

# A row whose customer's time zone cannot be loaded is looked at again this much later.
ZONE_RETRY = timedelta(hours=1)


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


def _due_now(clock: Clock, only_ids: frozenset[int] | None, tag: str | None) -> list[Any]:
    """A queued row whose time has come (within the run's restriction)."""
    return [col(Message.status) == "queued", col(Message.send_after) <= clock.now(),
            *_claim_filter(only_ids, tag)]


def _due_query(db: Database, clock: Clock, only_ids: frozenset[int] | None,
               tag: str | None) -> Any:
    due = (
        select(Message)
        .where(*_due_now(clock, only_ids, tag))
        .order_by(col(Message.send_after), col(Message.id))
        .limit(1)
    )
    if db.engine.dialect.name == "postgresql":
        # One row at a time: other workers skip only what is really being claimed.
        due = due.with_for_update(skip_locked=True, of=Message)
    return due


def _set_aside(s: Session, msg: Message, customer: Customer | None, *, clock: Clock,
               report: DispatchReport | None, window: SendWindow | None) -> bool:
    """Withdraw a row whose customer may no longer be mailed, or move a row whose send window
    closed while it waited to the customer's next window (or, when the customer's time zone
    cannot be loaded here, an hour later: never sent at a guessed hour). True if the row was
    set aside."""
    reason = _unsendable(s, msg, customer, clock.now())
    if reason:
        msg.status, msg.last_error, msg.updated_at = "withdrawn", reason, clock.now()
        s.add(msg)
        if report:
            report.add(withdrawn=1)
        return True
    assert customer is not None
    if window is None or msg.send_before is None or clock.now() <= msg.send_before:
        return False
    try:
        opens = planner.next_window_start(clock.now(), window, customer.time_zone)
        closes = planner.window_end(opens, window, customer.time_zone)
    except UnknownTimeZone as exc:
        # Never sent at a guessed hour; the other customers' rows go on.
        opens, closes = clock.now() + ZONE_RETRY, msg.send_before
        msg.last_error = (f"{exc} Held: re-import customer {customer.key} with a valid "
                          "time_zone.")
        if report:
            with report.lock:
                report.zone_problems[customer.key] = str(exc)
    else:
        if report:
            report.add(deferred=1)
    msg.send_after, msg.send_before, msg.updated_at = opens, closes, clock.now()
    s.add(msg)
    return True


def _email(msg: Message, settings: Settings, mailbox: str, to: tuple[Address, ...],
           cc: tuple[Address, ...]) -> OutgoingEmail:
    sender = next(x for x in settings.senders if x.address == mailbox)
    return compose_email(
        send_id=msg.send_id, sender=mailbox, sender_name=sender.name, to=to, cc=cc,
        reply_to=msg.reply_to, subject=msg.subject, html=msg.body_html(),
        text=msg.body_text(),
    )


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
        # The mailbox first: at its limit, no message row is read or locked (on PostgreSQL
        # the mailbox row lock is always taken before message rows, which are SKIP LOCKED).
        busy = pacing.mailbox_wait(s, limits, now=real)
        if busy is not None:
            anything_due = s.exec(
                select(Message.id).where(*_due_now(clock, only_ids, tag)).limit(1)
            ).first()
            return busy if anything_due is not None else None
        due = _due_query(db, clock, only_ids, tag)
        for _ in range(50):  # rows withdrawn or re-timed on the way, at most
            msg = s.exec(due).first()
            if msg is None:
                return None
            assert msg.id is not None
            customer = s.get(Customer, msg.customer_id)
            if _set_aside(s, msg, customer, clock=clock, report=report, window=window):
                continue
            assert customer is not None
            to, cc = _deliverable(s, msg, clock.now())
            external = (limits.tenant.external([a.address for a in (*to, *cc)])
                        if limits.tenant is not None else 0)
            slot = pacing.try_acquire(
                s, limits, now=real, lease=lease, recipients=len(to) + len(cc),
                external=external, checked=True,
            )
            if isinstance(slot, pacing.Wait):
                return slot
            msg.status, msg.sender, msg.attempts = "sending", limits.mailbox, msg.attempts + 1
            msg.claimed_by, msg.lease_until, msg.updated_at = worker, real + lease, clock.now()
            s.add(msg)
            email = _email(msg, settings, limits.mailbox, to, cc)
            return Claimed(msg.id, msg.attempts, slot, email, customer.key, msg.message)
        return pacing.Wait(None, "many rows withdrawn or re-timed; claiming again")


def _unsendable(s: Session, msg: Message, customer: Customer | None, now: datetime) -> str:
    if customer is None:
        return "customer deleted"
    # Internal notes go to the account manager whatever the customer's flags and stage; the
    # suppression list (an account manager who opted out, a mailbox that bounced) holds for
    # every row.
    reason = "" if msg.internal else _customer_refuses(msg, customer)
    if not reason and not msg.internal and msg.sequence >= 1 and customer.id is not None:
        # A reminder queued before the customer answered (a backlog): the planner holds
        # reminders after a reply, and plans this one again when the hold ends.
        until = reminder_holds(s, [customer.id]).get(customer.id)
        if until is not None and until > now:  # the column's type returns aware UTC
            reason = (f"reminders held until {until:%Y-%m-%d %H:%M} UTC (the customer "
                      "replied)")
    if reason:
        return reason
    to = _addresses(msg.to_json)
    suppressed = _suppressed(s, msg) if to else set()
    if to and all(a.address.lower() in suppressed for a in to):
        cc = _addresses(msg.cc_json)
        if all(a.address.lower() in suppressed for a in cc):
            return "every recipient is on the suppression list"
        return "every To recipient is on the suppression list (a Cc alone is not mailed)"
    return ""


def _customer_refuses(msg: Message, customer: Customer) -> str:
    """Why the customer's own mail may no longer go out, or ""."""
    if customer.opted_out:
        return "customer opted out"
    if customer.lost:
        return "customer marked lost"
    if customer.paused:
        # Queued before the pause (`comms send` between its plan and its dispatch, a worker
        # behind): planned again with what is true when the customer is resumed.
        return "customer paused"
    if msg.sequence >= 0 and msg.stage != customer.stage:
        # A stage change withdraws queued rows of other stages; this closes the race where a
        # run planned for the old stage while the change (an operator, stage sync) committed.
        # Resends and forced out-of-stage sends (negative sequences) were asked for as such.
        return f"stage changed to {customer.stage} since it was queued"
    return ""


def _suppressed(s: Session, msg: Message) -> set[str]:
    """The row's recipients (lower-cased) that must not be mailed (opted out, bounced)."""
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
            _sent(s, msg, result, now)
            report.add(sent=1)
        elif not mine:
            return  # someone else owns this row now (lease expired); leave it to them
        else:
            _not_sent(s, msg, claimed, result, real=real, now=now, report=report)
        msg.updated_at = now
        s.add(msg)


def _sent(s: Session, msg: Message, result: SendResult, now: datetime) -> None:
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


def _not_sent(s: Session, msg: Message, claimed: Claimed, result: SendResult, *,
              real: datetime, now: datetime, report: DispatchReport) -> None:
    """Throttled -> queued at Retry-After; failed -> failed; anything ambiguous -> unknown."""
    mailbox = claimed.slot.mailbox
    if result.outcome is Outcome.THROTTLED:
        wait = timedelta(seconds=result.retry_after if result.retry_after else 5.0)
        msg.status, msg.send_after, msg.lease_until = "queued", now + wait, None
        msg.last_error = f"throttled: {result.message}".strip()
        msg.error_code = result.error_code
        pacing.block(s, mailbox, real + wait)
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
    else:  # UNKNOWN: the request may have been accepted
        msg.status, msg.lease_until, msg.unknown_since = "unknown", None, real
        msg.ambiguous_from = _with_mailbox(msg.ambiguous_from, mailbox)
        msg.last_error = f"outcome unknown: {result.message}".strip()
        msg.error_code = result.error_code
        if result.retry_after:
            pacing.block(s, mailbox, real + timedelta(seconds=result.retry_after))
        report.add(unknown=1)


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
    """Rows left in `sending` by a worker that died: their outcome is unknown.

    The rows are read without a lock (PostgreSQL), so each is changed only while it is still
    the expired claim that was read (same status, claim, attempt and lease): a worker's
    ``record`` that commits in between (sent, failed, throttled) is never overwritten."""
    real = clock.real()
    expired = 0
    with db.session(immediate=True) as s:
        stale = s.execute(
            sa.select(col(Message.id), col(Message.sender), col(Message.ambiguous_from),
                      col(Message.claimed_by), col(Message.attempts), col(Message.lease_until))
            .where(col(Message.status) == "sending", col(Message.lease_until) < real)
            .order_by(col(Message.id))
        ).all()
        for mid, sender, ambiguous, claimed_by, attempts, lease_until in stale:
            expired += s.execute(
                sa.update(Message)
                .where(col(Message.id) == mid, col(Message.status) == "sending",
                       col(Message.claimed_by) == claimed_by,
                       col(Message.attempts) == attempts,
                       col(Message.lease_until) == lease_until)
                .values(status="unknown", unknown_since=real, lease_until=None,
                        ambiguous_from=_with_mailbox(ambiguous, sender or ""),
                        last_error="lease expired: the worker stopped mid-send",
                        updated_at=clock.now())
            ).rowcount  # type: ignore[attr-defined]
        return expired


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


