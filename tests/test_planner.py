"""The planner: example tests for each rule and the send window, then hypothesis properties over
generated customers, histories, clocks and campaigns, and a simulation of customers over weeks."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comms.campaign import WEEKDAYS, Campaign, Reminders, SendWindow, Stage
from comms.domain import ContactInfo, CustomerInfo, PlannedMessage, SentMessage
from comms.errors import CommsError
from comms.planner import Plan, in_window, next_window_start, plan, recipients

ALWAYS = SendWindow(days=WEEKDAYS, start=time(0, 0), end=time(23, 59, 59))
OFFICE = SendWindow()  # mon-fri 09:00-17:00
AM = ContactInfo("Avery Manager", "avery@fabrikam.example", role="account_manager")
T0 = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)  # a Monday


def make_campaign(
    window: SendWindow = ALWAYS,
    *,
    first: float = 3,
    every: float = 4,
    count: int = 3,
    escalate_after: int | None = 2,
    plain_first: float = 2,
    plain_every: float = 1,
    plain_count: int = 2,
) -> Campaign:
    """imported -> invited (entry message + reminders, escalating) -> waiting (reminders, no entry
    message) -> done (final)."""
    return Campaign(
        window=window,
        stages=(
            Stage(name="imported", next=("invited",)),
            Stage(
                name="invited", on_enter="invitation", next=("waiting", "imported"),
                reminders=Reminders(
                    message="invitation_reminder", first_after_days=first, every_days=every,
                    max=count, escalate_after=escalate_after, escalation_message="am_alert",
                ),
            ),
            Stage(
                name="waiting", next=("done", "invited"),
                reminders=Reminders(
                    message="waiting_reminder", first_after_days=plain_first,
                    every_days=plain_every, max=plain_count,
                ),
            ),
            Stage(name="done", on_enter="done_note", final=True),
        ),
    )


def customer(stage: str = "invited", entered: datetime = T0, **kw: object) -> CustomerInfo:
    base: dict[str, object] = dict(
        key="C1", name="Contoso", licences=10, stage=stage, stage_entered_at=entered,
        time_zone="Europe/London",
        contacts=(
            ContactInfo("Pat Primary", "pat@contoso.example", "primary"),
            ContactInfo("Bo Billing", "bo@contoso.example", "billing"),
            ContactInfo("Tess Tech", "tess@contoso.example", "technical"),
        ),
        account_manager_name="Avery Manager", account_manager_email="avery@fabrikam.example",
    )
    base.update(kw)
    return CustomerInfo(**base)  # type: ignore[arg-type]


def sent(message: str, seq: int, at: datetime, stage: str = "invited",
         status: str = "sent") -> SentMessage:
    return SentMessage(message=message, sequence=seq, status=status, stage=stage, planned_at=at,
                       sent_at=at if status == "sent" else None)


def keys(msgs: Sequence[PlannedMessage]) -> list[tuple[str, int]]:
    return [(m.message, m.sequence) for m in msgs]


# --- rules, by example -----------------------------------------------------------------------


def test_entering_a_stage_plans_its_entry_message_now() -> None:
    p = plan(customer(), [], T0, make_campaign())
    assert keys(p.due) == [("invitation", 0)]
    assert p.due[0].stage == "invited" and p.due[0].reminder_number == 0
    assert [c.email for c in p.due[0].to] == ["pat@contoso.example", "bo@contoso.example"]
    # The first reminder cannot fall due before 3 days after the invitation goes out.
    assert p.next_due_at == T0 + timedelta(days=3)
    assert p.deferred == ()


@pytest.mark.parametrize("status", ["queued", "sending", "unknown", "sent", "failed"])
def test_entry_message_is_never_planned_twice(status: str) -> None:
    history = [sent("invitation", 0, T0, status=status)]
    assert plan(customer(), history, T0 + timedelta(hours=1), make_campaign()).due == ()


def test_withdrawn_entry_message_is_planned_again() -> None:
    history = [sent("invitation", 0, T0, status="withdrawn")]
    assert keys(plan(customer(), history, T0, make_campaign()).due) == [("invitation", 0)]


def test_reminders_fall_due_on_schedule_one_at_a_time() -> None:
    c, camp = customer(), make_campaign(escalate_after=None)
    history = [sent("invitation", 0, T0)]
    before = plan(c, history, T0 + timedelta(days=3, seconds=-1), camp)
    assert before.due == () and before.next_due_at == T0 + timedelta(days=3)
    at = T0 + timedelta(days=3)
    p = plan(c, history, at, camp)
    assert keys(p.due) == [("invitation_reminder", 1)]
    assert p.due[0].reminder_number == 1 and p.due[0].cc == ()
    assert p.next_due_at == T0 + timedelta(days=7)
    # Reminder 1 still queued: reminder 2 waits for it even when its time has passed.
    queued = [*history, sent("invitation_reminder", 1, at, status="queued")]
    assert plan(c, queued, T0 + timedelta(days=30), camp).due == ()
    history.append(sent("invitation_reminder", 1, at))
    assert keys(plan(c, history, T0 + timedelta(days=7), camp).due) == [("invitation_reminder", 2)]
    history.append(sent("invitation_reminder", 2, T0 + timedelta(days=7)))
    p3 = plan(c, history, T0 + timedelta(days=11), camp)
    assert keys(p3.due) == [("invitation_reminder", 3)]
    assert p3.next_due_at is None  # max = 3: nothing follows the last reminder
    history.append(sent("invitation_reminder", 3, T0 + timedelta(days=11)))
    assert plan(c, history, T0 + timedelta(days=60), camp) == Plan(due=(), next_due_at=None)


def test_a_late_reminder_keeps_the_spacing() -> None:
    history = [sent("invitation", 0, T0), sent("invitation_reminder", 1, T0 + timedelta(days=6))]
    p = plan(customer(), history, T0 + timedelta(days=8), make_campaign(escalate_after=None))
    # Scheduled at day 7, but reminder 1 went out at day 6: not before day 10.
    assert p.due == () and p.next_due_at == T0 + timedelta(days=10)


@pytest.mark.parametrize("status", ["queued", "sending", "unknown"])
def test_pending_entry_message_holds_reminders_and_estimates_the_next_look(status: str) -> None:
    history = [sent("invitation", 0, T0, status=status)]
    now = T0 + timedelta(days=5)
    p = plan(customer(), history, now, make_campaign())
    assert p.due == ()
    assert p.next_due_at == now + timedelta(days=3)  # if it went out now


def test_failed_entry_message_stops_reminders() -> None:
    history = [sent("invitation", 0, T0, status="failed")]
    assert plan(customer(), history, T0 + timedelta(days=30), make_campaign()) == Plan((), None)


def test_an_entry_message_sent_by_hand_after_the_planned_one_failed_starts_the_reminders(
) -> None:
    # The planned invitation failed (a rejected address); the operator fixed the contact and
    # sent it with `comms send KEY --message invitation` (sequence 1). The reminders used to
    # wait for sequence 0 for ever.
    fixed = T0 + timedelta(days=2)
    history = [sent("invitation", 0, T0, status="failed"), sent("invitation", 1, fixed)]
    p = plan(customer(), history, fixed + timedelta(days=3, hours=1), make_campaign())
    assert keys(p.due) == [("invitation_reminder", 1)]
    assert plan(customer(), history, fixed + timedelta(days=1), make_campaign()).next_due_at == (
        fixed + timedelta(days=3))


def test_failed_reminder_stops_the_rest() -> None:
    history = [sent("invitation", 0, T0),
               sent("invitation_reminder", 1, T0 + timedelta(days=3), status="failed")]
    assert plan(customer(), history, T0 + timedelta(days=30), make_campaign()) == Plan((), None)


def test_escalation_copies_the_account_manager_and_sends_a_note() -> None:
    history = [sent("invitation", 0, T0), sent("invitation_reminder", 1, T0 + timedelta(days=3))]
    p = plan(customer(), history, T0 + timedelta(days=7), make_campaign(escalate_after=2))
    assert keys(p.due) == [("invitation_reminder", 2), ("am_alert", 2)]
    reminder, note = p.due
    assert reminder.cc == (AM,) and not reminder.internal
    assert note.internal and note.to == (AM,) and note.reminder_number == 2
    assert note.context["customer_key"] == "C1"


def test_account_manager_argument_wins_and_none_means_no_escalation() -> None:
    history = [sent("invitation", 0, T0), sent("invitation_reminder", 1, T0 + timedelta(days=3))]
    at, camp = T0 + timedelta(days=7), make_campaign(escalate_after=2)
    other = ContactInfo("Sam", "sam@fabrikam.example", "account_manager")
    p = plan(customer(), history, at, camp, account_manager=other)
    assert p.due[0].cc == (other,) and p.due[1].to == (other,)
    nobody = customer(account_manager_email="", account_manager_name="")
    p = plan(nobody, history, at, camp)
    assert keys(p.due) == [("invitation_reminder", 2)] and p.due[0].cc == ()
    gone = dataclasses.replace(other, suppressed=True)
    p = plan(customer(), history, at, camp, account_manager=gone)
    assert keys(p.due) == [("invitation_reminder", 2)] and p.due[0].cc == ()


def test_stage_without_entry_message_counts_from_stage_entry() -> None:
    c = customer("waiting", entered=T0)
    camp = make_campaign()
    assert plan(c, [], T0, camp).next_due_at == T0 + timedelta(days=2)
    assert keys(plan(c, [], T0 + timedelta(days=2), camp).due) == [("waiting_reminder", 1)]


def test_stage_change_stops_old_reminders() -> None:
    history = [sent("invitation", 0, T0), sent("invitation_reminder", 1, T0 + timedelta(days=3))]
    c = customer("waiting", entered=T0 + timedelta(days=4))
    p = plan(c, history, T0 + timedelta(days=30), make_campaign())
    assert keys(p.due) == [("waiting_reminder", 1)]


def test_reminder_sent_under_another_stage_name_is_not_counted_nor_repeated() -> None:
    # The campaign was edited: reminder 1 was sent while the stage had another name. It cannot
    # count for this stage, and sending it again or skipping to reminder 2 would both be wrong.
    history = [sent("invitation", 0, T0),
               sent("invitation_reminder", 1, T0 + timedelta(days=3), stage="old_invited")]
    assert plan(customer(), history, T0 + timedelta(days=30), make_campaign()) == Plan((), None)


def test_reentering_a_stage_does_not_resend_and_counts_from_reentry() -> None:
    back = T0 + timedelta(days=20)
    history = [sent("invitation", 0, T0), sent("invitation_reminder", 1, T0 + timedelta(days=3))]
    c = customer("invited", entered=back)
    p = plan(c, history, back, make_campaign())
    assert p.due == ()
    # Reminder 2: first_after 3 + every 4 after the re-entry.
    assert p.next_due_at == back + timedelta(days=7)


def test_final_stage_sends_its_entry_message_only() -> None:
    c = customer("done")
    assert keys(plan(c, [], T0, make_campaign()).due) == [("done_note", 0)]
    later = plan(c, [sent("done_note", 0, T0, stage="done")], T0 + timedelta(days=99),
                 make_campaign())
    assert later == Plan((), None)


@pytest.mark.parametrize("flag", ["paused", "opted_out", "lost"])
def test_side_states_get_nothing(flag: str) -> None:
    changes: dict[str, object] = {flag: True}
    blocked = dataclasses.replace(customer(), **changes)  # type: ignore[arg-type]
    assert plan(blocked, [], T0, make_campaign()) == Plan((), None)


def test_unknown_stage_gets_nothing() -> None:
    assert plan(customer("renamed"), [], T0, make_campaign()) == Plan((), None)


def test_all_recipients_suppressed_means_nothing() -> None:
    contacts = (ContactInfo("Pat", "pat@contoso.example", "primary", suppressed=True),
                ContactInfo("Tess", "tess@contoso.example", "technical"))
    c = customer(contacts=contacts)
    assert recipients(c, make_campaign()) == ()
    assert plan(c, [], T0, make_campaign()) == Plan((), None)


def test_recipients_follow_role_order_then_fall_back_to_everyone() -> None:
    contacts = (ContactInfo("Tess", "tess@contoso.example", "technical"),
                ContactInfo("Bo", "bo@contoso.example", "billing"),
                ContactInfo("Pat", "pat@contoso.example", "primary"),
                ContactInfo("Pat again", "PAT@contoso.example", "billing"))
    camp = make_campaign()
    assert [c.name for c in recipients(customer(contacts=contacts), camp)] == ["Pat", "Bo"]
    techs = contacts[:1]
    assert recipients(customer(contacts=techs), camp) == techs
    assert recipients(customer(contacts=()), camp) == ()


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        plan(customer(), [], datetime(2026, 6, 1, 10), make_campaign())


def test_unknown_time_zone_names_the_fix() -> None:
    with pytest.raises(CommsError, match=r"Unknown time zone 'Mars/Olympus'.*IANA"):
        plan(customer(time_zone="Mars/Olympus"), [], T0, make_campaign(OFFICE))


# --- send window, by example -----------------------------------------------------------------


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=UTC)


def local(zone: str, y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(zone)).astimezone(UTC)


def test_friday_evening_plan_is_deferred_to_monday_morning() -> None:
    friday_evening = local("Europe/London", 2026, 6, 5, 18, 30)
    p = plan(customer(time_zone="Europe/London"), [], friday_evening, make_campaign(OFFICE))
    assert p.due == ()
    assert keys(p.deferred) == [("invitation", 0)]
    assert p.next_due_at == local("Europe/London", 2026, 6, 8, 9, 0) == utc(2026, 6, 8, 8, 0)
    # At that moment it is due.
    assert keys(plan(customer(), [], p.next_due_at, make_campaign(OFFICE)).due) == [
        ("invitation", 0)
    ]


def test_window_is_dst_correct_in_berlin() -> None:
    berlin = "Europe/Berlin"
    # Monday 09:00 is 08:00 UTC in winter (CET) and 07:00 UTC in summer (CEST).
    assert next_window_start(utc(2026, 3, 21, 12), OFFICE, berlin) == utc(2026, 3, 23, 8)
    assert next_window_start(utc(2026, 3, 28, 12), OFFICE, berlin) == utc(2026, 3, 30, 7)
    assert next_window_start(utc(2026, 10, 24, 12), OFFICE, berlin) == utc(2026, 10, 26, 8)
    # 16:30 UTC is 17:30 CET (closed) in winter but 18:30 CEST in summer; 15:30 UTC is open
    # in winter (16:30 CET) but 17:30 CEST in summer (closed).
    assert not in_window(utc(2026, 3, 27, 16, 30), OFFICE, berlin)
    assert in_window(utc(2026, 3, 27, 15, 30), OFFICE, berlin)
    assert not in_window(utc(2026, 3, 30, 15, 30), OFFICE, berlin)
    assert in_window(utc(2026, 3, 30, 14, 59), OFFICE, berlin)


def test_reminder_due_across_the_dst_change_waits_for_local_opening() -> None:
    # Entry message sent Friday 27 March 16:00 CET; first reminder 2 days later is Sunday.
    berlin = "Europe/Berlin"
    camp = make_campaign(OFFICE, first=2, escalate_after=None)
    c = customer(time_zone=berlin, entered=local(berlin, 2026, 3, 27, 15))
    history = [sent("invitation", 0, local(berlin, 2026, 3, 27, 16))]
    p = plan(c, history, local(berlin, 2026, 3, 27, 16, 5), camp)
    assert p.next_due_at == local(berlin, 2026, 3, 30, 9) == utc(2026, 3, 30, 7)
    assert plan(c, history, utc(2026, 3, 30, 6, 59), camp).deferred != ()
    assert keys(plan(c, history, utc(2026, 3, 30, 7), camp).due) == [("invitation_reminder", 1)]


def test_window_opening_inside_the_skipped_hour() -> None:
    early = SendWindow(days=WEEKDAYS, start=time(2, 30), end=time(5, 0))
    # 29 March 2026 in Berlin: 02:00 CET jumps to 03:00 CEST; the window opens at the jump.
    assert next_window_start(utc(2026, 3, 28, 22), early, "Europe/Berlin") == utc(2026, 3, 29, 1)
    # In autumn 02:30 happens twice; the window opens at the first one.
    assert next_window_start(utc(2026, 10, 24, 22), early, "Europe/Berlin") == utc(2026, 10, 25, 0,
                                                                                    30)


def test_holidays_are_skipped() -> None:
    window = SendWindow(holidays=(date(2026, 12, 25), date(2026, 12, 28)))
    christmas_eve_evening = local("Europe/London", 2026, 12, 24, 17, 30)
    p = plan(customer(), [], christmas_eve_evening, make_campaign(window))
    assert keys(p.deferred) == [("invitation", 0)]
    # Fri 25th holiday, weekend, Mon 28th holiday: Tuesday 29th 09:00 GMT.
    assert p.next_due_at == utc(2026, 12, 29, 9)
    assert not in_window(utc(2026, 12, 25, 11), window, "Europe/London")


def test_holidays_are_local_dates() -> None:
    july_4 = (date(2026, 7, 4),)
    window = SendWindow(days=WEEKDAYS, start=time(0), end=time(23, 59), holidays=july_4)
    # 3 July 23:30 in New York is already 4 July in UTC: still open there; closed in Tokyo,
    # where it is 4 July 12:30.
    at = utc(2026, 7, 4, 3, 30)
    assert in_window(at, window, "America/New_York")
    assert not in_window(at, window, "Asia/Tokyo")


def test_tokyo_and_new_york_at_the_same_instant() -> None:
    at = utc(2026, 6, 10, 0, 30)  # Wed 09:30 in Tokyo, Tue 20:30 in New York
    camp = make_campaign(OFFICE)
    tokyo = plan(customer(time_zone="Asia/Tokyo"), [], at, camp)
    new_york = plan(customer(time_zone="America/New_York"), [], at, camp)
    assert keys(tokyo.due) == [("invitation", 0)] and tokyo.deferred == ()
    assert new_york.due == () and keys(new_york.deferred) == [("invitation", 0)]
    assert new_york.next_due_at == local("America/New_York", 2026, 6, 10, 9) == utc(2026, 6, 10,
                                                                                    13)


def test_internal_notes_follow_the_window_too() -> None:
    history = [sent("invitation", 0, T0), sent("invitation_reminder", 1, T0 + timedelta(days=3))]
    saturday = utc(2026, 6, 13, 12)
    p = plan(customer(), history, saturday, make_campaign(OFFICE))
    assert p.due == () and keys(p.deferred) == [("invitation_reminder", 2), ("am_alert", 2)]
    assert p.next_due_at == utc(2026, 6, 15, 8)


# --- strategies ------------------------------------------------------------------------------

ZONES = ("Europe/Berlin", "Europe/London", "America/New_York", "Asia/Tokyo", "Asia/Kolkata",
         "Australia/Lord_Howe", "America/Santiago", "Pacific/Chatham", "UTC")
START = datetime(2026, 1, 1, tzinfo=UTC)
STAGES = ("imported", "invited", "waiting", "done", "retired")


@st.composite
def windows(draw: st.DrawFn) -> SendWindow:
    days = draw(st.lists(st.sampled_from(WEEKDAYS), min_size=1, max_size=7, unique=True))
    start = draw(st.integers(0, 23 * 60))
    end = draw(st.integers(start + 1, 24 * 60 - 1))
    holidays = draw(st.lists(st.dates(date(2026, 1, 1), date(2027, 3, 1)), max_size=6))
    return SendWindow(days=tuple(days), start=time(start // 60, start % 60),
                      end=time(end // 60, end % 60), holidays=tuple(holidays))


@st.composite
def campaigns(draw: st.DrawFn) -> Campaign:
    count = draw(st.integers(0, 5))
    esc = draw(st.one_of(st.none(), st.integers(1, max(count, 1)))) if count else None
    days = st.floats(0.05, 10, allow_nan=False)
    return make_campaign(
        draw(st.one_of(st.just(ALWAYS), windows())),
        first=draw(days), every=draw(days), count=count, escalate_after=esc,
        plain_first=draw(days), plain_every=draw(days), plain_count=draw(st.integers(0, 4)),
    )


# True about one time in five: most generated customers can be mailed, some cannot.
sometimes = st.integers(0, 4).map(lambda i: i == 0)
instants = st.integers(0, 400 * 24 * 60).map(lambda m: START + timedelta(minutes=m))


@st.composite
def customers(draw: st.DrawFn, stage: str | None = None) -> CustomerInfo:
    n = draw(st.integers(0, 4))
    contacts = tuple(
        ContactInfo(f"Contact {i}", f"c{i}@contoso.example",
                    draw(st.sampled_from(("primary", "billing", "technical"))),
                    suppressed=draw(sometimes))
        for i in range(n)
    )
    has_am = draw(st.booleans())
    return CustomerInfo(
        key="C", name="Contoso", licences=5, stage=stage or draw(st.sampled_from(STAGES)),
        stage_entered_at=draw(instants), time_zone=draw(st.sampled_from(ZONES)),
        paused=draw(sometimes), opted_out=draw(sometimes), lost=draw(sometimes),
        account_manager_email="am@fabrikam.example" if has_am else "", contacts=contacts,
    )


MESSAGES = (("invitation", "invited"), ("invitation_reminder", "invited"), ("am_alert", "invited"),
            ("waiting_reminder", "waiting"), ("done_note", "done"))
STATUSES = ("queued", "sending", "sent", "failed", "unknown", "withdrawn")


@st.composite
def histories(draw: st.DrawFn) -> list[SentMessage]:
    out = []
    for _ in range(draw(st.integers(0, 8))):
        message, stage = draw(st.sampled_from(MESSAGES))
        if draw(sometimes):
            stage = draw(st.sampled_from(STAGES))  # recorded under another stage
        at = draw(instants)
        status = draw(st.sampled_from(STATUSES))
        out.append(SentMessage(
            message=message, sequence=draw(st.integers(0, 6)), status=status, stage=stage,
            planned_at=at, sent_at=at if status == "sent" else None,
        ))
    return out


def live_keys(history: Sequence[SentMessage]) -> set[tuple[str, int]]:
    return {(h.message, h.sequence) for h in history if h.status != "withdrawn"}


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties ------------------------------------------------------------------------------


@PROPS
@given(customers(), histories(), instants, campaigns())
def test_plan_invariants(c: CustomerInfo, history: list[SentMessage], now: datetime,
                         camp: Campaign) -> None:
    p = plan(c, history, now, camp)
    planned = [*p.due, *p.deferred]
    # Never two of the same (message, sequence), and never one the history already holds.
    assert len(set(keys(planned))) == len(planned)
    assert not set(keys(planned)) & live_keys(history)
    # Nothing for blocked customers or suppressed contacts.
    if c.paused or c.opted_out or c.lost or not recipients(c, camp):
        assert p == Plan((), None)
    for m in planned:
        assert all(not x.suppressed for x in (*m.to, *m.cc))
        assert m.stage == c.stage
        assert m.to
    # Due messages are inside the window now; deferred ones wait for its opening.
    assert not (p.due and p.deferred)
    if p.due:
        assert in_window(now, camp.window, c.time_zone)
    if p.deferred:
        assert not in_window(now, camp.window, c.time_zone)
        assert p.next_due_at == next_window_start(now, camp.window, c.time_zone)
    if p.next_due_at is not None:
        assert p.next_due_at >= now and p.next_due_at.tzinfo == UTC
        assert in_window(p.next_due_at, camp.window, c.time_zone)
    # At most one customer message (the entry message or one reminder) plus its internal note.
    assert len([m for m in planned if not m.internal]) <= 1


@PROPS
@given(customers(stage="waiting"), histories(), instants, campaigns())
def test_reminders_stop_the_moment_the_stage_changes(
    c: CustomerInfo, history: list[SentMessage], now: datetime, camp: Campaign
) -> None:
    # Whatever the invitation history, a customer now in `waiting` gets no invitation mail.
    p = plan(c, history, now, camp)
    assert {m.message for m in (*p.due, *p.deferred)} <= {"waiting_reminder"}


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400 * 24 * 60 * 60).map(lambda s: START + timedelta(seconds=s)),
       windows(), st.sampled_from(ZONES))
def test_next_window_start_is_the_first_open_instant(now: datetime, window: SendWindow,
                                                     zone: str) -> None:
    opening = next_window_start(now, window, zone)
    assert opening >= now and in_window(opening, window, zone)
    if opening > now:
        assert not in_window(opening - timedelta(seconds=1), window, zone)
        # No open minute in between (window bounds are whole minutes; DST changes are whole
        # minutes after the hour in every zone used here).
        probe = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        step = timedelta(minutes=1) if opening - now < timedelta(days=3) else timedelta(minutes=29)
        while probe < opening:
            assert not in_window(probe, window, zone), probe
            probe += step


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 3).map(lambda i: (
    datetime(2026, 3, 29, 1, tzinfo=UTC), datetime(2026, 10, 25, 1, tzinfo=UTC),
    datetime(2026, 3, 8, 7, tzinfo=UTC), datetime(2026, 11, 1, 6, tzinfo=UTC))[i]),
    st.integers(-36 * 60, 36 * 60), windows(),
    st.sampled_from(("Europe/Berlin", "America/New_York")))
def test_next_window_start_around_dst_changes(change: datetime, minutes: int, window: SendWindow,
                                              zone: str) -> None:
    now = change + timedelta(minutes=minutes)
    opening = next_window_start(now, window, zone)
    assert opening >= now and in_window(opening, window, zone)
    probe = now
    while probe < opening and probe < now + timedelta(days=3):
        assert not in_window(probe, window, zone)
        probe = probe.replace(second=0) + timedelta(minutes=1)


# --- simulation ------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """A simulated outbox row."""

    msg: PlannedMessage
    planned_at: datetime
    status: str = "queued"
    sent_at: datetime | None = None

    def view(self) -> SentMessage:
        return SentMessage(message=self.msg.message, sequence=self.msg.sequence,
                           status=self.status, stage=self.msg.stage, planned_at=self.planned_at,
                           sent_at=self.sent_at)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    camp=campaigns(),
    zone=st.sampled_from(ZONES),
    has_am=st.booleans(),
    steps=st.lists(st.tuples(st.integers(1, 3 * 24 * 60), st.floats(0, 1), st.floats(0, 1)),
                   min_size=5, max_size=60),
    move_at=st.one_of(st.none(), st.integers(0, 59)),
)
def test_simulated_customer_over_weeks(
    camp: Campaign, zone: str, has_am: bool, steps: list[tuple[int, float, float]],
    move_at: int | None,
) -> None:
    now = START + timedelta(hours=7)
    c = customer("invited", entered=now, time_zone=zone,
                 account_manager_email="avery@fabrikam.example" if has_am else "")
    rows: list[Row] = []

    def history() -> list[SentMessage]:
        return [r.view() for r in rows]

    def step(now: datetime) -> None:
        p = plan(c, history(), now, camp)
        assert not set(keys([*p.due, *p.deferred])) & live_keys(history())
        if p.due:
            assert in_window(now, camp.window, zone)
        for m in p.due:
            rows.append(Row(m, now))
        after = plan(c, history(), now, camp)
        assert after.due == ()  # planning twice queues nothing twice
        if after.next_due_at is not None:
            # Nothing falls due before the returned time if nothing changes.
            mid = now + (after.next_due_at - now) / 2
            assert plan(c, history(), mid, camp).due == ()

    def dispatch(now: datetime, roll: float) -> None:
        for r in rows:
            if r.status == "queued" and roll < 0.8:
                r.status, r.sent_at = "sent", now

    for i, (minutes, roll, _) in enumerate(steps):
        if move_at == i:
            # Stage change: queued messages of the old stage are withdrawn.
            for r in rows:
                if r.status == "queued":
                    r.status = "withdrawn"
            c = dataclasses.replace(c, stage="waiting", stage_entered_at=now)
        step(now)
        dispatch(now, roll)
        now += timedelta(minutes=minutes)
    # Drain: a dispatcher that sends at once, and a scheduler that wakes at next_due_at.
    for _ in range(40):
        step(now)
        dispatch(now, 0.0)
        nxt = plan(c, history(), now, camp).next_due_at
        if nxt is None:
            break
        now = max(nxt, now + timedelta(minutes=1))

    by_stage: dict[str, list[Row]] = {}
    for r in rows:
        by_stage.setdefault(r.msg.stage, []).append(r)
    for stage_name, stage_rows in by_stage.items():
        stage = camp.stage(stage_name)
        assert stage.reminders is not None
        rem = stage.reminders
        delivered = [r for r in stage_rows if r.status == "sent" and not r.msg.internal]
        reminders = [r for r in delivered if r.msg.message == rem.message]
        numbers = [r.msg.reminder_number for r in reminders]
        assert numbers == list(range(1, len(numbers) + 1))  # in order, never skipping
        assert len(numbers) <= rem.max
        assert all(r.msg.sequence == r.msg.reminder_number for r in reminders)
        entry = [r for r in delivered if r.msg.sequence == 0]
        if stage.on_enter:
            assert len(entry) <= 1
            if reminders:
                first_sent = entry[0].sent_at
                assert first_sent is not None
                assert reminders[0].planned_at >= first_sent + timedelta(days=rem.first_after_days)
        for a, b in itertools.pairwise(reminders):
            assert a.sent_at is not None
            assert b.planned_at - a.sent_at >= timedelta(days=rem.every_days)
        notes = [r for r in stage_rows if r.msg.internal]
        for r in reminders:
            n, esc = r.msg.reminder_number, rem.escalate_after
            escalated = esc is not None and n >= esc
            assert bool(r.msg.cc) == (escalated and has_am)
        assert sorted(r.msg.sequence for r in notes) == sorted(
            r.msg.reminder_number for r in stage_rows
            if r.msg.message == rem.message and r.msg.cc
        )
        for r in stage_rows:
            assert in_window(r.planned_at, camp.window, zone)
    # The stage the customer ends in got every reminder it allows (the drain ran long enough).
    final = camp.stage(c.stage)
    assert final.reminders is not None
    got = [r for r in by_stage.get(c.stage, []) if r.msg.message == final.reminders.message]
    if move_at is None or move_at < len(steps):
        assert len(got) == final.reminders.max


def test_the_window_cache_tells_apart_two_instants_a_dst_fold_apart() -> None:
    """01:30 in New York on 1 November 2026 happens twice (EDT, then EST): Python compares the
    two as equal, yet they are an hour apart. The cached answers are keyed by the instant."""
    ny = ZoneInfo("America/New_York")
    first = datetime(2026, 11, 1, 1, 30, tzinfo=ny)  # 05:30 UTC
    second = first.replace(fold=1)  # 06:30 UTC
    assert first == second and first.astimezone(UTC) != second.astimezone(UTC)
    window = SendWindow(days=WEEKDAYS, start=time(5, 0), end=time(6, 0))
    assert in_window(first, window, "UTC") is True
    assert in_window(second, window, "UTC") is False
    assert next_window_start(first, window, "UTC") == first.astimezone(UTC)
    assert next_window_start(second, window, "UTC") == datetime(2026, 11, 2, 5, 0, tzinfo=UTC)
