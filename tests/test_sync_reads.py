"""What stage sync reads, and what it concludes from it, end to end over HTTPS against the
sandbox (real msal and requests): the direct subscription identified once is followed (another
product still billed never stands in for it), only a licence-based, non-trial CSP subscription
is "CSP live", tenant evidence names its tenant, paged listings cannot loop or leave the host,
and a failed partner listing fails that source for each customer instead of the whole run."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select
from test_sync_guesses import (
    BASE,
    TENANT_X,
    TENANT_Y,
    _import,
    _row,
    _world,
    awaiting_cancellation,
)

from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.models import Message
from comms.store.sync_models import SyncEvidence
from comms.sync.observation import observation_for

TENANT_Z = "cccccccc-0000-4000-8000-00000000000c"


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch)


def _awaiting(world: Sandbox, cli: Any, tmp_path: Path) -> None:
    """A's tenant: a direct ENTERPRISEPACK of 30 (28 assigned), replaced by a CSP Microsoft 365
    E3 of 30 (an upgrade: not the same SKU)."""
    awaiting_cancellation(world, cli, tmp_path, licences=30, assigned=28)


def _sync(cli: Any, hours: int, *args: str) -> dict[str, Any]:
    r = cli("sync", "--now", (BASE + timedelta(hours=hours)).isoformat(), "--json", *args)
    assert r.exit_code in (0, 1), r.output
    data: dict[str, Any] = json.loads(r.stdout)
    data["exit_code"] = r.exit_code
    return data


def _direct_status(db: Database, key: str) -> str:
    with db.session() as s:
        obs = observation_for(s, _row(db, key).id or 0)
    return obs.direct_status if obs else ""


# -- the direct subscription identified once is the one followed ----------------------------

def test_the_direct_subscription_is_followed_when_an_addon_still_bills(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """Once the ENTERPRISEPACK was identified, a directly billed Visio add-on (Enabled, 2
    licences) does not stand in for it when it is cancelled: the customer completes, keeps its
    28 licences, and is never told "your old subscription is still active"."""
    _awaiting(world, cli, tmp_path)
    assert _sync(cli, 0)["exit_code"] == 0
    assert _row(db, "A").licences == 28
    world.tenant_change(TENANT_X, "add_direct_product", sku_part_number="VISIOCLIENT",
                        total=2, assigned=2)
    world.tenant_change(TENANT_X, "direct_status", status="Suspended")  # cancelled
    data = _sync(cli, 1)
    assert data["exit_code"] == 0, data
    a = _row(db, "A")
    assert (a.stage, a.licences) == ("completed", 28), data
    assert _direct_status(db, "A") == "Suspended"


def test_several_direct_products_and_none_known_claim_nothing(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """First read with a Visio add-on (Enabled, 2 assigned) beside the ENTERPRISEPACK: which
    one is replaced is not known, so no status ("still active"), no licence count and no move,
    before or after the cancellation; the customer is reported. (Power BI (free) beside it is
    no product at all: `[sync] free_skus`.)"""
    _awaiting(world, cli, tmp_path)
    world.tenant_change(TENANT_X, "add_direct_product", sku_part_number="VISIOCLIENT",
                        total=2, assigned=2)
    world.tenant_change(TENANT_X, "add_direct_product", sku_part_number="POWER_BI_STANDARD",
                        total=1_000_000, assigned=4)
    for hours in (0, 1):
        data = _sync(cli, hours)
        c = data["customers"][0]
        assert (data["exit_code"], data["cannot_verify"]) == (0, 1), data
        assert "(ENTERPRISEPACK, VISIOCLIENT)" in c["problem"], c
        a = _row(db, "A")
        assert (a.stage, a.licences) == ("awaiting_cancellation", 30)
        # No observation either way (neither "still active" nor "cancelled" can be stated).
        assert _direct_status(db, "A") == ""
        world.tenant_change(TENANT_X, "direct_status", status="Suspended")


# -- only a licence-based, non-trial CSP subscription is "CSP live" -----------------------

def test_an_azure_plan_or_a_trial_bought_through_the_partner_is_not_csp_live(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    world.add_customer_tenant(TENANT_Y, "beta.example", "Beta Ltd", direct_licences=30)
    world.tenant_change(TENANT_X, "activate_csp", offer="azure_plan")
    world.tenant_change(TENANT_Y, "activate_csp", quantity=25, trial=True)
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "approved", ""),
                            ("B", "Beta Ltd", TENANT_Y, "beta.example", 30, "approved", "")])
    assert _sync(cli, 0, "--source", "partner_center")["exit_code"] == 0
    assert (_row(db, "A").stage, _row(db, "B").stage) == ("approved", "approved")
    # lose_access_warning goes out first (sync moves an approved customer on only after it).
    sent = cli("run", "--now", (BASE + timedelta(minutes=30)).isoformat())
    assert sent.exit_code == 0, sent.output
    # The Microsoft 365 seats bought (paid) beside them: now the old one must go.
    world.tenant_change(TENANT_X, "activate_csp", quantity=30)
    world.tenant_change(TENANT_Y, "activate_csp", quantity=30)
    assert _sync(cli, 1, "--source", "partner_center")["exit_code"] == 0
    assert (_row(db, "A").stage, _row(db, "B").stage) == ("awaiting_cancellation",) * 2


# -- tenant evidence names its tenant -------------------------------------------------------

def test_tenant_evidence_records_the_tenant_it_was_read_in(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    _awaiting(world, cli, tmp_path)
    assert _sync(cli, 0, "--source", "tenant")["exit_code"] == 0
    with db.session() as s:
        seen = json.loads(s.exec(select(SyncEvidence.seen_json).where(
            col(SyncEvidence.source) == "tenant")).one())
    assert (seen["tenant_id"], seen["status"]) == (TENANT_X, "Enabled")


# -- paged listings: bounded, never twice the same page, never another host -----------------

def _three_listed(world: Sandbox, cli: Any, tmp_path: Path) -> None:
    for tid, dom in ((TENANT_X, "alpha.example"), (TENANT_Y, "beta.example"),
                     (TENANT_Z, "gamma.example")):
        world.add_customer_tenant(tid, dom, dom, direct_licences=30)
        world.tenant_change(tid, "accept_relationship")
        world.tenant_change(tid, "gdap", status="active")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "invited", "")])


def test_a_repeated_continuation_token_fails_the_partner_center_listing(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _three_listed(world, cli, tmp_path)
    monkeypatch.setenv("COMMS_SYNC_PAGE_SIZE", "1")
    world.set_sync_faults(pc_repeat_token=1.0)
    data = _sync(cli, 0, "--source", "partner_center")
    c = data["customers"][0]
    assert (data["exit_code"], c["status"]) == (1, "failed"), data
    assert "links to a page already read (a repeated continuation token" in c["problem"]
    assert world.sync_stats()["pc_requests"] < 10  # stopped at the cycle, not looping
    assert _row(db, "A").stage == "invited"


def test_a_gdap_next_link_to_another_host_is_not_followed(
    sandbox_factory: Any, db: Database, cli: Any, tmp_path: Path, database_url: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    world = _world(sandbox_factory, tmp_path, database_url, monkeypatch, gdap_page_size=1)
    monkeypatch.setenv("COMMS_SYNC_GDAP", "true")
    _three_listed(world, cli, tmp_path)
    assert _sync(cli, 0, "--source", "gdap")["customers"][0]["status"] != "failed"
    world.set_sync_faults(gdap_foreign_next_link=1.0)
    data = _sync(cli, 1, "--source", "gdap")
    c = data["customers"][0]
    assert (data["exit_code"], c["status"]) == (1, "failed"), data
    assert "next link 'https://graph.attacker.invalid/v1.0/" in c["problem"], c
    assert "is not under" in c["problem"]


# -- a failed partner listing fails that source, not the run -------------------------------

def test_a_partner_center_outage_fails_its_customers_and_run_still_plans(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30,
                              assigned=26)
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "announced", "")])
    world.set_sync_faults(pc_error_rate=1.0, seed=1)
    data = _sync(cli, 0)
    c = data["customers"][0]
    assert (data["exit_code"], c["status"]) == (1, "failed"), data
    assert "Partner Center customers" in c["problem"] and "still failing" in c["problem"]
    assert _row(db, "A").licences == 26  # the customer's own tenant was still read
    r = cli("run", "--sync", "--now", BASE.isoformat())
    assert r.exit_code == 0, r.output
    assert "1 customer(s) failed to sync" in r.output, r.output
    assert "planned on their ledger stage" in r.output
    with db.session() as s:
        assert s.exec(select(Message)).first() is not None  # planned on the ledger stage
