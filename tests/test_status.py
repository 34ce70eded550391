"""The figures of `comms status` on a known ledger: funnel, stuck customers, message counts by
local day/week, exhausted reminders, double-billing exposure, messages per day; the timeline;
and the `comms status` command showing them."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from comms.campaign import load_campaign
from comms.config import DefaultsSettings, Settings
from comms.errors import CommsError
from comms.services import status as st
from comms.store import bodies
from comms.store.db import Database
from comms.store.models import Customer, Message, StageEvent

# Wednesday 4 March 2026, 10:00 in New York (UTC-5; DST starts Sunday 8 March).
NOW = datetime(2026, 3, 4, 15, 0, tzinfo=UTC)
TZ = "America/New_York"


def Z(text: str) -> datetime:
    """A UTC instant from 'YYYY-MM-DDTHH:MM[:SS]'."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


@dataclass
class Ledger:
    db: Database
    ids: dict[str, int]


def add_customer(s: Any, key: str, stage: str, entered: datetime, *, licences: int = 10,
                 name: str | None = None, csp_live_at: datetime | None = None,
                 **flags: bool) -> Customer:
    c = Customer(
        key=key, name=name or f"Customer {key}", stage=stage, stage_entered_at=entered,
        licences=licences, csp_live_at=csp_live_at, created_at=entered, updated_at=entered,
        **flags,
    )
    s.add(c)
    s.flush()
    return c


def add_message(s: Any, customer: Customer, message: str, sequence: int, status: str, *,
                at: datetime, created_at: datetime | None = None, stage: str | None = None,
                unknown_since: datetime | None = None, internal: bool = False,
                subject: str = "Subject", last_error: str = "") -> Message:
    """``at`` is when the message reached ``status`` (sent_at for sent ones)."""
    queued_at = created_at or at - timedelta(hours=1)
    m = Message(
        send_id=uuid.uuid4().hex, customer_id=customer.id, message=message, sequence=sequence,
        stage=stage or customer.stage, internal=internal, status=status,
        to_json=json.dumps([{"address": f"it@{customer.key.lower()}.example", "name": "IT"}]),
        subject=subject, body=bodies.encode("<p>x</p>", "x"), send_after=queued_at,
        created_at=queued_at, updated_at=at,
        sent_at=at if status == "sent" else None, unknown_since=unknown_since,
        last_error=last_error,
    )
    s.add(m)
    return m


