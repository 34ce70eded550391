"""The planner (pure): one customer, its message history, ``now`` and the campaign -> the messages
due now and when the customer next needs looking at. No I/O, never reads the clock.

Rules, in the order they are applied:

1. Paused, opted-out and lost customers get nothing; neither does a customer whose stage the
   campaign does not know (the campaign was edited), one whose recipients are all suppressed,
   nor one stage sync reports as needing attention (``sync_attention``: its CSP subscription or
   reseller relationship is gone, so "cancel your old subscription" would be wrong advice).
   ``next_due_at`` is None for all of these: lifting the block (resume, opt in, found, a new
   contact, sync seeing the CSP subscription again) must reset the customer's next-due time.
2. Entering a stage with ``on_enter`` plans that message with sequence 0, due at once. A message
   goes to a customer once per (message, sequence): any history entry with that key and a status
   other than ``withdrawn`` blocks it, so re-entering a stage does not resend its entry message.
3. Reminders belong to the current stage only (other stages' history is ignored when counting).
   Reminder ``n`` (sequence ``n``, 1..max) falls due at::

       max(base + first_after_days + (n - 1) * every_days,  sent_at(reminder n-1) + every_days)

   where ``base`` is when the stage's entry message was sent (or, for a stage without one, when
   the customer entered the stage; on re-entering a stage whose entry message went out during an
   earlier visit, the re-entry time). The second term keeps reminders at least ``every_days``
   apart when one went out late (held for the send window, a throttled mailbox). Reminder ``n``
   is planned only once reminder ``n - 1`` (or the entry message, for ``n == 1``) has status
   ``sent``: never two at once, never skipping, and nothing after a ``failed`` one (someone must
   look at it first).
4. Escalation: from reminder ``escalate_after`` on, the reminder copies the account manager and an
   internal note (``escalation_message``, same sequence, ``internal=True``) goes to them too.
   Without an account manager address (or with a suppressed one) there is neither cc nor note.
5. Final stages send their entry message only.
6. The send window (weekdays and local hours in the customer's time zone, minus holidays) applies
   to every message, internal notes too. Due messages outside it are returned in ``deferred`` and
   ``next_due_at`` is the window's next opening.

``next_due_at`` (always UTC, never before ``now``) is the earliest moment planning this customer
again can produce something new, moved forward to the next window opening:

- messages deferred: the next window opening;
- messages due now: when the following reminder could fall due if they go out now (None when no
  reminder follows); planning again then is cheap and returns the exact time;
- a message still in the outbox (queued, sending, unknown): the same estimate, assuming it goes out
  now; the dispatcher owns the message itself. None when no reminder would follow it;
- waiting for a reminder: the moment it falls due (moved to the next window opening);
- nothing more to send, a failed message, or a blocked customer: None.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from comms.campaign import Campaign, Reminders, SendWindow, Stage
from comms.domain import ContactInfo, CustomerInfo, MessageStatus, PlannedMessage, SentMessage
from comms.errors import CampaignError
from comms.stages import is_sendable
from comms.timezones import zone

PENDING = frozenset({MessageStatus.QUEUED, MessageStatus.SENDING, MessageStatus.UNKNOWN})
ACCOUNT_MANAGER_ROLE = "account_manager"


@dataclass(frozen=True)
class Plan:
    """What one customer needs now (see the module docstring for ``next_due_at``)."""

    # Due now and inside the send window: queue these.
    due: tuple[PlannedMessage, ...]
    # When this customer next needs looking at (UTC); None: nothing scheduled.
    next_due_at: datetime | None
    # Due, but the send window is closed: they go out at ``next_due_at`` (the window's opening).
    deferred: tuple[PlannedMessage, ...] = ()


# --- send window -----------------------------------------------------------------------------


def _zone(name: str) -> ZoneInfo:
    return zone(name)  # the one time-zone policy: UnknownTimeZone names the closest zones


def _utc(at: datetime, what: str = "now") -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got naive {at.isoformat()}")
    return at.astimezone(UTC)


def _open_day(day: date, window: SendWindow) -> bool:
    return day.weekday() in window.weekday_numbers and day not in window.holidays


# The send window's answers depend on nothing but their arguments, and a run asks them for
# one ``now`` and a few dozen time zones, once or twice per customer: each is computed once
# for an instant in UTC (two local times a DST fold apart compare equal in Python, so the
# cache never sees one; a time zone that cannot be loaded raises every time: an exception is
# not cached).
_WINDOW_CACHE = 4096


def in_window(at: datetime, window: SendWindow, time_zone: str) -> bool:
    """Whether ``at`` lies in the send window: an allowed weekday that is not a holiday, and a
    local wall-clock time in ``[start, end)``, all in ``time_zone``."""
    return _in_window(_utc(at, "at"), window, time_zone)


@lru_cache(maxsize=_WINDOW_CACHE)
def _in_window(at: datetime, window: SendWindow, time_zone: str) -> bool:
    local = at.astimezone(_zone(time_zone))
    return _open_day(local.date(), window) and window.start <= local.time() < window.end


def _offset_change(lo: datetime, hi: datetime, zone: ZoneInfo) -> datetime | None:
    """The first instant in ``(lo, hi]`` whose UTC offset differs from ``lo``'s (one DST change
    at most), to the second; None when the offset is the same at both ends."""
    before = lo.astimezone(zone).utcoffset()
    if hi.astimezone(zone).utcoffset() == before:
        return None
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        mid = mid.replace(microsecond=0)
        if mid <= lo:
            break
        if mid.astimezone(zone).utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return hi


def _openings(day: date, window: SendWindow, zone: ZoneInfo) -> list[datetime]:
    """Candidate instants (UTC) at which the window can open on local ``day``: the wall-clock
    start (both readings when the clock goes back over it) and any DST change that day (a start
    inside a skipped hour opens the window the moment the clock jumps past it)."""
    out = {
        datetime.combine(day, window.start, tzinfo=zone).replace(fold=f).astimezone(UTC)
        for f in (0, 1)
    }
    day_start = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
    day_end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    change = _offset_change(day_start, day_end, zone)
    if change is not None:
        out.add(change)
    return sorted(out)


def next_window_start(now: datetime, window: SendWindow, time_zone: str) -> datetime:
    """The first instant at or after ``now`` (UTC) inside the send window: ``now`` itself when
    the window is open. DST-correct in ``time_zone``; holidays are local dates."""
    return _next_window_start(_utc(now), window, time_zone)


@lru_cache(maxsize=_WINDOW_CACHE)
def _next_window_start(now: datetime, window: SendWindow, time_zone: str) -> datetime:
    if in_window(now, window, time_zone):
        return now
    zone = _zone(time_zone)
    today = now.astimezone(zone).date()
    # Every week has an open weekday; each holiday can cost at most one more; the margin covers
    # a window that a DST jump swallows on its day.
    for offset in range(7 * (len(window.holidays) + 3)):
        day = today + timedelta(days=offset)
        if not _open_day(day, window):
            continue
        for at in _openings(day, window, zone):
            if at >= now and in_window(at, window, time_zone):
                return at
    raise CampaignError(  # pragma: no cover - unreachable with a validated window
        f"The send window {window.days} {window.start}-{window.end} never opens in {time_zone}; "
        "check [window] in the campaign file."
    )


def window_end(at: datetime, window: SendWindow, time_zone: str) -> datetime:
    """When the send window that is open at ``at`` closes (UTC): the window's local end time on
    ``at``'s local day. Messages queued in one window must not go out after it closes."""
    return _window_end(_utc(at), window, time_zone)


