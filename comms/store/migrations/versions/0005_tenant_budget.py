"""send_slots.external: external recipients of a send, for the tenant-wide budget (TERRL)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("send_slots", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("external", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.create_index("ix_send_slots_started", ["started_at"])


def downgrade() -> None:
    with op.batch_alter_table("send_slots", schema=None) as batch_op:
        batch_op.drop_index("ix_send_slots_started")
        batch_op.drop_column("external")
