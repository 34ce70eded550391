"""`comms templates check`: render every message x locale x branch against sample data and list
every problem, each naming the template file and line."""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lxml import html as lxml_html

from comms.campaign import Campaign
from comms.config import Settings, is_zero_id, partner_problem
from comms.errors import TemplateError
from comms.render import NAME_RE, RenderedEmail, Renderer, build_context
from comms.services.preview import Branch, branches, render_sample, sample_customers

MAX_HTML_BYTES = 100 * 1024  # Gmail clips messages at about 102 KB
_PLACEHOLDER_RE = re.compile(r"[{}]|%7B|%7D|\bTODO\b|\bXXX\b|\bexample placeholder\b", re.I)
_HREF_RE = re.compile(r"""href\s*=\s*(["'])(.*?)\1""", re.S)
_EXPR_RE = re.compile(r"^\s*\{\{\s*(.+?)\s*\}\}\s*$")
_MACRO_ARG_RE = re.compile(r"(?:button|link_fallback)\(\s*([^,()]+?)\s*,")
_IMG_RE = re.compile(r"<img\b[^>]*>", re.I | re.S)
_ZERO_ID_RE = re.compile(r"0{8}-0{4}-0{4}-0{4}-0{12}|partner[-_]?id=0+(?![\w-])", re.I)
_UNDEFINED_RE = re.compile(r"\bUndefined\b")


@dataclass(frozen=True)
class CheckResult:
    problems: list[str]
    renders: int
    messages: int
    # Information, not failures: locales that fall back to another locale's templates.
    notes: list[str] = field(default_factory=list)


def _line_of(source: str, pos: int) -> int:
    return source.count("\n", 0, pos) + 1


def _sources(renderer: Renderer, message: str, locale: str) -> list[tuple[Path, str]]:
    """Source files that can contribute to one message: its own, the layouts, shared partials."""
    out: list[tuple[Path, str]] = []
    want = None if locale == "en" else locale
    refused = {path for path, _ in renderer.outside_folders()}
    for name in sorted(renderer.template_names()):
        m = NAME_RE.match(name)
        own = m is not None and m.group("message") == message and m.group("locale") == want
        path = renderer.source_path(name)
        if (own or "/" not in name) and path not in refused:
            out.append((path, path.read_text(encoding="utf-8")))
    return out


def _locate_pattern(sources: list[tuple[Path, str]], pattern: re.Pattern[str]) -> str | None:
    for path, text in sources:
        m = pattern.search(text)
        if m:
            return f"{path}:{_line_of(text, m.start())}"
    return None


def _evaluate(renderer: Renderer, expr: str, context: dict[str, object]) -> object:
    try:
        return renderer.env.compile_expression(expr)(**context)
    except Exception:  # an expression that needs macro arguments: not this one
        return None


def _locate_link(
    renderer: Renderer, sources: list[tuple[Path, str]], value: str, context: dict[str, object]
) -> str:
    for path, text in sources:
        for m in _HREF_RE.finditer(text):
            raw = m.group(2)
            expr = _EXPR_RE.match(raw)
            if (expr is None and html_lib.unescape(raw) == value) or (
                expr is not None and _evaluate(renderer, expr.group(1), context) == value
            ):
                return f"{path}:{_line_of(text, m.start())}"
        for m in _MACRO_ARG_RE.finditer(text):
            if _evaluate(renderer, m.group(1), context) == value:
                return f"{path}:{_line_of(text, m.start())}"
    return str(sources[0][0]) if sources else "(unknown file)"


def _check_html(
    renderer: Renderer, message: str, locale: str, html: str, context: dict[str, object],
    problems: list[str],
) -> None:
    sources = _sources(renderer, message, locale)
    body = renderer.source_path(renderer.resolve(message, locale).html)
    size = len(html.encode("utf-8"))
    if size > MAX_HTML_BYTES:
        problems.append(
            f"{body}: rendered HTML is {size // 1024} KB; Gmail clips messages over about "
            "102 KB, keep it under 100 KB"
        )
    doc = lxml_html.document_fromstring(html)
    for a in doc.iter("a"):
        href = a.get("href")
        if href is None:
            continue
        value = href.strip()
        if value in ("", "#") or _PLACEHOLDER_RE.search(value):
            where = _locate_link(renderer, sources, href, context)
            problems.append(
                f"{where}: link {href!r} is empty or a placeholder; point it at a real URL"
            )
    if any(True for _ in doc.iter("script")):
        problems.append(f"{body}: contains <script>; email clients strip scripts, remove it")
    for link in doc.iter("link"):
        if "stylesheet" in (link.get("rel") or ""):
            problems.append(f"{body}: links an external stylesheet; put the CSS in <style>")
    for img in doc.iter("img"):
        if img.get("alt") is None:
            where = str(body)
            for path, text in sources:
                m = next((m for m in _IMG_RE.finditer(text) if "alt=" not in m.group(0)), None)
                if m:
                    where = f"{path}:{_line_of(text, m.start())}"
                    break
            problems.append(
                f"{where}: <img src={img.get('src')!r}> has no alt text; add alt=\"...\" "
                "(alt=\"\" for a purely decorative image)"
            )


def _config_origin(settings: Settings, pattern: re.Pattern[str]) -> str | None:
    """The ``[partner]`` setting a rendered value came from, when it matches there."""
    for key, value in settings.partner.model_dump().items():
        if isinstance(value, str) and pattern.search(value):
            return f"[partner] {key} ({value})"
    return None


def _where(renderer: Renderer, sources: list[tuple[Path, str]], pattern: re.Pattern[str],
           body: Path) -> str:
    return (_locate_pattern(sources, pattern) or _config_origin(renderer.settings, pattern)
            or f"{body} (from a template variable)")


