"""Outbox rows: the run's clock, queueing planned rows (idempotent), withdrawing queued
rows a stage change or an opt-out makes moot."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
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
# error_code of a row an operator withdrew (`comms outbox withdraw`): never queued again.
BY_OPERATOR = "withdrawn_by_operator"
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


def _withdraw(session: Session, customer_ids: Sequence[int], reason: str, at: datetime,
              *conditions: Any, evaluate: bool = True) -> int:
    """Withdraw the customers' queued rows matching ``conditions``, 5,000 customers a
    statement. ``evaluate`` also updates the rows already loaded in the session (the ORM's
    default); a caller whose session holds none of them skips that work."""
    done = 0
    ids = sorted(set(customer_ids))
    options = {} if evaluate else {"synchronize_session": False}
    for start in range(0, len(ids), 5000):
        result = session.execute(
            sa.update(Message)
            .where(col(Message.customer_id).in_(ids[start : start + 5000]),
                   col(Message.status).in_(PENDING), *conditions)
            .values(status="withdrawn", last_error=reason, updated_at=at)
            .execution_options(**options)
        )
        done += int(result.rowcount or 0)  # type: ignore[attr-defined]
    return done


def withdraw_stale(session: Session, customer_id: int, stage: str, at: datetime) -> int:
    """Withdraw queued messages planned for another stage than ``stage`` (a stage change
    makes them moot: an approved customer gets no more invitation reminders)."""
    return _withdraw(session, [customer_id], f"stage changed to {stage}", at,
                     col(Message.stage) != stage)


def withdraw_all_queued(session: Session, customer_id: int, reason: str, at: datetime,
                        *, internal_too: bool = True) -> int:
    """Withdraw every queued message of a customer (opted out, lost); with ``internal_too``
    False, only the customer's own mail (paused: notes to the account manager still go)."""
    if internal_too:
        return _withdraw(session, [customer_id], reason, at)
    return _withdraw(session, [customer_id], reason, at, col(Message.internal).is_(False))


def withdraw_for_new_content(session: Session, customer_ids: Sequence[int], reason: str,
                             at: datetime) -> int:
    """Withdraw the customers' queued staged mail (sequence >= 0, not notes to the account
    manager, not an operator's resend or forced send) because what it was rendered from
    changed (licences, contacts, name...): the next run plans it again and renders it with
    what is true then (``insert_messages`` queues the same row again)."""
    return _withdraw(session, customer_ids, reason, at, col(Message.internal).is_(False),
                     col(Message.sequence) >= 0, evaluate=False)


# --------------------------------------------------------------------------- queueing


