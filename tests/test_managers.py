"""Manager figures (issue 15): reached funnel, durations, double billing incurred to date."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from test_status import NOW
from wave_ledger import ANN, AUTUMN, BOB, CY, PILOT, SPRING, build_wave_ledger

from comms.campaign import load_campaign
from comms.services import demo
from comms.services.managers import compute_manager_report, percentile
from comms.store.db import Database, open_database
from comms.store.models import Customer, StageEvent

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def _customer(s: object, key: str, stage: str, licences: int, manager: str,
              moves: list[tuple[str, float]], live_day: float | None,
              email: str | None = "") -> None:
    c = Customer(key=key, name=key, licences=licences, stage=stage,
                 stage_entered_at=T0 + timedelta(days=moves[-1][1]),
                 account_manager_name=manager or None,
                 account_manager_email=f"{manager}@p.example" if email == "" else email,
                 csp_live_at=None if live_day is None else T0 + timedelta(days=live_day),
                 created_at=T0, updated_at=T0)
    s.add(c)  # type: ignore[attr-defined]
    s.flush()  # type: ignore[attr-defined]
    for to, day in moves:
        s.add(StageEvent(customer_id=c.id, kind="stage", to_stage=to,  # type: ignore[attr-defined]
                         at=T0 + timedelta(days=day), source="test"))


def test_incurred_cost_matches_a_hand_computation_for_three_customers(db: Database) -> None:
    campaign = load_campaign()
    now = T0 + timedelta(days=40)
    with db.session() as s:
        # A: live day 10, cancelled day 16 -> 6 days x 30 licences.
        _customer(s, "A", "completed", 30, "ann", [("imported", 0), ("invited", 1),
                  ("approved", 5), ("awaiting_cancellation", 10), ("completed", 16)], 10)
        # B: live day 20 (go-live recorded), still paying at day 40 -> 20 days x 10 licences.
        _customer(s, "B", "awaiting_cancellation", 10, "ann", [("imported", 0), ("invited", 2),
                  ("approved", 4), ("awaiting_cancellation", 20)], 20)
        # C: invited, never accepted: nothing billed twice.
        _customer(s, "C", "invited", 50, "bob", [("imported", 0), ("invited", 3)], None)
    with db.session() as s:
        m = compute_manager_report(s, campaign, now, 12.5)
    a, b = 6 * 30 * 12.5 / 30, 20 * 10 * 12.5 / 30
    assert m.incurred_total == round(a + b, 2) == 158.33
    assert m.exposure_today == round(b, 2)
    assert [f.reached for f in m.funnel] == [3, 3, 3, 2, 2, 1]
    assert m.invitation_to_acceptance.count == 2 and m.invitation_to_acceptance.median_days == 3
    assert m.live_to_cancellation.count == 1 and m.live_to_cancellation.median_days == 6
    by = {g.group: g for g in m.by_account_manager}
    assert by["ann <ann@p.example>"].incurred == round(a + b, 2)
    assert by["bob <bob@p.example>"].incurred == 0 and by["bob <bob@p.example>"].customers == 1
    assert "approved" not in {f.label for f in m.funnel}  # descriptions, not stage names


def test_each_manager_group_carries_its_name_and_address_apart(db: Database) -> None:
    moves = [("imported", 0.0), ("invited", 1.0)]
    with db.session() as s:
        _customer(s, "A", "invited", 5, "Ann <the elder>", moves, None, "ann@p.example")
        _customer(s, "B", "invited", 5, "", moves, None, "desk@p.example")
        _customer(s, "C", "invited", 5, "Cy", moves, None, None)
        _customer(s, "D", "invited", 5, "", moves, None, None)
    with db.session() as s:
        m = compute_manager_report(s, load_campaign(), T0 + timedelta(days=2), 12.5)
    got = [(g.group, g.name, g.email, g.customers) for g in m.by_account_manager]
    assert got == [
        ("(no account manager)", "(no account manager)", "", 1),
        ("<desk@p.example>", "", "desk@p.example", 1),
        ("Ann <the elder> <ann@p.example>", "Ann <the elder>", "ann@p.example", 1),
        ("Cy", "Cy", "", 1),
    ]


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([float(i) for i in range(1, 11)], 0.9) == 9.1


def test_reached_funnel_never_rises_on_the_demo_data(tmp_path: Path) -> None:
    result = demo.run_demo(tmp_path / "work", echo=lambda _line: None)
    db = open_database(result.database_url)
    try:
        with db.session() as s:
            m = compute_manager_report(s, load_campaign(), result.ended_at, 12.5)
    finally:
        db.dispose()
    counts = [f.reached for f in m.funnel]
    assert counts[0] > 0 and all(a >= b for a, b in itertools.pairwise(counts))
    assert counts[-1] > 0  # the demo completes customers: the funnel is not trivially flat
    for wave in m.by_wave:
        w = [f.reached for f in wave.funnel]
        assert all(a >= b for a, b in itertools.pairwise(w))


def test_per_wave_reached_conversion_and_inbox_counts(db: Database) -> None:
    """Hand-computed in tests/wave_ledger.py: one wave converts below 100 % at three steps and
    has two bounces (one hard) and a reply; a customer in two waves counts in both."""
    build_wave_ledger(db)
    with db.session() as s:
        m = compute_manager_report(s, load_campaign(), NOW, 12.5)
    waves = {g.group: g for g in m.by_wave}
    assert list(waves) == [AUTUMN, PILOT, SPRING]  # sorted; the untagged customer in none
    spring, autumn, pilot = waves[SPRING], waves[AUTUMN], waves[PILOT]
    assert [f.reached for f in spring.funnel] == [4, 3, 3, 2, 2, 1]
    assert [f.conversion for f in spring.funnel] == [None, 0.75, 1.0, 0.6667, 1.0, 0.5]
    assert [f.reached for f in autumn.funnel] == [3, 3, 3, 3, 1, 1]
    assert [f.conversion for f in autumn.funnel] == [None, 1.0, 1.0, 1.0, 0.3333, 1.0]
    assert [f.reached for f in pilot.funnel] == [1, 0, 0, 0, 0, 0]
    assert [f.conversion for f in pilot.funnel] == [None, 0.0, None, None, None, None]
    assert (spring.customers, spring.bounces, spring.hard_bounces, spring.replies) == (
        4, 2, 1, 1)
    assert (autumn.customers, autumn.bounces, autumn.hard_bounces, autumn.replies) == (
        3, 0, 0, 0)
    assert (pilot.bounces, pilot.replies) == (0, 0)
    # Overall, the same code over all eight customers (furthest stages 5, 4, 2, 0, 3, 3, 0, 4).
    assert [f.reached for f in m.funnel] == [8, 6, 6, 5, 3, 1]
    assert [f.conversion for f in m.funnel] == [None, 0.75, 1.0, 0.8333, 0.6, 0.3333]
    managers = {g.group.split(" <")[0]: g for g in m.by_account_manager}
    assert (managers[ANN[0]].bounces, managers[ANN[0]].replies) == (1, 0)
    assert (managers[BOB[0]].bounces, managers[BOB[0]].hard_bounces,
            managers[BOB[0]].replies) == (1, 0, 1)
    assert managers[CY[0]].replies == 1  # U1's reply: an account manager, no wave


def test_a_completion_undone_by_a_move_back_neither_completes_nor_stops_the_billing(
        db: Database, cli: Any) -> None:
    """docs/reporting.md: incurred runs "to now while still in the CSP-live stage", and the
    completion rate is the share completed. A customer marked completed by mistake and forced
    back to awaiting_cancellation was counted completed (100 %) and its incurred cost stopped
    at the mistaken completion, below today's exposure."""
    live = [("imported", 0.0), ("invited", 1.0), ("approved", 5.0),
            ("awaiting_cancellation", 10.0)]
    with db.session() as s:
        # D: completed by mistake on day 16, forced back on day 20, still paying on day 40.
        _customer(s, "D", "awaiting_cancellation", 10, "ann",
                  [*live, ("completed", 16), ("awaiting_cancellation", 20)], 10)
        # E: the same mistake on day 12, back on day 14, really cancelled on day 25.
        _customer(s, "E", "completed", 6, "ann",
                  [*live, ("completed", 12), ("awaiting_cancellation", 14), ("completed", 25)],
                  10)
    data = json.loads(cli("status", "--json", "--now",
                          (T0 + timedelta(days=40)).isoformat()).stdout)
    m = data["managers"]
    d, e = 30 * 10 * 12.5 / 30, 15 * 6 * 12.5 / 30
    assert data["exposure_total"] == m["exposure_today"] == d == 125.0
    assert m["incurred_total"] == round(d + e, 2) == 162.5
    assert (m["live_to_cancellation"]["count"], m["live_to_cancellation"]["median_days"]) == \
        (1, 15)
    [ann] = m["by_account_manager"]
    assert (ann["customers"], ann["completed_rate"], ann["incurred"]) == (2, 0.5, 162.5)
    assert data["completed"] == 1
    # The reached funnel counts the furthest stage ever reached (the audit trail): D reached
    # completed once, so the step stays at 2; only the completion rate says who is done now.
    assert [f["reached"] for f in m["funnel"]][-1] == 2
