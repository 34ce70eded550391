"""Plain, immutable views of ledger rows that the pure core (stages, planner, render) works on.

The store converts its SQLModel rows to these, so the core never touches a session or the clock.
"""

from __future__ import annotations

import contextlib
import enum
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import idna


class MessageStatus(enum.StrEnum):
    """Where an outbox message stands (the values are stored in the ledger: never rename)."""

    QUEUED = "queued"  # frozen, waiting for its send window and a sender slot
    SENDING = "sending"  # claimed by a dispatcher; its request may be in flight
    SENT = "sent"  # accepted by Graph (or written to the outbox folder)
    FAILED = "failed"  # definitely rejected; an operator retries after fixing the cause
    UNKNOWN = "unknown"  # may have been accepted; looked up in Sent Items before any resend
    WITHDRAWN = "withdrawn"  # will never be sent (stage moved on, opted out, by hand)
    BOUNCED = "bounced"  # accepted, then a non-delivery report came back (comms inbox)


# Statuses that mean "this decision was acted on": the message must not be queued again
# (bounced: accepted and delivered to the other recipients; a bounce came back for some).
ACTED_ON = frozenset({MessageStatus.QUEUED, MessageStatus.SENDING, MessageStatus.SENT,
                      MessageStatus.UNKNOWN, MessageStatus.BOUNCED})

EventKind = Literal[
    "stage", "pause", "resume", "opt_out", "opt_in", "lost", "found", "update", "resend", "import",
    "forced_send", "suppression_lifted",
]


@dataclass(frozen=True)
class Event:
    """One audit-trail entry; the store appends it and never rewrites it."""

    kind: EventKind
    at: datetime
    by: str
    source: str
    from_stage: str | None = None
    to_stage: str | None = None
    note: str = ""
    forced: bool = False


@dataclass(frozen=True)
class ContactInfo:
    name: str
    email: str
    role: str = "primary"  # primary | billing | technical
    suppressed: bool = False


@dataclass(frozen=True)
class CustomerInfo:
    key: str
    name: str
    licences: int
    stage: str
    stage_entered_at: datetime
    locale: str = "en"
    time_zone: str = "Europe/London"
    tenant_id: str = ""
    primary_domain: str = ""
    paused: bool = False
    opted_out: bool = False
    lost: bool = False
    account_manager_name: str = ""
    account_manager_email: str = ""
    # The account manager's address is on the suppression list (opted out, bounced): no Cc,
    # no internal note.
    account_manager_suppressed: bool = False
    tags: tuple[str, ...] = ()
    contacts: tuple[ContactInfo, ...] = ()
    # When the CSP subscription went live (entered the campaign's csp_live_stage); drives the
    # double-billing exposure.
    csp_live_at: datetime | None = None
    id: int | None = None
    # What stage sync last saw of the customer's own tenant (None: never observed): the only
    # ground for wording that states a fact about the old subscription.
    observation: Observation | None = None
    # A human reply came in (comms inbox): no reminder falls due before this.
    reminders_held_until: datetime | None = None
    # Stage sync saw something that needs a person (the CSP subscription or the reseller
    # relationship is gone): no stage message is planned while it lasts ("" when none).
    sync_attention: str = ""


@dataclass(frozen=True)
class Observation:
    """What stage sync saw about one customer's old direct subscription, when and where.

    Templates may state a fact ("the old subscription is still active") only when it was
    observed; without an observation every field is empty and the wording stays conditional.
    ``direct_status`` is the status as the source reported it (``Enabled``, ``Disabled`` ...)."""

    at: datetime | None = None
    source: str = ""
    direct_status: str = ""
    assigned_licences: int | None = None

    def __post_init__(self) -> None:
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError("Observation.at must be an aware datetime")

    @property
    def direct_active(self) -> bool:
        """The old direct subscription was seen still Enabled."""
        return self.direct_status.strip().lower() == "enabled"

    @property
    def direct_cancelled(self) -> bool:
        """The old direct subscription was seen and it was no longer Enabled."""
        return bool(self.direct_status.strip()) and not self.direct_active


@dataclass(frozen=True)
class SentMessage:
    """One entry of a customer's message history, as the planner sees it."""

    message: str
    sequence: int
    status: str  # a MessageStatus value
    stage: str
    planned_at: datetime
    sent_at: datetime | None = None
    # Withdrawn by an operator (`comms outbox withdraw`): never queued again, and passed over
    # so that the reminders after it still follow.
    by_operator: bool = False


@dataclass(frozen=True)
class PlannedMessage:
    """A message the planner says is due now."""

    message: str
    sequence: int  # 0 for the stage-entry message, n for the n-th reminder
    stage: str
    to: tuple[ContactInfo, ...]
    cc: tuple[ContactInfo, ...] = ()
    internal: bool = False  # an internal note to the account manager, not to the customer
    reminder_number: int = 0
    context: dict[str, object] = field(default_factory=dict)


def canonical_address(address: str) -> str:
    """The one spelling of an email address that ledger addresses are compared in: lower case,
    its domain in Unicode (IDNA labels ``xn--...`` decoded) and NFC, as email-validator writes
    an imported contact or a suppression. Graph and bounce reports may give the ASCII form
    (``anna@xn--mller-kva.de`` for ``anna@müller.de``): compared as given, an opt-out or a bounce
    from it matched no contact, and its suppression did not stop mail to the address."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return unicodedata.normalize("NFC", address.strip()).lower()
    if "xn--" in domain.lower():
        with contextlib.suppress(idna.IDNAError, UnicodeError):  # else compared as given
            domain = idna.decode(domain.lower().rstrip("."), uts46=True)
    return unicodedata.normalize("NFC", f"{local}@{domain}").lower()
