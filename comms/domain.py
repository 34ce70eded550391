"""Plain, immutable views of ledger rows that the pure core (stages, planner, render) works on.

The store converts its SQLModel rows to these, so the core never touches a session or the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


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
    tags: tuple[str, ...] = ()
    contacts: tuple[ContactInfo, ...] = ()
    # When the CSP subscription went live (entered awaiting_cancellation); drives double billing.
    csp_live_at: datetime | None = None
    id: int | None = None
    # A human reply came in (comms inbox): no reminder falls due before this.
    reminders_held_until: datetime | None = None


@dataclass(frozen=True)
class SentMessage:
    """One entry of a customer's message history, as the planner sees it."""

    message: str
    sequence: int
    status: str  # queued | sending | sent | failed | unknown | withdrawn
    stage: str
    planned_at: datetime
    sent_at: datetime | None = None


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
