"""The outbox: queue, claim, dispatch, reconcile (the exactly-once loop). See DESIGN.md §6."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col

from comms.store.models import Message

PENDING = ("queued",)


def withdraw_stale(session: Session, customer_id: int, stage: str, at: datetime) -> int:
    """Withdraw queued messages planned for another stage than ``stage`` (a stage change
    makes them moot: an approved customer gets no more invitation reminders)."""
    result = session.execute(
        sa.update(Message)
        .where(
            col(Message.customer_id) == customer_id,
            col(Message.status).in_(PENDING),
            col(Message.stage) != stage,
        )
        .values(status="withdrawn", last_error=f"stage changed to {stage}", updated_at=at)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def withdraw_all_queued(session: Session, customer_id: int, reason: str, at: datetime) -> int:
    """Withdraw every queued message of a customer (opted out, lost)."""
    result = session.execute(
        sa.update(Message)
        .where(col(Message.customer_id) == customer_id, col(Message.status).in_(PENDING))
        .values(status="withdrawn", last_error=reason, updated_at=at)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
