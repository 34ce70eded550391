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
not moved. A stage set by hand wins over every observation recorded before it: a move driven by an
observation happens only once that observation's source (``SOURCE_OF``) has recorded evidence
newer than the hand-made change (never a silent override, and something new from another source
does not count). Nothing here reads the clock or the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from comms.domain import CustomerInfo

OBSERVATIONS = ("relationship_accepted", "gdap_active", "csp_active", "direct_inactive")
# Which source an observation comes from (the evidence a move cites).
SOURCE_OF = {"relationship_accepted": "partner_center", "gdap_active": "gdap",
             "csp_active": "partner_center", "direct_inactive": "tenant"}


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
    evidence_at: dict[str, datetime],
    first_at: dict[str, datetime] | None = None,
) -> Decision:
    """Forward moves the facts call for, each allowed by the stage machine.

    ``manual_at``: when a person last set the stage; ``evidence_at``: source -> when its latest
    evidence (this sync's, if it saw something new) was recorded; ``first_at``: source -> when
    its first evidence was. A move whose observation's source has no evidence newer than
    ``manual_at`` is held: the stage set by hand stands. When the stage was set by hand to
    correct what sync had seen (some source had evidence before it), a source first read after
    that (one just turned on) does not undo it with its first evidence: only with a later one.
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
    moves: list[tuple[str, str, str]] = []
    for stage in sorted({s for _, s, _ in ahead}, key=order.__getitem__):
        if stage == current or order[stage] < order[current]:
            continue
        # Several observations may call for one stage: any whose source is not held moves it.
        holds = {o: _manual_hold(current, o, _hold_until(o, manual_at, first_at or {}),
                                 evidence_at) for _, s, o in ahead if s == stage}
        free = [o for o, why in holds.items() if not why]
        if not free:
            return Decision(tuple(moves), next(iter(holds.values())))
        observation = free[0]
        if stage not in allowed.get(current, ()):
            held = (f"observed {observation} (stage {stage!r}) but the campaign does not allow "
                    f"{current!r} -> {stage!r}")
            return Decision(tuple(moves), held)
        moves.append((current, stage, observation))
        current = stage
    return Decision(tuple(moves))


def _hold_until(observation: str, manual_at: datetime | None,
                first_at: dict[str, datetime]) -> datetime | None:
    """Until when a stage set by hand holds against ``observation``'s source: the hand-made
    change, or, for a source first read after a correction, that first reading."""
    first = first_at.get(SOURCE_OF[observation])
    corrected = manual_at is not None and any(at < manual_at for at in first_at.values())
    if manual_at is None or not corrected or first is None or first <= manual_at:
        return manual_at
    return first


def _manual_hold(current: str, observation: str, manual_at: datetime | None,
                 evidence_at: dict[str, datetime]) -> str:
    """Why a stage set by hand holds against ``observation`` ("" when it does not): its
    source recorded nothing after the hand-made change."""
    source = SOURCE_OF[observation]
    seen_at = evidence_at.get(source)
    if manual_at is None or (seen_at is not None and seen_at > manual_at):
        return ""
    return (f"stage {current!r} was set by hand at {manual_at:%Y-%m-%d %H:%M}, after the "
            f"{source} evidence of {observation}; it stands until {source} reports a new "
            "observation (set the stage by hand again to change it now)")
