"""The figures behind `comms status` and `comms report`, computed in the database.

Every function takes ``now`` (an aware datetime) and never reads the clock, so a test can build a
known ledger and check exact numbers. Counting and grouping happen in SQL; Python only loops over
the rows that are the answer (stuck customers, exhausted reminders, the exposure list).

Definitions (docs/reporting.md explains them for users):

- Funnel: customers per stage in campaign order; stages found in the ledger but not in the campaign
  come last, marked ``in_campaign=False``. Side states (paused, opted out, lost) are counted inside
  their stage and broken out.
- Stuck: a customer whose time in its current stage exceeds that stage's ``expected_days``. Side
  states do not hide a customer (an opted-out customer stuck in ``awaiting_cancellation`` still
  costs money); they are shown as flags.
- Message counts "today" and "this week" use the calendar of ``defaults.time_zone``: today is
  local midnight to the next local midnight, the week is ISO (Monday 00:00 to the next Monday
  00:00). A message counts under its *current* status, at the moment it reached that status:
  queued -> ``created_at``, sent -> ``sent_at``, unknown -> ``unknown_since``, the others ->
  ``updated_at``. "total" counts every message now in that status, whenever.
- Reminders exhausted: the customer is still in a stage whose campaign reminders are all sent,
  i.e. the reminder message with ``sequence == reminders.max`` has status ``sent``.
- Double-billing exposure: for each customer in the campaign's ``csp_live_stage``,
  ``days since csp_live_at x licences x price_per_licence_month / 30`` (the monthly price
  prorated per day over a 30-day month; days are fractional). Without ``csp_live_at`` the moment
  the customer entered the stage is used and the row is marked estimated.
- Messages per day: per local calendar day for the last N days (today included): messages put in
  the outbox (``created_at``), sent (``sent_at``) and failed (``updated_at``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlmodel import Session, col

from comms.campaign import Campaign
from comms.config import Settings
from comms.domain import MessageStatus
from comms.errors import RequestRefused
from comms.inbox.service import InboxCounts
from comms.inbox.service import counts as inbox_counts
from comms.services.calendar import aware_utc as _aware
from comms.services.calendar import day_bounds as day_bounds
from comms.services.calendar import days_between as _days_between
from comms.services.calendar import local_midnight as local_midnight
from comms.services.calendar import parse_now as parse_now
from comms.services.calendar import week_bounds as week_bounds
from comms.services.managers import ManagerReport, compute_manager_report
from comms.services.tenant_budget import TenantBudgetStatus, tenant_budget
from comms.store.db import Database
from comms.store.models import Customer, Message
from comms.store.wave_models import not_proof

# Days per billing month for the exposure proration (see module docstring).
DAYS_PER_MONTH = 30.0
STATUSES: tuple[str, ...] = Message.STATUSES
SECONDS_PER_DAY = 86_400.0


# ----------------------------------------------------------------------------- result types


@dataclass(frozen=True)
class StageCount:
    """One bar of the funnel."""

    stage: str
    customers: int
    paused: int = 0
    opted_out: int = 0
    lost: int = 0
    expected_days: float | None = None
    in_campaign: bool = True


@dataclass(frozen=True)
class StuckCustomer:
    key: str
    name: str
    stage: str
    entered_at: datetime
    days_in_stage: float
    expected_days: float
    licences: int
    flags: tuple[str, ...] = ()

    @property
    def days_over(self) -> float:
        return self.days_in_stage - self.expected_days


@dataclass(frozen=True)
class MessageCounts:
    """Messages per status: ``today``, ``week`` and ``total`` map every status to a count."""

    time_zone: str
    day_start: datetime
    week_start: datetime
    today: dict[str, int]
    week: dict[str, int]
    total: dict[str, int]


@dataclass(frozen=True)
class ExhaustedCustomer:
    key: str
    name: str
    stage: str
    reminders: int
    last_reminder_at: datetime | None
    days_in_stage: float
    licences: int


@dataclass(frozen=True)
class Exposure:
    key: str
    name: str
    licences: int
    live_since: datetime
    days: float
    amount: float
    estimated: bool = False


@dataclass(frozen=True)
class DayCount:
    day: date
    queued: int = 0
    sent: int = 0
    failed: int = 0


@dataclass(frozen=True)
class StatusReport:
    """Everything `comms status` shows, as of ``now``."""

    now: datetime
    time_zone: str
    currency: str
    price_per_licence_month: float
    customers_total: int
    funnel: list[StageCount]
    stuck: list[StuckCustomer]
    messages: MessageCounts
    exhausted: list[ExhaustedCustomer]
    exposure: list[Exposure]
    daily: list[DayCount] = field(default_factory=list)
    # The campaign's stage in which the CSP subscription is live (the exposure's stage).
    csp_live_stage: str = "awaiting_cancellation"
    completed_stages: tuple[str, ...] = ("completed",)  # Campaign.completed_stages
    # Manager figures (reached funnel, durations, incurred cost, breakdowns): services.managers.
    managers: ManagerReport | None = None
    tenant: TenantBudgetStatus | None = None
    inbox: InboxCounts | None = None  # replies and bounces (`comms inbox sync`)

    @property
    def completed(self) -> int:  # customers now in one of the completed stages
        return sum(s.customers for s in self.funnel if s.stage in self.completed_stages)

    @property
    def exposure_total(self) -> float:
        return round(sum(e.amount for e in self.exposure), 2)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes as ISO 8601 strings, dates as YYYY-MM-DD)."""
        data = _jsonable(asdict(self))
        assert isinstance(data, dict)
        del data["csp_live_stage"], data["completed_stages"]  # configuration, not figures
        data["exposure_total"] = self.exposure_total
        data["completed"] = self.completed
        for row, item in zip(data["stuck"], self.stuck, strict=True):
            row["days_over"] = round(item.days_over, 2)
        if self.tenant is not None:
            data["tenant"].update(remaining=self.tenant.remaining, full=self.tenant.full)
        return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 2)
    return value


