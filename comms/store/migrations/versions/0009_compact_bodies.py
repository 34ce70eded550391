"""messages: the frozen html + text move into one compressed column, body (issue 16)

Every existing row is converted in both directions (comms.store.bodies is the one codec), in
batches of 500 rows walked by id, so memory stays flat however large the outbox is.

On SQLite the columns are added and dropped with plain ALTER TABLE (SQLite >= 3.35) instead of
Alembic's copy-the-table batch mode: the table is not rebuilt, so nothing that references
messages by foreign key is touched. ALTER TABLE cannot make an added column NOT NULL without a
default there, hence the empty default on SQLite; every writer sets the column. The space the
old columns held is reused by later rows; `VACUUM` (SQLite) or `VACUUM FULL messages`
(PostgreSQL) returns it to the file system (docs/benchmarks.md, "Outbox storage").

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

from comms.store import bodies

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BATCH = 500

_messages = sa.table(
    "messages",
    sa.column("id", sa.Integer()),
    sa.column("html", sa.Text()),
    sa.column("text", sa.Text()),
    sa.column("body", sa.LargeBinary()),
)


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _require_drop_column() -> None:
    if sqlite3.sqlite_version_info < (3, 35, 0):
        raise RuntimeError(
            f"This migration needs SQLite 3.35 or newer (ALTER TABLE DROP COLUMN); Python here "
            f"has SQLite {sqlite3.sqlite_version}. Run comms on a Python with a newer SQLite."
        )


def _convert(read: list[Any], write: dict[str, Any], change: Callable[[Any], dict[str, Any]]
             ) -> None:
    """Rewrite every row, ``BATCH`` rows at a time in id order."""
    conn = op.get_bind()
    t = _messages.c
    update = sa.update(_messages).where(t.id == sa.bindparam("_id")).values(**write)
    last = 0
    while True:
        rows = conn.execute(
            sa.select(t.id, *read).where(t.id > last).order_by(t.id).limit(BATCH)
        ).all()
        if not rows:
            return
        conn.execute(update, [{"_id": r[0], **change(r)} for r in rows])
        last = rows[-1][0]


def upgrade() -> None:
    if _sqlite():
        _require_drop_column()
        op.add_column("messages", sa.Column("body", sa.LargeBinary(), nullable=False,
                                            server_default=sa.text("x''")))
    else:
        op.add_column("messages", sa.Column("body", sa.LargeBinary(), nullable=True))
    t = _messages.c
    _convert([t.html, t.text], {"body": sa.bindparam("_body")},
             lambda r: {"_body": bodies.encode(r[1], r[2])})
    if not _sqlite():
        op.alter_column("messages", "body", existing_type=sa.LargeBinary(), nullable=False)
    for name in ("html", "text"):
        _drop(name)


def downgrade() -> None:
    for name in ("html", "text"):
        if _sqlite():
            _require_drop_column()
            op.add_column("messages", sa.Column(name, sa.Text(), nullable=False,
                                                server_default=""))
        else:
            op.add_column("messages", sa.Column(name, sa.Text(), nullable=True))

    def split(r: Any) -> dict[str, Any]:
        html, text = bodies.decode(r[1])
        return {"_html": html, "_text": text}

    _convert([_messages.c.body], {"html": sa.bindparam("_html"), "text": sa.bindparam("_text")},
             split)
    if not _sqlite():
        for name in ("html", "text"):
            op.alter_column("messages", name, existing_type=sa.Text(), nullable=False)
    _drop("body")


def _drop(name: str) -> None:
    if _sqlite():
        op.execute(f'ALTER TABLE messages DROP COLUMN "{name}"')
    else:
        op.drop_column("messages", name)
