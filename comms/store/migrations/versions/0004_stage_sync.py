"""stage sync: sync_evidence (every observation) and sync_checks (last check per source)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import comms.store.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sync_evidence",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("customer_id", sa.Integer(),
                  sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("at", comms.store.models.UTCDateTime(), nullable=False),
        sa.Column("seen_json", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
    )
    op.create_index("ix_sync_evidence_customer_source", "sync_evidence",
                    ["customer_id", "source", "id"])
    op.create_table(
        "sync_checks",
        sa.Column("customer_id", sa.Integer(),
                  sa.ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("source", sa.String(40), primary_key=True),
        sa.Column("checked_at", comms.store.models.UTCDateTime(), nullable=False),
        sa.Column("problem", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sync_checks")
    op.drop_index("ix_sync_evidence_customer_source", table_name="sync_evidence")
    op.drop_table("sync_evidence")
