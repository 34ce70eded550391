"""Ledger rows for tests, built the way the product builds them (``new_message_row``), so a
new column needs one change here instead of in every test that queues a message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from comms import outbox
from comms.store.db import Database
from comms.store.models import Customer, new_message_row

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def customer(db: Database, key: str = "C1", *, at: datetime = T0, **fields: Any) -> int:
    """Insert a customer (stage invited, 5 licences unless given); returns its id."""
    values: dict[str, Any] = {"name": f"Customer {key}", "stage": "invited", "licences": 5,
                              "stage_entered_at": at, "created_at": at, "updated_at": at,
                              **fields}
    with db.session() as s:
        row = Customer(key=key, **values)
        s.add(row)
        s.flush()
        assert row.id is not None
        return row.id


def message_row(
    customer_id: int, message: str = "partner_invitation", sequence: int = 0, *,
    to: str = "it@contoso.example", stage: str = "invited", at: datetime = T0, **fields: Any,
) -> dict[str, Any]:
    """A queued outbox row to one recipient, with a short body; ``fields`` override columns."""
    return new_message_row(
        customer_id=customer_id, message=message, sequence=sequence, stage=stage,
        to_json=outbox.addresses_json([(to, "IT")]), subject=f"{message} {sequence}",
        html="<p>hi</p>", text="hi", now=at, **fields,
    )


def queued(db: Database, customer_id: int, message: str = "partner_invitation",
           sequence: int = 0, **kwargs: Any) -> int:
    """Queue one message (as ``message_row``); returns its outbox id."""
    with db.session() as s:
        ids = outbox.insert_messages(s, [message_row(customer_id, message, sequence, **kwargs)])
    assert len(ids) == 1
    return ids[0]
