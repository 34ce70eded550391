"""Jinja failures translated into one ``TemplateError`` naming the template file and line."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from jinja2 import TemplateNotFound, TemplateSyntaxError
from jinja2.exceptions import TemplateError as JinjaTemplateError

from comms.errors import TemplateError
from comms.render.environment import TemplateOutsideFolders
from comms.render.limits import RenderLimitExceeded


def _template_location(exc: BaseException, folders: list[Path]) -> tuple[str, int] | None:
    """The innermost template file and line in a Jinja traceback (Jinja rewrites its frames)."""
    roots = [str(f.resolve()) for f in folders] + [str(f) for f in folders]
    found: tuple[str, int] | None = None
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if any(filename.startswith(r) for r in roots):
            found = (filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def to_template_error(exc: Exception, folders: list[Path], what: str) -> TemplateError:
    """``exc`` from loading or rendering ``what`` as a ``TemplateError`` naming file:line."""
    if isinstance(exc, TemplateSyntaxError):
        where = f"{exc.filename or exc.name or what}:{exc.lineno}"
        return TemplateError(
            f"{where}: template syntax error: {exc.message}. Fix the template, then run "
            "`comms templates check`."
        )
    loc = _template_location(exc, folders)
    where = f"{loc[0]}:{loc[1]}" if loc else what
    if isinstance(exc, TemplateOutsideFolders):
        return TemplateError(f"{where}: {exc.message}.")
    if isinstance(exc, TemplateNotFound):
        return TemplateError(
            f"{what}: template {exc.name!r} not found (looked in "
            f"{', '.join(str(f) for f in folders)}). Create it or fix the name."
        )
    detail = exc.message if isinstance(exc, JinjaTemplateError) and exc.message else str(exc)
    if isinstance(exc, RenderLimitExceeded):
        return TemplateError(
            f"{where}: stopped: {detail}; make the template do less work, then run "
            "`comms templates check`."
        )
    hint = (
        "use only the variables listed in docs/templates.md"
        if "undefined" in detail or "has no attribute" in detail
        else "fix the template"
    )
    return TemplateError(
        f"{where}: {detail} ({type(exc).__name__}); {hint}, then run `comms templates check`."
    )
