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
