"""Engines, sessions and migrations for SQLite (default) and PostgreSQL.

SQLite runs in WAL mode with a busy timeout and foreign keys on; writers that must serialise
(claims, pacing) open their transaction with ``BEGIN IMMEDIATE``. On PostgreSQL the same code
uses row locks (``FOR UPDATE [SKIP LOCKED]``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session

from comms.config import MASK, mask_url, url_password
from comms.errors import DatabaseError, RequestRefused

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# The files SQLite keeps beside a ledger: replacing one loses the last commits or corrupts it.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy not issue BEGIN itself; we issue BEGIN / BEGIN IMMEDIATE in `begin` below.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA wal_autocheckpoint=10000")
    cur.close()


def _create_private(path: Path) -> None:
    """Create a new SQLite ledger file owner-only (0600) before SQLite opens it: it holds
    customer data, and SQLite gives its -wal and -shm files the database file's mode."""
    if path.exists():
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        raise DatabaseError(
            f"Cannot create the ledger {path}: {exc.strerror}. Choose a folder you can write "
            "to (COMMS_HOME or [database] url)."
        ) from exc


def _scrub(url: str, text: str) -> str:
    """``text`` (a driver's error) without any piece of the URL's password. The config refuses
    a password with an un-encoded "@" (a driver reads the rest as the host and names it in
    "failed to resolve host"); a URL given directly (tests, scripts) is scrubbed all the same."""
    password = url_password(url)
    pieces = {password, *re.split(r"[@/?#:]", password)}
    for piece in sorted((p for p in pieces if len(p) >= 3), key=len, reverse=True):
        text = text.replace(piece, MASK)
    return text


def _unreachable(url: str, exc: OperationalError) -> DatabaseError:
    """An OperationalError when connecting: the server is down, the address or the password is
    wrong. One line naming where and what to check; the URL's password is never shown."""
    where = mask_url(url).split("@")[-1]
    why = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else ""
    why = _scrub(url, why)
    return DatabaseError(
        f"Cannot use the database at {where}: {why}. Check that the server is running and "
        "reachable, and COMMS_DATABASE_URL or [database] url (host, port, user, password)."
    )


def make_engine(url: str) -> Engine:
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:" and not path.startswith("file:"):
                _create_private(Path(path))
            engine = sa.create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)

            @event.listens_for(engine, "begin")
            def _begin(conn: sa.Connection) -> None:
                mode = conn.info.pop("begin_mode", "")
                conn.exec_driver_sql(f"BEGIN {mode}".strip())

            return engine
        return sa.create_engine(url, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise DatabaseError(
            f"Cannot use database URL {url.split('@')[-1]!r}: {exc}. "
            "Check COMMS_DATABASE_URL or [database] url."
        ) from exc


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


class Database:
    """One database: an engine plus helpers to open sessions and migrate."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self, *, immediate: bool = False) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error.

        ``immediate=True`` takes SQLite's write lock at BEGIN, so read-then-write decisions
        (claims, pacing) cannot interleave between processes. On PostgreSQL callers lock rows
        with ``FOR UPDATE`` instead.
        """
        try:
            with self.engine.connect() as conn:
                if immediate and self.is_sqlite:
                    conn.info["begin_mode"] = "IMMEDIATE"
                with conn.begin(), Session(bind=conn, expire_on_commit=False) as session:
                    yield session
                    session.flush()
        except OperationalError as exc:
            raise DatabaseError(f"Database error: {_scrub(self.url, str(exc.orig))}") from exc

    def ledger_files(self) -> tuple[Path, ...]:
        """The SQLite ledger file and its companions (``-wal``, ``-shm``, ``-journal``, whether
        they exist now or not), resolved; none on PostgreSQL or for an in-memory database."""
        name = self.engine.url.database if self.is_sqlite else None
        if not name or name == ":memory:" or name.startswith("file:"):
            return ()
        ledger = Path(name).expanduser().resolve()
        return (ledger, *(ledger.with_name(ledger.name + c) for c in SQLITE_COMPANIONS))

    def refuse_as_output(self, path: str | Path) -> None:
        """Refuse (``RequestRefused``, before anything is written) an output file that is the
        ledger or one of its companions: an export or report written there replaces the live
        database. Any other existing file may be overwritten (cron rewrites the same report)."""
        files = self.ledger_files()
        target = Path(path).expanduser()
        resolved = target.resolve()
        for f in files:
            same = resolved == f
            if not same and target.exists() and f.exists():
                same = os.path.samefile(target, f)  # a hard link, or another case of the name
            if same:
                what = ("the ledger database" if f == files[0]
                        else f"the ledger's {f.name.removeprefix(files[0].name)} file")
                raise RequestRefused(
                    f"Refusing to write {target}: it is {what} ({f}); writing there would "
                    "destroy the ledger. Nothing was written; choose another file.")

    def current_revision(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except OperationalError as exc:
            raise _unreachable(self.url, exc) from exc

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(alembic_config(self.url)).get_current_head()

    def upgrade(self, revision: str = "head") -> None:
        cfg = alembic_config(self.url)
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"Migrating the database failed: {exc}") from exc

    def ensure_schema(self) -> None:
        """Upgrade to the newest schema if needed (automatic for the embedded SQLite)."""
        if self.current_revision() != self.head_revision():
            self.upgrade()

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(url: str, *, upgrade: bool = True) -> Database:
    db = Database(url)
    if upgrade:
        db.ensure_schema()
    return db
