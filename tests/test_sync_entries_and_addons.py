"""What stage sync reads must be whole before it concludes anything: an entry that is not an
object in a list (Partner Center's customers or subscriptions, the GDAP relationships, a
tenant's directory) fails that source's read instead of crashing the sync or being skipped; a
customer's subscriptions are read to their last page, and an answer whose ``totalCount`` says
more than it gave, with no next link, is a failed read; an active add-on alone
(``parentSubscriptionId``) is no CSP subscription. End to end over HTTPS against the sandbox,
with the real msal and requests."""

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
    _row,
    _world,
    awaiting_cancellation,
)
from test_sync_listing_and_gdap import _pc, _Replies, _Tokens

from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.sync import clients, partner

NOT_OBJECT = "an entry that is not an object"


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch)


@pytest.fixture
def paged(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """Partner Center answers a customer's subscriptions one a page."""
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch,
                  subscriptions_page_size=1)


def _sync(cli: Any, hours: float, *args: str) -> tuple[int, dict[str, Any]]:
    r = cli("sync", "--now", (BASE + timedelta(hours=hours)).isoformat(), "--json", *args)
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout)


def _two_approved(world: Sandbox, cli: Any, tmp_path: Path) -> None:
    for tid, domain in ((TENANT_X, "alpha.example"), (TENANT_Y, "beta.example")):
        world.add_customer_tenant(tid, domain, domain, direct_licences=30)
        world.tenant_change(tid, "accept_relationship")
        world.tenant_change(tid, "gdap", status="active")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "approved", ""),
                            ("B", "Beta Ltd", TENANT_Y, "beta.example", 30, "approved", "")])


# -- 1. an entry that is not an object fails that source's read --------------------------------

def test_page_items_refuses_an_entry_that_is_not_an_object() -> None:
    assert clients.page_items({"items": [{"id": "a"}]}, "items", "X", 1) == [{"id": "a"}]
    for entry, shown in ((None, "null"), ("text", "a string"), (42, "a number"),
                         ([1], "a list")):
        with pytest.raises(clients.SourceFailed, match=rf"X: page 2 has {NOT_OBJECT} in its "
                           rf"'value' list \(entry 2: {shown}\)"):
            clients.page_items({"value": [{"id": "a"}, entry]}, "value", "X", 2)


def _next(token: str) -> dict[str, Any]:
    return {"next": {"uri": "/customers/t/subscriptions?seekOperation=Next",
                     "headers": [{"key": "MS-ContinuationToken", "value": token}]}}


def test_objects_inside_an_entry_and_links_next_must_be_objects_too() -> None:
    with pytest.raises(clients.SourceFailed, match="a customer's companyProfile is a string"):
        list(_pc([{"items": [{"id": "a", "companyProfile": "x"}]}]).customers())
    with pytest.raises(clients.SourceFailed, match=r"a header of links\.next is null"):
        _pc([{"items": [], "links": {"next": {"uri": "/x", "headers": [None]}}}]
            ).subscriptions("t")
    gdap = partner.Gdap.__new__(partner.Gdap)
    gdap.base = "https://graph.example/v1.0"
    gdap.url = gdap.base + "/tenantRelationships/delegatedAdminRelationships"
    gdap.tokens = _Tokens()  # type: ignore[assignment]
    gdap.reader = _Replies([{"value": [{"customer": 7}]}])  # type: ignore[assignment]
    with pytest.raises(clients.SourceFailed, match="a relationship's customer is a number"):
        gdap.relationships()


def test_subscription_pages_are_followed_and_a_total_count_is_judged_at_the_end() -> None:
    one, two = {"id": "1"}, {"id": "2"}
    # totalCount of all the subscriptions on every page, or of the page itself: both whole.
    assert _pc([{"totalCount": 2, "items": [one], "links": _next("p2")},
                {"totalCount": 2, "items": [two]}]).subscriptions("t") == [one, two]
    assert _pc([{"totalCount": 1, "items": [one], "links": _next("p2")},
                {"totalCount": 1, "items": [two]}]).subscriptions("t") == [one, two]
    assert _pc([{"items": [one]}]).subscriptions("t") == [one]  # no count: as answered
    with pytest.raises(clients.SourceFailed, match="totalCount 3 but 2 received"):
        _pc([{"totalCount": 3, "items": [one], "links": _next("p2")},
             {"totalCount": 3, "items": [two]}]).subscriptions("t")
    with pytest.raises(clients.SourceFailed, match="links to a page already read"):
        _pc([{"items": [one], "links": _next("p2")}, {"items": [two], "links": _next("p2")}]
            ).subscriptions("t")


