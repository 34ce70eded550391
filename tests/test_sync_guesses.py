"""Stage sync never moves a customer on a guess: a tenant found by domain is judged against the
whole ledger (not the ``--customer``/``--tag`` selection), a stage set by hand stands until the
fact behind the move begins after it in its source's evidence, and "no direct subscription"
comes only from a complete directory read. End to end over HTTPS against the sandbox, with the
real msal and requests; the pure parts directly."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import CLIENT_ID, SECRET, sandbox_env
from sqlmodel import col, select

from comms.campaign import load_campaign
from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.models import Customer, Message, StageEvent
from comms.store.sync_models import SyncEvidence
from comms.sync import clients, service
from comms.sync.ledger import CustomerSync, _record, _Target
from comms.sync.rules import Facts, SyncRules, decide

SENDER = "transition@fabrikam.example"
TENANT_X = "aaaaaaaa-0000-4000-8000-00000000000a"
TENANT_Y = "bbbbbbbb-0000-4000-8000-00000000000b"
ROLES = ("Mail.Send", "Mail.Read", "Organization.Read.All", "DelegatedAdminRelationship.Read.All")
BASE = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)  # a Tuesday, inside the send window
Row = tuple[str, str, str, str, int, str, str]


def _csv(path: Path, rows: list[Row]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "tenant_id", "primary_domain", "licences", "locale",
                    "time_zone", "stage", "tags", "primary_contact_name",
                    "primary_contact_email"])
        for key, name, tid, domain, lic, stage, tags in rows:
            w.writerow([key, name, tid, domain, lic, "en", "Europe/London", stage, tags,
                        f"Admin {key}", f"admin-{key.lower()}@{domain}"])
    return path


def _world(sandbox_factory: Any, tmp_path: Path, database_url: str,
           monkeypatch: pytest.MonkeyPatch, **options: Any) -> Sandbox:
    sb: Sandbox = sandbox_factory(time_scale=0.005, **options)
    env = sandbox_env(sb, tmp_path, database_url, senders=[SENDER], time_scale=0.005,
                      timeout=5.0)
    sb.register_app(CLIENT_ID, secret=SECRET, roles=ROLES)
    env.update({"COMMS_SYNC_PARTNER_CENTER": "true", "COMMS_SYNC_CUSTOMER_TENANTS": "true",
                "COMMS_SYNC_PARTNER_CENTER_URL": sb.base_url, "COMMS_SYNC_MAX_ATTEMPTS": "5"})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return sb


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch)


@pytest.fixture
def paged(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """Graph pages directory/subscriptions one subscription a page."""
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch, directory_page_size=1)


def _import(cli: Any, tmp_path: Path, rows: list[Row], at: datetime = BASE) -> None:
    r = cli("customers", "import", str(_csv(tmp_path / "c.csv", rows)), "--now", at.isoformat())
    assert r.exit_code == 0, r.output


def _row(db: Database, key: str) -> Customer:
    with db.session() as s:
        r = s.exec(select(Customer).where(col(Customer.key) == key)).one()
        s.expunge(r)
        return r


def _stage_events(db: Database, key: str) -> list[StageEvent]:
    cid = _row(db, key).id
    with db.session() as s:
        rows = list(s.exec(select(StageEvent).where(col(StageEvent.customer_id) == cid,
                                                    col(StageEvent.kind) == "stage")).all())
        s.expunge_all()
        return rows


# -- 1. a tenant found by domain is judged against the whole ledger ----------------------------

SHARED = [("A", "Alpha Ltd", TENANT_X, "shared.example", 30, "invited", "wave1"),
          ("B", "Alpha Subsidiary", "", "shared.example", 3, "invited", "wave2")]


def _x_accepted_and_cancelled(world: Sandbox) -> None:
    world.add_customer_tenant(TENANT_X, "shared.example", "Alpha Ltd", direct_licences=30,
                              assigned=26)
    world.tenant_change(TENANT_X, "accept_relationship")
    world.tenant_change(TENANT_X, "activate_csp", quantity=30)
    world.tenant_change(TENANT_X, "direct_status", status="Suspended")


def test_a_customer_selected_alone_never_gets_another_customers_tenant(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    _x_accepted_and_cancelled(world)
    _import(cli, tmp_path, SHARED)
    r = cli("sync", "--customer", "B", "--now", BASE.isoformat(), "--json")
    assert r.exit_code == 0, r.output
    b = _row(db, "B")
    assert (b.tenant_id, b.stage, b.licences) == ("", "invited", 3)
    assert _stage_events(db, "B") == []
    data = json.loads(r.stdout)
    # X is A's, so it is neither B's nor "unmatched"; A itself was not read or moved.
    assert [c["key"] for c in data["customers"]] == ["B"]
    assert _row(db, "A").stage == "invited"


def test_a_tag_limited_run_sync_neither_moves_nor_emails_on_another_customers_tenant(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    _x_accepted_and_cancelled(world)
    _import(cli, tmp_path, SHARED)
    r = cli("run", "--sync", "--tag", "wave2", "--now", BASE.isoformat())
    assert r.exit_code == 0, r.output
    b = _row(db, "B")
    assert (b.tenant_id, b.stage) == ("", "invited")
    with db.session() as s:
        planned = set(s.exec(select(Message.message).where(col(Message.customer_id) == b.id)))
    assert "lose_access_warning" not in planned and all(
        "Alpha Subsidiary" not in (m.get("subject") or "") or "lose" not in m["subject"].lower()
        for m in world.sent())
    assert _stage_events(db, "B") == []


def test_the_whole_ledger_still_matches_the_tenants_owner(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    _x_accepted_and_cancelled(world)
    _import(cli, tmp_path, SHARED)
    r = cli("sync", "--tag", "wave1", "--now", BASE.isoformat())
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "approved"  # one stage per sync
    assert (_row(db, "B").tenant_id, _row(db, "B").stage) == ("", "invited")


def _report() -> service.SyncReport:
    return service.SyncReport(BASE, ("partner_center",), False, [], [], [])


def test_two_ledger_customers_of_one_tenant_are_both_listed_and_reported() -> None:
    """Import does not refuse two customers with one tenant id: when Partner Center lists the
    tenant, both are listed (the relationship is the tenant's) and the report says to fix it.
    It was: the last one held the tenant, the other read as "no longer listed" (needs
    attention, its queued mail withdrawn)."""
    a = _Target(1, "A", "Alpha", TENANT_X, "alpha.example")
    b = _Target(2, "B", "Alpha again", TENANT_X, "alpha.example")
    report, fills = _report(), {}
    listed = [clients.PartnerCustomer(TENANT_X, "alpha.example", "Alpha")]
    assert service._match(listed, [a, b], {1, 2}, report, fills) == {1, 2}
    assert service._match(listed, [a, b], {1}, _report(), {}) == {1}
    (line,) = report.ambiguous
    assert "held by ledger customers A, B" in line and fills == {}


def test_match_fills_only_a_domain_unique_in_the_ledger_and_in_partner_center() -> None:
    a = _Target(1, "A", "Alpha", TENANT_X, "shared.example")
    b = _Target(2, "B", "Alpha Sub", "", "shared.example")
    c = _Target(3, "C", "Gamma", "", "gamma.example")
    report, fills = _report(), {}
    listed = [clients.PartnerCustomer(TENANT_X, "shared.example", "Alpha"),
              clients.PartnerCustomer(TENANT_Y, "gamma.example", "G1"),
              clients.PartnerCustomer("cccccccc-0000-4000-8000-00000000000c", "gamma.example",
                                      "G2")]
    matched = service._match(listed, [a, b, c], {2, 3}, report, fills)
    # X is A's (outside the selection): not B's. Two Partner Center tenants claim gamma: none
    # is guessed to be C's.
    assert matched == set() and fills == {}
    assert len(report.ambiguous) == 2 and all("C" in m for m in report.ambiguous)
    assert report.unmatched == []


# -- 2. a stage set by hand stands until the moving rule's fact begins anew in its source ------

NAMES = ("imported", "announced", "invited", "approved", "awaiting_cancellation", "completed")
ALLOWED = {"awaiting_cancellation": ("completed",)}
SUSPENDED = Facts(relationship_accepted=True, csp_active=True, direct_status="Suspended")


class _Info:
    stage = "awaiting_cancellation"
    paused = opted_out = lost = False


def test_news_from_another_source_does_not_undo_a_stage_set_by_hand() -> None:
    manual = datetime(2026, 12, 2, tzinfo=UTC)
    before, after = manual - timedelta(days=1), manual + timedelta(days=1)
    held = decide(NAMES, ALLOWED, SyncRules(), _Info(), SUSPENDED,  # type: ignore[arg-type]
                  manual_at=manual, evidence_at={"tenant": before, "partner_center": after},
                  onset={"direct_inactive": before, "csp_active": after})
    assert held.moves == () and "set by hand" in held.held and "tenant" in held.held
    moved = decide(NAMES, ALLOWED, SyncRules(), _Info(), SUSPENDED,  # type: ignore[arg-type]
                   manual_at=manual, evidence_at={"tenant": after, "partner_center": before},
                   onset={"direct_inactive": after})
    assert moved.moves == (("awaiting_cancellation", "completed", "direct_inactive"),)


def test_a_manual_correction_survives_an_unrelated_partner_center_change(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    now = completed_on_suspended(world, db, cli, tmp_path)
    r = cli("customers", "set-stage", "A", "awaiting_cancellation", "--force", "--note",
            "suspended for non-payment, not cancelled", "--yes")
    assert r.exit_code == 0, r.output
    world.tenant_change(TENANT_X, "activate_csp", quantity=2)  # news from Partner Center only
    r = cli("sync", "--now", (now + timedelta(hours=1)).isoformat())
    assert _row(db, "A").stage == "awaiting_cancellation", r.output
    assert "set by hand" in r.output
    # The tenant then reports something new that still says "cancelled" (Deleted after
    # Suspended): cancelled all along as far as the rule goes, so the correction stands.
    world.tenant_change(TENANT_X, "direct_status", status="Deleted")
    r = cli("sync", "--now", (now + timedelta(hours=2)).isoformat())
    assert _row(db, "A").stage == "awaiting_cancellation", r.output
    # Cancelled anew after the correction (reactivated, then deleted): that moves it, citing
    # the tenant's new evidence.
    world.tenant_change(TENANT_X, "direct_status", status="Enabled")
    assert cli("sync", "--now", (now + timedelta(hours=3)).isoformat()).exit_code == 0
    world.tenant_change(TENANT_X, "direct_status", status="Deleted")
    r = cli("sync", "--now", (now + timedelta(hours=4)).isoformat())
    assert _row(db, "A").stage == "completed", r.output
    last = _stage_events(db, "A")[-1]
    with db.session() as s:
        newest = s.exec(select(SyncEvidence).where(col(SyncEvidence.source) == "tenant")
                        .order_by(col(SyncEvidence.id).desc())).first()
    assert newest is not None and '"Deleted"' in newest.seen_json
    assert last.by == "sync:tenant" and f"evidence #{newest.id})" in (last.note or "")


def test_a_source_turned_on_after_a_correction_needs_a_second_reading() -> None:
    info = _Info()
    info.stage = "invited"
    accepted = Facts(relationship_accepted=True, gdap_status="active")
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    manual, t2, t3 = t0 + timedelta(hours=1), t0 + timedelta(hours=2), t0 + timedelta(hours=3)
    allowed = {"invited": ("approved",)}
    # Partner Center was seen before the correction; gdap, turned on later, first read at t2.
    first = {"partner_center": t0, "gdap": t2}
    held = decide(NAMES, allowed, SyncRules(), info, accepted,  # type: ignore[arg-type]
                  manual_at=manual, evidence_at={"partner_center": t0, "gdap": t2},
                  first_at=first, onset={"relationship_accepted": t0, "gdap_active": t2})
    assert held.moves == () and "gdap" in held.held
    # Active again after an inactive reading that followed its first one: that moves it.
    moved = decide(NAMES, allowed, SyncRules(), info, accepted,  # type: ignore[arg-type]
                   manual_at=manual, evidence_at={"partner_center": t0, "gdap": t3},
                   first_at=first, onset={"relationship_accepted": t0, "gdap_active": t3})
    assert moved.moves == (("invited", "approved", "gdap_active"),)
    # A stage set by hand before sync ever saw the customer is no correction: first readings
    # move it.
    fresh = decide(NAMES, allowed, SyncRules(), info, accepted,  # type: ignore[arg-type]
                   manual_at=manual, evidence_at={"partner_center": t2}, first_at={
                       "partner_center": t2}, onset={"relationship_accepted": t2})
    assert fresh.moves == (("invited", "approved", "relationship_accepted"),)


def test_turning_on_a_source_does_not_undo_a_correction(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    world.tenant_change(TENANT_X, "accept_relationship")
    world.tenant_change(TENANT_X, "gdap", status="active")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "invited", "")],
            now - timedelta(hours=3))
    assert cli("sync", "--now", (now - timedelta(hours=2)).isoformat()).exit_code == 0
    assert _row(db, "A").stage == "approved"
    r = cli("customers", "set-stage", "A", "invited", "--force", "--note",
            "accepted by mistake", "--yes")
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("COMMS_SYNC_GDAP", "true")
    r = cli("sync", "--now", (now + timedelta(hours=1)).isoformat())
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "invited" and "set by hand" in r.output


# -- 3. "absent" only from a complete directory read -----------------------------------------

def completed_on_suspended(world: Sandbox, db: Database, cli: Any, tmp_path: Path) -> datetime:
    """Customer A completed by sync two hours ago on a Suspended direct subscription (unpaid,
    not cancelled: what an operator then corrects by hand); returns the real time it is now
    (`customers set-stage` records the real time, so sync runs around it)."""
    now = datetime.now(UTC)
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30,
                              assigned=26)
    world.tenant_change(TENANT_X, "accept_relationship")
    world.tenant_change(TENANT_X, "activate_csp", quantity=30)
    world.tenant_change(TENANT_X, "direct_status", status="Suspended")  # unpaid, not cancelled
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30,
                             "awaiting_cancellation", "")], now - timedelta(hours=3))
    assert cli("sync", "--now", (now - timedelta(hours=2)).isoformat()).exit_code == 0
    assert _row(db, "A").stage == "completed"
    return now


def awaiting_cancellation(world: Sandbox, cli: Any, tmp_path: Path, *, licences: int,
                          assigned: int = 26) -> None:
    """Customer A (tenant X, ``licences`` in the CSV) accepted, its CSP subscription active
    (Microsoft 365 E3, 30 seats), its direct one Enabled with 30 licences, ``assigned`` of them
    assigned."""
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30,
                              assigned=assigned)
    world.tenant_change(TENANT_X, "accept_relationship")
    world.tenant_change(TENANT_X, "activate_csp", quantity=30)
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", licences,
                             "awaiting_cancellation", "")])


def test_a_direct_subscription_on_a_later_page_is_seen(
    paged: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    # Page 1 holds the CSP subscription, page 2 (an @odata.nextLink inside the $batch answer)
    # the direct one, still Enabled: the customer has not cancelled.
    awaiting_cancellation(paged, cli, tmp_path, licences=30)
    r = cli("sync", "--now", BASE.isoformat(), "--json")
    assert r.exit_code == 0, r.output
    a = _row(db, "A")
    assert (a.stage, a.licences) == ("awaiting_cancellation", 26)
    paged.tenant_change(TENANT_X, "direct_status", status="Suspended")
    r = cli("sync", "--now", (BASE + timedelta(hours=1)).isoformat())
    assert _row(db, "A").stage == "completed", r.output


class _Reader:
    """A Reader answering the batch with given bodies (what Graph sent, already decoded)."""

    def __init__(self, subs: Any) -> None:
        self.subs = subs

    def batch_get(self, *args: Any, **kwargs: Any) -> list[Any]:
        return [self.subs, {"value": []}]


class _Tok:
    def token(self) -> str:
        return "t"

    def refresh(self, stale: str) -> str:
        return "t"


@pytest.mark.parametrize("subs", [{"@odata.context": "x"}, {"value": None}, {}])
def test_a_directory_answer_without_a_value_list_is_a_failed_read(subs: Any) -> None:
    tenant = clients.CustomerTenant.__new__(clients.CustomerTenant)
    tenant.reader = _Reader(subs)  # type: ignore[assignment]
    tenant.base = "https://graph.example/v1.0"
    tenant._tokens = lambda tid: _Tok()  # type: ignore[method-assign,assignment,return-value]
    with pytest.raises(clients.SourceFailed, match="no 'value' list"):
        tenant.read(TENANT_X)


def test_a_tenant_taken_meanwhile_is_not_filled_and_nothing_read_with_it_is_kept(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """Between the reads and the write another customer got the tenant (a concurrent import):
    the write transaction checks again, records nothing read with it, moves nothing."""
    _import(cli, tmp_path, SHARED)
    b = _row(db, "B")
    assert b.id is not None
    res = CustomerSync("B", b.name, seen={
        "partner_center": {"listed": True, "subscriptions": []},
        "tenant": {"id": "d", "sku": "E3", "status": "Suspended", "total": 30, "assigned": 26}})
    campaign = load_campaign()
    target = _Target(b.id, "B", b.name, "", "shared.example")
    _record(db, campaign, campaign.sync, BASE, [target], {b.id: res}, {b.id: TENANT_X}, False)
    b = _row(db, "B")
    assert (b.tenant_id, b.stage, b.licences) == ("", "invited", 3)
    assert res.moved == [] and "already the tenant of A" in res.problems["partner_center"]
    with db.session() as s:
        assert s.exec(select(SyncEvidence).where(col(SyncEvidence.customer_id) == b.id)
                      ).first() is None
