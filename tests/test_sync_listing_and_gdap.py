"""Review fixes for stage sync: an active GDAP relationship does not move a customer that
Partner Center was read for and does not list (no reseller relationship), and a 200 answer
without its collection list (Partner Center ``items``, Graph ``value``) is a failed read, never
an empty page. End to end over HTTPS against the sandbox, with the real msal and requests; the
pure parts directly."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_sync_guesses import (
    BASE,
    TENANT_X,
    TENANT_Y,
    _import,
    _Info,
    _row,
    _world,
    awaiting_cancellation,
)

from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.sync import clients, partner
from comms.sync.rules import Facts, SyncRules, decide

ERROR_BODY = {"code": 3000, "description": "Service error", "data": [], "source": "PartnerFD"}


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch)


def _at(hours: float) -> str:
    return (BASE + timedelta(hours=hours)).isoformat()


# --- 1. gdap_active needs the reseller relationship when Partner Center was read -------------

def test_gdap_active_counts_only_unless_partner_center_says_not_listed() -> None:
    rules = SyncRules()
    assert Facts(gdap_status="active").observed(rules) == ["gdap_active"]  # PC not read
    assert Facts(relationship_accepted=False, gdap_status="active").observed(rules) == []
    assert Facts(relationship_accepted=True, gdap_status="active").observed(rules) == [
        "relationship_accepted", "gdap_active"]
    info = _Info()
    info.stage = "invited"
    names = ("invited", "approved", "awaiting_cancellation", "completed")
    allowed = {"invited": ("approved",)}
    not_listed = Facts(relationship_accepted=False, gdap_status="active")
    assert decide(names, allowed, rules, info, not_listed,  # type: ignore[arg-type]
                  manual_at=None, evidence_at={}).moves == ()
    unread = Facts(gdap_status="active")
    assert decide(names, allowed, rules, info, unread,  # type: ignore[arg-type]
                  manual_at=None, evidence_at={}).moves == (
        ("invited", "approved", "gdap_active"),)


def test_gdap_active_does_not_move_a_customer_partner_center_does_not_list(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMS_SYNC_GDAP", "true")
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    # GDAP granted for support; the reseller relationship never accepted.
    world.tenant_change(TENANT_X, "gdap", status="active")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "invited", "")])
    r = cli("run", "--sync", "--now", _at(0))
    assert r.exit_code == 0, r.output
    r = cli("sync", "--now", _at(1), "--json")
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["customers"][0]
    assert c["seen"]["partner_center"]["listed"] is False
    assert c["seen"]["gdap"]["status"] == "active"
    assert _row(db, "A").stage == "invited"
    assert not any("lose access" in str(m["subject"]).lower() for m in world.sent())
    # Once Partner Center lists it, the customer moves as usual.
    world.tenant_change(TENANT_X, "accept_relationship")
    assert cli("sync", "--now", _at(2)).exit_code == 0
    assert _row(db, "A").stage == "approved"


def test_a_customer_listed_without_a_reseller_relationship_is_not_accepted(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """Partner Center's relationshipToPartner (none, reseller, advisor, syndication,
    microsoft_support): a customer listed as "advisor" (or "none": the reseller relationship
    removed) has not accepted the partner as reseller and must not get the "lose access"
    warning; listed as "reseller", it moves."""
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    world.add_customer_tenant(TENANT_Y, "beta.example", "Beta Ltd", direct_licences=20)
    world.tenant_change(TENANT_X, "listed_as", relationship="advisor")
    world.tenant_change(TENANT_Y, "listed_as", relationship="none")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "invited", ""),
                            ("B", "Beta Ltd", TENANT_Y, "beta.example", 20, "invited", "")])
    r = cli("sync", "--now", _at(0), "--json")
    assert r.exit_code == 0, r.output
    assert [c["seen"]["partner_center"]["listed"] for c in json.loads(r.stdout)["customers"]
            ] == [False, False]
    assert (_row(db, "A").stage, _row(db, "B").stage) == ("invited", "invited")
    world.tenant_change(TENANT_X, "listed_as", relationship="reseller")
    assert cli("sync", "--now", _at(1)).exit_code == 0
    assert (_row(db, "A").stage, _row(db, "B").stage) == ("approved", "invited")


# --- 2. a 200 answer without its list is a failed read ---------------------------------------

class _Replies:
    def __init__(self, bodies: list[Any]) -> None:
        self.bodies = list(bodies)

    def get_json(self, url: str, *args: Any, **kwargs: Any) -> Any:
        return self.bodies.pop(0)


class _Tokens:
    def token(self) -> str:
        return "t"

    def refresh(self, stale: str) -> str:
        return "t"


def _pc(bodies: list[Any]) -> partner.PartnerCenter:
    pc = partner.PartnerCenter.__new__(partner.PartnerCenter)
    pc.base, pc.page_size = "https://pc.example/v1", 2
    pc.tokens, pc.reader = _Tokens(), _Replies(bodies)  # type: ignore[assignment]
    return pc


def test_a_listing_page_without_its_list_is_a_failed_read() -> None:
    first = {"items": [{"id": "A"}, {"id": "B"}], "links": {"next": {
        "uri": "/customers?size=2&seekOperation=Next",
        "headers": [{"key": "MS-ContinuationToken", "value": "x"}]}}}
    with pytest.raises(clients.SourceFailed, match=r"customers: page 2 has no 'items' list"):
        list(_pc([first, dict(ERROR_BODY)]).customers())
    with pytest.raises(clients.SourceFailed, match=r"subscriptions of t: page 1 has no 'items'"):
        _pc([{"code": 600, "description": "oops"}]).subscriptions("t")
    assert _pc([{"items": []}]).subscriptions("t") == []  # an explicit empty list is empty
    gdap = partner.Gdap.__new__(partner.Gdap)
    gdap.base = "https://graph.example/v1.0"
    gdap.url = gdap.base + "/tenantRelationships/delegatedAdminRelationships"
    gdap.tokens, gdap.reader = _Tokens(), _Replies([{"error": {"code": "x"}}])  # type: ignore
    with pytest.raises(clients.SourceFailed, match=r"GDAP relationships: page 1 has no 'value'"):
        gdap.relationships()


def test_a_partner_center_listing_page_with_an_error_body_lists_nobody_as_gone(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMS_SYNC_PAGE_SIZE", "1")
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    world.add_customer_tenant(TENANT_Y, "beta.example", "Beta Ltd", direct_licences=20)
    for tid in (TENANT_X, TENANT_Y):
        world.tenant_change(tid, "accept_relationship")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "invited", ""),
                            ("B", "Beta Ltd", TENANT_Y, "beta.example", 20, "invited", "")])
    assert cli("sync", "--now", _at(0)).exit_code == 0
    assert (_row(db, "A").stage, _row(db, "B").stage) == ("approved", "approved")
    # Page 2 of the listing answers 200 with an error body: the listing is a failed read, not
    # a short one (the customer on page 2 is not "no longer listed").
    world.set_sync_faults(pc_error_body_next_page=1.0)
    r = cli("sync", "--now", _at(1), "--json")
    assert r.exit_code == 1, r.output
    data = json.loads(r.stdout)
    assert all(c["status"] != "needs attention" for c in data["customers"]), data
    assert all("partner_center" not in c["seen"] for c in data["customers"]), data
    assert "page 2 has no 'items' list" in r.stdout
    assert (_row(db, "A").stage, _row(db, "B").stage) == ("approved", "approved")
    # The first page too.
    world.set_sync_faults(pc_error_body_next_page=0.0, pc_error_body_first_page=1.0)
    r = cli("sync", "--now", _at(2), "--json")
    assert r.exit_code == 1, r.output
    assert all(c["status"] != "needs attention" for c in json.loads(r.stdout)["customers"])


def test_a_subscriptions_error_body_does_not_make_the_csp_subscription_look_gone(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    awaiting_cancellation(world, cli, tmp_path, licences=30)
    assert cli("sync", "--now", _at(0)).exit_code == 0
    world.set_sync_faults(pc_error_body_subscriptions=1.0)
    r = cli("sync", "--now", _at(1), "--json")
    assert r.exit_code == 1, r.output
    c = json.loads(r.stdout)["customers"][0]
    assert c["status"] != "needs attention", c
    assert "page 1 has no 'items' list" in r.stdout
    assert _row(db, "A").stage == "awaiting_cancellation"
