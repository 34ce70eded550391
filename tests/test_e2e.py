"""End to end: import the sample CSV, run, move stages over simulated weeks, run again; then
check the sandbox's record against each customer's history: the right messages, in order, each
once, with the right cancellation branch. This is the README's demo scenario."""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import col, select

from comms.campaign import load_campaign
from comms.config import load_settings
from comms.services.demo import DemoResult, run_demo, scenario
from comms.store.db import open_database
from comms.store.models import Customer, Message


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    return run_demo(tmp_path_factory.mktemp("demo") / "work", echo=lambda _line: None)


@pytest.fixture(scope="module")
def history(demo: DemoResult) -> dict[str, list[dict[str, Any]]]:
    """Per customer: its sent ledger rows in queue order, joined with the sandbox's record."""
    received = {r["send_id"]: r for r in demo.received}
    db = open_database(demo.database_url)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with db.session() as s:
        rows = s.exec(
            select(Message, Customer)
            .join(Customer, col(Customer.id) == col(Message.customer_id))
            .order_by(col(Message.created_at), col(Message.id))
        ).all()
        for m, c in rows:
            out[c.key].append({
                "message": m.message, "sequence": m.sequence, "status": m.status,
                "queued_at": m.created_at, "internal": m.internal, "licences": c.licences,
                "record": received.get(m.send_id), "am": c.account_manager_email,
                "time_zone": c.time_zone,
            })
    db.dispose()
    return out


def test_every_message_accepted_exactly_once_nothing_left_behind(demo: DemoResult) -> None:
    assert demo.failed == 0
    send_ids = [r["send_id"] for r in demo.received]
    assert len(send_ids) == len(set(send_ids)), "a message reached Graph twice"
    db = open_database(demo.database_url)
    with db.session() as s:
        rows = s.exec(select(Message.send_id, Message.status)).all()
    db.dispose()
    statuses = {status for _, status in rows}
    assert statuses <= {"sent", "withdrawn"}, statuses
    assert {sid for sid, st in rows if st == "sent"} == set(send_ids)
    assert len(send_ids) > 100  # 24 customers over a month: a real campaign, not a toy


def test_each_customer_received_what_its_history_calls_for(
    demo: DemoResult, history: dict[str, list[dict[str, Any]]]
) -> None:
    campaign = load_campaign()
    keys = sorted(history)
    steps = {s.action: s for s in scenario(keys)}
    paused = set(steps["pause"].keys)
    opted_out = set(steps["opt_out"].keys)
    finished = set().union(*(s.keys for s in scenario(keys) if s.action == "completed"))
    approved = set().union(*(s.keys for s in scenario(keys) if s.action == "approved"))
    order = {m: i for i, m in enumerate(campaign.messages())}
    for key, items in history.items():
        sent = [i for i in items if i["status"] == "sent" and not i["internal"]]
        names = [i["message"] for i in sent]
        # Each (message, sequence) once, in campaign order, reminders numbered 1, 2, 3 ...
        pairs = [(i["message"], i["sequence"]) for i in sent]
        assert len(pairs) == len(set(pairs)), key
        assert names == sorted(names, key=lambda n: order[n]), (key, names)
        for reminder in ("partner_invitation_reminder", "cancel_reminder"):
            seqs = [i["sequence"] for i in sent if i["message"] == reminder]
            assert seqs == list(range(1, len(seqs) + 1)), (key, reminder, seqs)
        assert names[:2] == ["kickoff", "partner_invitation"], (key, names)
        invite_reminders = names.count("partner_invitation_reminder")
        if key in paused:
            assert names == ["kickoff", "partner_invitation"], (key, names)
        elif key in opted_out:
            assert "lose_access_warning" not in names and invite_reminders <= 1, (key, names)
        elif key in approved:
            assert {"lose_access_warning", "cancel_instructions"} <= set(names), (key, names)
            assert ("transition_complete" in names) == (key in finished), (key, names)
            if key in finished:
                assert names[-1] == "transition_complete"
        else:  # never approved: every invitation reminder, then silence
            assert invite_reminders == campaign.stage("invited").reminders.max, (key, names)  # type: ignore[union-attr]
            assert names[-1] == "partner_invitation_reminder"


