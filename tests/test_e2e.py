"""End to end: import the sample CSV, run, move stages over simulated weeks, run again; then
check the sandbox's record against each customer's history: the right messages, in order, each
once, with the right cancellation branch; stages Microsoft sees moved by stage sync, one bounce
and one reply handled from the sender's Inbox. This is the README's demo scenario."""

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
from comms.services.demo_story import report_lines
from comms.store.db import open_database
from comms.store.models import Customer, Message, StageEvent


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
                "time_zone": c.time_zone, "locale": c.locale,
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
    assert statuses <= {"sent", "withdrawn", "bounced"}, statuses
    # A bounced message was accepted first: the NDR came back later.
    assert {sid for sid, st in rows if st in ("sent", "bounced")} == set(send_ids)
    assert len(send_ids) > 100  # 24 customers over a month: a real campaign, not a toy


def test_each_customer_received_what_its_history_calls_for(
    demo: DemoResult, history: dict[str, list[dict[str, Any]]]
) -> None:
    campaign = load_campaign()
    keys = sorted(history)
    steps = {s.action: s for s in scenario(keys)}
    paused = set(steps["pause"].keys)
    opted_out = set(steps["opt_out"].keys)
    finished = set().union(*(s.keys for s in scenario(keys)
                             if s.action in ("cancel_direct", "completed")))
    approved = set().union(*(s.keys for s in scenario(keys)
                             if s.action == "accept_relationship"))
    order = {m: i for i, m in enumerate(campaign.messages())}
    for key, items in history.items():
        sent = [i for i in items if i["status"] in ("sent", "bounced") and not i["internal"]]
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
            # The inbox's notes to the account manager are internal and go out at once.
            if i["status"] != "sent" or i["message"] == "inbox_account_manager_note":
                continue
            local = i["queued_at"].astimezone(ZoneInfo(i["time_zone"]))
            assert WEEKDAYS[local.weekday()] in window.days, (key, local)
            assert window.start <= local.time() < window.end, (key, local)
            assert local.date() not in window.holidays, (key, local)
            checked += 1
    assert checked > 100


def test_demo_report_shows_what_was_sent_to_whom(demo: DemoResult) -> None:
    lines = report_lines(demo)
    text = "\n".join(lines)
    # 24 in the CSV, 26 assigned in its tenant: sync's count stands.
    assert "CUST-0001 Contoso Dental Ltd [26 licences, completed]" in text
    assert "  Mon 30 Nov 12:00  kickoff -> sarah.jones@contosodental.example" in text
    assert f"{len(demo.received)} messages accepted by the sandbox Graph" in text
    assert "duplicates: 0; failed: 0." in text
    assert "status --now 2026-12-30T00:00" in text


# -- issue 13: stages move by sync wherever Microsoft sees the change ---------------------------


def _events(demo: DemoResult) -> list[tuple[str, str, str, str]]:
    db = open_database(demo.database_url)
    with db.session() as s:
        rows = s.exec(
            select(Customer.key, StageEvent.to_stage, StageEvent.by, StageEvent.note)
            .join(Customer, col(Customer.id) == col(StageEvent.customer_id))
            .where(col(StageEvent.kind) == "stage").order_by(col(StageEvent.id))
        ).all()
    db.dispose()
    return [(k, str(to), by, note) for k, to, by, note in rows]


def test_stages_microsoft_sees_are_moved_by_sync_the_rest_by_hand(demo: DemoResult) -> None:
    keys = sorted({k for k, *_ in _events(demo)})
    steps = scenario(keys)
    accepted = set().union(*(s.keys for s in steps if s.action == "accept_relationship"))
    cancelled = set().union(*(s.keys for s in steps if s.action == "cancel_direct"))
    unverified = demo.cast.unverified
    assert unverified in cancelled and len(accepted) >= 10
    by = {(k, to): b for k, to, b, _ in _events(demo)}
    for key in accepted:
        assert by[(key, "approved")].startswith("sync:"), key
        assert by[(key, "awaiting_cancellation")] == "sync:partner_center", key
    for key in cancelled - {unverified}:
        assert by[(key, "completed")] == "sync:tenant", key
    # The partner's own decisions, and nothing Microsoft would see, are set by hand.
    hand = {to for (_, to), b in by.items() if b == "demo"}
    assert hand == {"announced", "invited", "completed"}, hand
    assert [k for (k, to), b in by.items() if b == "demo" and to == "completed"] == [unverified]
    # Every sync move names its evidence.
    assert all("evidence #" in note for _, _, b, note in _events(demo) if b.startswith("sync:"))
    assert {k for _, k, _ in demo.sync_moves} == accepted


