"""Outbox rows: the run's clock, queueing planned rows (idempotent), withdrawing queued
rows a stage change or an opt-out makes moot."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from comms.delivery.base import (
    Address,
)
from comms.store.models import Message

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


