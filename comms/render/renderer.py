"""The ``Renderer``: finds the template files of a message and locale, renders subject, HTML
(CSS inlined) and text, and turns every template failure into a ``TemplateError``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

from jinja2 import Template, TemplateNotFound, TemplateSyntaxError

from comms.config import Settings
from comms.domain import ContactInfo, CustomerInfo, Observation
from comms.errors import TemplateError
from comms.paths import builtin_templates_dir
from comms.render import limits
from comms.render.context import (
    DEFAULT_LOCALE,
    build_context,
    locale_chain,
    make_branding,
)
from comms.render.environment import NAME_RE, ContainedLoader, collector, constants, make_env
from comms.render.errors import to_template_error
from comms.render.inliner import SkeletonInliner, inline_css

_EPOCH: Final = datetime(2000, 1, 1, tzinfo=ZoneInfo("UTC"))
_PROBE: Final = CustomerInfo(key="probe", name="probe", licences=0, stage="",
                             stage_entered_at=_EPOCH, time_zone="UTC")


@dataclass(frozen=True)
class RenderedEmail:
    """One message rendered for one customer, exactly as it will be sent."""

    message: str
    locale: str
    subject: str
    html: str
    text: str


@dataclass(frozen=True)
class TemplateSet:
    """The template files one (message, locale) resolved to, as loader names."""

    message: str
    locale: str
    subject: str
    html: str
    text: str | None
    layout_html: str
    layout_text: str


def _user_folder(settings: Settings, template_dir: Path | None) -> Path | None:
    user = template_dir or (Path(settings.templates.folder) if settings.templates.folder
                            else None)
    if user is not None and not user.is_dir():
        raise TemplateError(
            f"Template folder {user} is not a directory; fix [templates] folder in the "
            "config (or create the folder)."
        )
    return user


class Renderer:
    """Renders campaign messages from the built-in templates and an optional user folder.

    ``time_budget`` is the wall-clock budget of one template render in seconds."""

    def __init__(self, settings: Settings, *, template_dir: Path | None = None,
                 time_budget: float = limits.TIME_BUDGET) -> None:
        self.settings = settings
        user = _user_folder(settings, template_dir)
        builtin = builtin_templates_dir()
        self.folders: list[Path] = [user, builtin] if user is not None else [builtin]
        self.user_folder = user
        self.time_budget = time_budget
        # The reference environment renders templates exactly as written; the fast one has the
        # installation's constants folded in (see environment.FoldingLoader).
        self.env = make_env(self.folders)
        self._branding = make_branding(settings)
        sample = build_context(settings, _PROBE, message="", now=_EPOCH, branding=self._branding)
        self._folded = constants(sample)
        self.fast_env = make_env(self.folders, self._folded, skeleton=True)
        self.fast_text_env = make_env(self.folders, self._folded)
        self._names: frozenset[str] = frozenset(
            n.replace("\\", "/") for n in self.env.list_templates()
        )
        self._sets: dict[tuple[str, str], TemplateSet] = {}
        self._templates: dict[tuple[str, bool], Template] = {}
        self._globals: dict[str, Any] = dict(self.env.globals)
        self._inliner = SkeletonInliner()

    @property
    def _skeletons(self) -> dict[str, Any]:
        return self._inliner.skeletons

    # -- discovery --------------------------------------------------------------------------

    def messages(self) -> list[str]:
        """Every message with at least one HTML body, sorted by name."""
        out = {m.group("message") for n in self._names if (m := NAME_RE.match(n))
               and m.group("part") == "body" and m.group("ext") == "html"}
        return sorted(out)

    def has_message(self, message: str) -> bool:
        """True when the message has an (English) HTML body in either folder."""
        return f"{message}/body.html" in self._names

    def locales(self, message: str) -> list[str]:
        """The locales a message has its own HTML body for (English first)."""
        out = {DEFAULT_LOCALE} if self.has_message(message) else set()
        for n in self._names:
            m = NAME_RE.match(n)
            if m and m.group("message") == message and m.group("part") == "body" \
                    and m.group("ext") == "html" and m.group("locale"):
                out.add(m.group("locale"))
        return sorted(out, key=lambda x: (x != DEFAULT_LOCALE, x))

    def template_names(self) -> frozenset[str]:
        """Every template file name (relative, ``/``-separated) in the user and built-in folders."""
        return self._names

    def source_path(self, name: str) -> Path:
        """The file a loader name resolves to (the user folder wins)."""
        for folder in self.folders:
            p = folder / name
            if p.is_file():
                return p
        return self.folders[-1] / name

    def outside_folders(self) -> list[tuple[Path, Path]]:
        """Template files that lead (through a symlink) outside the template folders, with
        where they lead: the loader refuses to read them."""
        loader = self.env.loader
        assert isinstance(loader, ContainedLoader)
        out: list[tuple[Path, Path]] = []
        for name in sorted(self._names):
            path = self.source_path(name)
            target = loader.outside(path)
            if target is not None:
                out.append((path, target))
        return out

    def _variant(self, base: str, ext: str, locale: str) -> str | None:
        name = f"{base}.{ext}" if locale == DEFAULT_LOCALE else f"{base}.{locale}.{ext}"
        if name in self._names:
            return name
        if locale == DEFAULT_LOCALE and f"{base}.en.{ext}" in self._names:
            return f"{base}.en.{ext}"
        return None

    def resolve(self, message: str, locale: str) -> TemplateSet:
        """The files a message renders from for a customer locale (with English fallback)."""
        key = (message, locale)
        found = self._sets.get(key)
        if found is None:
            loc = next((lc for lc in locale_chain(locale)
                        if self._variant(f"{message}/body", "html", lc)), None)
            if loc is None:
                known = ", ".join(self.messages()) or "none"
                raise TemplateError(
                    f"No template for message {message!r} (expected {message}/body.html in "
                    f"{' or '.join(str(f) for f in self.folders)}). Known messages: {known}."
                )
            found = self._sets[key] = self._template_set(message, loc)
        return found

    def _template_set(self, message: str, loc: str) -> TemplateSet:
        html = self._variant(f"{message}/body", "html", loc)
        assert html is not None
        subject = self._variant(f"{message}/subject", "txt", loc)
        if subject is None:
            raise TemplateError(
                f"{self.source_path(html)}: message {message!r} ({loc}) has no subject; "
                f"create {message}/subject{'' if loc == DEFAULT_LOCALE else '.' + loc}.txt."
            )
        layout_html = next(
            (n for lc in locale_chain(loc) if (n := self._variant("layout", "html", lc))), None
        )
        if layout_html is None:
            raise TemplateError(f"No layout.html in {', '.join(map(str, self.folders))}.")
        layout_text = next(
            (n for lc in locale_chain(loc) if (n := self._variant("layout", "txt", lc))),
            "layout.txt",
        )
        return TemplateSet(message=message, locale=loc, subject=subject, html=html,
                           text=self._variant(f"{message}/body", "txt", loc),
                           layout_html=layout_html, layout_text=layout_text)

    def _template(self, name: str, fast: bool = False) -> Template:
        try:
            if not fast:
                return self.env.get_template(name)
            env = self.fast_env if name.endswith(".html") else self.fast_text_env
            return env.get_template(name)
        except (TemplateSyntaxError, TemplateNotFound) as exc:
            raise to_template_error(exc, self.folders, name) from exc

    # -- rendering --------------------------------------------------------------------------

    def render(
        self,
        message: str,
        customer: CustomerInfo,
        *,
        now: datetime,
        reminder_number: int = 0,
        recipient: ContactInfo | None = None,
        extra: Mapping[str, object] | None = None,
        observation: Observation | None = None,
    ) -> RenderedEmail:
        """Render ``message`` for ``customer`` (subject, inlined HTML, text)."""
        ctx = build_context(self.settings, customer, message=message, now=now,
                            reminder_number=reminder_number, recipient=recipient,
                            branding=self._branding,
                            observation=observation or customer.observation)
        fold = True
        if extra:
            ctx.update(extra)
            fold = not ({"partner", "links", "threshold"} & set(extra))
        return self._render_email(message, customer.locale, ctx, fast=True, fold=fold)

    def render_context(
        self, message: str, locale: str, context: Mapping[str, object], *, fast: bool = True
    ) -> RenderedEmail:
        """Render from a prepared context; ``fast=False`` is the reference path: templates exactly
        as written, then premailer on the whole message."""
        fold = fast and constants(context) == self._folded
        return self._render_email(message, locale, context, fast=fast, fold=fold)

    def _render_email(
        self, message: str, locale: str, context: Mapping[str, object], *, fast: bool, fold: bool
    ) -> RenderedEmail:
        ts = self.resolve(message, locale)
        if ts.text is None:
            raise TemplateError(
                f"{self.source_path(ts.html)}: HTML body without a text body; create "
                f"{ts.html[:-5]}.txt (every email is sent with both)."
            )
        ctx = {**self._globals, **context}
        ctx["locale"] = ts.locale
        ctx["layout"] = ts.layout_text
        subject = " ".join(self._render(ts.subject, ctx, fold).split())
        if not subject:
            raise TemplateError(
                f"{self.source_path(ts.subject)}:1: the subject rendered empty; write a subject."
            )
        ctx["subject"] = subject
        text = self._render(ts.text, ctx, fold)
        ctx["layout"] = ts.layout_html
        html = (self._render_html(ts.html, ctx, fold) if fast
                else inline_css(self._render(ts.html, ctx)))
        return RenderedEmail(message=message, locale=ts.locale, subject=subject, html=html,
                             text=_tidy_text(text))

    def _render(self, name: str, ctx: Mapping[str, object], fold: bool = False) -> str:
        template = self._templates.get((name, fold))
        if template is None:
            template = self._templates[(name, fold)] = self._template(name, fold)
        env = template.environment
        try:
            try:
                with limits.budget(self.time_budget):
                    return _join(template.root_render_func(template.new_context(
                        ctx if isinstance(ctx, dict) else dict(ctx), shared=True)))
            except Exception:
                env.handle_exception()  # re-raises with template file:line frames
                raise
        except Exception as exc:  # any template failure becomes one TemplateError naming file:line
            raise to_template_error(exc, self.folders, str(self.source_path(name))) from exc

    def _render_html(self, name: str, ctx: Mapping[str, object], fold: bool) -> str:
        values: list[str] = []
        token = collector.set(values)
        try:
            skeleton = self._render(name, ctx, fold)
        finally:
            collector.reset(token)
        return self._inliner.inline(skeleton, values)


def _join(chunks: Any) -> str:
    # What Template.render does, minus copying the globals into every context (they are merged
    # into ``ctx`` once per message), plus the output cap and a time check every 64 chunks
    # (loops and calls check the clock too: this covers long flat output). Written for speed:
    # it runs for every chunk of every template of every message.
    out: list[str] = []
    append = out.append
    size = 0
    cap = limits.MAX_OUTPUT
    until_clock = 0
    for chunk in chunks:
        size += len(chunk)
        if size > cap:
            limits.check_output(size)  # raises
        if not until_clock:
            limits.check_time()
            until_clock = 64
        until_clock -= 1
        append(chunk)
    return "".join(out)


_BLANK_LINES_RE = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_TRAILING_WS_RE = re.compile(r"[ \t]+\n")


def _tidy_text(text: str) -> str:
    # The checks are cheaper than the regular expressions, which rarely have work to do.
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_WS_RE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip() + "\n"
