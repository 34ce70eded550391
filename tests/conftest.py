"""Shared fixtures: an isolated COMMS_HOME per test, a fresh database (SQLite by default,
PostgreSQL when COMMS_TEST_POSTGRES_URL is set), a CLI runner, and requirement checks that
fail (not skip) in CI when a needed server or browser is missing."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from comms.cli import app
from comms.store.db import Database, open_database

pytest_plugins = ["sandbox_fixtures"]

REPO = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI") or os.environ.get("COMMS_REQUIRE_ALL"))


def require(condition: bool, what: str) -> None:
    """Skip locally when something optional is missing; fail in CI, where nothing may skip."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI (.ci/run installs it)")
    pytest.skip(f"{what} not available")


@pytest.fixture(autouse=True)
def comms_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("COMMS_") and name not in ("COMMS_TEST_POSTGRES_URL",):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMMS_HOME", str(home))
    monkeypatch.setenv("COMMS_ACTOR", "tester")
    monkeypatch.chdir(tmp_path)
    yield home


_PG_TEMPLATE: str | None = None


def _pg_admin_url() -> str | None:
    return os.environ.get("COMMS_TEST_POSTGRES_URL") or None


def _fresh_postgres_db() -> tuple[str, str]:
    """A new, migrated PostgreSQL database cloned from a migrated template (fast)."""
    import sqlalchemy as sa

    global _PG_TEMPLATE
    admin_url = _pg_admin_url()
    assert admin_url
    admin = sa.create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://"),
                             isolation_level="AUTOCOMMIT")
    base = admin_url.rsplit("/", 1)[0]
    with admin.connect() as conn:
        if _PG_TEMPLATE is None:
            name = f"comms_tpl_{uuid.uuid4().hex[:8]}"
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            tpl = open_database(f"{base}/{name}")
            tpl.dispose()
            _PG_TEMPLATE = name
        name = f"comms_t_{uuid.uuid4().hex[:10]}"
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{_PG_TEMPLATE}"')
    admin.dispose()
    return f"{base}/{name}", name


def _drop_postgres_db(name: str) -> None:
    import sqlalchemy as sa

    admin_url = _pg_admin_url()
    assert admin_url
    admin = sa.create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://"),
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def database_url(comms_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database URL, also exported as COMMS_DATABASE_URL for CLI and subprocesses."""
    if _pg_admin_url():
        url, name = _fresh_postgres_db()
        monkeypatch.setenv("COMMS_DATABASE_URL", url)
        yield url
        _drop_postgres_db(name)
    else:
        url = f"sqlite:///{comms_home / 'test.db'}"
        monkeypatch.setenv("COMMS_DATABASE_URL", url)
        yield url


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = open_database(database_url)
    yield database
    database.dispose()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def cli() -> object:
    """Invoke the real `comms` command in-process: cli("customers", "list") -> CliResult."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> CliResult:
        # Each invocation builds its own AppContext and closes it (database disposed) on exit.
        result = runner.invoke(app, list(args), input=input, catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return invoke


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    require(path is not None, "Chromium (Debian package chromium)")
    assert path
    return path


@pytest.fixture
def sample_csv() -> Path:
    return REPO / "examples" / "customers.csv"
