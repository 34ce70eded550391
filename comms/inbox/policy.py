"""The ``[inbox]`` section of campaign.toml: what reading the sender mailboxes does."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Phrases that mean "stop mailing me", matched case-insensitively in a reply's own text (its
# subject and the lines above the quoted original), never in the quoted original itself.
DEFAULT_OPTOUT_KEYWORDS: tuple[str, ...] = (
    # English
    "unsubscribe", "opt out", "opt-out", "remove me from", "stop emailing", "stop sending",
    "no more emails",
    # German
    "abmelden", "abbestellen", "austragen", "keine e-mails mehr", "keine emails mehr",
    "keine mails mehr", "nicht mehr anschreiben", "nicht mehr kontaktieren",
    # French
    "désabonner", "désinscrire", "ne plus recevoir",
    # Dutch
    "afmelden", "uitschrijven",
    # Spanish
    "darme de baja", "dar de baja", "cancelar suscripción",
    # Italian
    "annulla iscrizione", "disiscrivimi", "cancellami",
)


class InboxPolicy(BaseModel):
    """Reading replies and bounces (``[inbox]``); every key is optional."""

    model_config = ConfigDict(extra="forbid")

    # Sync the inbox first on every `comms run` (as `comms run --inbox` does).
    on_run: bool = False
    # Messages per Graph page (Prefer: odata.maxpagesize); Graph caps it.
    page_size: Annotated[int, Field(ge=1, le=1000, strict=True)] = 100
    # Read the message text (bodyPreview/body; needs Mail.Read). Off: headers only
    # (Mail.ReadBasic): no opt-out keywords, NDRs matched by their headers only.
    read_body: bool = True
    # A human reply holds that customer's reminders this many days.
    hold_reminders_days: Annotated[float, Field(ge=0)] = 7.0
    # Tell the account manager (an internal note, at most one per customer per day).
    notify_account_manager: bool = True
    # Soft bounces (4.x.x) of one address: suppressed after `soft_bounce_limit` within
    # `soft_bounce_window_days`.
    soft_bounce_limit: Annotated[int, Field(ge=1, strict=True)] = 3
    soft_bounce_window_days: Annotated[float, Field(gt=0)] = 14.0
    # Phrases that make a reply an opt-out (any language).
    optout_keywords: list[str] = Field(default_factory=lambda: list(DEFAULT_OPTOUT_KEYWORDS))
    # When a page holds many threaded replies, Sent Items of this many days is listed once
    # (1,000 a request) instead of looking each reply's In-Reply-To up on its own.
    sent_index_days: Annotated[float, Field(ge=0)] = 60.0
    # Lines of a reply kept on the customer's timeline.
    timeline_lines: Annotated[int, Field(ge=0, le=50, strict=True)] = 3

    @field_validator("optout_keywords")
    @classmethod
    def _keywords(cls, value: list[str]) -> list[str]:
        out = [v.strip().lower() for v in value if v.strip()]
        if len(out) != len(value):
            raise ValueError("optout_keywords must not contain empty strings")
        return out
