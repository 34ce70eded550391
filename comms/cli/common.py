"""What every command shares: the application context, the console, error handling."""

from __future__ import annotations

import getpass
import os
import re
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

# What a terminal would act on instead of showing: C0 and C1 controls (ESC starts ANSI/OSC
# sequences, e.g. a hidden hyperlink), DEL, and the bidirectional overrides that reorder text.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _show_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def tag_value(value: str | None) -> str | None:
    """A ``--tag`` as tags are stored (lower case, trimmed): ``--tag Wave-1`` selects the
    customers an import tagged ``Wave-1``."""
    return value.strip().lower() if value else value


def visible(value: object) -> str:
    """``value`` as text with every control character shown as an escape (``\\x1b``)."""
    return _CONTROL.sub(_show_control, str(value))


def safe(value: object) -> str:
    """Data from outside (customer keys, names, addresses, error texts) ready to print with
    Rich: control characters shown visibly and markup escaped, so ``[link=...]`` or an OSC
    sequence in a customer name is printed as written and never acted on. Every command prints
    customer data through this (or ``visible`` where the output is plain text)."""
    return escape(visible(value))


class CommsGroup(TyperGroup):
    """Turns any ``CommsError`` into one clear line on stderr and the error's exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CommsError as exc:
            # An error's own lines (a message, then its problems) stay lines.
            text = "\n".join(safe(line) for line in str(exc).split("\n"))
            err_console.print(f"[bold red]Error:[/] {text}", highlight=False,
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