def _flags(c: Any) -> tuple[str, ...]:
    return tuple(
        name for name, on in (("paused", c.paused), ("opted out", c.opted_out), ("lost", c.lost))
        if on
    )


# ----------------------------------------------------------------------------- the figures


def funnel(session: Session, campaign: Campaign) -> list[StageCount]:
    """Customers per stage in campaign order (empty stages included, unknown stages last)."""

    def _sum(flag: Any) -> Any:
        return sa.func.sum(sa.case((flag == sa.true(), 1), else_=0))

    rows = session.execute(
        sa.select(
            col(Customer.stage),
            sa.func.count(),
            _sum(col(Customer.paused)),
            _sum(col(Customer.opted_out)),
            _sum(col(Customer.lost)),
        ).group_by(col(Customer.stage))
    ).all()
    by_stage = {r[0]: (int(r[1]), int(r[2] or 0), int(r[3] or 0), int(r[4] or 0)) for r in rows}
    out: list[StageCount] = []
    for st in campaign.stages:
        n, p, o, lo = by_stage.pop(st.name, (0, 0, 0, 0))
        out.append(StageCount(st.name, n, p, o, lo, st.expected_days, True))
    for name in sorted(by_stage):
        n, p, o, lo = by_stage[name]
        out.append(StageCount(name, n, p, o, lo, None, False))
    return out


def stuck_customers(session: Session, campaign: Campaign, now: datetime) -> list[StuckCustomer]:
    """Customers longer in their stage than its ``expected_days``, longest overdue first."""
    now = _aware(now)
    limits = {
        st.name: st.expected_days
        for st in campaign.stages
        if st.expected_days is not None and not st.final
    }
    if not limits:
        return []
    cond = sa.or_(
        *(
            sa.and_(
                col(Customer.stage) == name,
                col(Customer.stage_entered_at) < now - timedelta(days=days),
            )
            for name, days in limits.items()
        )
    )
    rows = session.execute(
        sa.select(
            col(Customer.key), col(Customer.name), col(Customer.stage),
            col(Customer.stage_entered_at), col(Customer.licences),
            col(Customer.paused), col(Customer.opted_out), col(Customer.lost),
        ).where(cond)
    ).all()
    out = [
        StuckCustomer(
            key=r.key, name=r.name, stage=r.stage, entered_at=r.stage_entered_at,
            days_in_stage=_days_between(r.stage_entered_at, now),
            expected_days=limits[r.stage], licences=int(r.licences), flags=_flags(r),
        )
        for r in rows
    ]
    out.sort(key=lambda s: (-s.days_over, s.key))
    return out


