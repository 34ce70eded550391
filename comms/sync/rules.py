"""Which observation moves which stage: the campaign's ``[sync]`` rules, applied (pure).

```toml
[sync]
relationship_accepted = "approved"          # Partner Center lists the customer
gdap_active = "approved"                    # a GDAP relationship is active
csp_active = "awaiting_cancellation"        # a CSP subscription is active
direct_inactive = "completed"               # the direct subscription is no longer Enabled
direct_inactive_statuses = ["Warning", "Suspended", "Deleted", "LockedOut", "absent"]
```

An empty string turns a rule off. Moves go forward only (in campaign stage order), one allowed
move at a time through the stage machine; paused, opted-out and lost customers are observed but
not moved; a stage set by hand after the last observation wins until a new observation arrives.
Nothing here reads the clock or the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from comms.domain import CustomerInfo

OBSERVATIONS = ("relationship_accepted", "gdap_active", "csp_active", "direct_inactive")


class SyncRules(BaseModel):
    """The ``[sync]`` table of campaign.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    relationship_accepted: str = "approved"
    gdap_active: str = "approved"
    csp_active: str = "awaiting_cancellation"
    direct_inactive: str = "completed"
    direct_inactive_statuses: tuple[str, ...] = (
        "Warning", "Suspended", "Deleted", "LockedOut", "absent",
    )

    def stage_for(self, observation: str) -> str:
        return str(getattr(self, observation))


@dataclass(frozen=True)
class Facts:
    """What the sources saw of one customer; None where a source did not tell."""

    relationship_accepted: bool | None = None
    gdap_status: str | None = None
    csp_active: bool | None = None
    csp_quantity: int | None = None
    direct_status: str | None = None  # companySubscription status, or "absent"
    direct_total: int | None = None
    assigned: int | None = None

    def observed(self, rules: SyncRules) -> list[str]:
        """The rule names these facts trigger."""
        out: list[str] = []
        if self.relationship_accepted:
            out.append("relationship_accepted")
        if self.gdap_status == "active":
            out.append("gdap_active")
        if self.csp_active:
            out.append("csp_active")
        if self.direct_status is not None and self.direct_status in rules.direct_inactive_statuses:
            out.append("direct_inactive")
        return out


@dataclass(frozen=True)
class Decision:
    """The stage moves sync makes for one customer (possibly none) and why."""

    moves: tuple[tuple[str, str, str], ...]  # (from, to, observation)
    held: str = ""  # why an observed change did not move the customer


def decide(
    stage_names: tuple[str, ...],
    allowed: dict[str, tuple[str, ...]],
    rules: SyncRules,
    customer: CustomerInfo,
    facts: Facts,
    *,
    manual_at: datetime | None,
    observed_before: datetime | None,
    new_evidence: bool,
) -> Decision:
    """Forward moves the facts call for, each allowed by the stage machine.

    ``manual_at``: when a person last set the stage; ``observed_before``: the latest evidence
    before this sync; ``new_evidence``: this sync saw something new for the customer.
    """
    order = {name: i for i, name in enumerate(stage_names)}
    targets = sorted(
        {(order[rules.stage_for(o)], rules.stage_for(o), o)
         for o in facts.observed(rules) if rules.stage_for(o) in order},
    )
    current = customer.stage
    ahead = [(i, s, o) for i, s, o in targets if i > order.get(current, -1)]
    if not ahead:
        return Decision(())
    flags = [f for f in ("paused", "opted_out", "lost") if getattr(customer, f)]
    if flags:
        return Decision((), f"observed but not moved: customer is {', '.join(flags)}")
    if (manual_at is not None and not new_evidence
            and (observed_before is None or manual_at > observed_before)):
        return Decision((), f"stage {current!r} was set by hand at {manual_at:%Y-%m-%d %H:%M} "
                            "after the last observation; it stands until a new observation")
    moves: list[tuple[str, str, str]] = []
    for _, stage, observation in ahead:
        if stage == current or order[stage] < order[current]:
            continue
        if stage not in allowed.get(current, ()):
            held = (f"observed {observation} (stage {stage!r}) but the campaign does not allow "
                    f"{current!r} -> {stage!r}")
            return Decision(tuple(moves), held)
        moves.append((current, stage, observation))
        current = stage
    return Decision(tuple(moves))
