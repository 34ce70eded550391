"""What every command shares: the application context, the console, error handling."""

from __future__ import annotations

import getpass
import os
import sys
from contextvars import ContextVar
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from comms.errors import CommsError, RequestRefused
from comms.services.context import AppContext

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


# The context of the command running now: set by the root callback for one invocation and
# cleared when it ends (a ContextVar, so in-process invocations never see each other's).
_current: ContextVar[AppContext | None] = ContextVar("comms_app_context", default=None)


def open_context(ctx: typer.Context, config_file: str | None) -> AppContext:
    """Build the invocation's ``AppContext``; it is closed when the command ends."""
    obj = AppContext(config_file=config_file)
    ctx.obj = obj
    token = _current.set(obj)

    def close() -> None:
        obj.close()
        _current.reset(token)

    ctx.call_on_close(close)
    return obj


def app() -> AppContext:
    """The context of the running command (built by the root callback, ``comms --config``)."""
    obj = _current.get()
    if obj is None:
        raise RuntimeError("no comms command is running (the root callback builds the context)")
    return obj


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
        raise RequestRefused(f"{question} Refusing to continue without a terminal; add --yes.")
    if not typer.confirm(question, default=False):
        raise typer.Exit(1)