@lru_cache(maxsize=_WINDOW_CACHE)
def _window_end(at: datetime, window: SendWindow, time_zone: str) -> datetime:
    zone = _zone(time_zone)
    local_day = at.astimezone(zone).date()
    return datetime.combine(local_day, window.end, tzinfo=zone).astimezone(UTC)


# --- recipients ------------------------------------------------------------------------------


def recipients(customer: CustomerInfo, campaign: Campaign) -> tuple[ContactInfo, ...]:
    """The customer's contacts that receive customer messages: those with the campaign's
    ``recipients`` roles, in that role order (all contacts when none has such a role), without
    suppressed contacts or repeated addresses.

    Roles are chosen before suppressions are dropped on purpose: when the primary contact opted
    out, the message does not quietly go to the technical contact instead."""
    chosen = [c for role in campaign.recipients for c in customer.contacts if c.role == role]
    if not chosen:
        chosen = list(customer.contacts)
    out: list[ContactInfo] = []
    seen: set[str] = set()
    for c in chosen:
        key = c.email.strip().lower()
        if c.suppressed or not key or key in seen:
            continue
        seen.add(key)
        out.append(c)
    return tuple(out)


def copied_manager(
    customer: CustomerInfo, given: ContactInfo | None = None
) -> ContactInfo | None:
    """The account manager to copy and alert, or None (no address, or it is suppressed)."""
    am = given
    if am is None and customer.account_manager_email.strip():
        am = ContactInfo(
            name=customer.account_manager_name,
            email=customer.account_manager_email.strip(),
            role=ACCOUNT_MANAGER_ROLE,
            suppressed=customer.account_manager_suppressed,
        )
    if am is None or am.suppressed or not am.email.strip():
        return None
    return am


