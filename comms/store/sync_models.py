"""Stage-sync tables: every observation kept as evidence, and each customer's last check.

``sync_evidence`` is appended only when what a source sees of a customer changed since its
previous evidence (so a sync with nothing new writes nothing); ``sync_checks`` holds one row
per customer and source with the last time it was checked and why it could not be verified.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Column, Field, SQLModel

from comms.store.models import UTCDateTime

# How a ``sync_checks`` problem that needs a person begins (the CSP subscription or the reseller
# relationship is gone): unlike "cannot verify", it was observed, and no stage message is
# planned for the customer while it lasts.
ATTENTION = "needs attention: "


class SyncEvidence(SQLModel, table=True):
    __tablename__ = "sync_evidence"
    __table_args__ = (sa.Index("ix_sync_evidence_customer_source", "customer_id", "source", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    customer_id: int = Field(
        sa_column=Column(sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False)
    )
    source: str = Field(max_length=40)  # partner_center | gdap | tenant
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    # What was seen, as JSON (subscription ids, statuses, quantities, assigned licences).
    seen_json: str = Field(sa_column=Column(sa.Text(), nullable=False))
    digest: str = Field(max_length=64)


class SyncCheck(SQLModel, table=True):
    __tablename__ = "sync_checks"

    customer_id: int = Field(
        sa_column=Column(sa.ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)
    )
    source: str = Field(sa_column=Column(sa.String(40), primary_key=True))
    checked_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    # Empty when verified; else why not and how to fix it ("cannot verify: no consent ...").
    problem: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