def _host_pattern(host: str) -> re.Pattern[str]:
    # The host itself or any subdomain of it, not a longer name that merely ends the same way.
    return re.compile(r"(?<![\w-])" + re.escape(host.strip().lower()) + r"(?![\w-])", re.I)


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    return re.compile(r"\s+".join(re.escape(w) for w in phrase.split()), re.I)


def _check_content(
    renderer: Renderer, message: str, locale: str, rendered: RenderedEmail,
    problems: list[str],
) -> None:
    """Deny-listed hosts, forbidden phrases, all-zero partner ids and ``Undefined`` output."""
    settings = renderer.settings
    sources = _sources(renderer, message, locale)
    ts = renderer.resolve(message, locale)
    body = renderer.source_path(ts.html)
    visible = lxml_html.document_fromstring(rendered.html).text_content()
    texts = (rendered.subject, rendered.text, rendered.html, visible)
    for host in settings.templates.deny_hosts:
        pattern = _host_pattern(host)
        if host.strip() and any(pattern.search(t) for t in texts):
            where = _where(renderer, sources, pattern, body)
            problems.append(f"{where}: mentions {host}, a denied host ([templates] deny_hosts); "
                            "link to the current page instead")
    for phrase in settings.templates.forbidden_phrases:
        pattern = _phrase_pattern(phrase)
        if phrase.strip() and any(pattern.search(t) for t in texts):
            where = _where(renderer, sources, pattern, body)
            problems.append(f"{where}: says {phrase!r}, a forbidden phrase "
                            "([templates] forbidden_phrases); reword it")
    for href in _HREF_RE.finditer(rendered.html):
        if _ZERO_ID_RE.search(href.group(2)) and not is_zero_id(settings.partner.id):
            where = _locate_pattern(sources, _ZERO_ID_RE) or str(body)
            problems.append(f"{where}: link {html_lib.unescape(href.group(2))!r} holds an "
                            "all-zero partner id; use {{ links.invitation }} or the real id")
    parts = (("subject", rendered.subject, ts.subject), ("text body", rendered.text, ts.text),
             ("HTML body", visible, ts.html))
    for what, value, name in parts:
        if _UNDEFINED_RE.search(value):
            problems.append(f"{renderer.source_path(name or ts.html)}: the {what} renders "
                            "'Undefined'; a variable is misspelt or missing (docs/templates.md)")


def _structure_problems(renderer: Renderer, campaign: Campaign | None) -> list[str]:
    """Files refused by containment, HTML bodies without text, campaign messages without one."""
    problems = [
        f"{path}: leads to {target}, outside the template folders; comms refuses to read it "
        "(replace the symlink with a real file)"
        for path, target in renderer.outside_folders()
    ]
    for name in sorted(renderer.template_names()):
        if name.endswith(".html") and "/body" in name:
            text_name = name[: -len(".html")] + ".txt"
            if text_name not in renderer.template_names():
                problems.append(
                    f"{renderer.source_path(name)}:1: HTML body without a text body; create "
                    f"{text_name}"
                )
    if campaign is not None:
        for message in campaign.messages():
            if not renderer.has_message(message):
                problems.append(
                    f"campaign message {message!r} has no template: create "
                    f"{message}/subject.txt, body.html and body.txt"
                )
    if problem := partner_problem(renderer.settings, branding=False):
        problems.append(problem)
    return problems


def fallback_notes(renderer: Renderer, locales: Collection[str]) -> list[str]:
    """For each expected locale, the messages that have no template of their own in it."""
    notes: list[str] = []
    for locale in sorted(set(locales)):
        fallen: dict[str, list[str]] = {}
        for message in renderer.messages():
            got = renderer.resolve(message, locale).locale
            if got.lower() != locale.replace("_", "-").lower():
                fallen.setdefault(got, []).append(message)
        for got, names in sorted(fallen.items()):
            notes.append(f"locale {locale!r} falls back to {got!r} for {len(names)} "
                         f"message(s): {', '.join(names)}")
    return notes


def _check_branch(
    renderer: Renderer, message: str, locale: str, branch: Branch, now: datetime,
    problems: list[str],
) -> bool:
    settings = renderer.settings
    try:
        rendered = render_sample(renderer, message, locale, branch, now)
    except TemplateError as exc:
        problems.append(exc.message)
        return False
    customer = next(c for c in sample_customers(settings, now, locale)
                    if c.licences == branch.licences)
    context = build_context(settings, customer, message=message, now=now,
                            reminder_number=branch.reminder_number)
    context.update(locale=rendered.locale, subject=rendered.subject, **branch.context())
    _check_html(renderer, message, locale, rendered.html, context, problems)
    _check_content(renderer, message, locale, rendered, problems)
    return True


def check_templates(
    settings: Settings, *, now: datetime, folder: Path | None = None,
    campaign: Campaign | None = None, locales: Collection[str] = (),
) -> CheckResult:
    """Every problem in the templates (built-in plus ``folder``/``[templates] folder``).

    ``locales`` (with ``[templates] locales`` and ``[defaults] locale``) are the customer
    locales to expect; each that falls back to another locale's templates is a note."""
    renderer = Renderer(settings, template_dir=folder)
    problems = _structure_problems(renderer, campaign)
    renders = 0
    messages = renderer.messages()
    for message in messages:
        for locale in renderer.locales(message):
            for branch in branches(message, settings, campaign):
                renders += _check_branch(renderer, message, locale, branch, now, problems)
    expected = {*locales, *settings.templates.locales, settings.defaults.locale}
    unique = list(dict.fromkeys(problems))
    return CheckResult(problems=unique, renders=renders, messages=len(messages),
                       notes=fallback_notes(renderer, expected))
