"""messages: mark the rows an operator withdrew (`comms outbox withdraw`)

A row the run withdrew itself (the customer moved on, paused, opted out) is queued again when
the planner plans it again (the customer came back, was resumed). A row an operator withdrew
must never be sent: from now on `outbox withdraw` writes ``error_code =
'withdrawn_by_operator'``. Rows withdrawn by an operator before this revision are recognised by
the note that command has always written ("withdrawn by <who>.").

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_MARK = "withdrawn_by_operator"


def upgrade() -> None:
    op.execute(
        f"UPDATE messages SET error_code = '{_MARK}' "
        "WHERE status = 'withdrawn' AND note LIKE '%withdrawn by %'"
    )


def downgrade() -> None:
    op.execute(f"UPDATE messages SET error_code = '' WHERE error_code = '{_MARK}'")