def build_ledger(db: Database) -> Ledger:
    """The known ledger every figure below is checked against (numbers worked out by hand)."""
    ids: dict[str, int] = {}
    with db.session() as s:
        c01 = add_customer(s, "C01", "imported", ago(20))
        add_customer(s, "C02", "imported", ago(5))
        c03 = add_customer(s, "C03", "announced", ago(7))  # exactly expected: not stuck
        c04 = add_customer(s, "C04", "invited", ago(30))
        c05 = add_customer(s, "C05", "invited", ago(10))
        c06 = add_customer(s, "C06", "awaiting_cancellation", ago(12), licences=30,
                           csp_live_at=ago(12), paused=True)
        c07 = add_customer(s, "C07", "awaiting_cancellation", ago(3), licences=10,
                           csp_live_at=ago(3))
        c08 = add_customer(s, "C08", "awaiting_cancellation", ago(6), licences=4)
        c09 = add_customer(s, "C09", "completed", ago(100))
        c10 = add_customer(s, "C10", "approved", ago(8), lost=True)
        c11 = add_customer(s, "C11", "awaiting_cancellation", ago(1.5), licences=100,
                           csp_live_at=ago(1.5), name="Contoso <Ltd> & Sons")
        add_customer(s, "C12", "legacy", ago(40))
        c13 = add_customer(s, "C13", "approved", ago(2))

        add_message(s, c04, "partner_invitation", 0, "sent", at=ago(30))
        for seq, d in ((1, 27), (2, 23), (3, 19)):
            add_message(s, c04, "partner_invitation_reminder", seq, "sent", at=ago(d))
        add_message(s, c05, "partner_invitation", 0, "sent", at=ago(10))
        add_message(s, c05, "partner_invitation_reminder", 1, "sent", at=ago(7))
        add_message(s, c05, "partner_invitation_reminder", 2, "sent", at=Z("2026-03-02T06:00"))
        add_message(s, c05, "partner_invitation_reminder", 3, "queued",
                    at=Z("2026-03-04T04:59"), created_at=Z("2026-03-04T04:59"))
        add_message(s, c06, "cancel_instructions", 0, "sent", at=ago(12))
        for seq, when in ((1, ago(10)), (2, ago(7)), (3, ago(4)), (4, Z("2026-03-03T10:00")),
                          (5, Z("2026-03-04T05:00"))):
            add_message(s, c06, "cancel_reminder", seq, "sent", at=when)
        add_message(s, c07, "cancel_instructions", 0, "sent", at=Z("2026-03-04T14:00"))
        add_message(s, c07, "cancel_reminder", 1, "failed", at=Z("2026-03-04T14:30"),
                    last_error="550 mailbox unavailable")
        # Unknown since Sunday night local time; touched again today: counts by unknown_since.
        add_message(s, c11, "cancel_instructions", 0, "unknown", at=Z("2026-03-04T10:00"),
                    unknown_since=Z("2026-03-02T04:59"))
        add_message(s, c08, "cancel_instructions", 0, "queued", at=Z("2026-03-04T06:00"),
                    created_at=Z("2026-03-04T06:00"))
        add_message(s, c10, "lose_access_warning", 0, "withdrawn", at=Z("2026-03-04T07:00"))
        add_message(s, c13, "partner_invitation", 0, "sent", at=ago(14), stage="invited")
        for seq, d in ((1, 12), (2, 8), (3, 5)):
            add_message(s, c13, "partner_invitation_reminder", seq, "sent", at=ago(d),
                        stage="invited")
        add_message(s, c13, "lose_access_warning", 0, "sent", at=Z("2026-03-02T15:05"))
        add_message(s, c03, "kickoff", 0, "sent", at=Z("2026-03-02T05:00"))  # week start
        add_message(s, c09, "transition_complete", 0, "sent", at=Z("2026-03-02T04:59:59"))
        s.add(StageEvent(customer_id=c13.id, kind="stage", from_stage="invited",
                         to_stage="approved", at=ago(2), by="tester", source="cli",
                         note="partner accepted"))
        s.add(StageEvent(customer_id=c13.id, kind="stage", from_stage="imported",
                         to_stage="invited", at=ago(14.5), by="tester", source="cli"))
        s.flush()
        for c in (c01, c03, c04, c05, c06, c07, c08, c09, c10, c11, c13):
            assert c.id is not None
            ids[c.key] = c.id
    return Ledger(db, ids)


@pytest.fixture
def settings() -> Settings:
    return Settings(defaults=DefaultsSettings(time_zone=TZ))


@pytest.fixture
def campaign() -> Any:
    return load_campaign(None)


@pytest.fixture
def ledger(db: Database) -> Ledger:
    return build_ledger(db)


def test_funnel_counts_per_stage_in_campaign_order(ledger: Ledger, campaign: Any) -> None:
    with ledger.db.session() as s:
        rows = st.funnel(s, campaign)
    assert [(r.stage, r.customers) for r in rows] == [
        ("imported", 2), ("announced", 1), ("invited", 2), ("approved", 2),
        ("awaiting_cancellation", 4), ("completed", 1), ("legacy", 1),
    ]
    by = {r.stage: r for r in rows}
    assert (by["awaiting_cancellation"].paused, by["approved"].lost) == (1, 1)
    assert by["legacy"].in_campaign is False and by["imported"].in_campaign is True
    assert by["invited"].expected_days == 14


def test_funnel_lists_empty_stages_with_zero(db: Database, campaign: Any) -> None:
    with db.session() as s:
        rows = st.funnel(s, campaign)
    assert [r.customers for r in rows] == [0] * 6
    assert [r.stage for r in rows] == list(campaign.stage_names)


def test_stuck_customers_longest_overdue_first(ledger: Ledger, campaign: Any) -> None:
    with ledger.db.session() as s:
        stuck = st.stuck_customers(s, campaign, NOW)
    assert [(x.key, x.stage, round(x.days_in_stage, 3), round(x.days_over, 3)) for x in stuck] == [
        ("C04", "invited", 30.0, 16.0),
        ("C01", "imported", 20.0, 6.0),
        ("C06", "awaiting_cancellation", 12.0, 2.0),
        ("C10", "approved", 8.0, 1.0),
    ]
    assert [x.flags for x in stuck] == [(), (), ("paused",), ("lost",)]


