"""One small check per CSV field: each takes the cell's text and returns the stored value or
raises ``FieldError`` saying why the value cannot be used and how to fix it.

CSV data is untrusted (docs/operations.md): control characters, oversized values, non-ASCII
digits and lookalike time zones are refused here, before anything reaches the ledger, a
terminal or an email header.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from email_validator import EmailNotValidError, validate_email

from comms.errors import UnknownTimeZone
from comms.importing.locales import is_known_language
from comms.timezones import canonical

# A cell longer than this is refused (no field of the format needs more; CSV's own default).
MAX_CELL = 128 * 1024
# More licences than this is a typo, and would overflow the ledger's integer column.
MAX_LICENCES = 10_000_000
# Several tags, or several contacts of one role, share a cell separated by this.
SEPARATOR = "|"

# C0 controls (tab included: inside a value it is never meaningful, and outer whitespace is
# stripped first), DEL, C1 controls, and the Unicode line and paragraph separators.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_NAMES = {"\r": "a carriage return (CR)", "\n": "a line break (LF)",
                  "\x00": "a NUL byte", "\x1b": "an escape (ESC)", "\t": "a tab"}
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_LOCALE = re.compile(r"^([A-Za-z]{2,3})([-_][A-Za-z0-9]{2,8})*$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")
_DIGITS = re.compile(r"^[0-9]+$")
# A plain ASCII dot-atom local part: a strict subset of what email-validator accepts.
_PLAIN_LOCAL = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{}~-]+)*$"
)
# Spreadsheets run a cell starting with these as a formula (CSV injection); export prefixes
# such cells with an apostrophe and import removes it again, so the round trip is exact.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class FieldError(Exception):
    """A cell's value cannot be used: ``why`` names the fix; ``shown`` the value to quote."""

    def __init__(self, why: str, shown: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.shown = shown


def visible(value: str, limit: int = 80) -> str:
    """A value as an error message may show it: control characters escaped, length capped."""
    short = value if len(value) <= limit else value[:limit] + "…"
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", short)


def check_text(value: str) -> None:
    """Refuse oversized values and control characters (any field, before its own check)."""
    if len(value) > MAX_CELL:
        raise FieldError(
            f"is {len(value):,} characters long, more than the {MAX_CELL:,} any field may have; "
            "check for a quote that is never closed", shown="",
        )
    found = CONTROL.search(value)
    if found:
        char = found.group()
        name = _CONTROL_NAMES.get(char, f"the control character U+{ord(char):04X}")
        raise FieldError(f"contains {name} at position {found.start() + 1}; control characters "
                         "are not allowed (remove it, or retype the value)")


def guard_cell(value: str) -> str:
    """A cell as export writes it: formula-like text gets a leading apostrophe."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def unguard_cell(value: str) -> str:
    """Undo ``guard_cell`` on import."""
    if value.startswith("'") and value[1:].startswith(_FORMULA_START):
        return value[1:]
    return value


def split(value: str) -> list[str]:
    return [part.strip() for part in value.split(SEPARATOR)]


def key(value: str) -> str:
    if not value:
        raise FieldError("is empty; every customer needs a unique key (e.g. its CRM id)")
    if len(value) > 100:
        raise FieldError("is longer than 100 characters")
    cased = next((ch for ch in value if not ch.isascii() and ch.lower() + ch.upper() != ch * 2),
                 None)
    if cased is not None:
        # Keys are matched ignoring case, and the databases fold ASCII letters only: "ÄRZTE-1"
        # and "ärzte-1" would become two customers (each mailed), or an unchanged re-import
        # would fail on the unique index.
        raise FieldError(f"has the letter {cased!r}; a key may use the letters A-Z (any case), "
                         "digits, punctuation and letters without case, because keys are "
                         "matched ignoring case; use the CRM's account number or write the "
                         "letter without its accent (AERZTE-1)")
    return value


def name(value: str) -> str:
    if not value:
        raise FieldError("is empty; every customer needs a name")
    if len(value) > 300:
        raise FieldError("is longer than 300 characters")
    return value


def licences(value: str) -> int:
    if not value:
        raise FieldError("is empty; write the number of licences, a whole number such as 25")
    if value.startswith("-") and _DIGITS.match(value[1:]):
        raise FieldError("cannot be negative; write the number of licences such as 25")
    # ASCII digits only: int() would also take "٣", "+5" and "1_000".
    if not _DIGITS.match(value):
        raise FieldError("is not a whole number; write the number of licences such as 25")
    if len(value) > 9 or int(value) > MAX_LICENCES:
        raise FieldError(f"is more than {MAX_LICENCES:,}; write the number of licences "
                         "such as 25")
    return int(value)


def tenant_id(value: str) -> str:
    value = value.lower()
    if value and not _GUID.match(value):
        raise FieldError("is not a Microsoft tenant id (a GUID such as "
                         "8c6f0a2e-3b1d-4f7a-9e2c-5d4b3a2f1e0d); leave it empty if unknown",
                         shown=value)
    return value


def primary_domain(value: str) -> str:
    value = value.lower()
    if value and not _DOMAIN.match(value):
        raise FieldError("is not a domain name; write it like contoso.example (no https://, "
                         "no @)", shown=value)
    return value


def locale(value: str) -> str:
    match = _LOCALE.match(value)
    if not match or len(value) > 20:
        raise FieldError("is not a language code; use one such as en, de or fr-CA")
    if not is_known_language(match.group(1)):
        raise FieldError(f"{match.group(1).lower()!r} is not a known language code (ISO 639); "
                         "use one such as en, de or fr-CA")
    return value


def time_zone(value: str) -> str:
    try:
        return canonical(value)
    except UnknownTimeZone as exc:
        hint = exc.message.split(": ", 1)[-1]
        raise FieldError(f"is not a known time zone; {hint}") from None


def tags(value: str) -> tuple[str, ...]:
    found: list[str] = []
    for tag in split(value):
        tag = tag.lower()
        if not tag or tag in found:
            continue
        if len(tag) > 100:
            raise FieldError("has a tag longer than 100 characters", shown=tag)
        found.append(tag)
    return tuple(sorted(found))


def plain(limit: int) -> Callable[[str], str]:
    """A free-text field of at most ``limit`` characters (names)."""

    def check(value: str) -> str:
        if len(value) > limit:
            raise FieldError(f"is longer than {limit} characters")
        return value

    return check


class EmailChecker:
    """email-validator with a per-domain cache.

    Validating the domain is most of email-validator's cost, and a customer's contacts share
    one domain, so a domain already accepted is not checked again when the local part is plain
    ASCII (anything unusual still goes through email-validator in full).
    """

    def __init__(self) -> None:
        self._domains: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        """The normalised lower-case address, or ``FieldError``."""
        local, at, domain = value.rpartition("@")
        known = self._domains.get(domain.lower()) if at else None
        if known is not None and len(local) <= 64 and len(value) <= 254 and (
            _PLAIN_LOCAL.match(local)
        ):
            return f"{local}@{known}".lower()
        try:
            # No DNS lookups: imports must work offline, and *.example test domains must pass.
            result = validate_email(value, check_deliverability=False)
        except EmailNotValidError as exc:
            raise FieldError(f"not a valid email address: {exc}") from None
        if len(self._domains) > 20_000:  # keep memory flat on huge files
            self._domains.clear()
        self._domains[domain.lower()] = result.domain.lower()
        return result.normalized.lower()
