"""wave_events: proofs, approvals and holds of a wave (tag), append-only

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from comms.store.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "wave_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("tag", sa.String(100), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("by", sa.String(200), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("hashes_json", sa.Text(), nullable=False),
        sa.Column("detail_json", sa.Text(), nullable=False),
    )
    op.create_index("ix_wave_events_tag_id", "wave_events", ["tag", "id"])


def downgrade() -> None:
    op.drop_index("ix_wave_events_tag_id", table_name="wave_events")
    op.drop_table("wave_events")