def test_stuck_boundary_is_strictly_longer_than_expected(ledger: Ledger, campaign: Any) -> None:
    # C03 has been in "announced" exactly its 7 expected days: not stuck; a second later it is.
    with ledger.db.session() as s:
        now_keys = [x.key for x in st.stuck_customers(s, campaign, NOW)]
        later = [x.key for x in st.stuck_customers(s, campaign, NOW + timedelta(seconds=1))]
    assert "C03" not in now_keys
    assert "C03" in later


def test_message_counts_today_week_total_in_configured_time_zone(ledger: Ledger) -> None:
    with ledger.db.session() as s:
        counts = st.message_counts(s, NOW, ZoneInfo(TZ))
    assert counts.day_start == Z("2026-03-04T05:00")  # local midnight in New York
    assert counts.week_start == Z("2026-03-02T05:00")  # Monday local midnight
    assert counts.today == {"queued": 1, "sending": 0, "sent": 2, "failed": 1, "unknown": 0,
                            "withdrawn": 1, "bounced": 0}
    assert counts.week == {"queued": 2, "sending": 0, "sent": 6, "failed": 1, "unknown": 0,
                           "withdrawn": 1, "bounced": 0}
    assert counts.total == {"queued": 2, "sending": 0, "sent": 21, "failed": 1, "unknown": 1,
                            "withdrawn": 1, "bounced": 0}


def test_message_counts_follow_the_time_zone(ledger: Ledger) -> None:
    # In UTC the day starts at 00:00Z: the queued reminder at 04:59Z is today, the sent
    # reminder at 05:00Z still is, the unknown one (Mon 04:59Z) now falls inside the week.
    with ledger.db.session() as s:
        counts = st.message_counts(s, NOW, ZoneInfo("UTC"))
    assert counts.today["queued"] == 2
    assert counts.today["sent"] == 2
    assert counts.week["unknown"] == 1
    assert counts.week["sent"] == 7  # C09's message at Mon 04:59:59Z joins the week


def test_exhausted_reminders_only_for_customers_still_in_the_stage(
    ledger: Ledger, campaign: Any
) -> None:
    with ledger.db.session() as s:
        rows = st.exhausted_reminders(s, campaign, NOW)
    assert [(r.key, r.stage, r.reminders, r.last_reminder_at) for r in rows] == [
        ("C04", "invited", 3, ago(19)),
        ("C06", "awaiting_cancellation", 5, Z("2026-03-04T05:00")),
    ]
    # C05 has its last reminder still queued; C13 used all reminders but moved on to approved.


def test_exposure_per_customer_highest_first(ledger: Ledger) -> None:
    with ledger.db.session() as s:
        rows = st.double_billing_exposure(s, NOW, 12.5)
    assert [(e.key, e.licences, round(e.days, 3), e.amount, e.estimated) for e in rows] == [
        ("C06", 30, 12.0, 150.00, False),   # 12 d × 30 × 12.50 / 30
        ("C11", 100, 1.5, 62.50, False),    # 1.5 d × 100 × 12.50 / 30
        ("C07", 10, 3.0, 12.50, False),     # 3 d × 10 × 12.50 / 30
        ("C08", 4, 6.0, 10.00, True),       # no go-live date: from entering the stage
    ]


def test_exposure_uses_the_configured_price(ledger: Ledger) -> None:
    with ledger.db.session() as s:
        rows = st.double_billing_exposure(s, NOW, 3.0)
    assert [e.amount for e in rows] == [36.0, 15.0, 3.0, 2.4]


def test_compute_status_bundles_every_figure(
    ledger: Ledger, settings: Settings, campaign: Any
) -> None:
    report = st.compute_status(ledger.db, settings, campaign, NOW, days=7)
    assert report.customers_total == 13
    assert report.exposure_total == 235.00
    assert report.currency == "GBP"
    assert len(report.daily) == 7 and report.daily[-1].day == date(2026, 3, 4)
    data = report.to_dict()
    json.dumps(data)  # JSON-ready
    assert data["exposure_total"] == 235.0
    assert data["stuck"][0]["key"] == "C04" and data["stuck"][0]["days_over"] == 16.0
    assert data["messages"]["today"]["sent"] == 2