def insert_messages(session: Session, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert planned rows; returns the ids of the rows queued.

    A row whose (customer, message, sequence) exists is skipped, with one exception: a row the
    run withdrew itself (the customer moved on, was paused, opted out, was marked lost) before
    it went out is queued again with the new content, when the planner plans it again (the
    customer came back, was resumed). It keeps its send id (reconciliation looks for that id
    in Sent Items) and its attempts; the note says why it was withdrawn. A row an operator
    withdrew (``BY_OPERATOR``) stays withdrawn. Withdrawal only ever takes a queued row, so
    nothing re-queued here was sent."""
    if not rows:
        return []
    table = Message.__table__  # type: ignore[attr-defined]
    result = session.execute(_upsert(session).returning(table.c.id), _unique(rows))
    return [int(i) for i in result.scalars().all()]


def queue_messages(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """``insert_messages`` for a scheduled run, which needs only how many rows were queued.
    On SQLite without RETURNING: one prepared statement executed for every row, whose counts
    of changed rows add up (an upsert that skips a row changes none), instead of a statement
    rendered per thousand rows with the ids read back. PostgreSQL sends those statements
    anyway, and its driver reports no count for a statement run for many rows."""
    if not rows:
        return 0
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        return len(insert_messages(session, rows))
    unique = _unique(rows)
    keys = tuple(unique[0])
    prepared = _sqlite_upsert(conn.dialect, keys)
    if prepared is None or any(tuple(r) != keys for r in unique):  # not rows of one shape
        result = session.execute(_upsert(session), unique)
        return int(result.rowcount)  # type: ignore[attr-defined]
    sql, params = prepared
    # The values as SQLAlchemy binds them (its bind processors, e.g. UTCDateTime's), each
    # distinct time converted once: a batch's rows share their times.
    converted: dict[tuple[str, Any], Any] = {}

    def value(row: dict[str, Any], name: str, process: Any) -> Any:
        if not name:
            return process  # the statement's own value
        v = row[name]
        if process is None or v is None:
            return v
        if not isinstance(v, datetime):
            return process(v)
        key = (name, v)
        if key not in converted:
            converted[key] = process(v)
        return converted[key]

    values = [tuple(value(r, n, p) for n, p in params) for r in unique]
    return int(conn.exec_driver_sql(sql, values).rowcount)


def _upsert(session: Session) -> Any:
    """The INSERT of a planned row, or the revival of the same row withdrawn by the run."""
    return _upsert_for(session.get_bind().dialect.name)


@cache  # built once per dialect: building it took longer than inserting 200 rows
def _upsert_for(dialect: str) -> Any:
    table = Message.__table__  # type: ignore[attr-defined]
    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    revived = {name: stmt.excluded[name] for name in _REQUEUED}
    revived["note"] = sa.func.trim(
        table.c.note + " Queued again after its withdrawal (" + table.c.last_error + ")."
    )
    revived["last_error"] = sa.literal("")
    return stmt.on_conflict_do_update(
        index_elements=["customer_id", "message", "sequence"], set_=revived,
        where=(table.c.status == "withdrawn") & (table.c.error_code != BY_OPERATOR),
    )


@lru_cache(maxsize=16)  # one per engine's dialect and row shape
def _sqlite_upsert(dialect: Any, keys: tuple[str, ...]) -> tuple[str, list[tuple[str, Any]]] | None:
    """The upsert of rows with these columns as SQLite's SQL with positional parameters, and
    for each parameter the row's column and its bind processor, or ("", the statement's own
    value: the note it appends, the statuses it compares). Executed for many rows without
    SQLAlchemy building each row's parameters (a third of the cost of queueing a row,
    profiled; docs/benchmarks.md). None when the rows leave a column to its default."""
    compiled = _upsert_for("sqlite").compile(dialect=dialect, column_keys=list(keys))
    table = Message.__table__  # type: ignore[attr-defined]
    out: list[tuple[str, Any]] = []
    for name in compiled.positiontup or ():
        if name in keys:
            out.append((name, table.c[name].type.dialect_impl(dialect).bind_processor(dialect)))
        elif name in table.c:
            return None  # a column the rows leave to its default: SQLAlchemy fills it in
        else:
            bind = compiled.binds[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            value = bind.effective_value
            assert value is not None, f"upsert parameter {name} has no value"
            out.append(("", process(value) if process else value))
    return compiled.string, out


def _unique(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per key: PostgreSQL refuses an upsert that touches a row twice in one command
    (`comms send A --tag T` with A in T plans A twice); the first one wins, as before."""
    first: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for r in rows:
        first.setdefault((r["customer_id"], r["message"], r["sequence"]), r)
    return list(first.values())


# What a re-queued withdrawn row takes from the new plan (send_id, attempts, sent_at,
# request_id and ambiguous_from stay as they were).
_REQUEUED = ("stage", "internal", "status", "to_json", "cc_json", "reply_to", "subject", "body",
             "locale", "sender", "send_after", "send_before", "error_code", "lease_until",
             "claimed_by", "created_at", "updated_at")


def addresses_json(items: Iterable[tuple[str, str]]) -> str:
    listed = [{"address": a, "name": n} for a, n in items]
    return json.dumps(listed, ensure_ascii=False) if listed else "[]"


def _addresses(raw: str) -> tuple[Address, ...]:
    return tuple(Address(d["address"], d.get("name", "")) for d in json.loads(raw or "[]"))


