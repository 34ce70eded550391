"""Render one campaign email: subject, HTML body (CSS inlined) and plain-text body.

Templates live in folders named after the message (``templates/emails/<message>/``)::

    layout.html  layout.txt                shared base layout (``{% extends layout %}``)
    <message>/subject.txt                  one line; whitespace is collapsed
    <message>/body.html  <message>/body.txt
    <message>/body.de.html ...             locale variants: ``.de``, ``.de-AT``, ``.fr`` ...

A user folder (``[templates] folder``) is searched before the built-in one, so a file there
overrides the built-in file of the same relative name. A customer's locale ``de-AT`` is looked up
as ``de-AT``, then ``de``, then the unsuffixed (English) file; the layout follows the locale the
message resolved to, so a German body never sits in an English frame.

Jinja2 runs sandboxed (marketing staff edit templates), with ``StrictUndefined`` (a missing
variable is an error, never a blank) and autoescaping for ``.html`` files only.

Inlining CSS with premailer costs several milliseconds per message. The fast path renders the
HTML body once more cheaply: every value a template prints into text is replaced by a unique
placeholder, so the output (the *skeleton*) depends only on the template's structure and
branches. premailer runs once per distinct skeleton; the escaped values are then put back,
normalised exactly as lxml would serialise them. Values printed inside tags, ``<style>``,
comments or after a bare ``&`` are put back *before* inlining and become part of the cache key;
if premailer moved or duplicated a placeholder the skeleton is marked slow and that message is
inlined the ordinary way. ``tests/test_render.py`` checks that both paths give identical output
for every message, locale and branch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any, Final
from zoneinfo import ZoneInfo

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    pass_context,
    pass_eval_context,
    select_autoescape,
)
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment
from lxml import etree
from markupsafe import Markup, escape
from premailer import Premailer

from comms.config import Settings
from comms.domain import ContactInfo, CustomerInfo
from comms.errors import TemplateError
from comms.paths import builtin_templates_dir

DEFAULT_LOCALE: Final = "en"
# Subscription lifecycle after the old subscription expires (days, approximate; DESIGN §1).
LIFECYCLE: Final = {"expired_days": 30, "disabled_days": 90, "deleted_days": 180}

NAME_RE = re.compile(
    r"^(?P<message>[a-z][a-z0-9_]*)/(?P<part>subject|body)"
    r"(?:\.(?P<locale>[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})?))?\.(?P<ext>txt|html)$"
)

_EPOCH: Final = datetime(2000, 1, 1, tzinfo=ZoneInfo("UTC"))
_PROBE: Final = CustomerInfo(key="probe", name="probe", licences=0, stage="",
                             stage_entered_at=_EPOCH)

_MONTHS: Final = {
    "en": ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"),
    "de": ("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August",
           "September", "Oktober", "November", "Dezember"),
}


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


# ---------------------------------------------------------------------------------------------
# Context (pure)


def _ns(**values: object) -> SimpleNamespace:
    # Namespaces, not dicts: Jinja tries attribute access first, and a dict's failed getattr
    # costs an exception on every ``customer.name`` in every message.
    return SimpleNamespace(**values)


def _contact_dict(c: ContactInfo) -> SimpleNamespace:
    return _ns(name=c.name, email=c.email, role=c.role)


def default_recipient(customer: CustomerInfo) -> ContactInfo | None:
    """Whom a customer email greets when the caller names nobody: the first primary contact,
    else the first contact that is not suppressed, else nobody."""
    usable = [c for c in customer.contacts if not c.suppressed] or list(customer.contacts)
    for c in usable:
        if c.role == "primary":
            return c
    return usable[0] if usable else None


def days_billed_twice(customer: CustomerInfo, now: datetime) -> int:
    """Whole days since the CSP subscription went live (0 before that or when unknown)."""
    if customer.csp_live_at is None:
        return 0
    return max(0, (now - customer.csp_live_at).days)


def make_branding(settings: Settings) -> tuple[SimpleNamespace, SimpleNamespace]:
    """The ``partner`` and ``links`` template variables (the same for every message)."""
    p = settings.partner
    partner = _ns(
        name=p.name,
        id=p.id,
        website=p.website,
        logo_url=p.logo_url,
        primary_color=p.primary_color,
        accent_color=p.accent_color,
        signature=p.signature,
        reply_to=p.reply_to,
        support_phone=p.support_phone,
        postal_address=p.postal_address,
        opt_out_text=p.opt_out_text,
        sender_name=settings.senders[0].name or p.name,
    )
    links = _ns(
        invitation=p.invitation_link,
        billing=p.billing_url,
        support=p.support_url,
        website=p.website,
        reply=f"mailto:{p.reply_to}",
        phone="tel:" + re.sub(r"[^0-9+]", "", p.support_phone),
    )
    return partner, links


def build_context(
    settings: Settings,
    customer: CustomerInfo,
    *,
    message: str,
    now: datetime,
    reminder_number: int = 0,
    recipient: ContactInfo | None = None,
    branding: tuple[SimpleNamespace, SimpleNamespace] | None = None,
) -> dict[str, object]:
    """The variables every template sees (documented in docs/templates.md). Pure: no clock.

    ``branding`` is ``branding(settings)`` computed once by a caller rendering many messages."""
    p = settings.partner
    branding = branding or make_branding(settings)
    threshold = p.licence_threshold
    billed = days_billed_twice(customer, now)
    who = recipient or default_recipient(customer)
    am: SimpleNamespace | None = None
    if customer.account_manager_email or customer.account_manager_name:
        am = _ns(name=customer.account_manager_name or customer.account_manager_email,
                 email=customer.account_manager_email)
    cost = customer.licences * p.price_per_licence_month * billed / 30
    return {
        "message": message,
        "now": now,
        "today": now.astimezone(_zone(customer.time_zone)).date(),
        "locale": customer.locale or DEFAULT_LOCALE,
        "partner": branding[0],
        "links": branding[1],
        "threshold": threshold,
        "self_service": customer.licences < threshold,
        "customer": _ns(
            key=customer.key,
            name=customer.name,
            licences=customer.licences,
            tenant_id=customer.tenant_id,
            primary_domain=customer.primary_domain,
            locale=customer.locale,
            time_zone=customer.time_zone,
            stage=customer.stage,
            csp_live_at=customer.csp_live_at,
            contacts=[_contact_dict(c) for c in customer.contacts],
        ),
        "account_manager": am,
        "recipient": _contact_dict(who) if who else None,
        "days_billed_twice": billed,
        "overlap_cost": f"{p.currency} {cost:,.2f}",
        "price_per_licence_month": f"{p.currency} {p.price_per_licence_month:,.2f}",
        "reminder_number": reminder_number,
        "is_reminder": reminder_number > 0,
        # The planner sets this through ``extra`` when the account manager is copied.
        "escalated": False,
        "lifecycle": _ns(**LIFECYCLE),
        # What the partner actually observed about the old subscription (stage sync); until a
        # sync records one, nothing is observed and evidence-bound sentences stay conditional.
        "observed": _ns(at=None, source="", direct_active=False, direct_cancelled=False,
                        direct_status="", assigned_licences=None),
    }


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except Exception:  # an unknown zone in the ledger must not stop an email; fall back to UTC
        return ZoneInfo("UTC")


def locale_chain(locale: str) -> list[str]:
    """Locales to try, most specific first, English last: ``de-AT`` -> de-AT, de, en."""
    loc = (locale or "").replace("_", "-").strip()
    out: list[str] = []
    if loc:
        lang, _, region = loc.partition("-")
        if region:
            out.append(f"{lang.lower()}-{region}")
        out.append(lang.lower())
    if DEFAULT_LOCALE not in out:
        out.append(DEFAULT_LOCALE)
    return out


# ---------------------------------------------------------------------------------------------
# Jinja environment


@pass_context
def _date_filter(ctx: Context, value: object, locale: str | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
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
_collector: ContextVar[list[str] | None] = ContextVar("comms_render_collector", default=None)
_PH_FMT = "QzPh{}pHzQ"
_PH_RE = re.compile(r"QzPh(\d+)pHzQ")


_PH_MARKUPS: Final = tuple(Markup(_PH_FMT.format(i)) for i in range(512))


@lru_cache(maxsize=65536)
def _escape_str(value: str) -> str:
    return str(escape(value))


@pass_eval_context
def _finalize(eval_ctx: EvalContext, value: Any) -> Any:
    values = _collector.get()
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
    return _PH_MARKUPS[n] if n < 512 else Markup(_PH_FMT.format(n))


_FOLD_RE = re.compile(r"\{\{\s*(partner|links)\.([a-z_]+)\s*\}\}|\{\{\s*(threshold)\s*\}\}")
# A file that rebinds one of these names (set/for/with/macro argument) is not folded.
_REBIND_RE = re.compile(
    r"\{%-?\s*(?:set|for|with|macro|import|from)\b[^%]*\b(?:partner|links|threshold)\b"
)


class _FoldingLoader(FileSystemLoader):
    """Writes the per-installation constants (partner branding, links, threshold) into the
    template source, so they cost nothing per message. Only exact ``{{ partner.x }}``,
    ``{{ links.x }}`` and ``{{ threshold }}`` are folded, escaped as autoescape would; the
    reference renderer (``fast=False``) does not fold, and the equality test compares both."""

    def __init__(self, folders: list[Path], constants: Mapping[str, str]) -> None:
        super().__init__([str(f) for f in folders])
        self.constants = dict(constants)

    def get_source(self, environment: Any, template: str) -> Any:
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


class _Environment(SandboxedEnvironment):
    """The sandbox, with a shortcut for the context's own namespaces (plain data we built)."""

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