def test_messages_per_day_local_days_across_dst(db: Database) -> None:
    """New York springs forward on Sunday 8 March 2026: that local day is 23 hours long."""
    tz = ZoneInfo(TZ)
    now = Z("2026-03-10T15:00")  # Tuesday 11:00 EDT
    with db.session() as s:
        c = add_customer(s, "D1", "invited", Z("2026-02-01T00:00"))
        for i, when in enumerate((
            "2026-03-08T04:59",  # Sat 7 Mar 23:59 EST
            "2026-03-08T05:00",  # Sun 8 Mar 00:00 EST
            "2026-03-09T03:59",  # Sun 8 Mar 23:59 EDT (23-hour day)
            "2026-03-09T04:00",  # Mon 9 Mar 00:00 EDT
            "2026-03-10T14:00",  # today
            "2026-03-03T12:00",  # before the 7-day window
        )):
            add_message(s, c, "partner_invitation_reminder", i + 1, "sent", at=Z(when),
                        created_at=Z(when))
        add_message(s, c, "cancel_reminder", 1, "failed", at=Z("2026-03-09T12:00"),
                    created_at=Z("2026-03-09T11:00"))
        add_message(s, c, "cancel_reminder", 2, "queued", at=Z("2026-03-10T13:00"),
                    created_at=Z("2026-03-10T13:00"))
    with db.session() as s:
        daily = st.messages_per_day(s, now, tz, days=7)
    assert [(d.day.isoformat(), d.queued, d.sent, d.failed) for d in daily] == [
        ("2026-03-04", 0, 0, 0),
        ("2026-03-05", 0, 0, 0),
        ("2026-03-06", 0, 0, 0),
        ("2026-03-07", 1, 1, 0),
        ("2026-03-08", 2, 2, 0),
        ("2026-03-09", 2, 1, 1),
        ("2026-03-10", 2, 1, 0),
    ]
    with db.session() as s:
        one = st.messages_per_day(s, now, tz, days=1)
        assert [(d.day.isoformat(), d.sent) for d in one] == [("2026-03-10", 1)]
        with pytest.raises(CommsError, match="at least 1"):
            st.messages_per_day(s, now, tz, days=0)


def test_day_and_week_bounds_are_local_midnights() -> None:
    tz = ZoneInfo(TZ)
    assert st.day_bounds(Z("2026-03-08T12:00"), tz) == (Z("2026-03-08T05:00"),
                                                        Z("2026-03-09T04:00"))
    assert st.week_bounds(Z("2026-03-08T12:00"), tz) == (Z("2026-03-02T05:00"),
                                                         Z("2026-03-09T04:00"))
    # 04:30Z on Monday is still Sunday evening in New York: last week.
    assert st.week_bounds(Z("2026-03-02T04:30"), tz)[0] == Z("2026-02-23T05:00")


def test_parse_now() -> None:
    assert st.parse_now("2026-03-04T10:00", TZ) == Z("2026-03-04T15:00")
    assert st.parse_now("2026-03-04T10:00+00:00", TZ) == Z("2026-03-04T10:00")
    with pytest.raises(CommsError, match=r"--now 'yesterday' is not an ISO 8601 date-time"):
        st.parse_now("yesterday", TZ)


@pytest.fixture
def ny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMS_DEFAULTS_TIME_ZONE", TZ)
    monkeypatch.setenv("COLUMNS", "200")


def table_rows(out: str, title: str) -> list[list[str]]:
    """The body rows of the rich table printed under ``title`` (cells stripped)."""
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if title in line)
    rows: list[list[str]] = []
    for line in lines[i + 1:]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            rows.append([c.strip() for c in line.split("│")[1:-1]])
    return rows


