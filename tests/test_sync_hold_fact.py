"""A stage corrected by hand holds until the fact behind the move begins after the correction,
not until its source sees anything new: one more licence assigned while the old subscription
still reads Suspended does not complete the customer again (nor send "transition complete");
the subscription read Enabled after the correction and Suspended again does. End to end over
HTTPS against the sandbox, with the real msal and requests; the onset of a fact (``onsets``)
and the hold (``decide``) directly."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select
from test_sync_guesses import (
    ALLOWED,
    NAMES,
    SUSPENDED,
    TENANT_X,
    _Info,
    _row,
    _stage_events,
    _world,
    completed_on_suspended,
)

from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.models import Message
from comms.store.sync_models import SyncEvidence
from comms.sync.ledger import facts_of
from comms.sync.rules import Facts, SyncRules, decide, onsets

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch)


def _tenant_evidence(db: Database) -> list[SyncEvidence]:
    with db.session() as s:
        rows = list(s.exec(select(SyncEvidence).where(col(SyncEvidence.source) == "tenant")
                           .order_by(col(SyncEvidence.id))).all())
        s.expunge_all()
        return rows


def _set_back(cli: Any) -> None:
    """The operator: Suspended is a suspension for non-payment, not a cancellation."""
    r = cli("customers", "set-stage", "A", "awaiting_cancellation", "--force", "--note",
            "suspended for non-payment, not cancelled", "--yes")
    assert r.exit_code == 0, r.output


def _sync(cli: Any, at: datetime) -> dict[str, Any]:
    r = cli("sync", "--now", at.isoformat(), "--json")
    assert r.exit_code == 0, r.output
    customer: dict[str, Any] = json.loads(r.stdout)["customers"][0]
    return customer


# -- 1. end to end ----------------------------------------------------------------------------


def test_a_licence_assigned_while_still_suspended_does_not_undo_the_correction(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """It did: the tenant's evidence changed (assigned 26 -> 27), and that alone lifted the
    hold: sync completed the customer again at once and the run sent "transition complete"."""
    now = completed_on_suspended(world, db, cli, tmp_path)
    _set_back(cli)
    world.tenant_change(TENANT_X, "assigned", count=27)  # still Suspended
    data = _sync(cli, now + timedelta(hours=1))
    evidence = _tenant_evidence(db)
    # The change is recorded (new evidence, the licence count from reality) ...
    assert len(evidence) == 2 and '"assigned": 27' in evidence[-1].seen_json
    assert data["licences"] == [26, 27]
    # ... but the customer is not moved, and the report says why and until when.
    assert _row(db, "A").stage == "awaiting_cancellation", data
    assert data["status"] == "held" and data["moved"] == []
    assert "set by hand" in data["held"], data
    assert "it stands until tenant sees direct_inactive begin again" in data["held"]
    # A scheduled run (sync, plan, send) with yet another licence assigned: still no
    # completion, so no "transition complete" email is planned.
    world.tenant_change(TENANT_X, "assigned", count=28)
    r = cli("run", "--sync", "--now", (now + timedelta(hours=2)).isoformat())
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "awaiting_cancellation", r.output
    assert len(_tenant_evidence(db)) == 3
    with db.session() as s:
        planned = set(s.exec(select(Message.message)).all())
    assert "transition_complete" not in planned, planned
    assert not [m for m in world.sent() if (m.get("subject") or "").startswith("Done:")]


def test_the_old_subscription_suspended_again_after_the_correction_moves_it(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    now = completed_on_suspended(world, db, cli, tmp_path)
    _set_back(cli)
    world.tenant_change(TENANT_X, "assigned", count=27)
    assert _sync(cli, now + timedelta(hours=1))["status"] == "held"
    # The subscription is reactivated (paid) after the correction: direct_inactive is false ...
    world.tenant_change(TENANT_X, "direct_status", status="Enabled")
    data = _sync(cli, now + timedelta(hours=2))
    assert _row(db, "A").stage == "awaiting_cancellation" and data["status"] == "seen", data
    # ... and true again once it is suspended (cancelled) again: that fact began after the
    # correction, so sync moves the customer, citing that evidence.
    world.tenant_change(TENANT_X, "direct_status", status="Suspended")
    data = _sync(cli, now + timedelta(hours=3))
    assert _row(db, "A").stage == "completed", data
    assert data["moved"] == ["awaiting_cancellation -> completed (direct_inactive)"]
    newest = _tenant_evidence(db)[-1]
    assert '"Suspended"' in newest.seen_json
    last = _stage_events(db, "A")[-1]
    assert last.by == "sync:tenant" and f"evidence #{newest.id})" in (last.note or "")


# -- 2. the onset of a fact in its source's evidence (pure) -----------------------------------


def _tenant(status: str, assigned: int = 26) -> dict[str, Any]:
    return {"id": "d1", "sku": "ENTERPRISEPACK", "status": status, "total": 30,
            "assigned": assigned, "tenant_id": TENANT_X}


def _pc(listed: bool = True, quantity: int = 30) -> dict[str, Any]:
    return {"listed": listed, "subscriptions": [
        {"id": "c1", "status": "active", "billing": "license", "quantity": quantity}]}


def _onsets(history: list[tuple[str, datetime, dict[str, Any]]]) -> dict[str, datetime]:
    return onsets(history, facts_of, SyncRules())


def test_the_onset_is_the_start_of_the_latest_run_in_which_the_fact_is_true() -> None:
    history = [
        ("tenant", _h(0), _tenant("Suspended")),
        ("partner_center", _h(0), _pc()),
        ("tenant", _h(1), _tenant("Enabled")),         # not cancelled: the run breaks
        ("partner_center", _h(1.5), _pc(quantity=31)),  # another source: no break
        ("tenant", _h(2), _tenant("Suspended")),
        ("tenant", _h(3), _tenant("Suspended", assigned=27)),  # something else changed
        ("tenant", _h(4), _tenant("Deleted")),          # still cancelled: the same run
    ]
    assert _onsets(history) == {"direct_inactive": _h(2), "relationship_accepted": _h(0),
                                "csp_active": _h(0)}
    # Continuously true since the first reading: its onset is that reading.
    assert _onsets([("tenant", _h(0), _tenant("Suspended")),
                    ("tenant", _h(1), _tenant("Suspended", assigned=27))]) == {
        "direct_inactive": _h(0)}


def test_no_onset_for_a_fact_false_in_its_latest_evidence_or_never_seen() -> None:
    assert _onsets([]) == {}
    assert _onsets([("tenant", _h(0), _tenant("Suspended")),
                    ("tenant", _h(1), _tenant("Enabled"))]) == {}
    # Several direct products, none known to be the old one: no claim, so no fact either.
    assert _onsets([("tenant", _h(0), _tenant("Suspended")),
                    ("tenant", _h(1), {"status": "unknown", "several": ["A", "B"]})]) == {}
    # Partner Center no longer lists the customer: the relationship's run ends there.
    assert _onsets([("partner_center", _h(0), _pc()),
                    ("partner_center", _h(1), {"listed": False})]) == {}
    # An unreadable row (recorded as {}) ends a run rather than extending it.
    assert _onsets([("tenant", _h(0), _tenant("Suspended")), ("tenant", _h(1), {}),
                    ("tenant", _h(2), _tenant("Suspended"))]) == {"direct_inactive": _h(2)}


def test_the_onset_of_an_observation_is_its_own_sources_fact() -> None:
    """GDAP active counts only while Partner Center lists the customer (or was not read); its
    onset is still when the GDAP relationship became active, whatever Partner Center said."""
    history = [("partner_center", _h(0), {"listed": False}),
               ("gdap", _h(0), {"status": "active"}),
               ("partner_center", _h(2), _pc())]
    assert _onsets(history) == {"gdap_active": _h(0), "relationship_accepted": _h(2),
                                "csp_active": _h(2)}


# -- 3. the hold (pure) -----------------------------------------------------------------------


def _decide(info: Any, facts: Facts, **kw: Any) -> Any:
    allowed = {**ALLOWED, "invited": ("approved",)}
    return decide(NAMES, allowed, SyncRules(), info, facts, **kw)


def test_a_fact_true_since_before_the_correction_holds_whatever_its_source_saw_since() -> None:
    manual = _h(1)
    kw: dict[str, Any] = {"manual_at": manual, "first_at": {"tenant": _h(0)},
                          "evidence_at": {"tenant": _h(2)}}  # new tenant evidence after it
    held = _decide(_Info(), SUSPENDED, **kw, onset={"direct_inactive": _h(0)})
    assert held.moves == ()
    assert held.held == (
        "stage 'awaiting_cancellation' was set by hand at 2026-12-01 11:00, after the tenant "
        "evidence of direct_inactive (true in its evidence since 2026-12-01 10:00); it stands "
        "until tenant sees direct_inactive begin again (set the stage by hand again to change "
        "it now)")
    # No onset known (a caller that read no history): held, never moved on a guess.
    assert _decide(_Info(), SUSPENDED, **kw).moves == ()
    moved = _decide(_Info(), SUSPENDED, **kw, onset={"direct_inactive": _h(2)})
    assert moved.moves == (("awaiting_cancellation", "completed", "direct_inactive"),)
    # Without a correction by hand, onsets do not matter: nothing changed there.
    assert _decide(_Info(), SUSPENDED, manual_at=None, evidence_at={"tenant": _h(2)},
                   onset={"direct_inactive": _h(0)}).moves == moved.moves


def test_a_source_first_read_after_the_correction_needs_a_fact_that_begins_after_that() -> None:
    """A source turned on after a correction: its first reading does not undo it, nor does a
    later one in which the same fact is still true; one that begins after it does."""
    info = _Info()
    info.stage = "invited"
    accepted = Facts(relationship_accepted=True, gdap_status="active")
    manual = _h(1)
    first = {"partner_center": _h(0), "gdap": _h(2)}
    kw: dict[str, Any] = {"manual_at": manual, "first_at": first,
                          "evidence_at": {"partner_center": _h(0), "gdap": _h(4)}}
    # gdap active since its first reading (evidence at 2 and 4): held.
    gdap = [("gdap", _h(2), {"status": "active", "id": "r1"}),
            ("gdap", _h(4), {"status": "active", "id": "r2"})]
    onset = onsets([("partner_center", _h(0), _pc()), *gdap], facts_of, SyncRules())
    assert onset["gdap_active"] == _h(2)
    held = _decide(info, accepted, **kw, onset=onset)
    assert held.moves == () and "until gdap sees gdap_active begin again" in held.held
    # Inactive at 3, active again at 4: begun after the first reading, it moves.
    gdap[1:1] = [("gdap", _h(3), {"status": "expired", "id": "r1"})]
    onset = onsets([("partner_center", _h(0), _pc()), *gdap], facts_of, SyncRules())
    assert onset["gdap_active"] == _h(4)
    assert _decide(info, accepted, **kw, onset=onset).moves == (
        ("invited", "approved", "gdap_active"),)
    # A stage set by hand before sync ever saw the customer is no correction to hold: the
    # first evidence after it is a fact that began after it.
    onset = onsets([("partner_center", _h(2), _pc())], facts_of, SyncRules())
    assert _decide(info, Facts(relationship_accepted=True), manual_at=manual,
                   first_at={"partner_center": _h(2)}, evidence_at={"partner_center": _h(2)},
                   onset=onset).moves == (("invited", "approved", "relationship_accepted"),)