def _make_env(
    folders: list[Path], constants: Mapping[str, str] | None = None, *, skeleton: bool = False
) -> SandboxedEnvironment:
    loader: FileSystemLoader = (
        _FoldingLoader(folders, constants) if constants is not None
        else FileSystemLoader([str(f) for f in folders])
    )
    env = _Environment(
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
    env.filters["date"] = _date_filter
    return env


def _constants(context: Mapping[str, object]) -> dict[str, str]:
    out: dict[str, str] = {"threshold": str(context["threshold"])}
    for group in ("partner", "links"):
        ns = context[group]
        assert isinstance(ns, SimpleNamespace)
        for key, value in vars(ns).items():
            if isinstance(value, str):
                out[f"{group}.{key}"] = value
    return out


# ---------------------------------------------------------------------------------------------
# CSS inlining

_PREMAILER_OPTS: Final[dict[str, Any]] = {
    "allow_network": False,
    "allow_loading_external_files": False,
    # Keep !important in the leftover <style> block: media queries must beat inline styles.
    "strip_important": False,
    # Keep width/height attributes as written (width="600" is what Outlook lays out by).
    "disable_basic_attributes": ["width", "height"],
    "cssutils_logging_level": logging.CRITICAL,
}


def inline_css(html: str) -> str:
    """Inline the ``<style>`` rules into ``style`` attributes (premailer); media queries stay."""
    return str(Premailer(html, **_PREMAILER_OPTS).transform(pretty_print=False))


# Printable ASCII without '&' (values are escaped already, so no '<', '>', '"' either):
# lxml writes such text back unchanged.
_PLAIN_TEXT_RE = re.compile(r"[ -%'-;=?-~\t\n]*")


@lru_cache(maxsize=65536)
def _lxml_text(escaped: str) -> str:
    doc = f"<!DOCTYPE html><html><body><p>{escaped}</p></body></html>"
    root = etree.fromstring(doc, etree.HTMLParser()).getroottree()
    out: str = etree.tostring(root, method="html", encoding="utf-8").decode("utf-8")
    start = out.index("<p>") + 3
    return out[start : out.rindex("</p>")]


# After markupsafe: only these entities, in otherwise plain printable ASCII.
_ESCAPED_ASCII_RE = re.compile(r"(?:[ -%'-;=?-~\t\n]|&(?:amp|lt|gt|#34|#39);)*")


@lru_cache(maxsize=65536)
def _normalise_text(escaped: str) -> str:
    """An escaped value as lxml serialises it in a text node (what premailer would output).

    lxml writes text with ``&amp; &lt; &gt;`` and bare quotes; anything beyond plain ASCII goes
    through lxml itself (tests compare the shortcut with lxml on random strings)."""
    if _PLAIN_TEXT_RE.fullmatch(escaped):
        return escaped
    if _ESCAPED_ASCII_RE.fullmatch(escaped):
        return escaped.replace("&#34;", '"').replace("&#39;", "'")
    return _lxml_text(escaped)


_RAW_REGION_RE = re.compile(
    r"<!--.*?-->|<(style|script)\b.*?</\1\s*>|<[^>]*>", re.DOTALL | re.IGNORECASE
)


def _unsafe_placeholders(skeleton: str) -> tuple[int, ...]:
    """Placeholders that premailer could transform or that sit outside a text node."""
    unsafe: set[int] = set()
    for region in _RAW_REGION_RE.finditer(skeleton):
        unsafe.update(int(m.group(1)) for m in _PH_RE.finditer(region.group(0)))
    for m in _PH_RE.finditer(skeleton):
        if m.start() > 0 and skeleton[m.start() - 1] == "&":
            unsafe.add(int(m.group(1)))
    return tuple(sorted(unsafe))


def _in_text_node(out: str, pos: int) -> bool:
    head = out[:pos]
    return not (
        head.rfind("<") > head.rfind(">")
        or head.rfind("<!--") > head.rfind("-->")
        or head.lower().rfind("<style") > head.lower().rfind("</style")
        or head.lower().rfind("<script") > head.lower().rfind("</script")
    )


@dataclass
class _Skeleton:
    unsafe: tuple[int, ...]
    # (values at the unsafe positions) -> literal parts interleaved with value indexes, or
    # None when premailer did not keep every placeholder in a text node (use the slow path).
    inlined: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[int, ...]] | None]


