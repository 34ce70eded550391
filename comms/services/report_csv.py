"""The outbox CSV export (`comms outbox export`): spreadsheet-safe cells, streamed rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from comms.errors import OutputError, RequestRefused
from comms.fileio import write_atomic_stream
from comms.services.status import STATUSES
from comms.store.db import Database
from comms.store.models import Customer, Message

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """Spreadsheet-safe cell: datetimes as ISO 8601 UTC, booleans as yes/no, and text that a
    spreadsheet would run as a formula (=, +, -, @) prefixed with an apostrophe."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="seconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _addresses(raw: str) -> str:
    try:
        items = json.loads(raw or "[]")
    except ValueError:
        return raw
    out: list[str] = []
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, dict):
            inner = item.get("emailAddress")
            src = inner if isinstance(inner, dict) else item
            out.append(str(src.get("address") or src.get("email") or ""))
        else:
            out.append(str(item))
    return "; ".join(a for a in out if a)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        # utf-8-sig: Excel reads non-ASCII names correctly only with the byte-order mark.
        buffer.write("\ufeff")
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(v) for v in row])
            count += 1
            if buffer.tell() > 1 << 16:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    try:
        write_atomic_stream(path, lines())  # like `customers export`: a missing folder is an error
    except OutputError as exc:
        why = exc.message.removeprefix(f"Cannot write {path}: ").rstrip(".")
        raise OutputError(f"Cannot write {path}: {why}. Choose another file.") from exc
    return count


OUTBOX_COLUMNS = (
    "id", "send_id", "customer_key", "customer_name", "message", "sequence", "stage",
    "internal", "status", "to", "cc", "subject", "sender", "send_after", "attempts",
    "sent_at", "error_code", "last_error", "created_at", "updated_at",
)


def export_outbox_csv(db: Database, path: str | Path, status: str | None = None) -> int:
    """Write the outbox (optionally only messages in ``status``) to a CSV file; return the
    number of messages written. Rows stream from the database (memory stays flat)."""
    if status is not None and status not in STATUSES:
        raise RequestRefused(
            f"Unknown message status {status!r}; use one of: {', '.join(STATUSES)}."
        )
    db.refuse_as_output(path)
    q = (
        sa.select(
            col(Message.id), col(Message.send_id), col(Customer.key), col(Customer.name),
            col(Message.message), col(Message.sequence), col(Message.stage),
            col(Message.internal), col(Message.status), col(Message.to_json),
            col(Message.cc_json), col(Message.subject), col(Message.sender),
            col(Message.send_after), col(Message.attempts), col(Message.sent_at),
            col(Message.error_code), col(Message.last_error), col(Message.created_at),
            col(Message.updated_at),
        )
        .join(Customer, col(Customer.id) == col(Message.customer_id))
        .order_by(col(Message.id))
    )
    if status is not None:
        q = q.where(col(Message.status) == status)

    def rows() -> Iterator[Sequence[Any]]:
        with db.session() as s:
            for r in s.execute(q.execution_options(yield_per=2000)):
                values = list(r)
                values[9] = _addresses(values[9])
                values[10] = _addresses(values[10])
                yield values

    return _write_csv(Path(path), OUTBOX_COLUMNS, rows())


