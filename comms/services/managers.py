"""Figures for managers (issue 15): the true funnel, time to convert, money lost so far, and
breakdowns per account manager and per wave.

* **Reached funnel**: a customer *reached* a stage when it is in it now or the audit trail
  (``stage_events``) shows it entered it or any later stage of the campaign. Counted as "the
  furthest stage ever reached", so the counts never rise from one step to the next; conversion is
  reached(step) / reached(previous step).
* **Durations**: days from first entering ``invited`` to first entering any later stage
  (acceptance), and from the CSP subscription going live (``csp_live_at``, else first entering
  the campaign's ``csp_live_stage``) to entering a later stage for good (the old subscription
  cancelled: the first later entry after the last entry into the live stage, so a completion
  undone by a move back does not count). Median and 90th percentile (linear interpolation
  between ranks).
* **Double billing incurred to date**: per customer, days billed twice (go-live to cancellation,
  or to ``now`` while in the CSP-live stage, also after a move back from a later stage) ×
  licences × monthly price / 30 — the same formula as today's exposure
  (comms.services.status.double_billing_exposure), summed over every customer who ever paid
  twice.
* **Completion rate**: customers now in a completed stage (``Campaign.completed_stages``) over
  the group's customers; one moved back from it is not completed.
* **Inbox per group**: bounces (hard among them) and replies read by `comms inbox sync`
  (``inbound_messages`` matched to a customer), counted per account manager and per wave the
  same way as the overall inbox counts (comms.inbox.queries.counts).
Nothing here reads the clock; everything is computed from one read of customers, tags and events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from comms.campaign import Campaign
from comms.services.calendar import aware_utc as _aware
from comms.services.calendar import days_between as _days_between
from comms.store.inbox_models import InboundMessage
from comms.store.models import Customer, CustomerTag, StageEvent

DAYS_PER_MONTH = 30.0
INVITED = "invited"


@dataclass(frozen=True)
class FunnelStep:
    stage: str
    label: str  # the stage's description (what people read), else its name
    reached: int
    # reached / reached of the previous step: None for the first step and after a step nobody
    # reached (0 of 0 is no conversion, not 0 %)
    conversion: float | None


@dataclass(frozen=True)
class Percentiles:
    count: int
    median_days: float | None
    p90_days: float | None


@dataclass(frozen=True)
class Breakdown:
    group: str  # account manager ("Name <email>") or wave tag: the group's key
    customers: int
    funnel: list[FunnelStep]
    completed_rate: float | None
    exposure_today: float
    incurred: float
    bounces: int = 0  # inbound bounces of the group's customers (hard ones included)
    hard_bounces: int = 0
    replies: int = 0
    name: str = ""  # the account manager's name (or the wave tag), without the address
    email: str = ""  # the account manager's address; "" for a wave or a manager without one


@dataclass(frozen=True)
class ManagerReport:
    funnel: list[FunnelStep]
    invitation_to_acceptance: Percentiles
    live_to_cancellation: Percentiles
    incurred_total: float
    exposure_today: float
    by_account_manager: list[Breakdown] = field(default_factory=list)
    by_wave: list[Breakdown] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Cust:
    id: int
    stage: str
    entered: datetime
    licences: int
    csp_live_at: datetime | None
    manager: tuple[str, str]  # (name, email)
    first_entry: dict[str, datetime] = field(default_factory=dict)
    entries: list[tuple[str, datetime]] = field(default_factory=list)  # every entry, in order
    tags: list[str] = field(default_factory=list)
    inbox: dict[str, int] = field(default_factory=dict)  # bounce | hard | reply -> count


def stage_label(campaign: Campaign, stage: str) -> str:
    """What people read for a stage: its description without the final full stop, else its
    name with spaces."""
    if campaign.has_stage(stage) and campaign.stage(stage).description:
        return campaign.stage(stage).description.rstrip(".")
    return stage.replace("_", " ")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th quantile (0..1), linear between ranks; None without values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _load(session: Session, tag: str | None, since: datetime | None) -> list[_Cust]:
    q = sa.select(col(Customer.id), col(Customer.stage), col(Customer.stage_entered_at),
                  col(Customer.licences), col(Customer.csp_live_at),
                  col(Customer.account_manager_name), col(Customer.account_manager_email),
                  col(Customer.created_at))
    if tag:
        q = q.where(col(Customer.id).in_(
            sa.select(col(CustomerTag.customer_id)).where(col(CustomerTag.tag) == tag)))
    if since is not None:
        q = q.where(col(Customer.created_at) >= since)
    custs = {}
    for r in session.execute(q).all():
        mgr = (r[5] or ("" if r[6] else "(no account manager)"), r[6] or "")
        custs[r[0]] = _Cust(r[0], r[1], _aware(r[2]), int(r[3]), r[4], mgr)
    events = session.execute(
        sa.select(col(StageEvent.customer_id), col(StageEvent.to_stage), col(StageEvent.at))
        .where(col(StageEvent.to_stage).is_not(None)).order_by(col(StageEvent.id))
    ).all()
    for cid, to_stage, at in events:
        c = custs.get(cid)
        if c is not None:
            c.entries.append((to_stage, _aware(at)))
            c.first_entry.setdefault(to_stage, _aware(at))
    for c in custs.values():
        if c.stage not in c.first_entry:
            c.first_entry[c.stage] = c.entered
            c.entries.append((c.stage, c.entered))
    for cid, t in session.execute(sa.select(col(CustomerTag.customer_id), col(CustomerTag.tag))):
        if cid in custs:
            custs[cid].tags.append(t)
    _load_inbox(session, custs)
    return list(custs.values())


def _load_inbox(session: Session, custs: dict[int, _Cust]) -> None:
    m = InboundMessage
    for cid, kind, hard, n in session.execute(
        sa.select(col(m.customer_id), col(m.kind), col(m.hard), sa.func.count())
        .where(col(m.customer_id).is_not(None), col(m.kind).in_(("bounce", "reply")))
        .group_by(col(m.customer_id), col(m.kind), col(m.hard))
    ).all():
        c = custs.get(cid)
        if c is None:
            continue
        c.inbox[kind] = c.inbox.get(kind, 0) + int(n)
        if kind == "bounce" and hard:
            c.inbox["hard"] = c.inbox.get("hard", 0) + int(n)


def conversion(reached: int, previous: int | None) -> float | None:
    """reached / previous step's reached, 4 decimals; None for the first step (``previous`` is
    None) and after a step nobody reached."""
    if not previous:
        return None
    return round(reached / previous, 4)


def _reached(campaign: Campaign, customers: Iterable[_Cust]) -> list[FunnelStep]:
    order = {s: i for i, s in enumerate(campaign.stage_names)}
    furthest = [max((order[s] for s in c.first_entry if s in order), default=-1)
                for c in customers]
    out: list[FunnelStep] = []
    prev: int | None = None
    for i, st in enumerate(campaign.stages):
        n = sum(1 for f in furthest if f >= i)
        out.append(FunnelStep(st.name, stage_label(campaign, st.name), n, conversion(n, prev)))
        prev = n
    return out


def _left(campaign: Campaign, c: _Cust, stage: str) -> datetime | None:
    """When the customer first entered a stage after ``stage`` (campaign order)."""
    names = campaign.stage_names
    later = names[names.index(stage) + 1:] if stage in names else ()
    times = [c.first_entry[s] for s in later if s in c.first_entry]
    return min(times) if times else None


def _cancelled_at(campaign: Campaign, c: _Cust) -> datetime | None:
    """When the customer left the CSP-live stage for a later stage for good: its first entry
    into a later stage after its last entry into the live stage. A completion undone by a move
    back (marked done by mistake) ends nothing: the old subscription was still billed. None
    while the customer is in the live stage, or if it never went past it."""
    live, names = campaign.csp_live_stage, campaign.stage_names
    if c.stage == live or live not in names:
        return None
    later = set(names[names.index(live) + 1:])
    back = max((at for s, at in c.entries if s == live), default=None)
    times = [at for s, at in c.entries if s in later and (back is None or at >= back)]
    return min(times) if times else None


def _live_span(campaign: Campaign, c: _Cust, now: datetime) -> tuple[datetime, datetime] | None:
    """Go-live to cancellation, or to ``now`` while the customer is in the CSP-live stage."""
    live = campaign.csp_live_stage
    start = _aware(c.csp_live_at) if c.csp_live_at else c.first_entry.get(live)
    if start is None:
        return None
    end = now if c.stage == live else _cancelled_at(campaign, c)
    if end is None:
        return None
    return start, max(start, end)


def _money(days: float, licences: int, price: float) -> float:
    return days * licences * price / DAYS_PER_MONTH


def _manager_key(name: str, email: str) -> str:
    return f"{name} <{email}>".strip() if email else name


def _group(campaign: Campaign, name: str, cs: list[_Cust], now: datetime,
           price: float, email: str = "") -> Breakdown:
    funnel = _reached(campaign, cs)
    incurred = exposure = 0.0
    for c in cs:
        span = _live_span(campaign, c, now)
        if span is None:
            continue
        incurred += _money(_days_between(*span), c.licences, price)
        if c.stage == campaign.csp_live_stage:
            exposure += _money(_days_between(span[0], now), c.licences, price)
    # Customers whose transition is complete now: one who was moved back is not.
    done = sum(1 for c in cs if c.stage in campaign.completed_stages)

    def inbox(kind: str) -> int:
        return sum(c.inbox.get(kind, 0) for c in cs)

    return Breakdown(_manager_key(name, email), len(cs), funnel,
                     round(done / len(cs), 4) if cs else None,
                     round(exposure, 2), round(incurred, 2),
                     bounces=inbox("bounce"), hard_bounces=inbox("hard"), replies=inbox("reply"),
                     name=name, email=email)


def compute_manager_report(
    session: Session, campaign: Campaign, now: datetime, price_per_licence_month: float, *,
    tag: str | None = None, since: datetime | None = None,
) -> ManagerReport:
    """Every manager figure as of ``now`` (optionally one wave, or customers imported since)."""
    now = _aware(now)
    cs = _load(session, tag, since)
    overall = _group(campaign, "all", cs, now, price_per_licence_month)
    accept: list[float] = []
    cancel: list[float] = []
    for c in cs:
        if INVITED in c.first_entry and (end := _left(campaign, c, INVITED)) is not None:
            accept.append(_days_between(c.first_entry[INVITED], end))
        span = _live_span(campaign, c, now)
        if span is not None and _cancelled_at(campaign, c) is not None:
            cancel.append(_days_between(*span))
    managers: dict[tuple[str, str], list[_Cust]] = defaultdict(list)
    waves: dict[str, list[_Cust]] = defaultdict(list)
    for c in cs:
        managers[c.manager].append(c)
        for t in c.tags:
            waves[t].append(c)
    return ManagerReport(
        funnel=overall.funnel,
        invitation_to_acceptance=_pct(accept), live_to_cancellation=_pct(cancel),
        incurred_total=overall.incurred, exposure_today=overall.exposure_today,
        by_account_manager=[
            _group(campaign, name, managers[(name, email)], now, price_per_licence_month, email)
            for name, email in sorted(managers, key=lambda m: (_manager_key(*m), m))],
        by_wave=[_group(campaign, w, waves[w], now, price_per_licence_month)
                 for w in sorted(waves)],
    )


def _pct(values: list[float]) -> Percentiles:
    med, p90 = percentile(values, 0.5), percentile(values, 0.9)
    return Percentiles(len(values), None if med is None else round(med, 2),
                       None if p90 is None else round(p90, 2))

