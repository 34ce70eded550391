"""The Jinja environment: sandboxed, strict, contained to its template folders, and limited.

- ``StrictUndefined``: a missing variable is an error, never a blank; autoescaping for ``.html``
  files only.
- Containment: every template path is resolved (symlinks included) and a file outside the
  template folders is refused, so an override folder cannot make comms read, say, a private
  key through ``_footer.txt -> /etc/comms/key.pem``.
- Limits: see ``comms.render.limits`` (time budget, size caps).
- Folding: the fast environments write the installation's constants into the source.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from contextvars import ContextVar
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final

from jinja2 import (
    FileSystemLoader,
    TemplateNotFound,
    nodes,
    pass_context,
    pass_eval_context,
    select_autoescape,
)
from jinja2 import StrictUndefined as _StrictUndefined
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup, escape

from comms.errors import UnknownTimeZone
from comms.render import limits
from comms.render.context import DEFAULT_LOCALE
from comms.render.inliner import PH_FMT
from comms.timezones import zone

NAME_RE = re.compile(
    r"^(?P<message>[a-z][a-z0-9_]*)/(?P<part>subject|body)"
    r"(?:\.(?P<locale>[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})?))?\.(?P<ext>txt|html)$"
)

_MONTHS: Final = {
    "en": ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"),
    "de": ("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August",
           "September", "Oktober", "November", "Dezember"),
}


class StrictUndefined(_StrictUndefined):
    """Also refuses ``repr``: ``{{ [customer.nmae] }}`` would otherwise print ``[Undefined]``."""

    __slots__ = ()
    __repr__ = _StrictUndefined._fail_with_undefined_error


class TemplateOutsideFolders(TemplateNotFound):
    """A template name that resolves (through a symlink) to a file outside the folders."""

    def __init__(self, name: str, target: Path) -> None:
        super().__init__(name, f"template {name!r} resolves to {target}, outside the template "
                               "folders; comms refuses to read it (replace the symlink with a "
                               "real file)")
        self.target = target


@pass_context
def _date_filter(ctx: Context, value: object, locale: str | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        # The day in the customer's time zone: sync at 21:00 UTC is the next morning in Sydney.
        tz = str(getattr(ctx.get("customer"), "time_zone", "") or "")
        if value.tzinfo is not None and tz:
            # build_context refuses an unknown zone before any template runs.
            with suppress(UnknownTimeZone):
                value = value.astimezone(zone(tz))
        value = value.date()
    if not isinstance(value, date):
        return str(value)
    lang = (locale or str(ctx.get("locale", DEFAULT_LOCALE))).split("-")[0]
    if lang == "de":
        return f"{value.day}. {_MONTHS['de'][value.month - 1]} {value.year}"
    if lang == "en":
        return f"{value.day} {_MONTHS['en'][value.month - 1]} {value.year}"
    return value.isoformat()


# While the fast path renders a skeleton, printed values are collected here (per thread/task).
collector: ContextVar[list[str] | None] = ContextVar("comms_render_collector", default=None)
_PH_MARKUPS: Final = tuple(Markup(PH_FMT.format(i)) for i in range(512))


@lru_cache(maxsize=65536)
def _escape_str(value: str) -> str:
    return str(escape(value))


@pass_eval_context
def _finalize(eval_ctx: EvalContext, value: Any) -> Any:
    values = collector.get()
    if values is None or not eval_ctx.autoescape:
        return value
    kind = type(value)
    if kind is str:
        text = _escape_str(value)
    elif kind is int:
        text = str(value)
    elif hasattr(value, "__html__"):
        return value  # markup (macro output, |safe) belongs to the skeleton
    else:
        text = str(escape(value))  # StrictUndefined raises here, as in a normal render
    if not text or text.isspace():
        # HTML parsers drop blank text nodes in places: keep blanks in the skeleton itself.
        return Markup(text)
    n = len(values)
    values.append(text)
    return _PH_MARKUPS[n] if n < 512 else Markup(PH_FMT.format(n))


class ContainedLoader(FileSystemLoader):
    """A ``FileSystemLoader`` that only reads files inside its (resolved) folders."""

    def __init__(self, folders: list[Path]) -> None:
        super().__init__([str(f) for f in folders])
        self.roots = [f.resolve() for f in folders]

    def outside(self, path: Path) -> Path | None:
        """Where ``path`` really leads when that is outside every folder, else None."""
        real = path.resolve()
        if any(real.is_relative_to(root) for root in self.roots):
            return None
        return real

    def get_source(
        self, environment: Any, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        target = self.outside(Path(filename))
        if target is not None:
            raise TemplateOutsideFolders(template, target)
        return source, filename, uptodate

    def list_templates(self) -> list[str]:
        # os.walk(followlinks=True) would wander through a symlinked "/" (or loop for ever):
        # follow a linked folder only when it stays inside the template folders.
        found: set[str] = set()
        for root in self.roots:
            for rel in _walk(root, root, self.roots, set()):
                found.add(rel)
        return sorted(found)


def _walk(folder: Path, base: Path, roots: list[Path], seen: set[Path]) -> Iterator[str]:
    real = folder.resolve()
    if real in seen or not any(real.is_relative_to(r) for r in roots):
        return
    seen.add(real)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_dir():
            yield from _walk(path, base, roots, seen)
        elif entry.is_file() or entry.is_symlink():
            yield path.relative_to(base).as_posix()


_FOLD_RE = re.compile(r"\{\{\s*(partner|links)\.([a-z_]+)\s*\}\}|\{\{\s*(threshold)\s*\}\}")
# A file that rebinds one of these names (set/for/with/macro argument) is not folded.
_REBIND_RE = re.compile(
    r"\{%-?\s*(?:set|for|with|macro|import|from)\b[^%]*\b(?:partner|links|threshold)\b"
)


class FoldingLoader(ContainedLoader):
    """Writes the per-installation constants (partner branding, links, threshold) into the
    template source, so they cost nothing per message. Only exact ``{{ partner.x }}``,
    ``{{ links.x }}`` and ``{{ threshold }}`` are folded, escaped as autoescape would; the
    reference renderer (``fast=False``) does not fold, and the equality test compares both."""

    def __init__(self, folders: list[Path], constants: Mapping[str, str]) -> None:
        super().__init__(folders)
        self.constants = dict(constants)

    def get_source(
        self, environment: Any, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        if _REBIND_RE.search(source):
            return source, filename, uptodate
        html = template.endswith(".html")

        def repl(m: re.Match[str]) -> str:
            key = f"{m.group(1)}.{m.group(2)}" if m.group(1) else "threshold"
            value = self.constants.get(key)
            # Values that could read as template syntax or shift line numbers stay dynamic.
            if value is None or "{" in value or "\n" in value or not value.strip():
                return m.group(0)
            return str(escape(value)) if html else value

        return _FOLD_RE.sub(repl, source), filename, uptodate


class Environment(SandboxedEnvironment):
    """The sandbox, limited (see ``comms.render.limits``), with a shortcut for the context's own
    namespaces (plain data we built)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def make_globals(self, d: Mapping[str, Any] | None) -> Any:
        # A plain dict instead of a ChainMap: the globals never change after start-up, and
        # Jinja iterates them for every context it creates (several per message).
        return {**self.globals, **(d or {})}

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is SimpleNamespace and not attribute.startswith("_"):
            try:
                return obj.__dict__[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return limits.instrument(super()._parse(source, name, filename))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        limits.check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any,
             *args: Any, **kwargs: Any) -> Any:
        limits.check_call(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def make_env(
    folders: list[Path], constants: Mapping[str, str] | None = None, *, skeleton: bool = False
) -> Environment:
    loader: ContainedLoader = (
        FoldingLoader(folders, constants) if constants is not None else ContainedLoader(folders)
    )
    env = Environment(
        loader=loader,
        undefined=StrictUndefined,
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False,
                                     default=False),
        # Only the HTML fast path collects values; elsewhere a finalize call per {{ }} is waste.
        finalize=_finalize if skeleton else None,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    env.filters = {name: limits.guard_filter(name, f) for name, f in env.filters.items()}
    env.filters["date"] = _date_filter
    env.filters[limits.LOOP_FILTER] = limits.loop_budget
    env.filters[limits.CONCAT_FILTER] = limits.size_cap
    env.globals["range"] = limits.capped_range
    env.globals.pop("lipsum", None)  # unbounded work, and no email needs it
    return env


def constants(context: Mapping[str, object]) -> dict[str, str]:
    """The values the fast environments fold into the source (strings of partner/links)."""
    out: dict[str, str] = {"threshold": str(context["threshold"])}
    for group in ("partner", "links"):
        ns = context[group]
        assert isinstance(ns, SimpleNamespace)
        for key, value in vars(ns).items():
            if isinstance(value, str):
                out[f"{group}.{key}"] = value
    return out
