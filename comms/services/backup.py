"""`comms db backup`: a consistent copy of the embedded SQLite ledger while it is in use."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from comms.errors import DatabaseError, OutputError
from comms.fileio import write_atomic_stream
from comms.store.db import Database


def backup_database(db: Database, target: Path, *, force: bool = False) -> Path:
    """Copy the SQLite ledger to ``target`` with SQLite's online backup API.

    Safe while other `comms` processes write (the copy is one consistent snapshot). The copy is
    a single self-contained file (rollback journal, not WAL). PostgreSQL is refused with a
    pointer to ``pg_dump``.
    """
    if not db.is_sqlite:
        raise DatabaseError(
            "`comms db backup` copies SQLite ledgers only. On PostgreSQL use pg_dump, e.g. "
            "`pg_dump --format=custom --file=comms.dump DBNAME`, and restore with pg_restore "
            "(see docs/operations.md)."
        )
    target = Path(target)
    db.refuse_as_output(target)  # even with --force: the copy would replace the live ledger
    if target.is_dir():
        raise OutputError(
            f"Cannot write {target}: it is a directory; give a file name (e.g. "
            f"{target / 'comms-backup.db'})."
        )
    if target.exists() and not force:
        raise OutputError(f"{target} already exists; choose another file or add --force.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # SQLite's backup API needs a database file to copy into; the finished snapshot is then
    # streamed through the one atomic writer (fsync, owner-only mode, rename), so the target
    # appears whole or not at all and memory stays flat whatever the ledger's size.
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=target.parent) as work:
        snapshot = Path(work) / "snapshot.db"
        _snapshot(db, snapshot, target)
        with snapshot.open("rb") as fh:
            write_atomic_stream(target, iter(lambda: fh.read(1 << 20), b""))
    return target


def _snapshot(db: Database, path: Path, target: Path) -> None:
    raw = db.engine.raw_connection()
    try:
        source = raw.driver_connection
        assert isinstance(source, sqlite3.Connection)
        copy = sqlite3.connect(path)
        try:
            source.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
            problems = copy.execute("PRAGMA quick_check").fetchone()
            if problems is None or problems[0] != "ok":
                raise DatabaseError(f"The backup copy failed its integrity check: {problems}")
        finally:
            copy.close()
    except sqlite3.Error as exc:
        raise DatabaseError(f"Backing up the database to {target} failed: {exc}") from exc
    finally:
        raw.close()
