"""messages: drop ix_messages_customer_id, which uq_messages_key already serves

``uq_messages_key`` is (customer_id, message, sequence): every lookup by customer_id uses it
(its leading column) on SQLite and PostgreSQL alike. The separate index on customer_id only
cost a B-tree insert for every message queued (issue 16).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_messages_customer_id", table_name="messages")


def downgrade() -> None:
    op.create_index("ix_messages_customer_id", "messages", ["customer_id"], unique=False)
