"""Operator actions on outbox rows: list, show, retry, withdraw, resolve; and suppressions."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from email_validator import EmailNotValidError, validate_email
from sqlmodel import Session, col, select

from comms import outbox
from comms.domain import MessageStatus
from comms.errors import NotFound, RequestRefused, StateConflict
from comms.store.db import Database
from comms.store.models import Contact, Customer, Message, StageEvent, Suppression
from comms.store.sync_models import SyncEvidence


@dataclass(frozen=True)
class OutboxRow:
    message: Message
    customer_key: str
    # What stage sync had observed of the customer's old subscription when the message was
    # rendered (its wording rests on it), e.g. "direct subscription Enabled, 26 assigned
    # (sync:tenant, 2026-12-01 10:00 UTC)"; "" when nothing had been observed.
    evidence: str = ""


def list_messages(
    db: Database, *, status: str | None = None, customer_key: str | None = None, limit: int = 200
) -> list[OutboxRow]:
    if status and status not in Message.STATUSES:
        raise RequestRefused(f"Unknown status {status!r}. Statuses: {', '.join(Message.STATUSES)}.")
    with db.session() as s:
        q = select(Message, Customer.key).join(
            Customer, col(Customer.id) == col(Message.customer_id)
        )
        if status:
            q = q.where(Message.status == status)
        if customer_key:
            q = q.where(Customer.key == customer_key)
        rows = s.exec(q.order_by(col(Message.id).desc()).limit(limit)).all()
    return [OutboxRow(m, k) for m, k in rows]


def get_message(db: Database, message_id: int) -> OutboxRow:
    with db.session() as s:
        row = s.exec(
            select(Message, Customer.key)
            .join(Customer, col(Customer.id) == col(Message.customer_id))
            .where(Message.id == message_id)
        ).first()
        if row is None:
            raise NotFound(f"No outbox message {message_id}. See `comms outbox list`.")
        return OutboxRow(row[0], row[1], _evidence_at(s, row[0]))


def _evidence_at(s: Session, m: Message) -> str:
    ev = s.exec(
        select(SyncEvidence)
        .where(col(SyncEvidence.customer_id) == m.customer_id,
               col(SyncEvidence.source) == "tenant", col(SyncEvidence.at) <= m.created_at)
        .order_by(col(SyncEvidence.id).desc()).limit(1)
    ).first()
    if ev is None:
        return ""
    seen = json.loads(ev.seen_json)
    assigned = seen.get("assigned")
    return (f"direct subscription {seen.get('status') or 'absent'}"
            + (f", {assigned} licences assigned" if assigned is not None else "")
            + f" (evidence #{ev.id}, sync:{ev.source}, {ev.at:%Y-%m-%d %H:%M} UTC)")


def _transition(
    db: Database, message_id: int, allowed: Sequence[str], to: str, now: datetime, note: str,
    hint: str,
) -> Message:
    with db.session(immediate=True) as s:
        # Locked (PostgreSQL): a run claiming the row meanwhile would otherwise send what the
        # operator is told was withdrawn.
        msg = s.get(Message, message_id, with_for_update=True)
        if msg is None:
            raise NotFound(f"No outbox message {message_id}. See `comms outbox list`.")
        if msg.status not in allowed:
            raise StateConflict(f"Message {message_id} is {msg.status}; {hint}")
        msg.status = str(to)
        msg.updated_at = now
        if to == MessageStatus.QUEUED:
            msg.send_after = now
            msg.error_code = ""
        elif to == MessageStatus.WITHDRAWN:
            msg.error_code = outbox.BY_OPERATOR  # the planner never queues it again
        msg.note = (msg.note + " " + note).strip()
        s.add(msg)
        return msg


def retry(db: Database, message_id: int, *, now: datetime, by: str) -> Message:
    """A failed message goes back to the queue (after the cause was fixed)."""
    return _transition(db, message_id, (MessageStatus.FAILED,), MessageStatus.QUEUED, now,
                       f"retried by {by}.",
                       "only failed messages are retried (unknown ones: `comms outbox resolve`).")


def withdraw(db: Database, message_id: int, *, now: datetime, by: str) -> Message:
    return _transition(db, message_id, (MessageStatus.QUEUED, MessageStatus.FAILED),
                       MessageStatus.WITHDRAWN, now,
                       f"withdrawn by {by}.", "only queued or failed messages can be withdrawn.")


def resolve(db: Database, message_id: int, *, sent: bool, now: datetime, by: str,
            reconciling: bool = False) -> Message:
    return outbox.resolve(db, message_id, sent=sent, by=by, now=now, reconciling=reconciling)


def normalise_email(email: str) -> str:
    try:
        checked = validate_email(email, check_deliverability=False, test_environment=True)
        return checked.normalized.lower()
    except EmailNotValidError as exc:
        raise RequestRefused(f"{email!r} is not a valid email address: {exc}") from None


def suppress(db: Database, email: str, *, reason: str, now: datetime, by: str) -> tuple[str, int]:
    """Put an address on the suppression list. Nothing is withdrawn here: from now on the
    planner leaves the address out, and the dispatcher withdraws a queued message when it
    reaches one whose every recipient is suppressed. Returns the normalised address and how many
    customers it is a contact of."""
    address = normalise_email(email)
    with db.session(immediate=True) as s:
        existing = s.get(Suppression, address)
        if existing is None:
            s.add(Suppression(email=address, reason=reason, at=now, by=by))
        contacts = s.exec(
            # Equality, not LIKE: "_" and "%" are ordinary characters in an address.
            select(Contact.customer_id).where(sa.func.lower(col(Contact.email)) == address)
        ).all()
        return address, len(set(contacts))


@dataclass(frozen=True)
class Unsuppressed:
    """What ``unsuppress`` lifted."""

    address: str
    lifted: str  # the suppression, for people: "hard bounce 5.1.1 on 2026-11-30"
    customers: int  # customers planned again (the address is a contact or their manager)


_STATUS_CODE = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})$")
OPT_OUT_REPLY = "opt-out reply:"  # how ``comms inbox sync`` starts an opt-out's reason


def describe_suppression(row: Suppression) -> tuple[str, bool]:
    """A suppression for people ("hard bounce 5.1.1 on 2026-11-30", "opted out by reply on
    ..."), and whether lifting it needs a note: a bounce (the mailbox does not take mail) or
    the person's own opt-out reply. ``comms inbox sync`` writes the reason ``bounce`` with the
    status code or the soft-bounce count in ``by``, or the reply after ``opt-out reply:``."""
    on = f"on {row.at:%Y-%m-%d}"
    if row.reason == "bounce":
        by = row.by.strip()
        code = _STATUS_CODE.search(by)
        if code:
            return f"hard bounce {code.group(1)} {on}", True
        soft = re.search(r"(\d+ soft bounces in [\d.]+ days)$", by)
        return (f"bounce ({soft.group(1)}) {on}" if soft else f"bounce {on}"), True
    if row.reason.startswith(OPT_OUT_REPLY):
        reply = " ".join(row.reason[len(OPT_OUT_REPLY):].split())
        return f"opted out by reply {on}" + (f" ({reply[:80]})" if reply else ""), True
    return (f"suppressed by {row.by or 'an operator'} {on}"
            + (f" ({row.reason})" if row.reason else "")), False


def unsuppress(db: Database, email: str, *, now: datetime, by: str, note: str = "") -> Unsuppressed:
    """Take an address off the suppression list; the customers it is a contact (or the
    account manager) of are planned again at the next run, each with a ``suppression_lifted``
    event in its audit trail naming the address, what was lifted, who and why.

    A suppression from a bounce or from the person's own opt-out reply is lifted only with a
    ``note`` saying why (``RequestRefused`` otherwise; nothing changes)."""
    address = normalise_email(email)
    with db.session(immediate=True) as s:
        row = s.get(Suppression, address)
        if row is None:
            raise NotFound(f"{address} is not on the suppression list.")
        lifted, needs_note = describe_suppression(row)
        if needs_note and not note.strip():
            raise RequestRefused(
                f"{address} is suppressed: {lifted}. Mailing it again needs --note saying "
                "why (e.g. the person asked to be mailed again, the mailbox works again); it is "
                "recorded in the audit trail. Nothing changed.")
        s.delete(row)
        affected = s.exec(
            select(Customer.id, Customer.stage).where(
                col(Customer.id).in_(select(Contact.customer_id).where(
                    sa.func.lower(col(Contact.email)) == address))
                | (sa.func.lower(sa.func.trim(col(Customer.account_manager_email))) == address))
        ).all()
        ids = [cid for cid, _ in affected]
        if ids:
            s.execute(sa.update(Customer).where(col(Customer.id).in_(ids))
                      .values(next_due_at=now))
        text = f"{address} taken off the suppression list (was: {lifted})" + (
            f"; note: {note.strip()}" if note.strip() else "")
        for cid, stage in affected:
            assert cid is not None
            s.add(StageEvent(customer_id=cid, kind="suppression_lifted", from_stage=stage,
                             to_stage=stage, at=now, by=by, source="cli", note=text))
    return Unsuppressed(address, lifted, len(ids))


def suppressions(db: Database) -> list[Suppression]:
    with db.session() as s:
        return list(s.exec(select(Suppression).order_by(col(Suppression.at))).all())
