"""The ledger: SQLModel tables, engine and sessions, Alembic migrations."""

from comms.store.db import Database, open_database

__all__ = ["Database", "open_database"]
