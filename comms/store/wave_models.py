"""Wave (tag) approval tables: an append-only audit trail of proofs, approvals and holds.

A wave is a tag. Each ``wave_events`` row is one act: ``proof`` (proof copies queued to the
operator), ``approve`` or ``hold``. The newest ``approve``/``hold`` row of a tag is its approval
state; rows are never updated or deleted, so who approved what, when, stays on record.

Proof copies travel through the normal outbox (pacing, leases, exactly-once reconciliation) as
internal rows whose message name starts with ``PROOF_PREFIX``: no campaign message can carry that
name (campaign names are lower_snake_case), so the planner never counts them, and the status,
report and run figures leave them out (``not_proof``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Column, Field, SQLModel, col

from comms.store.models import Message, UTCDateTime

PROOF_PREFIX = "proof:"


def not_proof() -> Any:
    """SQL condition: an outbox row that is not a wave proof copy."""
    return sa.not_(col(Message.message).startswith(PROOF_PREFIX))


class WaveEvent(SQLModel, table=True):
    __tablename__ = "wave_events"
    __table_args__ = (sa.Index("ix_wave_events_tag_id", "tag", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    tag: str = Field(sa_column=Column(sa.String(100), nullable=False))
    action: str = Field(max_length=20)  # proof | approve | hold
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    by: str = Field(default="", max_length=200)
    note: str = Field(default="", sa_column=Column(sa.Text(), nullable=False, default=""))
    # Content hash of what the wave would send (all messages below), and per message name.
    content_hash: str = Field(default="", max_length=64)
    hashes_json: str = Field(
        default="{}", sa_column=Column(sa.Text(), nullable=False, default="{}")
    )
    # proof: the outbox ids of the proof copies; approve: the hash of the proof that was seen.
    detail_json: str = Field(
        default="{}", sa_column=Column(sa.Text(), nullable=False, default="{}")
    )
