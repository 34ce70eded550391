"""What every command shares: the loaded settings, the database, the console, error handling."""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from comms.config import Settings, load_settings
from comms.errors import CommsError
from comms.store.db import Database, open_database

console = Console()
err_console = Console(stderr=True)


class CommsGroup(TyperGroup):
    """Turns any ``CommsError`` into one clear line on stderr and the error's exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CommsError as exc:
            err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None


def new_app(help: str, **kwargs: Any) -> typer.Typer:
    return typer.Typer(
        help=help, cls=CommsGroup, no_args_is_help=True, rich_markup_mode=None,
        pretty_exceptions_enable=False, add_completion=False, **kwargs,
    )


@dataclass
class State:
    config_file: str | None = None
    _settings: Settings | None = None
    _db: Database | None = None


_state = State()


def set_config_file(path: str | None) -> None:
    _state.config_file = path
    _state._settings = None
    _state._db = None


def settings() -> Settings:
    if _state._settings is None:
        _state._settings = load_settings(_state.config_file)
    return _state._settings


def database() -> Database:
    """The ledger database, upgraded to the newest schema on first use."""
    if _state._db is None:
        _state._db = open_database(settings().database_url())
    return _state._db


def reset() -> None:
    """Forget loaded settings and database (tests call this between invocations)."""
    if _state._db is not None:
        _state._db.dispose()
    _state._settings = None
    _state._db = None
    _state.config_file = None


def actor() -> str:
    """Who is acting, for the audit trail."""
    try:
        user = os.environ.get("COMMS_ACTOR") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return user


def is_tty() -> bool:
    return sys.stdout.isatty()


def confirm_or_abort(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise CommsError(f"{question} Refusing to continue without a terminal; add --yes.")
    if not typer.confirm(question, default=False):
        raise typer.Exit(1)
