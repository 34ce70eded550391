"""The ledger's tables (SQLModel). Schema changes go through Alembic (comms/store/migrations).

All datetimes are stored as UTC and come back timezone-aware (``UTCDateTime``), on SQLite and
PostgreSQL alike.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Column, Field, SQLModel

from comms.domain import MessageStatus
from comms.store import bodies as codec
from comms.store.bodies import Bodies


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC; refuses naive datetimes so no local time slips in."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the ledger; pass an aware one")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # SQLite raw text, e.g. from a hand-written query
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _dt(nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class Customer(SQLModel, table=True):
    __tablename__ = "customers"
    __table_args__ = (
        sa.Index("ix_customers_stage_next_due", "stage", "next_due_at"),
        # Keys compare ignoring case (CUST-1 is cust-1); stored as given (migration 0003).
        sa.Index("uq_customers_key_lower", sa.text("lower(key)"), unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(sa_column=Column(sa.String(100), unique=True, nullable=False))
    name: str = Field(sa_column=Column(sa.String(300), nullable=False))
    tenant_id: str = Field(default="", sa_column=Column(sa.String(64), nullable=False, default=""))
    primary_domain: str = Field(default="", max_length=255)
    licences: int = 0
    locale: str = Field(default="en", max_length=20)
    time_zone: str = Field(default="Europe/London", max_length=64)
    stage: str = Field(sa_column=Column(sa.String(64), nullable=False))
    stage_entered_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    paused: bool = False
    opted_out: bool = False
    lost: bool = False
    account_manager_name: str = Field(default="", max_length=200)
    account_manager_email: str = Field(default="", max_length=320)
    # When the CSP subscription went live (entering awaiting_cancellation): double billing clock.
    csp_live_at: datetime | None = _dt(nullable=True)
    # When the planner next has something for this customer (None: nothing scheduled).
    next_due_at: datetime | None = _dt(nullable=True)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class CustomerTag(SQLModel, table=True):
    __tablename__ = "customer_tags"

    customer_id: int = Field(
        sa_column=Column(sa.ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)
    )
    tag: str = Field(sa_column=Column(sa.String(100), primary_key=True, index=True))


class Contact(SQLModel, table=True):
    __tablename__ = "contacts"
    __table_args__ = (
        sa.UniqueConstraint("customer_id", "email", name="uq_contacts_customer_email"),
    )

    id: int | None = Field(default=None, primary_key=True)
    customer_id: int = Field(
        sa_column=Column(
            sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    name: str = Field(default="", max_length=200)
    email: str = Field(max_length=320)
    role: str = Field(default="primary", max_length=20)  # primary | billing | technical


class StageEvent(SQLModel, table=True):
    """The audit trail: appended, never updated or deleted."""

    __tablename__ = "stage_events"

    id: int | None = Field(default=None, primary_key=True)
    customer_id: int = Field(
        sa_column=Column(sa.ForeignKey("customers.id"), nullable=False, index=True)
    )
    kind: str = Field(max_length=20)  # stage | pause | ... | resend | suppression_lifted
    from_stage: str | None = Field(default=None, max_length=64)
    to_stage: str | None = Field(default=None, max_length=64)
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    by: str = Field(default="", max_length=200)
    source: str = Field(default="", max_length=50)  # cli | import | run | send
    note: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    forced: bool = False


class Message(SQLModel, table=True):
    """The outbox: one row per planned email; content frozen at queue time."""

    __tablename__ = "messages"
    __table_args__ = (
        sa.UniqueConstraint("customer_id", "message", "sequence", name="uq_messages_key"),
        sa.Index("ix_messages_status_send_after", "status", "send_after"),
    )
    STATUSES: ClassVar[tuple[str, ...]] = (
        *(s.value for s in MessageStatus),
    )

    id: int | None = Field(default=None, primary_key=True)
    send_id: str = Field(sa_column=Column(sa.String(64), unique=True, nullable=False))
    # Looked up through uq_messages_key, whose leading column it is (migration 0011).
    customer_id: int = Field(sa_column=Column(sa.ForeignKey("customers.id"), nullable=False))
    message: str = Field(max_length=100)
    sequence: int = 0
    stage: str = Field(max_length=64)
    internal: bool = False
    status: str = Field(default=MessageStatus.QUEUED.value, max_length=20)
    to_json: str = Field(sa_column=Column(sa.Text(), nullable=False))
    cc_json: str = Field(default="[]", sa_column=Column(sa.Text(), nullable=False, default="[]"))
    reply_to: str = Field(default="", max_length=320)
    subject: str = Field(sa_column=Column(sa.Text(), nullable=False))
    # The frozen HTML + text, compressed (migration 0009); read them through body_html() /
    # body_text(), write them through new_message_row(html=, text=) or store.bodies.encode.
    body: bytes = Field(sa_column=Column(sa.LargeBinary(), nullable=False))
    locale: str = Field(default="en", max_length=20)
    sender: str | None = Field(default=None, max_length=320)
    send_after: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    # End of the send window it was planned in: a message still queued after this (a backlog,
    # throttling) waits for the customer's next window instead of going out at night.
    # None: no window (an operator's `comms send`).
    send_before: datetime | None = _dt(nullable=True)
    attempts: int = 0
    last_error: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    error_code: str = Field(default="", max_length=100)
    lease_until: datetime | None = _dt(nullable=True)
    claimed_by: str = Field(default="", max_length=200)
    # First moment the outcome became ambiguous; reconciliation waits a grace period from here.
    unknown_since: datetime | None = _dt(nullable=True)
    # Sender mailboxes whose attempt ended ambiguously (space-separated): the message may sit
    # in any of their Sent Items, so reconciliation looks in every one before a resend.
    ambiguous_from: str = Field(
        default="", sa_column=Column(sa.Text(), nullable=False, server_default="")
    )
    sent_at: datetime | None = _dt(nullable=True)
    request_id: str = Field(default="", max_length=100)
    note: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))

    def bodies(self) -> Bodies:
        """The frozen HTML and text, exactly as rendered when the message was queued."""
        return codec.decode(self.body)

    def body_html(self) -> str:
        return self.bodies().html

    def body_text(self) -> str:
        return self.bodies().text


# The bookkeeping columns of a freshly queued outbox row (Core inserts bypass the model's
# defaults, so every writer of rows starts from these).
_NEW_MESSAGE: dict[str, Any] = {
    "internal": False, "status": MessageStatus.QUEUED.value, "cc_json": "[]", "reply_to": "",
    "locale": "en", "sender": None, "send_before": None, "attempts": 0, "last_error": "",
    "error_code": "", "lease_until": None, "claimed_by": "", "unknown_since": None,
    "sent_at": None, "request_id": "", "note": "",
}


def new_message_row(
    *, customer_id: int, message: str, sequence: int, stage: str, to_json: str, subject: str,
    html: str = "", text: str = "", body: bytes | None = None, now: datetime, **fields: Any,
) -> dict[str, Any]:
    """A complete row for ``outbox.insert_messages``: a fresh send id, queued at ``now``;
    ``fields`` override any column (cc_json, internal, send_before, note...). The bodies are
    ``html`` + ``text``, or ``body`` when the caller encoded them already."""
    row: dict[str, Any] = {
        **_NEW_MESSAGE, "send_id": fields.pop("send_id", None) or uuid.uuid4().hex,
        "customer_id": customer_id,
        "message": message, "sequence": sequence, "stage": stage, "to_json": to_json,
        "subject": subject, "body": codec.encode(html, text) if body is None else body,
        "send_after": now, "created_at": now, "updated_at": now,
    }
    unknown = set(fields) - set(Message.model_fields)
    if unknown:
        raise TypeError(f"not outbox columns: {sorted(unknown)}")
    row.update(fields)
    return row


class Suppression(SQLModel, table=True):
    """Addresses that must never be mailed (opt-outs, hard bounces)."""

    __tablename__ = "suppressions"

    email: str = Field(sa_column=Column(sa.String(320), primary_key=True))
    reason: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    by: str = Field(default="", max_length=200)


class SenderMailbox(SQLModel, table=True):
    """One row per sender mailbox: the lock that serialises pacing decisions across processes."""

    __tablename__ = "sender_mailboxes"

    address: str = Field(sa_column=Column(sa.String(320), primary_key=True))
    # Throttled by Graph: nothing is sent from this mailbox before this moment.
    blocked_until: datetime | None = _dt(nullable=True)


class SendSlot(SQLModel, table=True):
    """A send request to a mailbox: counts toward its rate, concurrency and daily recipients."""

    __tablename__ = "send_slots"
    __table_args__ = (
        sa.Index("ix_send_slots_mailbox_started", "mailbox", "started_at"),
        sa.Index("ix_send_slots_started", "started_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    mailbox: str = Field(sa_column=Column(sa.String(320), nullable=False))
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    # In flight until finished_at is set or the lease runs out (a killed worker).
    lease_until: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    finished_at: datetime | None = _dt(nullable=True)
    recipients: int = 1
    message_id: int | None = None
    # send: counts toward rate, recipients and concurrency; lookup (Sent Items): concurrency only.
    kind: str = Field(
        default="send", sa_column=Column(sa.String(10), nullable=False, server_default="send")
    )
    # Recipients outside the partner tenant's accepted domains: the tenant-wide budget (TERRL).
    external: int = Field(
        default=0, sa_column=Column(sa.Integer(), nullable=False, server_default="0")
    )


from comms.store import inbox_models as _inbox_models  # noqa: E402,F401  (inbox tables)
from comms.store import sync_models as _sync_models  # noqa: E402,F401  (stage-sync tables)
from comms.store import wave_models as _wave_models  # noqa: E402,F401  (wave approvals)
