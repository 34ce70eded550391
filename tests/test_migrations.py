"""Migrations: upgrading from an empty database (and from the first released schema) gives
exactly the schema the models describe; `comms db upgrade` and `comms db backup` work."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import comms.store.models  # noqa: F401  (registers every table on SQLModel.metadata)
from comms.store.db import Database, alembic_config, open_database

Cli = Callable[..., Any]
# SQLite's reflection cannot read the expression index on lower(key) (migration 0003) and says
# so; the index itself is checked in tests/test_import_keys.py.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index"),
    pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based"),
]
FIRST_RELEASE = "0001"


def downgrade_to_base(db: Database) -> None:
    cfg = alembic_config(db.url)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")


def schema_diffs(db: Database) -> list[Any]:
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, SQLModel.metadata))


def shape(db: Database) -> dict[str, Any]:
    """Tables, columns (name, nullability) and indexes as the database reports them."""
    insp = sa.inspect(db.engine)
    out: dict[str, Any] = {}
    for table in insp.get_table_names():
        if table == "alembic_version":
            continue
        out[table] = (
            sorted((c["name"], c["nullable"]) for c in insp.get_columns(table)),
            sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                   for i in insp.get_indexes(table)),
        )
    return out


def test_upgrade_from_empty_matches_the_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        if not db.is_sqlite:
            # The PostgreSQL fixture hands out an already migrated clone; start from nothing.
            downgrade_to_base(db)
        assert db.current_revision() is None
        db.upgrade()
        assert db.current_revision() == db.head_revision()
        assert schema_diffs(db) == []
        expected = {t.name for t in SQLModel.metadata.sorted_tables}
        assert set(shape(db)) == expected
        for table in SQLModel.metadata.sorted_tables:
            columns, indexes = shape(db)[table.name]
            assert [c for c, _ in columns] == sorted(c.name for c in table.columns)
            # Expression indexes (lower(key)) are not reflected on SQLite; test_import_keys.py
            # checks that one by what it refuses.
            plain = {i.name for i in table.indexes
                     if all(isinstance(e, sa.Column) for e in i.expressions)}
            assert {i[0] for i in indexes} >= plain
    finally:
        db.dispose()


def test_upgrade_from_the_first_release(database_url: str) -> None:
    db = Database(database_url)
    try:
        downgrade_to_base(db)
        db.upgrade(FIRST_RELEASE)
        assert db.current_revision() == FIRST_RELEASE
        db.upgrade()
        assert db.current_revision() == db.head_revision()
        assert schema_diffs(db) == []
    finally:
        db.dispose()


def test_downgrade_to_base_and_up_again(database_url: str) -> None:
    db = open_database(database_url)
    try:
        downgrade_to_base(db)
        assert set(shape(db)) == set()
        assert db.current_revision() is None
        db.ensure_schema()
        assert schema_diffs(db) == []
    finally:
        db.dispose()


def test_db_upgrade_command(cli: Cli, database_url: str) -> None:
    result = cli("db", "upgrade")
    assert result.exit_code == 0
    db = Database(database_url)
    try:
        assert result.stdout == f"Database at revision {db.head_revision()}.\n"
    finally:
        db.dispose()


def test_db_backup(cli: Cli, db: Database, sample_csv: Path, tmp_path: Path) -> None:
    assert cli("customers", "import", str(sample_csv)).exit_code == 0
    target = tmp_path / "backups" / "ledger.db"
    result = cli("db", "backup", str(target))
    if not db.is_sqlite:
        assert result.exit_code == 1
        assert result.stderr == (
            "Error: `comms db backup` copies SQLite ledgers only. On PostgreSQL use pg_dump, "
            "e.g. `pg_dump --format=custom --file=comms.dump DBNAME`, and restore with "
            "pg_restore (see docs/operations.md).\n")
        return
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"Backed up the ledger to {target}. Restore: see docs/operations.md.\n")
    copy = sqlite3.connect(target)
    try:
        assert copy.execute("select count(*) from customers").fetchone() == (24,)
        assert copy.execute("pragma journal_mode").fetchone() == ("delete",)
    finally:
        copy.close()
    again = cli("db", "backup", str(target))
    assert (again.exit_code, again.stderr) == (
        1, f"Error: {target} already exists; choose another file or add --force.\n")
    assert cli("db", "backup", str(target), "--force").exit_code == 0
    # A restored copy opens as a working ledger.
    restored = open_database(f"sqlite:///{target}")
    try:
        assert restored.current_revision() == restored.head_revision()
    finally:
        restored.dispose()