def test_cli_status_shows_every_figure(
    ledger: Ledger, cli: Any, ny: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comms.cli import common

    # The shared console sized itself at import: 80 columns, as in a cron mail. Cells wrap
    # (a record's lines are joined below); no figure may be cut short.
    monkeypatch.setattr(common.console, "_width", 80)
    r = cli("status", "--now", "2026-03-04T10:00")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "…" not in out

    def joined(out: str, title: str) -> list[list[str]]:
        return [[" ".join(c) for c in rec] for rec in table_records(out, title)]

    assert "Status as of 2026-03-04 10:00 (America/New_York) · 13 customers" in out
    assert joined(out, "Customers per stage") == [
        ["imported", "2", "0", "0", "0", "14"],
        ["announced", "1", "0", "0", "0", "7"],
        ["invited", "2", "0", "0", "0", "14"],
        ["approved", "2", "0", "0", "1", "7"],
        ["awaiting_cancellation", "4", "1", "0", "0", "10"],
        ["completed", "1", "0", "0", "0", "-"],
        ["legacy (not in campaign)", "1", "0", "0", "0", "-"],
    ]
    assert joined(out, "Messages by status") == [
        ["queued", "1", "2", "2"],
        ["sending", "0", "0", "0"],
        ["sent", "2", "6", "21"],
        ["failed", "1", "1", "1"],
        ["unknown", "0", "0", "1"],
        ["withdrawn", "1", "1", "1"],
        ["bounced", "0", "0", "0"],
    ]
    assert joined(out, "Stuck past expected time: 4") == [
        ["C04", "Customer C04", "invited", "30.0", "14", "16.0", ""],
        ["C01", "Customer C01", "imported", "20.0", "14", "6.0", ""],
        ["C06", "Customer C06", "awaiting cancellation", "12.0", "10", "2.0", "paused"],
        ["C10", "Customer C10", "approved", "8.0", "7", "1.0", "lost"],
    ]
    assert joined(out, "Reminders exhausted without progress: 2") == [
        ["C04", "Customer C04", "invited", "3", "2026-02-13 10:00", "30.0"],
        ["C06", "Customer C06", "awaiting cancellation", "5", "2026-03-04 00:00", "12.0"],
    ]
    assert "Double-billing exposure: GBP 235.00 (4 customers awaiting cancellation)" in out
    assert joined(out, "Exposure by customer, highest first") == [
        ["C06", "Customer C06", "30", "12.0", "GBP 150.00"],
        ["C11", "Contoso <Ltd> & Sons", "100", "1.5", "GBP 62.50"],
        ["C07", "Customer C07", "10", "3.0", "GBP 12.50"],
        ["C08", "Customer C08", "4", "6.0*", "GBP 10.00"],
    ]
    assert "days live × licences × GBP 12.50 / 30" in out
    assert "* no CSP go-live date recorded: counted from entering the stage" in out


def test_cli_status_json(ledger: Ledger, cli: Any, ny: None) -> None:
    r = cli("status", "--json", "--now", "2026-03-04T15:00:00+00:00", "--days", "3")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["now"] == "2026-03-04T15:00:00+00:00"
    assert [f["customers"] for f in data["funnel"]] == [2, 1, 2, 2, 4, 1, 1]
    assert [x["key"] for x in data["stuck"]] == ["C04", "C01", "C06", "C10"]
    assert [x["key"] for x in data["exhausted"]] == ["C04", "C06"]
    assert [(x["key"], x["amount"]) for x in data["exposure"]] == [
        ("C06", 150.0), ("C11", 62.5), ("C07", 12.5), ("C08", 10.0)]
    assert data["exposure_total"] == 235.0
    assert data["messages"]["week"]["sent"] == 6
    assert [d["day"] for d in data["daily"]] == ["2026-03-02", "2026-03-03", "2026-03-04"]


def test_cli_status_rejects_a_bad_now(db: Database, cli: Any) -> None:
    r = cli("status", "--now", "tomorrow")
    assert r.exit_code == 2  # a bad option value is a usage error, as in every command
    assert r.stderr.strip() == (
        "Error: --now 'tomorrow' is not an ISO 8601 date-time; use e.g. 2026-03-02T09:30 (read "
        "in Europe/London, [defaults] time_zone) or 2026-03-02T09:30:00+00:00."
    )


def table_records(out: str, title: str) -> list[list[list[str]]]:
    """The body rows of the rich table under ``title`` when a row spans several lines: each
    record is a list of cells, each cell the list of its non-empty lines. A record starts on
    the line whose second cell (the first figure) is filled."""
    records: list[list[list[str]]] = []
    for cells in table_rows(out, title):
        if cells[1] or not records:
            records.append([[c] if c else [] for c in cells])
        else:
            for parts, c in zip(records[-1], cells, strict=True):
                parts.extend([c] if c else [])
    return records


def test_cli_status_per_wave_conversion_and_inbox(
    db: Database, cli: Any, ny: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`comms status` per wave and per account manager: reached (conversion) per stage,
    completion and money, bounces and replies; the figures are hand-computed in
    tests/wave_ledger.py. At 80 columns (a terminal, a cron mail) no figure is cut short."""
    from wave_ledger import ANN, AUTUMN, CY, PILOT, SPRING, build_wave_ledger

    from comms.cli import common

    build_wave_ledger(db)
    monkeypatch.setattr(common.console, "_width", 80)
    r = cli("status", "--now", "2026-03-04T10:00")
    assert r.exit_code == 0, r.output
    out = r.stdout
    managers = out[out.index("Funnel: customers who reached"):out.index("Inbox:")]
    assert "…" not in managers
    assert max(len(line) for line in managers.splitlines()) <= 80
    funnel = table_rows(out, "Funnel: customers who reached each stage")
    assert [row[0] for row in funnel if row[0]] == ["1", "2", "3", "4", "5", "6"]

    def by_group(title: str) -> dict[str, list[str]]:
        return {"".join(cells[0]): [" ".join(c) for c in cells[1:]]
                for cells in table_records(out, title)}

    reached = by_group("Per wave: customers who reached each stage")
    assert {w: reached[w] for w in (AUTUMN, PILOT, SPRING)} == {
        AUTUMN: ["3", "3 (100%)", "3 (100%)", "3 (100%)", "1 (33%)", "1 (100%)"],
        PILOT: ["1", "0 (0%)", "0 (-)", "0 (-)", "0 (-)", "0 (-)"],
        SPRING: ["4", "3 (75%)", "3 (100%)", "2 (67%)", "2 (100%)", "1 (50%)"],
    }
    money = by_group("Per wave: completion and double billing")
    assert {w: money[w] for w in (AUTUMN, PILOT, SPRING)} == {
        AUTUMN: ["3", "33%", "0.00", "12.50"],  # A1: live one day, 30 licences
        PILOT: ["1", "0%", "0.00", "0.00"],
        SPRING: ["4", "25%", "33.33", "45.83"],  # + A2: live 4 days, 20 licences, still paying
    }
    # An account manager: the name, the address under it, both whole (a long address folds).
    groups = [cells[0] for cells in table_records(
        out, "Per account manager: completion and double billing")]
    assert [CY[0], CY[1]] in groups
    # rich wraps a long name at its spaces and folds a long address: nothing is dropped
    assert ANN[0].replace(" ", "") + ANN[1] in ["".join(g) for g in groups], groups
    words = " ".join(out.split())  # lines of text wrap at 80 columns
    assert f"wave {SPRING}: bounces 2 (1 hard), replies 1" in words
    assert f"wave {AUTUMN}: bounces 0 (0 hard), replies 0" in words
    assert "Inbox: bounces 2 (1 hard), replies 2" in words  # the overall line, U1's reply too


def test_a_campaign_with_many_stages_gets_its_breakdown_in_tables_that_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten stages do not fit 80 columns beside a group: the stages are split over tables,
    every figure printed whole, no line wider than the terminal."""
    from rich.console import Console

    from comms.cli import common, status_cmd
    from comms.services.managers import Breakdown, FunnelStep

    monkeypatch.setattr(common.console, "_width", 80)
    funnel = [FunnelStep(f"s{n}", f"stage {n}", 10_000 - n, None if n == 0 else 0.99)
              for n in range(10)]
    rows = [Breakdown("Ann <ann@p.example>", 10_000, funnel, 0.5, 1.0, 2.0,
                      name="Ann", email="ann@p.example")]
    tables = status_cmd._reached_tables("Per account manager", "account manager", 10, rows)
    assert len(tables) == 2
    out = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    for t in tables:
        out.print(status_cmd.present.fit(t))
    text = out.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    ranges = [(int(a), int(b)) for a, b in re.findall(r"stages (\d+)-(\d+)\)",
                                                        " ".join(text.split()))]
    assert ranges[0][0] == 1 and ranges[-1][1] == 10 and len(ranges) == 2
    assert ranges[1][0] == ranges[0][1] + 1  # every stage once, in order
    for n in range(10):
        assert f" {10_000 - n} " in text
