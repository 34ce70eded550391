"""One time-zone policy for the whole product.

Every IANA name given to comms (config defaults, CSV rows, the ledger, ``--now``) goes through
``zone()``: exact names first, then a case-insensitive match (``europe/london`` is
``Europe/London``); anything else raises ``UnknownTimeZone`` with the closest known names. Nothing
falls back to UTC silently: a wrong zone would send a customer's mail at night.
"""

from __future__ import annotations

import difflib
import zoneinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from comms.errors import UnknownTimeZone


@lru_cache(maxsize=1)
def _by_lower() -> dict[str, str]:
    return {name.lower(): name for name in zoneinfo.available_timezones()}


def canonical(name: str) -> str:
    """The IANA spelling of ``name`` (case-insensitive), or raise ``UnknownTimeZone``."""
    text = (name or "").strip()
    if not text:
        raise UnknownTimeZone("No time zone given; use an IANA name such as Europe/London.")
    known = _by_lower()
    exact = known.get(text.lower())
    if exact is not None:
        return exact
    close = difflib.get_close_matches(text.lower(), list(known), n=3, cutoff=0.75)
    hint = (
        "did you mean " + " or ".join(known[c] for c in close) + "?"
        if close else "use an IANA name such as Europe/London or America/New_York."
    )
    raise UnknownTimeZone(f"Unknown time zone {name!r}: {hint}")


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The ``ZoneInfo`` for ``name`` (case-insensitive), or raise ``UnknownTimeZone``."""
    try:
        return ZoneInfo(canonical(name))
    except ZoneInfoNotFoundError as exc:  # listed but not loadable: a broken tzdata install
        raise UnknownTimeZone(f"Time zone {name!r} cannot be loaded: {exc}") from exc
