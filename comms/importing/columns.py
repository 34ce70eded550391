"""The documented columns and how a file's header row maps onto them.

A header cell is a documented column (any case, spaces or hyphens for underscores, a few
aliases), the ``problems`` column of a rejects file (ignored), a near miss of a documented
column (an error naming it: a typo must not lose data silently), or another column (CRM exports
carry many): reported as ignored, or an error with ``strict``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from comms.importing.fields import visible
from comms.store.customer_upsert import ROLES as ROLES  # the contact roles, by column prefix

# The documented columns, in the order export writes them.
COLUMNS: tuple[str, ...] = (
    "key",
    "name",
    "tenant_id",
    "primary_domain",
    "licences",
    "locale",
    "time_zone",
    "stage",
    "account_manager_name",
    "account_manager_email",
    "tags",
    "primary_contact_name",
    "primary_contact_email",
    "billing_contact_name",
    "billing_contact_email",
    "technical_contact_name",
    "technical_contact_email",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("key", "name", "licences")
# Spellings people type that mean a documented column.
ALIASES = {"licenses": "licences", "timezone": "time_zone", "tz": "time_zone"}
# A rejects file carries this column; importing a fixed rejects file ignores it.
PROBLEMS_COLUMN = "problems"
# A header wider than this is not a customer list (and checking it would take minutes).
MAX_COLUMNS = 1000
# How similar an unknown column must be to a documented one to count as its typo.
_NEAR_MISS = 0.75
# Problems listed in one error; the rest are counted.
MAX_PROBLEMS = 100


def capped(problems: list[str], total: int | None = None) -> list[str]:
    """At most ``MAX_PROBLEMS`` problems, then one line counting the rest."""
    total = len(problems) if total is None else total
    if total <= MAX_PROBLEMS:
        return problems
    return [*problems[:MAX_PROBLEMS], f"and {total - MAX_PROBLEMS:,} more problem(s)"]


def normalise_header(name: str) -> str:
    norm = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return ALIASES.get(norm, norm)


@dataclass
class HeaderMap:
    """The documented column of each header cell (None: not read)."""

    columns: list[str | None]
    # Unknown columns that are ignored, as written in the file.
    ignored: list[str] = field(default_factory=list)
    # 0-based positions of blank header cells (a value under one is an error).
    blank: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # How many problems there are (``problems`` lists the first ``MAX_PROBLEMS``).
    total: int = 0


def _unknown(i: int, raw: str, name: str, strict: bool, out: HeaderMap) -> None:
    close = difflib.get_close_matches(name, COLUMNS, n=1, cutoff=_NEAR_MISS)
    shown = visible(raw.strip())
    if close:
        out.problems.append(
            f"header column {i} '{shown}' is not a known column; did you mean {close[0]!r}? "
            "Rename it (a misspelt column would lose its values)"
        )
    elif strict:
        out.problems.append(
            f"header column {i} '{shown}' is not a known column (--strict-columns); known "
            f"columns: {', '.join(COLUMNS)}"
        )
    else:
        out.ignored.append(shown)


def map_header(header: Sequence[str], *, strict: bool = False) -> HeaderMap:
    """Map a header row; ``problems`` lists what makes it unusable (empty when fine)."""
    if len(header) > MAX_COLUMNS:
        return HeaderMap([], total=1, problems=[
            f"the header row has {len(header):,} columns; the format has {len(COLUMNS)} "
            f"(files with up to {MAX_COLUMNS:,} columns are read, extra columns are ignored)"
        ])
    out = HeaderMap([])
    seen: dict[str, int] = {}
    for i, raw in enumerate(header, start=1):
        name = normalise_header(raw)
        mapped: str | None = None
        if not raw.strip():
            out.blank.append(i - 1)
        elif name == PROBLEMS_COLUMN:
            pass
        elif name not in COLUMNS:
            _unknown(i, raw, name, strict, out)
        elif name in seen:
            out.problems.append(f"header column {i} {raw.strip()!r} repeats column "
                                f"{seen[name]}; each column may appear once")
        else:
            seen[name] = i
            mapped = name
        out.columns.append(mapped)
    out.problems.extend(_missing(seen))
    out.total = len(out.problems)
    out.problems = capped(out.problems)
    return out


def _missing(seen: dict[str, int]) -> list[str]:
    problems = [f"the required column {required!r} is missing from the header"
                for required in REQUIRED_COLUMNS if required not in seen]
    if not any(f"{r}_contact_email" in seen for r in ROLES):
        problems.append(
            "the header has no contact email column; add primary_contact_email "
            "(and optionally billing_contact_email, technical_contact_email)"
        )
    return problems