def _status_time() -> Any:
    """When a message reached its current status (see the module docstring)."""
    m = Message
    return sa.case(
        (col(m.status) == MessageStatus.QUEUED, col(m.created_at)),
        (col(m.status) == MessageStatus.SENT, sa.func.coalesce(col(m.sent_at), col(m.updated_at))),
        (col(m.status) == MessageStatus.UNKNOWN,
         sa.func.coalesce(col(m.unknown_since), col(m.updated_at))),
        else_=col(m.updated_at),
    )


def message_counts(session: Session, now: datetime, tz: ZoneInfo) -> MessageCounts:
    """Messages per current status: reached it today, this week (local calendar), and in all."""
    now = _aware(now)
    d0, d1 = day_bounds(now, tz)
    w0, w1 = week_bounds(now, tz)
    ts = _status_time()

    def _in(a: datetime, b: datetime) -> Any:
        return sa.func.sum(sa.case((sa.and_(ts >= a, ts < b), 1), else_=0))

    rows = session.execute(
        sa.select(col(Message.status), _in(d0, d1), _in(w0, w1), sa.func.count())
        .where(not_proof())  # wave proofs went to the operator, not to customers
        .group_by(col(Message.status))
    ).all()
    today = dict.fromkeys(STATUSES, 0)
    week = dict.fromkeys(STATUSES, 0)
    total = dict.fromkeys(STATUSES, 0)
    for status, t, w, n in rows:
        today[status] = int(t or 0)
        week[status] = int(w or 0)
        total[status] = int(n or 0)
    return MessageCounts(str(tz.key), d0, w0, today, week, total)


def exhausted_reminders(
    session: Session, campaign: Campaign, now: datetime
) -> list[ExhaustedCustomer]:
    """Customers still in a stage whose reminders have all been sent (longest in stage first)."""
    now = _aware(now)
    stages = [
        st for st in campaign.stages if st.reminders is not None and st.reminders.max > 0
    ]
    if not stages:
        return []
    conds = []
    for st in stages:
        assert st.reminders is not None
        conds.append(
            sa.and_(
                col(Customer.stage) == st.name,
                col(Message.message) == st.reminders.message,
                col(Message.sequence) == st.reminders.max,
            )
        )
    rows = session.execute(
        sa.select(
            col(Customer.key), col(Customer.name), col(Customer.stage),
            col(Customer.stage_entered_at), col(Customer.licences),
            sa.func.max(col(Message.sent_at)).label("last_at"),
        )
        .join(Message, col(Message.customer_id) == col(Customer.id))
        .where(col(Message.status) == MessageStatus.SENT, sa.or_(*conds))
        .group_by(
            col(Customer.id), col(Customer.key), col(Customer.name), col(Customer.stage),
            col(Customer.stage_entered_at), col(Customer.licences),
        )
    ).all()
    maxes = {st.name: st.reminders.max for st in stages if st.reminders is not None}
    out: list[ExhaustedCustomer] = []
    for r in rows:
        last = r.last_at
        if isinstance(last, str):  # SQLite returns MAX() of a typed column as raw text
            last = datetime.fromisoformat(last)
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=UTC)
        out.append(
            ExhaustedCustomer(
                key=r.key, name=r.name, stage=r.stage, reminders=maxes[r.stage],
                last_reminder_at=last, days_in_stage=_days_between(r.stage_entered_at, now),
                licences=int(r.licences),
            )
        )
    out.sort(key=lambda e: (-e.days_in_stage, e.key))
    return out


