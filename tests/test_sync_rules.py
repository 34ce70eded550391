"""What stage sync moves, and what it does not: one stage per sync, never past approved before
its lose_access_warning went out, completed only for a cancelled direct subscription, a routine
forward move by hand is no correction, and a customer whose CSP subscription or reseller
relationship is gone is reported and gets no cancel mail. End to end over HTTPS against the
sandbox, with the real msal and requests; the pure rule directly."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select
from test_sync_guesses import (
    BASE,
    TENANT_X,
    _import,
    _Info,
    _row,
    _world,
    awaiting_cancellation,
    completed_on_suspended,
)

from comms.campaign import load_campaign
from comms.sandbox import Sandbox
from comms.services.customers import set_stage
from comms.store import repo
from comms.store.db import Database
from comms.store.models import Message
from comms.sync.rules import Facts, SyncRules, decide


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch)


def _messages(db: Database) -> list[tuple[str, str]]:
    with db.session() as s:
        return [(m.message, m.status) for m in s.exec(select(Message).order_by(col(Message.id)))]


def _at(hours: float) -> str:
    return (BASE + timedelta(hours=hours)).isoformat()


# -- 1. one stage per sync; approved's lose_access_warning goes out before moving on ----------


def test_accepted_and_provisioned_between_two_syncs_still_gets_the_lose_access_warning(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """The customer accepts and the partner provisions CSP within one cron interval: sync moves
    it to approved only, waits until lose_access_warning went out, then moves it on."""
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30,
                              assigned=26)
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "invited", "")])
    assert cli("run", "--sync", "--now", _at(0)).exit_code == 0
    world.tenant_change(TENANT_X, "accept_relationship")
    world.tenant_change(TENANT_X, "activate_csp", quantity=30)
    r = cli("sync", "--now", _at(4))
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "approved"
    # Not planned yet: a second sync before the run waits for it (a move would withdraw it).
    r = cli("sync", "--now", _at(4.5), "--json")
    data = json.loads(r.stdout)["customers"][0]
    assert _row(db, "A").stage == "approved"
    assert data["status"] == "held"
    assert data["held"].startswith("waiting for lose_access_warning to be sent")
    r = cli("run", "--sync", "--now", _at(5))
    assert r.exit_code == 0, r.output
    assert ("lose_access_warning", "sent") in _messages(db), r.output
    assert _row(db, "A").stage == "approved"  # the run's sync came before its sending
    r = cli("run", "--sync", "--now", _at(6))
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "awaiting_cancellation"
    sent = [m for m, status in _messages(db) if status == "sent"]
    assert sent.index("lose_access_warning") < sent.index("cancel_instructions"), sent


def test_a_queued_stage_message_is_waited_for_and_one_never_sent_does_not_block() -> None:
    from comms.sync.rules import StageMessage

    rules = SyncRules()
    info = _Info()
    info.stage = "approved"
    names = ("invited", "approved", "awaiting_cancellation", "completed")
    allowed = {"approved": ("awaiting_cancellation",),
               "awaiting_cancellation": ("completed",)}
    facts = Facts(relationship_accepted=True, csp_active=True, direct_status="Suspended")

    def run(state: str) -> Any:
        return decide(names, allowed, rules, info, facts, manual_at=None, evidence_at={},
                      stage_message=StageMessage("lose_access_warning", state))

    waiting = run("queued")
    assert waiting.moves == () and waiting.held.startswith(
        "waiting for lose_access_warning to be sent (queued)")
    # Sent: one stage on (completed is observed too, but waits for the next sync).
    assert run("sent").moves == (("approved", "awaiting_cancellation", "csp_active"),)
    for state in ("failed", "withdrawn by an operator", "no contact it may go to"):
        moved = run(state)
        assert moved.moves == (("approved", "awaiting_cancellation", "csp_active"),)
        assert f"lose_access_warning was never sent ({state})" in moved.held


# -- 2. completed only when the direct subscription is cancelled ------------------------------


@pytest.mark.parametrize(("status", "stage"), [
    ("Warning", "awaiting_cancellation"), ("LockedOut", "awaiting_cancellation"),
    ("Suspended", "completed"), ("Deleted", "completed"), ("absent", "completed"),
])
def test_completed_only_for_a_cancelled_direct_subscription(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, status: str, stage: str
) -> None:
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30,
                              assigned=26)
    world.tenant_change(TENANT_X, "accept_relationship")
    world.tenant_change(TENANT_X, "activate_csp", quantity=30)
    world.tenant_change(TENANT_X, "direct_status", status=status)
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30,
                             "awaiting_cancellation", "")])
    r = cli("sync", "--now", _at(1))
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == stage, r.output


# -- 3. a routine forward move by hand is no correction ---------------------------------------


def test_a_routine_forward_move_by_hand_does_not_hold_an_accepted_customer(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    # `customers set-stage` records the real time, so sync runs around it.
    now = datetime.now(UTC)
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    world.tenant_change(TENANT_X, "accept_relationship")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "announced", "")],
            now - timedelta(hours=2))
    assert cli("sync", "--now", (now - timedelta(hours=1)).isoformat()).exit_code == 0
    assert _row(db, "A").stage == "announced"  # announced -> approved is not allowed
    r = cli("customers", "set-stage", "A", "invited", "--yes")
    assert r.exit_code == 0, r.output
    r = cli("sync", "--now", (now + timedelta(hours=1)).isoformat())
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "approved", r.output
    # Moved back by hand (a correction): that holds until Partner Center says something new.
    r = cli("customers", "set-stage", "A", "invited", "--force", "--note", "not yet", "--yes")
    assert r.exit_code == 0, r.output
    r = cli("sync", "--now", (now + timedelta(hours=2)).isoformat())
    assert _row(db, "A").stage == "invited" and "set by hand" in r.output


def test_a_forward_move_by_hand_after_a_correction_keeps_the_correction(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """Sync completed the customer on a Suspended subscription (suspended for non-payment, not
    cancelled); the operator corrects in two steps: back to approved, then on to
    awaiting_cancellation. The second move is forward, but it finishes the correction: the
    next sync must not complete the customer again on the evidence the operator rejected."""
    now = completed_on_suspended(world, db, cli, tmp_path)
    for stage, extra in (("approved", ("--force",)), ("awaiting_cancellation", ())):
        r = cli("customers", "set-stage", "A", stage, *extra, "--note", "not cancelled", "--yes")
        assert r.exit_code == 0, r.output
    r = cli("sync", "--now", (now + timedelta(hours=1)).isoformat())
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "awaiting_cancellation" and "set by hand" in r.output
    # Cancelled anew after the correction (paid and reactivated, then cancelled for real) moves
    # it on as usual.
    world.tenant_change(TENANT_X, "direct_status", status="Enabled")
    assert cli("sync", "--now", (now + timedelta(hours=1.5)).isoformat()).exit_code == 0
    world.tenant_change(TENANT_X, "direct_status", status="Deleted")
    r = cli("sync", "--now", (now + timedelta(hours=2)).isoformat())
    assert _row(db, "A").stage == "completed", r.output


# -- 4. a CSP subscription or reseller relationship gone needs a person -----------------------


def test_csp_subscription_gone_is_reported_and_no_cancel_mail_goes(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    awaiting_cancellation(world, cli, tmp_path, licences=30)
    assert cli("run", "--sync", "--now", _at(0)).exit_code == 0
    assert ("cancel_instructions", "sent") in _messages(db)
    world.tenant_change(TENANT_X, "csp_status", status="deleted")
    world.tenant_change(TENANT_X, "direct_status", status="Suspended")
    r = cli("sync", "--now", _at(24), "--json")
    data = json.loads(r.stdout)["customers"][0]
    assert data["status"] == "needs attention", data
    assert "no active CSP subscription" in data["problem"] and "deleted" in data["problem"]
    for day in (2, 3, 5, 6, 8, 9, 10):
        assert cli("run", "--sync", "--now", _at(24 * day)).exit_code == 0
    assert _row(db, "A").stage == "awaiting_cancellation"  # neither back nor on to completed
    assert not [m for m, _ in _messages(db) if m == "cancel_reminder"], _messages(db)
    r = cli("status")
    assert "Need attention: 1 customer(s)" in r.output and "no active CSP" in r.output, r.output
    # The CSP subscription is back: reported no more, and the customer moves on.
    world.tenant_change(TENANT_X, "csp_status", status="active")
    r = cli("sync", "--now", _at(24 * 11), "--json")
    data = json.loads(r.stdout)["customers"][0]
    assert data["status"] == "moved" and _row(db, "A").stage == "completed", data


def test_attention_lasts_through_a_partner_center_outage_and_a_sync_of_other_sources(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """Not reading Partner Center again is no sign the CSP subscription came back: while it is
    not read (an outage, `--source tenant`), no cancel reminder goes and nothing moves."""
    awaiting_cancellation(world, cli, tmp_path, licences=30)
    assert cli("run", "--sync", "--now", _at(0)).exit_code == 0
    world.tenant_change(TENANT_X, "csp_status", status="deleted")
    data = json.loads(cli("sync", "--now", _at(24), "--json").stdout)["customers"][0]
    assert data["status"] == "needs attention", data
    world.tenant_change(TENANT_X, "direct_status", status="Suspended")
    assert cli("sync", "--source", "tenant", "--now", _at(30)).exit_code == 0
    assert _row(db, "A").stage == "awaiting_cancellation"
    world.set_sync_faults(pc_error_rate=1.0, seed=1)
    for day in (2, 3, 5, 6, 8, 9):
        cli("run", "--sync", "--now", _at(24 * day))
    assert _row(db, "A").stage == "awaiting_cancellation"
    assert not [m for m, _ in _messages(db) if m == "cancel_reminder"], _messages(db)
    r = cli("status")
    assert "Need attention: 1 customer(s)" in r.output and "no active CSP" in r.output, r.output
    assert r.output.count("not read again") <= 1


def test_relationship_gone_is_reported(world: Sandbox, db: Database, cli: Any,
                                       tmp_path: Path) -> None:
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    world.tenant_change(TENANT_X, "accept_relationship")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "invited", "")])
    assert cli("sync", "--now", _at(0)).exit_code == 0
    assert _row(db, "A").stage == "approved"
    world._core.tenants.customers[TENANT_X].relationship = False  # the customer removed it
    r = cli("sync", "--now", _at(1))
    assert r.exit_code == 0, r.output
    assert "needs attention" in r.output and "no longer lists" in r.output, r.output
    assert "1 need attention" in r.output
    assert cli("run", "--now", _at(2)).exit_code == 0
    assert _messages(db) == [], "lose_access_warning planned for a customer that left"
    assert _row(db, "A").stage == "approved"


def test_a_correction_committed_while_sync_records_holds(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, database_url: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator corrects a stage while sync is recording. On PostgreSQL another
    transaction can commit meanwhile: sync read the hand-made corrections before it locked the
    customer rows, so it saw the new stage without the correction that holds it and completed
    the customer again at once. On SQLite no other writer can commit while sync records (shown
    here), so the correction lands after it. The test wraps the row lock to act exactly then
    (the lock itself is real)."""
    postgres = database_url.startswith("postgresql")
    completed_on_suspended(world, db, cli, tmp_path)
    real, fired = repo.get_customers, []

    def correct() -> None:
        set_stage(db, load_campaign(), ["A"], "awaiting_cancellation", now=datetime.now(UTC),
                  by="operator", note="not cancelled", force=True)

    def meanwhile(session: Any, keys: Any, *, lock: bool = False) -> Any:
        if lock and not fired:
            fired.append(True)
            if postgres:
                correct()  # another connection of the pool, its own transaction
            else:
                path = database_url.removeprefix("sqlite:///")
                other = sqlite3.connect(path, timeout=0)
                try:
                    with pytest.raises(sqlite3.OperationalError, match="locked"):
                        other.execute("BEGIN IMMEDIATE")
                finally:
                    other.close()
        return real(session, keys, lock=lock)

    monkeypatch.setattr(repo, "get_customers", meanwhile)
    r = cli("sync", "--now", (datetime.now(UTC) + timedelta(seconds=1)).isoformat())
    assert fired and r.exit_code == 0, r.output
    if not postgres:
        assert _row(db, "A").stage == "completed"  # nothing could commit meanwhile
        correct()
        r = cli("sync", "--now", (datetime.now(UTC) + timedelta(seconds=2)).isoformat())
    assert _row(db, "A").stage == "awaiting_cancellation" and "set by hand" in r.output
