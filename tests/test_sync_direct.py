"""Which of a customer tenant's subscriptions is "the direct one" whose status moves the stage
and whose assigned licences pick the cancellation route: never the partner's own CSP
subscriptions, never a trial, the one identified by the previous reading of that tenant once
known, and, when the partner's CSP subscription names the product being replaced, not a free
or add-on product beside it; several products and none known: no status, no licence count.
The partner's tenant id must be a GUID, and a customer whose tenant id is the partner's own is
not read."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from test_sync_guesses import BASE, TENANT_X, _import, _row, _world, awaiting_cancellation

from comms.config import load_settings
from comms.sync import clients, ledger, reading
from comms.sync.ledger import CustomerSync

PARTNER = "11111111-2222-4333-8444-555555555555"
SETTINGS = load_settings(env={"COMMS_GRAPH_TENANT_ID": PARTNER})


def _sub(sid: str, sku: str, status: str = "Enabled", total: int = 10, *,
         owner: str | None = None, trial: bool = False) -> dict[str, Any]:
    return {"id": sid, "skuId": f"sku-{sku}", "skuPartNumber": sku, "status": status,
            "totalLicenses": total, "isTrial": trial, "ownerTenantId": owner}


def _direct(subs: list[dict[str, Any]], assigned: dict[str, int],
            previous: dict[str, Any] | None = None) -> dict[str, Any]:
    res = CustomerSync("A", "Alpha")
    skus = [{"skuId": f"sku-{k}", "consumedUnits": v} for k, v in assigned.items()]
    reading._direct(res, SETTINGS, subs, skus, tenant_id="tenant-a", previous=previous)
    seen: dict[str, Any] = res.seen["tenant"]
    assert seen.pop("tenant_id") == "tenant-a"  # which tenant it was read in
    if seen["status"] == "unknown":
        assert "none known to be the one the CSP subscription replaces" in res.problems["tenant"]
    else:
        assert "tenant" not in res.problems
    return seen


def test_a_trial_is_not_the_direct_subscription() -> None:
    seen = _direct([_sub("paid", "ENTERPRISEPACK", total=10),
                    _sub("trial", "ENTERPRISEPREMIUM", total=25, trial=True)],
                   {"ENTERPRISEPACK": 10, "ENTERPRISEPREMIUM": 2})
    assert (seen["id"], seen["assigned"]) == ("paid", 10)
    # Only a trial left: no direct subscription bills any more.
    assert _direct([_sub("trial", "ENTERPRISEPACK", trial=True)], {}) == {"status": "absent"}


def test_the_product_being_replaced_wins_over_a_free_one_beside_it() -> None:
    subs = [_sub("csp", "SPE_E3", total=30, owner=PARTNER),
            _sub("paid", "SPE_E3", total=30),
            _sub("free", "POWER_BI_STANDARD", total=1_000_000)]
    seen = _direct(subs, {"SPE_E3": 28, "POWER_BI_STANDARD": 4})
    assert (seen["id"], seen["assigned"]) == ("paid", 28)
    # Cancelled: the free product still Enabled beside it does not hide that.
    subs[1]["status"] = "Suspended"
    assert _direct(subs, {"SPE_E3": 28})["status"] == "Suspended"


def test_without_a_matching_product_another_product_never_stands_in() -> None:
    """The CSP product differs from the direct one (an upgrade) and a Visio add-on is billed
    directly too: once the old one is cancelled, the add-on that still bills must not become
    "the direct one" (its 2 licences would pick the self-service route, its status would say
    "still active")."""
    subs = [_sub("csp", "SPE_E3", owner=PARTNER), _sub("old", "ENTERPRISEPACK", "Suspended"),
            _sub("addon", "VISIOCLIENT", "Enabled", total=2)]
    seen = _direct(subs, {"VISIOCLIENT": 2})
    assert (seen["status"], seen.get("id"), seen.get("assigned")) == ("unknown", None, None)
    assert seen["several"] == ["ENTERPRISEPACK", "VISIOCLIENT"]
    # The one identified by the previous reading of the tenant is followed.
    followed = _direct(subs, {"VISIOCLIENT": 2}, {"id": "old", "tenant_id": "tenant-a"})
    assert (followed["id"], followed["status"], followed["assigned"]) == ("old", "Suspended",
                                                                          None)
    assert _direct(subs[:2], {})["status"] == "Suspended"
    one = _direct([subs[0], _sub("old", "ENTERPRISEPACK", total=30)], {"ENTERPRISEPACK": 27})
    assert (one["status"], one["total"], one["assigned"]) == ("Enabled", 30, 27)


def test_the_subscription_followed_is_gone_only_from_its_own_tenant() -> None:
    addon = _sub("addon", "VISIOCLIENT", "Enabled", total=2)
    # It left the directory it was seen in: cancelled and deleted, whatever else still bills.
    # It stays followed (recorded with the absence): the next reading does not take the add-on
    # for it either (it did: the absence named no id, and the add-on became "the direct one").
    gone = _direct([addon], {"VISIOCLIENT": 2}, {"id": "old", "tenant_id": "tenant-a"})
    assert gone == {"status": "absent", "id": "old"}
    assert _direct([addon], {"VISIOCLIENT": 2}, {**gone, "tenant_id": "tenant-a"}) == gone
    # Seen in another tenant (the CSV's tenant id was corrected since): not followed here.
    other = _direct([addon], {"VISIOCLIENT": 2}, {"id": "old", "tenant_id": "tenant-b"})
    assert (other["id"], other["status"], other["assigned"]) == ("addon", "Enabled", 2)


def test_several_products_billed_directly_give_no_status_and_no_licence_count() -> None:
    """None named by the CSP subscription: which one is being replaced is not known, so
    neither its status ("still active" would be a claim) nor its licence count (an add-on's 2
    licences must not pick the cancellation route)."""
    subs = [_sub("csp", "SPE_E3", owner=PARTNER), _sub("paid", "ENTERPRISEPACK", total=30),
            _sub("addon", "VISIOCLIENT", total=2)]
    seen = _direct(subs, {"ENTERPRISEPACK": 28, "VISIOCLIENT": 2})
    assert seen == {"status": "unknown", "several": ["ENTERPRISEPACK", "VISIOCLIENT"]}
    assert ledger.facts_of({"tenant": seen}).direct_status is None  # no claim: nothing moves


def test_a_free_product_is_never_the_old_subscription() -> None:
    """Power BI (free) and the like (`[sync] free_skus`) bill nothing: beside the paid product
    they are left out, and alone they are no direct subscription. It was: with the old one
    already deleted, Power BI (free) became "the direct one", Enabled with 4 licences ("still
    active", the self-service route, never completed)."""
    paid = _sub("paid", "ENTERPRISEPACK", total=30)
    free = _sub("free", "POWER_BI_STANDARD", total=1_000_000)
    seen = _direct([_sub("csp", "SPE_E3", owner=PARTNER), paid, free],
                   {"ENTERPRISEPACK": 28, "POWER_BI_STANDARD": 4})
    assert (seen["id"], seen["status"], seen["assigned"]) == ("paid", "Enabled", 28)
    assert _direct([_sub("csp", "SPE_E3", owner=PARTNER), free],
                   {"POWER_BI_STANDARD": 4}) == {"status": "absent"}
    assert "POWER_BI_STANDARD" in SETTINGS.sync.free_skus
    extended = SETTINGS.model_copy(update={"sync": SETTINGS.sync.model_copy(
        update={"free_skus": ("visioclient",)})})
    res = CustomerSync("A", "Alpha")
    reading._direct(res, extended, [paid, _sub("addon", "VISIOCLIENT", total=2)], [],
                    tenant_id="tenant-a")
    assert res.seen["tenant"]["id"] == "paid"  # the partner's own list, any case


def test_the_partners_own_subscriptions_are_never_direct() -> None:
    upper = PARTNER.upper()  # ownerTenantId compared without case
    assert _direct([_sub("csp", "SPE_E3", owner=upper)], {}) == {"status": "absent"}


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Any:
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch)