@pytest.mark.parametrize("fault, source, what", [
    ("pc_customers_non_object", "partner_center", "Partner Center customers: page 1"),
    ("pc_subscriptions_non_object", "partner_center", "Partner Center subscriptions of "),
    ("gdap_non_object", "gdap", "GDAP relationships: page 1"),
    ("directory_non_object", "tenant", "/directory/subscriptions: page 1"),
])
def test_an_entry_that_is_not_an_object_fails_that_sources_read(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    fault: str, source: str, what: str,
) -> None:
    """A null, a string or a number among the items: that source's read fails for the
    customers it concerns (reported, exit code 1), the others are read, nothing is concluded
    from it (no "needs attention", no move), and the sync is not stopped by a crash."""
    monkeypatch.setenv("COMMS_SYNC_GDAP", "true")
    _two_approved(world, cli, tmp_path)
    code, data = _sync(cli, 0)
    assert (code, data["failed"]) == (0, 0), data
    world.set_sync_faults(**{fault: 1.0})
    code, data = _sync(cli, 1)
    assert code == 1, data
    for c in data["customers"]:
        assert c["status"] == "failed", c
        assert source not in c["seen"], c
        assert what in c["problem"] and NOT_OBJECT in c["problem"], c
        assert set(c["seen"]) == {"partner_center", "gdap", "tenant"} - {source}, c
    assert (_row(db, "A").stage, _row(db, "B").stage) == ("approved", "approved")
    world.set_sync_faults(**{fault: 0.0})
    code, data = _sync(cli, 2)
    assert (code, data["failed"]) == (0, 0), data


# -- 2. a customer's subscriptions: every page, and no partial list taken for the whole --------

def test_a_csp_subscription_on_a_later_page_of_subscriptions_is_seen(
    paged: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """Page 1 holds an Azure plan (no seats), page 2 (``links.next``) the Microsoft 365
    seats: the customer's CSP subscription is live."""
    paged.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    paged.tenant_change(TENANT_X, "activate_csp", offer="azure_plan")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "approved", "")])
    assert _sync(cli, 0)[0] == 0
    # lose_access_warning goes out first (sync moves an approved customer on only after it).
    r = cli("run", "--now", (BASE + timedelta(minutes=30)).isoformat())
    assert r.exit_code == 0, r.output
    paged.tenant_change(TENANT_X, "activate_csp", quantity=30)
    code, data = _sync(cli, 1)
    assert code == 0, data
    subs = data["customers"][0]["seen"]["partner_center"]["subscriptions"]
    assert [s["offer"] for s in subs if s["quantity"] == 30] == ["Microsoft 365 E3"], subs
    assert len(subs) == 2, subs
    assert _row(db, "A").stage == "awaiting_cancellation"


def test_subscriptions_short_of_their_total_count_without_a_next_link_are_a_failed_read(
    paged: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """totalCount says 2, the answer gives 1 and no ``links.next``: the missing one may be the
    active CSP subscription, so nothing is concluded (no "needs attention", no move) and the
    read is reported failed (exit code 1)."""
    paged.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    paged.tenant_change(TENANT_X, "activate_csp", offer="azure_plan")
    paged.tenant_change(TENANT_X, "activate_csp", quantity=30)
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30,
                             "awaiting_cancellation", "")])
    assert _sync(cli, 0)[0] == 0
    paged.set_sync_faults(pc_subscriptions_no_next=1.0)
    code, data = _sync(cli, 1)
    c = data["customers"][0]
    assert (code, c["status"]) == (1, "failed"), data
    assert "totalCount 2" in c["problem"] and "1 received" in c["problem"], c
    assert "partner_center" not in c["seen"]
    assert _row(db, "A").stage == "awaiting_cancellation"


# -- 3. an active add-on alone is no CSP subscription -----------------------------------------

def test_an_active_add_on_alone_does_not_make_the_csp_subscription_live(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    world.tenant_change(TENANT_X, "activate_csp", offer="add_on", quantity=30)
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "approved", "")])
    assert _sync(cli, 0)[0] == 0
    r = cli("run", "--now", (BASE + timedelta(minutes=30)).isoformat())
    assert r.exit_code == 0, r.output
    code, data = _sync(cli, 1)
    assert code == 0, data
    seen = data["customers"][0]["seen"]["partner_center"]
    assert [a["parent"] for a in seen["add_ons"]] != [None], seen
    assert seen["subscriptions"] == [], seen
    assert _row(db, "A").stage == "approved"  # no base subscription: nothing to cancel yet
    # The base subscription bought: now the old one must go.
    world.tenant_change(TENANT_X, "activate_csp", quantity=30)
    code, data = _sync(cli, 2)
    assert code == 0, data
    assert _row(db, "A").stage == "awaiting_cancellation"


def test_an_add_on_beside_a_suspended_base_is_no_live_csp_subscription(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    """At awaiting_cancellation with the base suspended and an add-on on it still active: no
    active CSP subscription (needs attention), not "CSP live"."""
    awaiting_cancellation(world, cli, tmp_path, licences=30)
    world.tenant_change(TENANT_X, "csp_status", status="suspended")
    world.tenant_change(TENANT_X, "activate_csp", offer="add_on", quantity=30)
    code, data = _sync(cli, 0)
    c = data["customers"][0]
    assert (code, c["status"]) == (0, "needs attention"), data
    assert c["seen"]["partner_center"]["add_ons"][0]["parent"] == (
        c["seen"]["partner_center"]["subscriptions"][0]["id"])
    assert _row(db, "A").stage == "awaiting_cancellation"