def test_reminders_respect_spacing_and_stop_at_stage_change(
    history: dict[str, list[dict[str, Any]]]
) -> None:
    campaign = load_campaign()
    every = {
        s.reminders.message: timedelta(days=s.reminders.every_days)
        for s in campaign.stages if s.reminders
    }
    for key, items in history.items():
        sent = [i for i in items if i["status"] == "sent"]
        for message, gap in every.items():
            times = [i["queued_at"] for i in sent if i["message"] == message]
            for a, b in itertools.pairwise(times):
                assert b - a >= gap, (key, message, a, b)
        invited_left = next((i["queued_at"] for i in sent
                             if i["message"] == "lose_access_warning"), None)
        if invited_left:
            assert all(i["queued_at"] <= invited_left for i in sent
                       if i["message"] == "partner_invitation_reminder"), key


def test_cancellation_branch_follows_licence_count(
    history: dict[str, list[dict[str, Any]]]
) -> None:
    settings = load_settings(env={})
    billing, support = settings.partner.billing_url, settings.partner.support_url
    seen = set()
    for key, items in history.items():
        for i in items:
            if i["message"] != "cancel_instructions" or i["record"] is None:
                continue
            html = i["record"]["html"]
            self_service = i["licences"] < settings.partner.licence_threshold
            seen.add(self_service)
            assert (billing in html) == self_service, (key, i["licences"])
            assert (support in html) == (not self_service), (key, i["licences"])
    assert seen == {True, False}, "the sample must exercise both branches"


def test_escalation_copies_the_account_manager(history: dict[str, list[dict[str, Any]]]) -> None:
    campaign = load_campaign()
    reminders = campaign.stage("awaiting_cancellation").reminders
    assert reminders is not None and reminders.escalate_after is not None
    escalated = 0
    for key, items in history.items():
        for i in items:
            if i["message"] == "cancel_reminder" and i["status"] == "sent":
                cc = i["record"]["cc"]
                expect = i["sequence"] >= reminders.escalate_after and bool(i["am"])
                assert (i["am"] in cc) == expect, (key, i["sequence"], cc)
                escalated += expect
            if i["message"] == reminders.escalation_message and i["status"] == "sent":
                assert i["internal"] and i["record"]["to"] == [i["am"]]
    assert escalated >= 1, "the stalled customer must be escalated"


def test_everything_queued_inside_the_customers_send_window(
    history: dict[str, list[dict[str, Any]]]
) -> None:
    from zoneinfo import ZoneInfo

    from comms.campaign import WEEKDAYS

    window = load_campaign().window
    checked = 0
    for key, items in history.items():
        for i in items:
            if i["status"] != "sent":
                continue
            local = i["queued_at"].astimezone(ZoneInfo(i["time_zone"]))
            assert WEEKDAYS[local.weekday()] in window.days, (key, local)
            assert window.start <= local.time() < window.end, (key, local)
            assert local.date() not in window.holidays, (key, local)
            checked += 1
    assert checked > 100


def test_demo_report_shows_what_was_sent_to_whom(demo: DemoResult) -> None:
    from comms.services.demo import report_lines

    lines = report_lines(demo)
    text = "\n".join(lines)
    assert "CUST-0001 Contoso Dental Ltd [24 licences, completed]" in text
    assert "  Mon 30 Nov 12:00  kickoff -> sarah.jones@contosodental.example" in text
    assert f"{len(demo.received)} messages accepted by the sandbox Graph" in text
    assert "duplicates: 0; failed: 0." in text
    assert "status --now 2026-12-30T00:00" in text
