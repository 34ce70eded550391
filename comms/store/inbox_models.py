"""The inbox's ledger tables: every inbound message read from a sender mailbox (once), the delta
link per mailbox, and per-customer inbox state (flag, reminder hold, last account-manager note).

Imported by ``comms.store.models`` so Alembic and ``SQLModel.metadata`` see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlmodel import Column, Field, SQLModel

from comms.store.models import UTCDateTime, _dt

KINDS = ("bounce", "reply", "auto", "optout", "unmatched", "error")


class InboundMessage(SQLModel, table=True):
    """One message read from a sender mailbox's Inbox, with what it was taken for and why.

    Inserted in the same transaction as its effects: the unique key (mailbox, graph id) is what
    makes a re-read (a crash mid-page, a second sync) a no-op."""

    __tablename__ = "inbound_messages"
    __table_args__ = (
        sa.UniqueConstraint("mailbox", "graph_id", name="uq_inbound_mailbox_graph_id"),
        sa.Index("ix_inbound_kind", "kind"),
        sa.Index("ix_inbound_address_kind", "address", "kind"),  # soft bounces per address
    )

    id: int | None = Field(default=None, primary_key=True)
    mailbox: str = Field(sa_column=Column(sa.String(320), nullable=False))
    graph_id: str = Field(sa_column=Column(sa.String(400), nullable=False))
    internet_message_id: str = Field(
        default="", sa_column=Column(sa.String(998), nullable=False, default="", index=True)
    )
    conversation_id: str = Field(
        default="", sa_column=Column(sa.String(400), nullable=False, default="", index=True)
    )
    received_at: datetime | None = _dt(nullable=True)
    from_address: str = Field(default="", max_length=320)
    subject: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    preview: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    # bounce | reply | auto | optout | unmatched | error (could not be processed: detail says
    # why; read again, e.g. after `comms inbox sync --restart`, it is processed again)
    kind: str = Field(max_length=20)
    rule: str = Field(default="", max_length=100)  # the classifier rule that decided
    detail: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    status_code: str = Field(default="", max_length=20)  # bounces: 5.1.1, 4.4.7 ...
    hard: bool = False
    address: str = Field(default="", max_length=320)  # bounced recipient / replying contact
    customer_id: int | None = Field(
        default=None,
        sa_column=Column(sa.ForeignKey("customers.id"), nullable=True, index=True),
    )
    message_id: int | None = Field(default=None, sa_column=Column(sa.Integer(), nullable=True))
    effects: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    processed_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class InboxMailbox(SQLModel, table=True):
    """Where the next sync of one mailbox's Inbox starts (Graph's ``@odata.deltaLink``)."""

    __tablename__ = "inbox_mailboxes"

    mailbox: str = Field(sa_column=Column(sa.String(320), primary_key=True))
    delta_link: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    synced_at: datetime | None = _dt(nullable=True)


class InboxCustomerState(SQLModel, table=True):
    """What the inbox decided about a customer: flagged after a hard bounce, reminders held
    after a human reply, and the day of the last account-manager note (one a day at most)."""

    __tablename__ = "inbox_customer_state"

    customer_id: int = Field(
        sa_column=Column(sa.ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)
    )
    flagged: bool = False
    flag_reason: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    reminders_held_until: datetime | None = _dt(nullable=True)
    updated_at: datetime | None = _dt(nullable=True)


def reminder_holds(session: Any, customer_ids: Sequence[int]) -> dict[int, datetime]:
    """Customer id -> until when its reminders are held (only customers with a hold)."""
    out: dict[int, datetime] = {}
    ids = list(customer_ids)
    for start in range(0, len(ids), 900):
        rows = session.execute(_holds_read(), {"ids": ids[start:start + 900]}).all()
        out.update({int(cid): until for cid, until in rows})
    return out


@cache  # built once; the ids are bound at execution (see comms.store.repo._ids_in)
def _holds_read() -> Any:
    table = InboxCustomerState.__table__  # type: ignore[attr-defined]
    return sa.select(table.c.customer_id, table.c.reminders_held_until).where(
        table.c.customer_id.in_(sa.bindparam("ids", expanding=True)),
        table.c.reminders_held_until.is_not(None),
    )