def _substitute(skeleton: str, values: list[str], only: tuple[int, ...] | None = None) -> str:
    keep = None if only is None else set(only)

    def repl(m: re.Match[str]) -> str:
        i = int(m.group(1))
        return values[i] if keep is None or i in keep else m.group(0)

    return _PH_RE.sub(repl, skeleton)


def _inline_skeleton(
    skeleton: str, values: list[str], unsafe: tuple[int, ...]
) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    count = len(values)
    inlined = inline_css(_substitute(skeleton, values, unsafe))
    expected = set(range(count)) - set(unsafe)
    seen: list[int] = []
    for m in _PH_RE.finditer(inlined):
        if not _in_text_node(inlined, m.start()):
            return None
        seen.append(int(m.group(1)))
    if len(seen) != len(expected) or set(seen) != expected:
        return None
    parts = _PH_RE.split(inlined)
    return tuple(parts[0::2]), tuple(int(i) for i in parts[1::2])


# ---------------------------------------------------------------------------------------------
# Errors


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


def _to_template_error(exc: Exception, folders: list[Path], what: str) -> TemplateError:
    if isinstance(exc, TemplateSyntaxError):
        where = f"{exc.filename or exc.name or what}:{exc.lineno}"
        return TemplateError(
            f"{where}: template syntax error: {exc.message}. Fix the template, then run "
            "`comms templates check`."
        )
    if isinstance(exc, TemplateNotFound):
        return TemplateError(
            f"{what}: template {exc.name!r} not found (looked in "
            f"{', '.join(str(f) for f in folders)}). Create it or fix the name."
        )
    loc = _template_location(exc, folders)
    where = f"{loc[0]}:{loc[1]}" if loc else what
    detail = exc.message if isinstance(exc, JinjaTemplateError) and exc.message else str(exc)
    hint = (
        "use only the variables listed in docs/templates.md"
        if "undefined" in detail or "has no attribute" in detail
        else "fix the template"
    )
    return TemplateError(
        f"{where}: {detail} ({type(exc).__name__}); {hint}, then run `comms templates check`."
    )


