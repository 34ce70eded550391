"""`comms templates check`: render every message x locale x branch against sample data and list
every problem, each naming the template file and line."""

from __future__ import annotations

import html as html_lib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lxml import html as lxml_html

from comms.campaign import Campaign
from comms.config import Settings
from comms.errors import TemplateError
from comms.render import NAME_RE, Renderer, build_context
from comms.services.preview import branches, render_sample, sample_customers

MAX_HTML_BYTES = 100 * 1024  # Gmail clips messages at about 102 KB
_PLACEHOLDER_RE = re.compile(r"[{}]|%7B|%7D|\bTODO\b|\bXXX\b|\bexample placeholder\b", re.I)
_HREF_RE = re.compile(r"""href\s*=\s*(["'])(.*?)\1""", re.S)
_EXPR_RE = re.compile(r"^\s*\{\{\s*(.+?)\s*\}\}\s*$")
_MACRO_ARG_RE = re.compile(r"(?:button|link_fallback)\(\s*([^,()]+?)\s*,")
_IMG_RE = re.compile(r"<img\b[^>]*>", re.I | re.S)


@dataclass(frozen=True)
class CheckResult:
    problems: list[str]
    renders: int
    messages: int


def _line_of(source: str, pos: int) -> int:
    return source.count("\n", 0, pos) + 1


def _sources(renderer: Renderer, message: str, locale: str) -> list[tuple[Path, str]]:
    """Source files that can contribute to one message: its own, the layouts, shared partials."""
    out: list[tuple[Path, str]] = []
    want = None if locale == "en" else locale
    for name in sorted(renderer.template_names()):
        m = NAME_RE.match(name)
        own = m is not None and m.group("message") == message and m.group("locale") == want
        if own or "/" not in name:
            path = renderer.source_path(name)
            out.append((path, path.read_text(encoding="utf-8")))
    return out


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


def check_templates(
    settings: Settings, *, now: datetime, folder: Path | None = None,
    campaign: Campaign | None = None,
) -> CheckResult:
    """Every problem in the templates (built-in plus ``folder``/``[templates] folder``)."""
    renderer = Renderer(settings, template_dir=folder)
    problems: list[str] = []
    renders = 0
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
    messages = renderer.messages()
    for message in messages:
        for locale in renderer.locales(message):
            for branch in branches(message, settings, campaign):
                try:
                    rendered = render_sample(renderer, message, locale, branch, now)
                except TemplateError as exc:
                    problems.append(exc.message)
                    continue
                renders += 1
                customer = next(c for c in sample_customers(settings, now, locale)
                                if c.licences == branch.licences)
                context = build_context(settings, customer, message=message, now=now,
                                        reminder_number=branch.reminder_number)
                context.update(locale=rendered.locale, subject=rendered.subject,
                               escalated=branch.escalated)
                _check_html(renderer, message, locale, rendered.html, context, problems)
    unique = list(dict.fromkeys(problems))
    return CheckResult(problems=unique, renders=renders, messages=len(messages))
