"""What a reply says, in its own words (pure): the text above the quoted original and the
signature (``own_text``), and the opt-out phrase it means (``optout_keyword``): not negated in
its clause, not in a sentence about the subscription, or a command that is the whole reply."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

# Where the quoted original starts in a reply (Outlook, Gmail, Apple Mail; en/de/fr/nl/es).
_QUOTE_START = re.compile(
    r"^\s*(>|-{2,}\s*(original message|ursprüngliche nachricht|message d'origine)|"
    r"_{5,}|(from|von|de|van|sent|gesendet|envoyé)\s*:|"
    r"on .{0,200}wrote:|am .{0,200}schrieb|le .{0,200}a écrit)",
    re.IGNORECASE,
)
# An attribution line wrapped by the client ("On Tue, 1 Dec 2026, Alex <\nalex@...> wrote:").
_QUOTE_END = re.compile(
    r"(wrote|schrieb|a écrit|schreef|escribió|ha scritto)\s*:\s*$", re.IGNORECASE
)


# RFC 3676's signature delimiter "-- " (clients often drop the trailing space).
_SIGNATURE = re.compile(r"^--[ \t]*$")


def own_text(text: str, lines: int | None = None) -> str:
    """The reply's own text: the lines above the quoted original and the signature, blank lines
    dropped."""
    out: list[str] = []
    for line in text.splitlines():
        if _QUOTE_START.match(line) or _QUOTE_END.search(line) or _SIGNATURE.match(line):
            break
        if line.strip():
            out.append(line.strip())
        if lines is not None and len(out) >= lines:
            break
    return "\n".join(out)


_REPLY_PREFIX = re.compile(r"^\s*((re|aw|wg|fw|fwd|tr|antw)\s*:\s*)+", re.IGNORECASE)
# A sentence that talks about the subscription or its billing: an opt-out phrase in it may be
# about cancelling the old subscription (what the campaign asks for), so it is left to a human.
SUBSCRIPTION_TOPIC = re.compile(
    r"(?<!\w)(subscriptions?|plan|licen[cs]es?|invoices?|billing|abo|abonnements?|lizenz\w*|"
    r"rechnung\w*|abonnement|licentie\w*|factur\w*|suscripci[oó]n\w*|licencia\w*|"
    r"abbonament\w*|licenz\w*|fattur\w*)(?!\w)",
    re.IGNORECASE,
)
# A negation before the phrase in its sentence ("please do NOT unsubscribe us").
_NEGATION = re.compile(
    r"(?<!\w)(not|no|never|dont|nicht|kein\w*|nie|niemals|ne|pas|jamais|niet|geen|nooit|"
    r"nunca|non|mai)(?!\w)|n't(?!\w)",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?;\n]")
# A negation cancels a phrase only in its own clause ("No thanks, unsubscribe me" opts out) and
# at most _NEGATION_REACH words before it ("I do not want you to unsubscribe me" does not).
_CLAUSE_END = re.compile(r"[.!?;:,\n\u2013\u2014]|(?<!\w)-|-(?!\w)")
_NEGATION_REACH = 3
# An imperative negation left open by a parenthesis: "Do not, under any circumstances,
# unsubscribe me" (its verb is in a later clause). A bare "No," answers; it negates nothing.
_DANGLING = re.compile(r"(?<!\w)(do\s+not|don't|dont|please\s+not|never)\s*$", re.IGNORECASE)
# Declining the offer, not the phrase: "No thanks please unsubscribe me", "Nein danke, abmelden".
_DECLINE = re.compile(
    r"(?<!\w)(no[\s,]+thanks?|no[\s,]+thank you|not interested|nein[\s,]+danke|"
    r"kein interesse|non[\s,]+merci|pas intéressée?s?|nee[\s,]+bedankt|geen interesse|"
    r"no[\s,]+gracias|no[\s,]+grazie|non mi interessa|no me interesa)(?!\w)",
    re.IGNORECASE,
)
# What may surround a command word and leave it the whole reply.
_POLITE = re.compile(
    r"(?<!\w)(please|pls|plz|thanks|thank you|bitte|danke|graag|bedankt|merci|svp|hi|hello|"
    r"hallo|hola|bonjour|ciao|dear|"
    r"s'il vous pla[iî]t|por favor|gracias|per favore|grazie|me|us|mich|uns|mij)(?!\w)",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=16)
def _keyword_patterns(keywords: tuple[str, ...]) -> tuple[re.Pattern[str], list[re.Pattern[str]]]:
    """All keywords in one pattern (most replies match none: one search rejects them), and
    one pattern per keyword (in order: the first keyword of the list wins, not the first in
    the text). Spaces in a keyword match any run of whitespace."""
    each = [r"(?<!\w)" + r"\s+".join(map(re.escape, kw.lower().split())) + r"(?!\w)"
            for kw in keywords]
    return re.compile("|".join(each) or r"(?!)"), [re.compile(p) for p in each]


def _counts_in(text: str, start: int, end: int) -> bool:
    """Whether a phrase found at text[start:end] is meant: no negation shortly before it in its
    clause, nor a "do not" left open by an earlier clause of its sentence, and its sentence does
    not talk about the subscription."""
    begin = max((m.end() for m in _SENTENCE_END.finditer(text, 0, start)), default=0)
    stop = _SENTENCE_END.search(text, end)
    sentence_end = stop.start() if stop else len(text)
    clause = max((m.end() for m in _CLAUSE_END.finditer(text, begin, start)), default=begin)
    before = _DECLINE.sub(" ", text[clause:start])
    negations = list(_NEGATION.finditer(before))
    if negations and len(re.findall(r"\w+", before[negations[-1].end():])) <= _NEGATION_REACH:
        return False
    earlier = _CLAUSE_END.split(_DECLINE.sub(" ", text[begin:clause]))
    if any(_DANGLING.search(part) for part in earlier):
        return False
    return not SUBSCRIPTION_TOPIC.search(text[begin:sentence_end])


def _is_command(text: str, commands: Sequence[str]) -> str:
    """The command ``text`` consists of (besides politeness), or ""."""
    if not text or "?" in text:
        return ""
    bare = _POLITE.sub(" ", _DECLINE.sub(" ", text.lower()))
    bare = " ".join(re.sub(r"[^\w'-]+", " ", bare).split())
    return bare if bare in commands else ""


def optout_keyword(subject: str, text: str, keywords: Sequence[str],
                   commands: Sequence[str] = ()) -> str:
    """The opt-out phrase of a reply ("" when none counts): the first keyword found in the
    subject (minus RE:/AW:) or the reply's own text that is not negated and not in a sentence
    about the subscription, or a command that is the whole reply (its own text, or the
    subject when the text is empty)."""
    subject = _REPLY_PREFIX.sub("", subject).strip().replace("\u2019", "'")
    own = own_text(text).replace("\u2019", "'")
    command = _is_command(own or subject, [c.lower() for c in commands])
    if command:
        return command
    if not keywords:
        return ""
    haystack = f"{subject}\n{own}".lower()
    anyone, each = _keyword_patterns(tuple(keywords))
    if not anyone.search(haystack):
        return ""
    for kw, pattern in zip(keywords, each, strict=True):
        for m in pattern.finditer(haystack):
            if _counts_in(haystack, m.start(), m.end()):
                return kw
    return ""