def test_a_partner_tenant_id_that_is_not_a_guid_stops_the_sync(
    world: Any, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30,
                             "awaiting_cancellation", "")])
    monkeypatch.setenv("COMMS_GRAPH_TENANT_ID", "fabrikam.onmicrosoft.com")
    r = cli("sync", "--now", BASE.isoformat())
    assert r.exit_code == 3, r.output
    assert "[graph] tenant_id is 'fabrikam.onmicrosoft.com', not a tenant id (a GUID)" in \
        " ".join(r.stderr.split())


def test_a_customer_with_the_partners_own_tenant_id_is_not_read(
    world: Any, db: Any, cli: Any, tmp_path: Path
) -> None:
    # The partner's own directory lists no direct subscription: read as the customer's, it
    # would say "absent" and complete the customer.
    _import(cli, tmp_path, [("A", "Alpha Ltd", world.tenant_id, "alpha.example", 30,
                             "awaiting_cancellation", "")])
    r = cli("sync", "--now", BASE.isoformat(), "--json", "--source", "tenant")
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "awaiting_cancellation"
    data = json.loads(r.stdout)
    assert data["cannot_verify"] == 1
    assert "is your own tenant ([graph] tenant_id)" in data["customers"][0]["problem"]


def test_queued_mail_is_rendered_again_when_sync_changes_the_licence_count(
    world: Any, db: Any, cli: Any, tmp_path: Path
) -> None:
    """The CSV said 24 (self-service route); the instructions were queued, not yet sent (a
    backlog); sync then sees 26 assigned: what goes out is the support route with 26."""
    awaiting_cancellation(world, cli, tmp_path, licences=24)
    queued = cli("run", "--now", BASE.isoformat(), "--limit", "0")
    assert "queued 1" in queued.stdout, queued.output
    r = cli("sync", "--now", BASE.isoformat(), "--source", "tenant")
    assert r.exit_code == 0, r.output
    assert _row(db, "A").licences == 26
    sent = cli("run", "--now", BASE.isoformat())
    assert sent.exit_code == 0, sent.output
    mails = world.sent()
    assert len(mails) == 1
    html = mails[0]["html"]
    assert "with 26 licences" in html and "admin.microsoft.com/#/support" in html
    assert "linkid=842054" not in html and "24 licences" not in html