# --- history ---------------------------------------------------------------------------------

# A message an operator withdrew: it stays withdrawn, and what follows it is planned.
SKIPPED = "skipped"


@dataclass(frozen=True)
class _Entry:
    """What the history says about one (message, sequence): the strongest status wins
    (sent > pending > skipped > failed); withdrawn entries do not count, except one an operator
    withdrew, which is skipped: never planned again, and the reminders after it follow."""

    status: str  # sent | pending | skipped | failed
    stage: str
    at: datetime  # sent: when it went out (latest); otherwise: when it was planned (latest)


_RANK = {MessageStatus.SENT: 4, "pending": 3, SKIPPED: 2, MessageStatus.FAILED: 1}


def _stage_message(seen: dict[tuple[str, int], _Entry], message: str) -> _Entry | None:
    """The stage's own message as the customer got it: the strongest of its planned copy
    (sequence 0) and an operator's `comms send` of it (1, 2, ...): sent by hand after the
    planned one failed, it still starts the reminders."""
    found = [e for (m, n), e in seen.items() if m == message and n >= 0]
    return max(found, key=lambda e: (_RANK[e.status], e.at)) if found else None


def _index(history: Iterable[SentMessage]) -> dict[tuple[str, int], _Entry]:
    out: dict[tuple[str, int], _Entry] = {}
    for h in history:
        if h.status == MessageStatus.WITHDRAWN and not h.by_operator:
            continue
        status = SKIPPED if h.by_operator else "pending" if h.status in PENDING else h.status
        if status == "bounced":  # accepted and sent; an NDR came back for (some) recipients
            status = "sent"
        if status not in _RANK:
            # An unknown status is treated as pending: never resend what we cannot account for.
            status = "pending"
        when = (h.sent_at or h.planned_at) if status == MessageStatus.SENT else h.planned_at
        at = _utc(when, "history time")
        key = (h.message, h.sequence)
        old = out.get(key)
        if old is None or _RANK[status] > _RANK[old.status] or (
            _RANK[status] == _RANK[old.status] and at > old.at
        ):
            out[key] = _Entry(status=status, stage=h.stage, at=at)
    return out


def stage_message_state(history: Iterable[SentMessage], message: str) -> str | None:
    """Where a stage's on-enter ``message`` stands, as planning sees it: ``sent``, ``pending``
    (queued, sending, unknown), ``skipped`` (withdrawn by an operator), ``failed``, or None
    (never planned, or withdrawn by a run: it is planned again)."""
    entry = _stage_message(_index(history), message)
    return None if entry is None else entry.status


# --- plan ------------------------------------------------------------------------------------


def _days(n: float) -> timedelta:
    return timedelta(days=n)


def plan(
    customer: CustomerInfo,
    history: Sequence[SentMessage],
    now: datetime,
    campaign: Campaign,
    *,
    account_manager: ContactInfo | None = None,
) -> Plan:
    """The messages due for ``customer`` at ``now`` and when to look at it next.

    ``history`` is every outbox entry of this customer (any stage, any status). ``now`` and all
    times in and out are timezone-aware (returned in UTC). See the module docstring for the rules.
    """
    now = _utc(now)
    if not is_sendable(customer) or not campaign.has_stage(customer.stage) \
            or customer.sync_attention:
        return Plan(due=(), next_due_at=None)
    to = recipients(customer, campaign)
    if not to:
        return Plan(due=(), next_due_at=None)
    stage = campaign.stage(customer.stage)
    seen = _index(history)
    due: list[PlannedMessage] = []
    follow_up: datetime | None = None

    entered = _utc(customer.stage_entered_at, "stage_entered_at")
    base: datetime | None = entered
    if stage.on_enter:
        entry = _stage_message(seen, stage.on_enter)
        if entry is None:
            due.append(PlannedMessage(message=stage.on_enter, sequence=0, stage=stage.name, to=to))
            # The following reminder counts from the moment this goes out, which is >= now.
            base = None
            follow_up = _first_reminder_after(stage, now)
        elif entry.status == MessageStatus.SENT:
            # Sent during an earlier visit of this stage: count reminders from the re-entry.
            base = max(entry.at, entered)
        elif entry.status == "pending":
            base = None
            follow_up = _first_reminder_after(stage, max(now, entry.at))
        else:  # failed or withdrawn by an operator: no reminder follows a message never sent
            return Plan(due=(), next_due_at=None)

    if base is not None and stage.reminders is not None and not stage.final:
        step, follow_up = _reminder_step(
            customer, stage, stage.reminders, seen, base, now, to,
            copied_manager(customer, account_manager),
        )
        due.extend(step)

    window = campaign.window
    tz = customer.time_zone
    if due and not in_window(now, window, tz):
        return Plan(due=(), next_due_at=next_window_start(now, window, tz), deferred=tuple(due))
    next_due = None if follow_up is None else next_window_start(max(follow_up, now), window, tz)
    return Plan(due=tuple(due), next_due_at=next_due)


