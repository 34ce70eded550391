"""One `comms run` at a time per database, with locks the operating system or the server drops
when the holder dies (a SIGKILLed run never leaves a stale lock behind).

SQLite: an exclusive ``flock`` on ``<database file>.run.lock``.
PostgreSQL: a session-level advisory lock held on a dedicated connection.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy as sa

from comms.errors import RunLocked
from comms.store.db import Database


def _key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class RunLock:
    def __init__(self, db: Database, name: str = "run") -> None:
        self.db = db
        self.name = name
        self._fd: int | None = None
        self._conn: sa.Connection | None = None

    def acquire(self) -> RunLock:
        if self.db.is_sqlite:
            self._acquire_file()
        else:
            self._acquire_advisory()
        return self

    def _acquire_file(self) -> None:
        import fcntl

        path = self.db.url.split("///", 1)[-1]
        if not path or path == ":memory:":
            return
        lock_path = Path(path + f".{self.name}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunLocked(self._message(holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd

    def _acquire_advisory(self) -> None:
        conn = self.db.engine.connect()
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _key(self.name)})
        if not got.scalar():
            conn.close()
            raise RunLocked(self._message(""))
        conn.commit()
        self._conn = conn

    def _message(self, holder: str) -> str:
        who = f" ({holder})" if holder else ""
        return (
            f"Another `comms {self.name}` is using this database{who}; this one stops "
            "without doing anything. Wait for it to finish (cron: schedule runs further apart)."
        )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _key(self.name)})
            finally:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> Any:
        self.release()
        return None