@pytest.mark.parametrize(("content", "kind"), [
    (b"<html><body>Service Unavailable</body></html>", "text/html"),
    (b"[1, 2]", "application/json"),
    (b"", "application/json"),
])
def test_an_answer_that_is_not_a_json_object_is_a_failed_read(content: bytes, kind: str) -> None:
    """A proxy's HTML page or a truncated body fails that read (reported for the customer,
    nothing concluded) instead of an exception that stops the whole sync."""
    response = requests.Response()
    response.status_code = 200
    response._content = content
    response.headers["Content-Type"] = kind
    with pytest.raises(clients.SourceFailed, match="not a JSON object; nothing was concluded"):
        clients.json_body(response, "directory of tenant X")


def test_two_subscriptions_of_the_product_are_one_old_subscription() -> None:
    """Two direct ENTERPRISEPACK subscriptions (30 and 5): cancelling the larger leaves the
    other billing, so the old subscription is not cancelled until both are; its licences are
    both's. It was: the larger one followed alone, and the customer completed while 5 licences
    were still billed twice."""
    subs = [_sub("csp", "ENTERPRISEPACK", total=35, owner=PARTNER),
            _sub("big", "ENTERPRISEPACK", total=30), _sub("small", "ENTERPRISEPACK", total=5)]
    first = _direct(subs, {"ENTERPRISEPACK": 33})
    assert (first["id"], first["ids"], first["status"], first["total"], first["assigned"]) == (
        "big", ["big", "small"], "Enabled", 35, 33)
    previous = {**first, "tenant_id": "tenant-a"}
    subs[1]["status"] = "Suspended"  # the larger one cancelled
    one_left = _direct(subs, {"ENTERPRISEPACK": 5}, previous)
    assert (one_left["id"], one_left["status"]) == ("small", "Enabled")
    del subs[1]  # and gone from the directory: the other still bills
    assert _direct(subs, {"ENTERPRISEPACK": 5}, previous)["status"] == "Enabled"
    subs[1]["status"] = "Suspended"  # both cancelled now
    assert _direct(subs, {}, previous)["status"] == "Suspended"
    assert _direct(subs[:1], {}, previous) == {"status": "absent", "id": "big",
                                                "ids": ["big", "small"], "sku": "ENTERPRISEPACK"}


DISTRIBUTOR = "99999999-8888-4777-8666-555555555555"


def test_a_subscription_another_partner_created_is_never_the_direct_one() -> None:
    """Graph's ``ownerTenantId`` is the partner tenant that created a subscription: a CSP
    subscription an indirect provider created for us (or another reseller's) is nobody's old
    direct subscription. It was taken for one."""
    subs = [_sub("old", "SPE_E3", "Suspended", total=30),
            _sub("via-distributor", "SPE_E3", "Enabled", total=30, owner=DISTRIBUTOR)]
    seen = _direct(subs, {"SPE_E3": 28})
    assert (seen["id"], seen["status"], seen.get("ids")) == ("old", "Suspended", None)
    # A direct subscription that names the customer's own tenant as its owner is direct.
    own = [_sub("old", "SPE_E3", "Enabled", total=30, owner="TENANT-A")]
    assert _direct(own, {"SPE_E3": 28})["status"] == "Enabled"


def test_an_indirect_providers_csp_subscription_does_not_keep_the_customer_billed_twice(
    world: Any, db: Any, cli: Any, tmp_path: Path
) -> None:
    """End to end: a partner buying through an indirect provider; the new E3 in the customer's
    directory was created by the distributor's tenant. Once the old one is cancelled, sync
    completes the customer (it read the new one as the old one "still active": reminders
    that the customer had not cancelled, for ever)."""
    awaiting_cancellation(world, cli, tmp_path, licences=30)
    world.tenant_change(TENANT_X, "add_direct_product", sku_part_number="SPE_E3",
                        sku_id=world._core.tenants.customers[TENANT_X].direct["skuId"],
                        total=30, assigned=0, owner_tenant_id=DISTRIBUTOR)
    r = cli("sync", "--now", BASE.isoformat(), "--source", "tenant", "--json")
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "awaiting_cancellation"
    world.tenant_change(TENANT_X, "direct_status", status="Suspended")
    r = cli("sync", "--now", (BASE + timedelta(hours=1)).isoformat(), "--source", "tenant")
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "completed", r.output
