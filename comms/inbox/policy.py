"""The ``[inbox]`` section of campaign.toml: what reading the sender mailboxes does."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Phrases that ask to stop OUR emails, matched case-insensitively as whole words in a reply's
# own text and subject (never in the quoted original or below a "-- " signature delimiter).
# The campaign asks customers to cancel a subscription, so nothing here may also be a way of
# saying "cancel the subscription" ("unsubscribe from the old plan", "dar de baja",
# "abbestellen", "cancelar suscripción"): each phrase names the mail, the list or the writer.
# A phrase also does not count when its sentence negates it before ("do NOT unsubscribe us")
# or talks about the subscription or its billing (phrases.SUBSCRIPTION_TOPIC); such replies
# are ordinary replies that a human reads.
DEFAULT_OPTOUT_KEYWORDS: tuple[str, ...] = (
    # English
    "unsubscribe me", "unsubscribe us", "unsubscribe from these emails",
    "unsubscribe from your emails", "unsubscribe from this list", "unsubscribe from your list",
    "unsubscribe from your mailing list", "unsubscribe from the mailing list",
    "opt me out", "opt us out", "opt out of these emails", "opt out of your emails",
    "remove me from your list", "remove me from your mailing list", "remove me from this list",
    "remove me from the mailing list", "remove me from your distribution list",
    "remove us from your list", "remove us from your mailing list",
    "take me off your list", "take me off your mailing list", "take me off this list",
    "stop emailing me", "stop emailing us", "stop mailing me", "stop sending me emails",
    "stop sending me these", "stop sending us these", "stop sending me these emails",
    "stop sending us emails", "stop sending these emails",
    "no more emails", "do not email me", "don't email me",
    # German
    "keine e-mails mehr", "keine emails mehr", "keine mails mehr", "keine e-mail mehr",
    "nicht mehr anschreiben", "nicht mehr per e-mail", "austragen", "vom verteiler",
    "aus dem verteiler", "aus ihrem verteiler", "aus dem e-mail-verteiler", "mich abmelden",
    "uns abmelden",
    # French
    "me désabonner", "désabonnez-moi", "me désinscrire", "désinscrivez-moi",
    "ne plus recevoir vos", "ne plus recevoir ces", "ne plus recevoir de mails",
    "ne plus recevoir d'e-mails", "retirez-moi de votre liste",
    # Dutch
    "mij afmelden", "meld mij af", "meld me af", "mij uitschrijven", "schrijf mij uit",
    "geen e-mails meer", "geen mails meer",
    # Spanish
    "darme de baja de la lista", "darme de baja de sus correos",
    "darme de baja de estos correos", "no quiero recibir más correos",
    "dejen de enviarme correos", "eliminarme de la lista", "sacarme de la lista",
    # Italian
    "disiscrivimi", "cancellami dalla lista", "cancellami dalla mailing list",
    "rimuovetemi dalla lista", "rimuovimi dalla lista",
)
# Words that opt out only as the whole reply (besides "please", "thanks" and the like, and
# without a question mark): the list command "unsubscribe" alone is clear, "how do I
# unsubscribe from the old plan?" is not.
DEFAULT_OPTOUT_COMMANDS: tuple[str, ...] = (
    "unsubscribe", "opt out", "opt-out", "abmelden", "austragen", "désabonner",
    "se désabonner", "désinscrire", "afmelden", "uitschrijven", "darme de baja",
    "disiscrivimi", "cancellami",
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
    # Phrases that make a reply an opt-out (any language); see DEFAULT_OPTOUT_KEYWORDS.
    optout_keywords: list[str] = Field(default_factory=lambda: list(DEFAULT_OPTOUT_KEYWORDS))
    # Words that make a reply an opt-out only when they are the whole reply.
    optout_commands: list[str] = Field(default_factory=lambda: list(DEFAULT_OPTOUT_COMMANDS))
    # When a page holds many threaded replies, Sent Items of this many days is listed once
    # (1,000 a request) instead of looking each reply's In-Reply-To up on its own.
    sent_index_days: Annotated[float, Field(ge=0)] = 60.0
    # Lines of a reply kept on the customer's timeline.
    timeline_lines: Annotated[int, Field(ge=0, le=50, strict=True)] = 3

    @field_validator("optout_keywords", "optout_commands")
    @classmethod
    def _keywords(cls, value: list[str]) -> list[str]:
        out = [v.strip().lower() for v in value if v.strip()]
        if len(out) != len(value):
            raise ValueError("must not contain empty strings")
        return out