def _first_reminder_after(stage: Stage, sent_at: datetime) -> datetime | None:
    r = stage.reminders
    if r is None or stage.final or r.max < 1:
        return None
    return sent_at + _days(r.first_after_days)


def reminder_context(r: Reminders, n: int, am: ContactInfo | None) -> dict[str, object]:
    """What reminder ``n``'s templates are told (the planner's and the preview's one source):
    its number, the campaign's ``max`` (only the last may say so), and whether the account
    manager is copied (from ``escalate_after`` on, when there is one who may be mailed)."""
    return {
        "reminder_number": n,
        "reminders_max": r.max,
        "escalated": r.escalate_after is not None and n >= r.escalate_after and am is not None,
    }


def _reminder(
    customer: CustomerInfo, stage: Stage, r: Reminders, n: int,
    seen: dict[tuple[str, int], _Entry], to: tuple[ContactInfo, ...], am: ContactInfo | None,
) -> list[PlannedMessage]:
    """Reminder ``n``; from ``escalate_after`` on, copied to the account manager, with the
    internal note to them (once per reminder)."""
    context = reminder_context(r, n, am)
    escalate = bool(context["escalated"])
    out = [
        PlannedMessage(
            message=r.message, sequence=n, stage=stage.name, to=to,
            cc=(am,) if escalate and am is not None else (),
            reminder_number=n, context=context,
        )
    ]
    if escalate and am is not None and (r.escalation_message, n) not in seen:
        out.append(
            PlannedMessage(
                message=r.escalation_message, sequence=n, stage=stage.name, to=(am,),
                internal=True, reminder_number=n,
                context={**context, "customer_key": customer.key},
            )
        )
    return out


def _reminder_step(
    customer: CustomerInfo,
    stage: Stage,
    r: Reminders,
    seen: dict[tuple[str, int], _Entry],
    base: datetime,
    now: datetime,
    to: tuple[ContactInfo, ...],
    am: ContactInfo | None,
) -> tuple[list[PlannedMessage], datetime | None]:
    """The reminder due now (with its escalation note), and the follow-up time."""
    prev_sent: datetime | None = None
    for n in range(1, r.max + 1):
        scheduled = base + _days(r.first_after_days + (n - 1) * r.every_days)
        due_at = scheduled if prev_sent is None else max(scheduled, prev_sent + _days(r.every_days))
        if customer.reminders_held_until is not None:  # the customer answered: do not nag
            due_at = max(due_at, _utc(customer.reminders_held_until, "reminders_held_until"))
        entry = seen.get((r.message, n))
        if entry is not None and entry.stage != stage.name:
            # The key is taken by another stage (the campaign was edited): it cannot be sent
            # again, and skipping it would break the order. Stop here.
            return [], None
        if entry is None:
            if due_at > now:
                return [], due_at
            out = _reminder(customer, stage, r, n, seen, to, am)
            follow = None
            if n < r.max:
                follow = max(
                    base + _days(r.first_after_days + n * r.every_days),
                    now + _days(r.every_days),
                )
            return out, follow
        if entry.status == "pending":
            if n >= r.max:
                return [], None
            sent_from = max(now, entry.at)
            follow = max(
                base + _days(r.first_after_days + n * r.every_days),
                sent_from + _days(r.every_days),
            )
            return [], follow
        if entry.status == MessageStatus.FAILED:
            return [], None
        prev_sent = entry.at  # sent, or withdrawn by an operator (counted from its planning)
    return [], None
