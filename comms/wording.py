"""Words for people: counts with the right plural ("1 licence", "3 customers", "1 mailbox")."""

from __future__ import annotations

_IRREGULAR = {"mailbox": "mailboxes", "entry": "entries", "reply": "replies", "day": "days",
              "address": "addresses", "is": "are", "was": "were"}


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 message``, ``2 messages``, ``1,240 customers``, ``1 mailbox``, ``3 mailboxes``."""
    if n == 1:
        return f"{n:,} {word}"
    return f"{n:,} {many or _IRREGULAR.get(word) or word + 's'}"
