"""The read side of the inbox: `comms inbox list/show`, a customer's timeline, and the counts
behind `comms status` and the report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from comms.errors import NotFound
from comms.store.db import Database
from comms.store.inbox_models import InboundMessage, InboxCustomerState
from comms.store.models import Contact, Customer, Suppression


def list_inbound(db: Database, *, kind: str | None = None, limit: int = 200
                 ) -> list[dict[str, Any]]:
    with db.session() as s:
        q = (sa.select(InboundMessage, col(Customer.key))
             .join(Customer, col(Customer.id) == col(InboundMessage.customer_id), isouter=True)
             .order_by(col(InboundMessage.id).desc()).limit(limit))
        if kind:
            q = q.where(col(InboundMessage.kind) == kind)
        return [_row_dict(m, key) for m, key in s.execute(q).all()]


def show_inbound(db: Database, inbound_id: int) -> dict[str, Any]:
    with db.session() as s:
        found = s.execute(
            sa.select(InboundMessage, col(Customer.key))
            .join(Customer, col(Customer.id) == col(InboundMessage.customer_id), isouter=True)
            .where(col(InboundMessage.id) == inbound_id)
        ).first()
    if found is None:
        raise NotFound(f"No inbound message #{inbound_id}. See `comms inbox list`.")
    return _row_dict(found[0], found[1], full=True)


def _row_dict(m: InboundMessage, key: str | None, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": m.id, "mailbox": m.mailbox, "received_at": m.received_at, "kind": m.kind,
        "from": m.from_address, "subject": m.subject, "customer": key, "rule": m.rule,
        "status_code": m.status_code, "address": m.address, "outbox_id": m.message_id,
        "effects": m.effects,
    }
    if full:
        out.update({"graph_id": m.graph_id, "internet_message_id": m.internet_message_id,
                    "conversation_id": m.conversation_id, "detail": m.detail, "hard": m.hard,
                    "preview": m.preview, "processed_at": m.processed_at})
    return out


def timeline_entries(session: Session, customer_id: int) -> list[InboundMessage]:
    """Inbound messages of one customer, oldest first (for `customers show`)."""
    return list(session.exec(
        select(InboundMessage).where(col(InboundMessage.customer_id) == customer_id)
        .order_by(col(InboundMessage.id))
    ).all())


@dataclass(frozen=True)
class InboxCounts:
    bounces: int
    hard_bounces: int
    replies: int
    optouts: int
    auto: int
    unmatched: int
    unreachable: list[str]  # customer keys with no deliverable address left
    awaiting_operator: list[str]  # customers whose reminders are held after a reply
    by_stage: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> kind -> n
    hard_by_stage: dict[str, int] = field(default_factory=dict)  # stage -> hard bounces
    errors: int = 0  # messages that could not be processed (`comms inbox list --kind error`)


def counts(session: Session, now: datetime) -> InboxCounts:
    """Inbox numbers for `comms status` and the report; per stage by the customer's current
    stage."""
    by_kind: Counter[str] = Counter()
    hard = 0
    for kind, is_hard, n in session.execute(
        sa.select(col(InboundMessage.kind), col(InboundMessage.hard), sa.func.count())
        .group_by(col(InboundMessage.kind), col(InboundMessage.hard))
    ).all():
        by_kind[kind] += n
        if kind == "bounce" and is_hard:
            hard += n
    deliverable = (
        sa.select(col(Contact.customer_id))
        .where(sa.func.lower(col(Contact.email)).not_in(sa.select(col(Suppression.email))))
    )
    unreachable = session.execute(
        sa.select(col(Customer.key)).where(
            col(Customer.id).in_(sa.select(col(Contact.customer_id))),
            col(Customer.id).not_in(deliverable),
            col(Customer.lost).is_(False),
        ).order_by(col(Customer.key))
    ).scalars().all()
    awaiting = session.execute(
        sa.select(col(Customer.key))
        .join(InboxCustomerState, col(InboxCustomerState.customer_id) == col(Customer.id))
        .where(col(InboxCustomerState.reminders_held_until) > now).order_by(col(Customer.key))
    ).scalars().all()
    by_stage: dict[str, dict[str, int]] = {}
    hard_by_stage: Counter[str] = Counter()
    for stage, kind, is_hard, n in session.execute(
        sa.select(col(Customer.stage), col(InboundMessage.kind), col(InboundMessage.hard),
                  sa.func.count())
        .join(Customer, col(Customer.id) == col(InboundMessage.customer_id))
        .group_by(col(Customer.stage), col(InboundMessage.kind), col(InboundMessage.hard))
    ).all():
        kinds = by_stage.setdefault(stage, {})
        kinds[kind] = kinds.get(kind, 0) + int(n)
        if kind == "bounce" and is_hard:
            hard_by_stage[stage] += int(n)
    return InboxCounts(by_kind["bounce"], hard, by_kind["reply"], by_kind["optout"],
                       by_kind["auto"], by_kind["unmatched"], list(unreachable), list(awaiting),
                       by_stage, dict(hard_by_stage), by_kind["error"])
