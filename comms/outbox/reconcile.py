"""Reconciliation of `unknown` outcomes against Sent Items: one pass at a time per row,
every mailbox an ambiguous attempt went through, verdicts bound to their episode."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select

from comms import pacing
from comms.delivery.base import (
    LookupUnavailable,
    Reconciler,
)
from comms.errors import NotFound, StateConflict
from comms.outbox.claims import DispatchReport, _claim_filter, ambiguous_mailboxes
from comms.outbox.queue import HELD, Clock
from comms.store.db import Database
from comms.store.models import Message


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
        with db.session(immediate=True) as s:
            changed = s.execute(
                sa.update(Message).where(*_same_episode(ep))
                .values(updated_at=now, **_verdict_values(ep, verdict, now))
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


def _verdict_values(ep: Episode, verdict: bool | str | None, now: datetime) -> dict[str, Any]:
    """The row's new values for a verdict (applied only while the episode still holds)."""
    if verdict == "later":
        return {"lease_until": None, "claimed_by": ""}  # the next pass asks again
    if verdict is True:
        return {"status": "sent", "sent_at": now, "lease_until": None,
                "note": sa.func.trim(col(Message.note) +
                                     " confirmed in Sent Items after an unknown outcome.")}
    if verdict is False:
        return {"status": "queued", "send_after": now, "lease_until": None, "claimed_by": "",
                "last_error": f"not found in Sent Items of {', '.join(ep.mailboxes)} after "
                "the grace period; sending again"}
    return {"error_code": HELD, "lease_until": None, "claimed_by": "",
            "last_error": "outcome unknown and Sent Items cannot be checked (no Mail.Read?): "
            f"decide with `comms outbox resolve {ep.message_id} --sent` or `--resend`"}


def resolve(db: Database, message_id: int, *, sent: bool, by: str, now: datetime,
            reconciling: bool = False) -> Message:
    """An operator's decision on an `unknown` row: it was sent, or send it again.

    ``reconciling`` (Sent Items can be checked: ``[graph] reconcile``): a resend is refused
    until the row is held for the operator (its mailbox could not be read), because the
    lookup after the grace period decides it without the risk of a second copy; and no
    decision is taken while a reconcile pass is looking the row up."""
    with db.session(immediate=True) as s:
        msg = s.get(Message, message_id, with_for_update=True)
        if msg is None:
            raise NotFound(f"No outbox message {message_id}. See `comms outbox list`.")
        if msg.status != "unknown":
            raise StateConflict(
                f"Message {message_id} is {msg.status}, not unknown; only unknown outcomes "
                "are resolved by hand."
            )
        if msg.lease_until is not None and msg.lease_until > Clock.real():
            raise StateConflict(
                f"Message {message_id} is being looked up in Sent Items right now; see "
                f"`comms outbox show {message_id}` in a minute.")
        if not sent and reconciling and msg.error_code != HELD:
            raise StateConflict(
                f"Message {message_id} may have been accepted: comms looks its send id up in "
                "Sent Items once the grace period has passed (the next `comms run` or worker) "
                "and sends it again only if no copy is there. Sending it again now could send "
                "it twice. `--resend` is for a message held because Sent Items could not be "
                f"read (`comms outbox show {message_id}` says so); `--sent` if you saw it there."
            )
        msg.error_code = ""
        if sent:
            msg.status, msg.sent_at = "sent", now
            msg.note = (msg.note + f" marked sent by {by}.").strip()
        else:
            msg.status, msg.send_after = "queued", now
            msg.note = (msg.note + f" resend decided by {by}.").strip()
        msg.lease_until, msg.claimed_by = None, ""
        msg.updated_at = now
        s.add(msg)
        return msg
