"""exactly once under many workers: the mailboxes a message may have been accepted by, the
reconciliation lease, and lookups counted as requests in pacing

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        # Space-separated sender mailboxes whose attempt ended ambiguously: any of them may
        # hold the message in its Sent Items, so reconciliation looks in all of them.
        batch_op.add_column(
            sa.Column("ambiguous_from", sa.Text(), nullable=False, server_default="")
        )
    with op.batch_alter_table("send_slots", schema=None) as batch_op:
        # 'send' counts toward the rate, recipient and concurrency limits; 'lookup' (a Sent
        # Items read) toward concurrency only.
        batch_op.add_column(
            sa.Column("kind", sa.String(length=10), nullable=False, server_default="send")
        )


def downgrade() -> None:
    with op.batch_alter_table("send_slots", schema=None) as batch_op:
        batch_op.drop_column("kind")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("ambiguous_from")