def test_a_tenant_without_consent_cannot_be_verified(
    demo: DemoResult, history: dict[str, list[dict[str, Any]]]
) -> None:
    unverified = demo.cast.unverified
    assert unverified is not None
    assert list(demo.cannot_verify) == [unverified]
    assert "no consent" in demo.cannot_verify[unverified]
    # Its completion rests on its word, not on an observation: the email stays conditional.
    done = [i for i in history[unverified] if i["message"] == "transition_complete"]
    assert len(done) == 1
    assert "We can see that the old Microsoft 365 subscription" not in done[0]["record"]["html"]
    seen = [i for k in history if k != unverified for i in history[k]
            if i["message"] == "transition_complete" and i["locale"] == "en"]
    assert seen and all("We can see that the old Microsoft 365 subscription"
                        in i["record"]["html"] for i in seen)
    lines = "\n".join(report_lines(demo))
    assert f"Cannot verify in its tenant: {unverified}" in lines


def test_licences_come_from_the_tenant_and_change_the_route(
    demo: DemoResult, history: dict[str, list[dict[str, Any]]]
) -> None:
    settings = load_settings(env={})
    key = demo.cast.recount
    assert key is not None
    before, after = demo.licence_changes[key]
    threshold = settings.partner.licence_threshold
    assert before < threshold <= after  # the CSV's count would have taken the other route
    assert list(demo.licence_changes) == [key]
    cancel = next(i for i in history[key] if i["message"] == "cancel_instructions")
    html = cancel["record"]["html"]
    assert str(after) in html and settings.partner.support_url in html
    assert settings.partner.billing_url not in html


# -- issue 14: one bounce and one reply handled --------------------------------------------------


def test_the_bounce_suppresses_the_address_and_tells_the_account_manager(
    demo: DemoResult, history: dict[str, list[dict[str, Any]]]
) -> None:
    from comms.inbox.service import NOTE_MESSAGE
    from comms.store.models import Suppression

    key, dead = demo.cast.bounce, demo.dead
    assert key is not None and dead
    db = open_database(demo.database_url)
    with db.session() as s:
        sup = s.get(Suppression, dead)
        assert sup is not None and sup.reason == "bounce"
    db.dispose()
    items = history[key]
    bounced = [i for i in items if i["status"] == "bounced"]
    assert len(bounced) == 1 and dead in bounced[0]["record"]["to"]
    after = [i for i in items if i["queued_at"] > bounced[0]["queued_at"] and not i["internal"]
             and i["status"] == "sent"]
    assert after, "the customer's other address keeps getting its emails"
    assert all(dead not in i["record"]["to"] + i["record"]["cc"] for i in after)
    notes = [i for i in items if i["message"] == NOTE_MESSAGE]
    assert len(notes) == 1 and notes[0]["status"] == "sent"
    assert notes[0]["record"]["to"] == [notes[0]["am"]]
    assert ("bounce", key) in {(kind, k) for _, kind, k in demo.inbound}


def test_the_reply_holds_the_reminders(
    demo: DemoResult, history: dict[str, list[dict[str, Any]]]
) -> None:
    from comms.store.inbox_models import InboundMessage, InboxCustomerState

    key = demo.cast.unverified
    assert key is not None
    db = open_database(demo.database_url)
    with db.session() as s:
        customer = s.exec(select(Customer).where(col(Customer.key) == key)).one()
        replies = s.exec(select(InboundMessage).where(
            col(InboundMessage.customer_id) == customer.id)).all()
        assert [r.kind for r in replies] == ["reply"]
        assert "reminders held" in replies[0].effects
        state = s.get(InboxCustomerState, customer.id)
        assert state is not None and state.reminders_held_until is not None
    db.dispose()
    # The others who got cancellation instructions with it were reminded; it was not.
    names = [i["message"] for i in history[key] if i["status"] == "sent"]
    assert "cancel_instructions" in names and "cancel_reminder" not in names
    fast = [k for k in sorted(history)[: len(history) // 2] if k != key]
    assert all("cancel_reminder" in [i["message"] for i in history[k]] for k in fast)
    assert [kind for _, kind, _ in demo.inbound] == ["bounce", "reply"]


def test_the_bounce_and_the_reply_are_dated_on_the_simulated_timeline(
    demo: DemoResult,
) -> None:
    """The sandbox's Inbox runs on the demo's clock: the NDR arrives minutes after the message
    it reports, the reply after the email it answers, both inside the simulated month and
    before the run that read them."""
    from comms.services.demo import NDR_DELAY, RUN_EVERY, START
    from comms.store.inbox_models import InboundMessage

    db = open_database(demo.database_url)
    with db.session() as s:
        rows = s.exec(select(InboundMessage).order_by(col(InboundMessage.id))).all()
        answered = {m.id: m for m in s.exec(select(Message).where(col(Message.id).in_(
            [r.message_id for r in rows if r.message_id is not None])))}
    db.dispose()
    assert [r.kind for r in rows] == ["bounce", "reply"]
    for row in rows:
        assert row.received_at is not None and row.message_id in answered
        sent = answered[row.message_id].sent_at
        assert sent is not None
        assert START <= sent < row.received_at <= row.processed_at
        assert row.processed_at <= demo.ended_at + RUN_EVERY
    bounce, reply = rows
    assert bounce.received_at - answered[bounce.message_id].sent_at <= NDR_DELAY
    replied_at = next(at for at, what in demo.steps if "replied" in what)
    assert replied_at <= reply.received_at < replied_at + timedelta(minutes=1)
