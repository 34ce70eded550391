"""Which observation moves which stage: the campaign's ``[sync]`` rules, applied (pure).

```toml
[sync]
relationship_accepted = "approved"          # Partner Center lists the customer
gdap_active = "approved"                    # a GDAP relationship is active
csp_active = "awaiting_cancellation"        # a CSP subscription is active
direct_inactive = "completed"               # the direct subscription is cancelled
direct_inactive_statuses = ["Suspended", "Disabled", "Deleted", "absent"]
wait_for_stage_message = ["approved"]       # move on only once this stage's message went out
```

An empty string turns a rule off. ``gdap_active`` does not count when Partner Center was read and
does not list the customer: an active GDAP relationship (granted for support) is no reseller
relationship. Moves go forward only (in campaign stage order), at most one stage per sync, each
allowed by the stage machine; paused, opted-out and lost customers are observed but not moved. From
a stage named in ``wait_for_stage_message`` a customer moves on only once that stage's on-enter
message went out (a move withdraws it while queued): the approved customer hears about Microsoft's
"You are about to lose access" mail before sync moves it on. A stage set by hand to correct sync
(moved backwards, or away from the stage sync had moved it to) wins over every observation recorded
before it: a move driven by an observation happens only once the fact behind it began after the
hand-made change, in the evidence of that observation's source (``SOURCE_OF``): it was false in
some evidence recorded after the change and is true now, or first seen after it (never a silent
override; something new from another source, or another change in what the same source saw while
the fact stayed true, does not count); a routine forward move by hand is no correction and holds
nothing. Nothing here reads the clock or the database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
    # Statuses meaning the direct subscription was cancelled (Graph's Suspended is the portal's
    # Disabled). Warning (expired, in its grace period) and LockedOut are not cancelled: the
    # customer stays in awaiting_cancellation and keeps being reminded.
    direct_inactive_statuses: tuple[str, ...] = ("Suspended", "Disabled", "Deleted", "absent")
    # Stages whose on-enter message must have gone out before sync moves a customer on.
    wait_for_stage_message: tuple[str, ...] = ("approved",)

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
        # GDAP alone (granted for support) is no reseller relationship: it does not count when
        # Partner Center was read and does not list the customer (False, not None = not read).
        if self.gdap_status == "active" and self.relationship_accepted is not False:
            out.append("gdap_active")
        if self.csp_active:
            out.append("csp_active")
        if self.direct_status is not None and self.direct_status in rules.direct_inactive_statuses:
            out.append("direct_inactive")
        return out


@dataclass(frozen=True)
class Decision:
    """The stage move sync makes for one customer (at most one) and why not, or what to know."""

    moves: tuple[tuple[str, str, str], ...]  # (from, to, observation)
    held: str = ""  # why an observed change did not move the customer, or a note on the move


# States of a stage's on-enter message (``StageMessage.state``) that are worth waiting for:
# it is on its way (planned by the next run, queued, being sent). Any other state but "sent"
# means it will not go by itself (failed, withdrawn by an operator, nobody to send it to).
WAIT_STATES = ("not planned yet", "queued")


@dataclass(frozen=True)
class StageMessage:
    """The current stage's on-enter message and where it stands (see ``WAIT_STATES``)."""

    message: str
    state: str  # sent | not planned yet | queued | failed | withdrawn by an operator | ...


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
    onset: dict[str, datetime] | None = None,
    stage_message: StageMessage | None = None,
) -> Decision:
    """The forward move the facts call for (one stage at most), allowed by the stage machine.

    ``manual_at``: when a person last corrected the stage by hand (None for a routine forward
    move); ``evidence_at``: source -> when its latest evidence (this sync's, if it saw something
    new) was recorded; ``first_at``: source -> when its first evidence was; ``onset``:
    observation -> when it last began in its own source's evidence (``onsets``; needed only
    with a ``manual_at``). A move whose observation did not begin after ``manual_at`` is held:
    the stage set by hand stands, whatever else its source or another one saw since. When the
    stage was set by hand to correct what sync had seen (some source had evidence before it), a
    source first read after that (one just turned on) does not undo it with its first evidence:
    only with a fact that begins after that first reading. ``stage_message``: the current stage's
    on-enter message when the stage is one of ``rules.wait_for_stage_message``; while it is on
    its way the customer waits, and when it can never go the move is made and says so.
    """
    order = {name: i for i, name in enumerate(stage_names)}
    current = customer.stage
    ahead = sorted({(order[rules.stage_for(o)], rules.stage_for(o), o)
                    for o in facts.observed(rules)
                    if rules.stage_for(o) in order
                    and order[rules.stage_for(o)] > order.get(current, -1)})
    if not ahead:
        return Decision(())
    flags = [f for f in ("paused", "opted_out", "lost") if getattr(customer, f)]
    if flags:
        return Decision((), f"observed but not moved: customer is {', '.join(flags)}")
    # One stage per sync: the nearest stage observed ahead (the next sync takes the next one,
    # once this stage's own message has had its chance).
    stage = ahead[0][1]
    # Several observations may call for one stage: any whose source is not held moves it.
    holds = {o: _manual_hold(current, o, _hold_until(o, manual_at, first_at or {}),
                             evidence_at, (onset or {}).get(o)) for _, s, o in ahead if s == stage}
    free = [o for o, why in holds.items() if not why]
    if not free:
        return Decision((), next(iter(holds.values())))
    observation = free[0]
    if stage not in allowed.get(current, ()):
        return Decision((), f"observed {observation} (stage {stage!r}) but the campaign does "
                            f"not allow {current!r} -> {stage!r}")
    note = ""
    if stage_message is not None and stage_message.state != "sent":
        if stage_message.state in WAIT_STATES:
            return Decision((), f"waiting for {stage_message.message} to be sent "
                                f"({stage_message.state}) before moving on to {stage!r} "
                                f"(observed {observation})")
        note = (f"moved on although {stage_message.message} was never sent "
                f"({stage_message.state}): tell the customer yourself")
    return Decision(((current, stage, observation),), note)