def double_billing_exposure(
    session: Session, now: datetime, price_per_licence_month: float,
    stage: str = "awaiting_cancellation",
) -> list[Exposure]:
    """Per customer in the CSP-live ``stage`` (the campaign's ``csp_live_stage``): days live x
    licences x monthly price / 30, highest first (ties by key)."""
    now = _aware(now)
    rows = session.execute(
        sa.select(
            col(Customer.key), col(Customer.name), col(Customer.licences),
            col(Customer.csp_live_at), col(Customer.stage_entered_at),
        ).where(col(Customer.stage) == stage)
    ).all()
    out: list[Exposure] = []
    for r in rows:
        since = r.csp_live_at or r.stage_entered_at
        days = max(0.0, _days_between(since, now))
        amount = days * int(r.licences) * price_per_licence_month / DAYS_PER_MONTH
        out.append(
            Exposure(r.key, r.name, int(r.licences), since, days, round(amount, 2),
                     estimated=r.csp_live_at is None)
        )
    out.sort(key=lambda e: (-e.amount, e.key))
    return out


def messages_per_day(
    session: Session, now: datetime, tz: ZoneInfo, days: int = 14
) -> list[DayCount]:
    """Messages queued, sent and failed per local calendar day, oldest first, today last."""
    if days < 1:
        raise RequestRefused(f"--days must be at least 1, got {days}.")
    now = _aware(now)
    today = now.astimezone(tz).date()
    dates = [today - timedelta(days=days - 1 - i) for i in range(days)]
    bounds = [local_midnight(d, tz) for d in dates] + [local_midnight(today + timedelta(1), tz)]
    series: dict[str, dict[int, int]] = {}
    for name, ts, status in (
        ("queued", col(Message.created_at), None),
        ("sent", sa.func.coalesce(col(Message.sent_at), col(Message.updated_at)), "sent"),
        ("failed", col(Message.updated_at), "failed"),
    ):
        # One grouped query per series: the CASE puts each row in its local day, DST-correct.
        bucket = sa.case(
            *((ts < b, i) for i, b in enumerate(bounds[1:-1])), else_=days - 1
        ) if days > 1 else sa.literal(0)
        q = sa.select(bucket.label("b"), sa.func.count()).where(
            ts >= bounds[0], ts < bounds[-1], not_proof())
        if status is not None:
            q = q.where(col(Message.status) == status)
        # Group by the output name: repeating the CASE would bind its parameters twice, which
        # PostgreSQL does not recognise as the same expression.
        rows = session.execute(q.group_by(sa.text("b"))).all()
        series[name] = {int(b): int(n) for b, n in rows}
    return [
        DayCount(d, series["queued"].get(i, 0), series["sent"].get(i, 0),
                 series["failed"].get(i, 0))
        for i, d in enumerate(dates)
    ]


def compute_status(
    db: Database, settings: Settings, campaign: Campaign, now: datetime, *, days: int = 14,
    tag: str | None = None, since: datetime | None = None,
    sending_now: datetime | None = None,
) -> StatusReport:
    """Every figure of `comms status` as of ``now``, read in one transaction.

    The tenant budget is read at ``sending_now`` (default ``now``): the dispatcher stamps its
    send slots with the real clock even under ``--now``, so the CLI passes the real clock."""
    now = _aware(now)
    tz = ZoneInfo(settings.defaults.time_zone)
    price = settings.partner.price_per_licence_month
    with db.session() as s:
        total = int(s.execute(sa.select(sa.func.count()).select_from(Customer)).scalar_one())
        return StatusReport(
            now=now,
            time_zone=settings.defaults.time_zone,
            currency=settings.partner.currency,
            price_per_licence_month=price,
            customers_total=total,
            funnel=funnel(s, campaign),
            stuck=stuck_customers(s, campaign, now),
            messages=message_counts(s, now, tz),
            exhausted=exhausted_reminders(s, campaign, now),
            exposure=double_billing_exposure(s, now, price, campaign.csp_live_stage),
            daily=messages_per_day(s, now, tz, days),
            csp_live_stage=campaign.csp_live_stage,
            completed_stages=campaign.completed_stages,
            managers=compute_manager_report(s, campaign, now, price, tag=tag, since=since),
            tenant=tenant_budget(s, settings, sending_now or now),
            inbox=inbox_counts(s, now),
        )
