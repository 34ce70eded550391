"""The stage machine (pure): which moves the campaign allows, and the audit events moves produce.

A move the campaign does not allow is refused with the list of allowed ones, unless forced with a
note; a forced move is recorded as such. Side states (paused, opted out, lost) sit beside the stage
and are changed by their own events. Nothing here reads the clock or touches the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from comms.campaign import Campaign
from comms.domain import CustomerInfo, Event, EventKind
from comms.errors import StageMoveRefused

__all__ = ["Event", "EventKind", "SideAction", "allowed_moves", "is_sendable", "move",
           "side_event", "side_flag"]

SideAction = Literal["pause", "resume", "opt_out", "opt_in", "lost", "found"]

# Side action -> (flag, value it sets)
_SIDE: dict[str, tuple[str, bool]] = {
    "pause": ("paused", True),
    "resume": ("paused", False),
    "opt_out": ("opted_out", True),
    "opt_in": ("opted_out", False),
    "lost": ("lost", True),
    "found": ("lost", False),
}


def allowed_moves(campaign: Campaign, stage: str) -> tuple[str, ...]:
    if not campaign.has_stage(stage):
        return ()
    return campaign.stage(stage).next


def move(
    campaign: Campaign,
    customer: CustomerInfo,
    to: str,
    *,
    at: datetime,
    by: str,
    source: str,
    note: str = "",
    force: bool = False,
) -> Event:
    """The event for moving ``customer`` to stage ``to``, or ``StageMoveRefused``."""
    if not campaign.has_stage(to):
        raise StageMoveRefused(
            f"Unknown stage {to!r}. Stages: {', '.join(campaign.stage_names)}."
        )
    if to == customer.stage:
        raise StageMoveRefused(f"Customer {customer.key} is already in stage {to!r}.")
    allowed = allowed_moves(campaign, customer.stage)
    if to not in allowed:
        if not force:
            options = ", ".join(allowed) if allowed else "none (final stage)"
            raise StageMoveRefused(
                f"Customer {customer.key} cannot move from {customer.stage!r} to {to!r}. "
                f"Allowed: {options}. To move anyway, add --force with a --note saying why."
            )
        if not note.strip():
            raise StageMoveRefused(
                f"Forcing {customer.key} from {customer.stage!r} to {to!r} needs a --note "
                "saying why; it is recorded in the audit trail."
            )
    return Event(
        kind="stage",
        at=at,
        by=by,
        source=source,
        from_stage=customer.stage,
        to_stage=to,
        note=note,
        forced=to not in allowed,
    )


def side_event(
    customer: CustomerInfo,
    action: SideAction,
    *,
    at: datetime,
    by: str,
    source: str,
    note: str = "",
) -> Event | None:
    """The event for a side-state change, or None when the customer is already in that state."""
    flag, value = _SIDE[action]
    if getattr(customer, flag) == value:
        return None
    return Event(
        kind=action, at=at, by=by, source=source, from_stage=customer.stage,
        to_stage=customer.stage, note=note,
    )


def side_flag(action: SideAction) -> tuple[str, bool]:
    """Which customer flag an action sets, and to what."""
    return _SIDE[action]


def is_sendable(customer: CustomerInfo) -> bool:
    """Whether any message may go to this customer at all."""
    return not (customer.paused or customer.opted_out or customer.lost)