# ---------------------------------------------------------------------------------------------
# Renderer


class Renderer:
    """Renders campaign messages from the built-in templates and an optional user folder."""

    def __init__(self, settings: Settings, *, template_dir: Path | None = None) -> None:
        self.settings = settings
        user = template_dir or (Path(settings.templates.folder) if settings.templates.folder
                                else None)
        if user is not None and not user.is_dir():
            raise TemplateError(
                f"Template folder {user} is not a directory; fix [templates] folder in the "
                "config (or create the folder)."
            )
        builtin = builtin_templates_dir()
        self.folders: list[Path] = [user, builtin] if user is not None else [builtin]
        self.user_folder = user
        # The reference environment renders templates exactly as written; the fast one has the
        # installation's constants folded in (see _FoldingLoader).
        self.env = _make_env(self.folders)
        self._branding = make_branding(settings)
        sample = build_context(settings, _PROBE, message="", now=_EPOCH, branding=self._branding)
        self._folded = _constants(sample)
        self.fast_env = _make_env(self.folders, self._folded, skeleton=True)
        self.fast_text_env = _make_env(self.folders, self._folded)
        self._names: frozenset[str] = frozenset(
            n.replace("\\", "/") for n in self.env.list_templates()
        )
        self._sets: dict[tuple[str, str], TemplateSet] = {}
        self._templates: dict[tuple[str, bool], Template] = {}
        self._globals: dict[str, Any] = dict(self.env.globals)
        self._skeletons: dict[str, _Skeleton] = {}

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
        if found is not None:
            return found
        for loc in locale_chain(locale):
            html = self._variant(f"{message}/body", "html", loc)
            if html is None:
                continue
            subject = self._variant(f"{message}/subject", "txt", loc)
            if subject is None:
                raise TemplateError(
                    f"{self.source_path(html)}: message {message!r} ({loc}) has no subject; "
                    f"create {message}/subject{'' if loc == DEFAULT_LOCALE else '.' + loc}.txt."
                )
            layout_loc = next(
                (lc for lc in locale_chain(loc) if self._variant("layout", "html", lc)), None
            )
            if layout_loc is None:
                raise TemplateError(f"No layout.html in {', '.join(map(str, self.folders))}.")
            layout_html = self._variant("layout", "html", layout_loc)
            layout_text = next(
                (n for lc in locale_chain(loc) if (n := self._variant("layout", "txt", lc))),
                "layout.txt",
            )
            assert layout_html is not None
            found = TemplateSet(
                message=message,
                locale=loc,
                subject=subject,
                html=html,
                text=self._variant(f"{message}/body", "txt", loc),
                layout_html=layout_html,
                layout_text=layout_text,
            )
            self._sets[key] = found
            return found
        known = ", ".join(self.messages()) or "none"
        raise TemplateError(
            f"No template for message {message!r} (expected {message}/body.html in "
            f"{' or '.join(str(f) for f in self.folders)}). Known messages: {known}."
        )

    def _template(self, name: str, fast: bool = False) -> Template:
        try:
            if not fast:
                return self.env.get_template(name)
            env = self.fast_env if name.endswith(".html") else self.fast_text_env
            return env.get_template(name)
        except (TemplateSyntaxError, TemplateNotFound) as exc:
            raise _to_template_error(exc, self.folders, name) from exc

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
    ) -> RenderedEmail:
        """Render ``message`` for ``customer`` (subject, inlined HTML, text)."""
        ctx = build_context(self.settings, customer, message=message, now=now,
                            reminder_number=reminder_number, recipient=recipient,
                            branding=self._branding)
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
        fold = fast and _constants(context) == self._folded
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
                # What Template.render does, minus copying the globals into every context
                # (they are merged into ``ctx`` once per message by _render_email).
                return "".join(template.root_render_func(template.new_context(
                    ctx if isinstance(ctx, dict) else dict(ctx), shared=True)))
            except Exception:
                env.handle_exception()  # re-raises with template file:line frames
                raise
        except Exception as exc:  # any template failure becomes one TemplateError naming file:line
            raise _to_template_error(exc, self.folders, str(self.source_path(name))) from exc

    def _render_html(self, name: str, ctx: Mapping[str, object], fold: bool) -> str:
        values: list[str] = []
        token = _collector.set(values)
        try:
            skeleton = self._render(name, ctx, fold)
        finally:
            _collector.reset(token)
        entry = self._skeletons.get(skeleton)
        if entry is None:
            if len(self._skeletons) >= 512:  # bounded: memory stays flat over any run
                self._skeletons.clear()
            entry = _Skeleton(_unsafe_placeholders(skeleton), {})
            self._skeletons[skeleton] = entry
        key = tuple(values[i] for i in entry.unsafe)
        if key in entry.inlined:
            parts = entry.inlined[key]
        else:
            if len(entry.inlined) >= 256:
                entry.inlined.clear()
            parts = _inline_skeleton(skeleton, values, entry.unsafe)
            entry.inlined[key] = parts
        if parts is None:
            return inline_css(_substitute(skeleton, values))
        literals, indexes = parts
        out = [_normalise_text(values[i]) for i in indexes]
        # Interleave: literal0, value0, literal1, value1, ..., literalN.
        merged: list[str] = [""] * (2 * len(out) + 1)
        merged[0::2] = literals
        merged[1::2] = out
        return "".join(merged)


_BLANK_LINES_RE = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_TRAILING_WS_RE = re.compile(r"[ \t]+\n")


def _tidy_text(text: str) -> str:
    # The checks are cheaper than the regular expressions, which rarely have work to do.
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_WS_RE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip() + "\n"
