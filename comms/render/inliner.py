"""The CSS inliner: premailer, and the skeleton shortcut that runs it once per template shape.

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
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from lxml import etree
from premailer import Premailer

# Placeholders the skeleton render prints instead of values (see environment._finalize).
PH_FMT: Final = "QzPh{}pHzQ"
PH_RE: Final = re.compile(r"QzPh(\d+)pHzQ")

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
def lxml_text(escaped: str) -> str:
    doc = f"<!DOCTYPE html><html><body><p>{escaped}</p></body></html>"
    root = etree.fromstring(doc, etree.HTMLParser()).getroottree()
    out: str = etree.tostring(root, method="html", encoding="utf-8").decode("utf-8")
    start = out.index("<p>") + 3
    return out[start : out.rindex("</p>")]


# After markupsafe: only these entities, in otherwise plain printable ASCII.
_ESCAPED_ASCII_RE = re.compile(r"(?:[ -%'-;=?-~\t\n]|&(?:amp|lt|gt|#34|#39);)*")


@lru_cache(maxsize=65536)
def normalise_text(escaped: str) -> str:
    """An escaped value as lxml serialises it in a text node (what premailer would output).

    lxml writes text with ``&amp; &lt; &gt;`` and bare quotes; anything beyond plain ASCII goes
    through lxml itself (tests compare the shortcut with lxml on random strings)."""
    if _PLAIN_TEXT_RE.fullmatch(escaped):
        return escaped
    if _ESCAPED_ASCII_RE.fullmatch(escaped):
        return escaped.replace("&#34;", '"').replace("&#39;", "'")
    return lxml_text(escaped)


_RAW_REGION_RE = re.compile(
    r"<!--.*?-->|<(style|script)\b.*?</\1\s*>|<[^>]*>", re.DOTALL | re.IGNORECASE
)


def _unsafe_placeholders(skeleton: str) -> tuple[int, ...]:
    """Placeholders that premailer could transform or that sit outside a text node."""
    unsafe: set[int] = set()
    for region in _RAW_REGION_RE.finditer(skeleton):
        unsafe.update(int(m.group(1)) for m in PH_RE.finditer(region.group(0)))
    for m in PH_RE.finditer(skeleton):
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

    return PH_RE.sub(repl, skeleton)


def _inline_skeleton(
    skeleton: str, values: list[str], unsafe: tuple[int, ...]
) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    count = len(values)
    inlined = inline_css(_substitute(skeleton, values, unsafe))
    expected = set(range(count)) - set(unsafe)
    seen: list[int] = []
    for m in PH_RE.finditer(inlined):
        if not _in_text_node(inlined, m.start()):
            return None
        seen.append(int(m.group(1)))
    if len(seen) != len(expected) or set(seen) != expected:
        return None
    parts = PH_RE.split(inlined)
    return tuple(parts[0::2]), tuple(int(i) for i in parts[1::2])


class SkeletonInliner:
    """Inlines rendered skeletons, premailer running once per distinct skeleton (and per set of
    values at unsafe positions). Bounded caches: memory stays flat over any run."""

    def __init__(self) -> None:
        self.skeletons: dict[str, _Skeleton] = {}

    def inline(self, skeleton: str, values: list[str]) -> str:
        """The skeleton with ``values`` put back, CSS inlined: what premailer gives on the
        fully rendered HTML."""
        entry = self.skeletons.get(skeleton)
        if entry is None:
            if len(self.skeletons) >= 512:
                self.skeletons.clear()
            entry = _Skeleton(_unsafe_placeholders(skeleton), {})
            self.skeletons[skeleton] = entry
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
        out = [normalise_text(values[i]) for i in indexes]
        # Interleave: literal0, value0, literal1, value1, ..., literalN.
        merged: list[str] = [""] * (2 * len(out) + 1)
        merged[0::2] = literals
        merged[1::2] = out
        return "".join(merged)