def _hold_until(observation: str, manual_at: datetime | None,
                first_at: dict[str, datetime]) -> datetime | None:
    """Until when a stage set by hand holds against ``observation``'s source: the hand-made
    change, or, for a source first read after a correction, that first reading (what it saw
    then does not undo the correction: only a fact that begins after it)."""
    first = first_at.get(SOURCE_OF[observation])
    corrected = manual_at is not None and any(at < manual_at for at in first_at.values())
    if manual_at is None or not corrected or first is None or first <= manual_at:
        return manual_at
    return first


def _manual_hold(current: str, observation: str, hold_at: datetime | None,
                 evidence_at: dict[str, datetime], began: datetime | None) -> str:
    """Why a stage set by hand holds against ``observation`` ("" when it does not): it did not
    begin (``began``, its onset) in evidence its source recorded after ``hold_at``. A source
    that saw something else change while the observation stayed true (one more licence
    assigned, the subscription still Suspended) does not undo the correction."""
    source = SOURCE_OF[observation]
    seen_at = evidence_at.get(source)
    if hold_at is None or (seen_at is not None and began is not None
                           and seen_at > hold_at and began > hold_at):
        return ""
    since = f" (true in its evidence since {began:%Y-%m-%d %H:%M})" if began is not None else ""
    return (f"stage {current!r} was set by hand at {hold_at:%Y-%m-%d %H:%M}, after the "
            f"{source} evidence of {observation}{since}; it stands until {source} sees "
            f"{observation} begin again (set the stage by hand again to change it now)")


def onsets(history: Iterable[tuple[str, datetime, dict[str, Any]]],
           read: Callable[[dict[str, dict[str, Any]]], Facts],
           rules: SyncRules) -> dict[str, datetime]:
    """Observation -> when it last began in its own source's evidence: the ``at`` of the
    earliest row of the latest unbroken run of that source's rows in which it is true.
    ``history``: one customer's evidence rows (source, at, what was seen), oldest first;
    ``read``: how facts are read from what the sources saw (``ledger.facts_of``), applied to
    each row alone, so an observation that counts only together with another source
    (``gdap_active``) is dated by its own source's fact. An observation false in its source's
    latest row, or never seen, has none."""
    out: dict[str, datetime] = {}
    for source, at, seen in history:
        true = read({source: seen}).observed(rules)
        for observation in OBSERVATIONS:
            if SOURCE_OF[observation] != source:
                continue
            if observation in true:
                out.setdefault(observation, at)
            else:
                out.pop(observation, None)
    return out
