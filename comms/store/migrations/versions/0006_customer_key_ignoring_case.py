"""customers: one key per customer ignoring case (unique index on lower(key))

Imports match keys ignoring case (``CUST-1`` and ``cust-1`` are one customer); the index makes
the ledger hold to that even under two concurrent imports, and makes the lookup fast. A ledger
that already holds two keys differing only in case (imported before this rule) gets a plain
index instead, so the upgrade never fails; an import then updates the first of them (by
id).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEX = "uq_customers_key_lower"


def upgrade() -> None:
    clash = op.get_bind().execute(sa.text(
        "SELECT lower(key) FROM customers GROUP BY lower(key) HAVING count(*) > 1 LIMIT 1"
    )).first()
    op.create_index(INDEX, "customers", [sa.text("lower(key)")], unique=clash is None)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="customers")
