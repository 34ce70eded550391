"""Microsoft Graph's directory reads for stage sync, as the sandbox serves them.

- ``GET /v1.0/tenantRelationships/delegatedAdminRelationships`` (partner tenant token with
  ``DelegatedAdminRelationship.Read.All``): GDAP relationships, paged with ``$top`` and
  ``@odata.nextLink``.
- ``GET /v1.0/directory/subscriptions`` and ``GET /v1.0/subscribedSkus`` (a token issued in the
  customer's tenant; ``Organization.Read.All`` or ``Directory.Read.All`` consented there): the
  tenant's companySubscriptions (the direct one has no ``ownerTenantId``; the partner's CSP ones
  carry the partner tenant) and its SKUs with ``consumedUnits``. Without consent: 403
  ``Authorization_RequestDenied``.

``directory/subscriptions`` is paged (``directory_page_size`` a page, ``$skiptoken`` in an
absolute ``@odata.nextLink``, inside a ``$batch`` answer too).

Per-tenant throttling answers 429 with ``Retry-After``; the fault knobs add 429s and 503/504.
Any other path under ``/v1.0`` is not this service's (None).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from comms.sandbox import bearer
from comms.sandbox.core import Core
from comms.sandbox.state import retry_after_text
from comms.sandbox.tenants import ADD_ON_SKU_ID, ADD_ON_SKU_PART, CustomerTenant
from comms.sandbox.tokens import InvalidToken
from comms.sandbox.web import Request, Response, graph_error, json_response

GDAP_ROLES = frozenset({"DelegatedAdminRelationship.Read.All",
                        "DelegatedAdminRelationship.ReadWrite.All"})
DIRECTORY_ROLES = frozenset({"Organization.Read.All", "Directory.Read.All"})
DENIED = "Insufficient privileges to complete the operation."
CSP_SKU_ID = "05e9a617-0261-4cee-bb44-138d3ef5d965"  # Microsoft 365 E3 (SPE_E3)
CSP_STATUS = {"active": "Enabled", "suspended": "Suspended", "deleted": "Deleted",
              "disabled": "Suspended", "expired": "Warning", "pending": "Enabled"}


def handle(core: Core, req: Request) -> Response | None:
    low = [s.lower() for s in req.segments[1:]]
    if low == ["tenantrelationships", "delegatedadminrelationships"]:
        kind = "gdap"
    elif low in (["directory", "subscriptions"], ["subscribedskus"]):
        kind = low[-1]
    else:
        return None
    world = core.tenants
    world.count("directory_requests")
    core.state.count("requests")
    try:
        who = bearer.principal(core, req, core.graph_audiences(), customer_tenants=True)
    except InvalidToken as exc:
        core.state.count("unauthorized")
        return graph_error(req, 401, "InvalidAuthenticationToken", str(exc))
    if req.method != "GET":
        return graph_error(req, 405, "Request_BadRequest",
                           "Specified HTTP method is not allowed for the request target.")
    partner = who.tenant_id.lower() == core.tenant_id.lower()
    wait = world.take_directory(who.tenant_id)
    if wait is not None:
        world.count("directory_throttled")
        return _throttled(req, wait)
    faults = world.faults
    if world.roll(faults.directory_throttle_rate):
        world.count("directory_throttled")
        return _throttled(req, world.rng.uniform(0.5, 2.0) * min(1.0, max(world.time_scale, 0.02)))
    if world.roll(faults.directory_error_rate):
        world.count("directory_errors")
        if world.roll(0.5):
            return graph_error(req, 503, "serviceNotAvailable", "The service is unavailable.",
                               {"Retry-After": "1"})
        return graph_error(req, 504, "UnknownError", "The operation has timed out.")
    if kind == "gdap":
        if not partner or not (who.roles & GDAP_ROLES):
            return _denied(core, req)
        return _relationships(core, req)
    if partner:
        # The partner's own directory is not what sync reads; answer as Graph would with
        # the partner's (empty, in the sandbox) subscriptions.
        return json_response(200, {"@odata.context": f"{core.graph_url}/$metadata#{kind}",
                                   "value": []})
    if not (who.roles & DIRECTORY_ROLES):
        return _denied(core, req)
    tenant = world.find(who.tenant_id)
    assert tenant is not None  # the token was accepted, so the tenant exists
    if kind == "subscriptions":
        return _subscriptions_page(core, req, _company_subscriptions(core, tenant))
    return json_response(200, {
        "@odata.context": f"{core.graph_url}/$metadata#subscribedSkus",
        "value": _subscribed_skus(tenant),
    })


def _subscriptions_page(core: Core, req: Request, subs: list[dict[str, Any]]) -> Response:
    """One page of ``directory/subscriptions`` (``directory_page_size`` a page), with an
    absolute ``@odata.nextLink`` while more are left, as Graph pages it."""
    try:
        skip = int(req.query.get("$skiptoken") or 0)
    except ValueError:
        return graph_error(req, 400, "BadRequest", "Invalid $skiptoken.")
    size = max(1, core.tenants.directory_page_size)
    value: list[Any] = subs[skip : skip + size]
    if core.tenants.roll(core.tenants.faults.directory_non_object):
        value.insert(len(value) // 2, None)  # the fault: a null among the subscriptions
    body: dict[str, Any] = {
        "@odata.context": f"{core.graph_url}/$metadata#directory/subscriptions",
        "value": value,
    }
    if skip + size < len(subs):
        body["@odata.nextLink"] = (
            f"{core.graph_url}/directory/subscriptions?$skiptoken={quote(str(skip + size))}")
    return json_response(200, body)


def _denied(core: Core, req: Request) -> Response:
    core.tenants.count("directory_denied")
    return graph_error(req, 403, "Authorization_RequestDenied", DENIED)


def _throttled(req: Request, seconds: float) -> Response:
    return graph_error(
        req, 429, "TooManyRequests",
        "Too many requests: the tenant's directory is throttling this application. Retry "
        "after the time in the Retry-After header.",
        headers={"Retry-After": retry_after_text(seconds)},
    )


def _relationships(core: Core, req: Request) -> Response:
    try:
        top = int(req.query.get("$top") or 100)
        skip = int(req.query.get("$skiptoken") or 0)
    except ValueError:
        return graph_error(req, 400, "BadRequest", "Invalid $top or $skiptoken.")
    top = max(1, min(top, core.tenants.gdap_page_size))
    with_gdap = [t for t in core.tenants.snapshot() if t.gdap_status]
    page = with_gdap[skip : skip + top]
    value: list[Any] = [_relationship(t) for t in page]
    if core.tenants.roll(core.tenants.faults.gdap_non_object):
        value.insert(len(value) // 2, 42)  # the fault: a number among the relationships
    body: dict[str, Any] = {
        "@odata.context": f"{core.graph_url}/$metadata#tenantRelationships/"
                          "delegatedAdminRelationships",
        "value": value,
    }
    if skip + top < len(with_gdap):
        # The fault: a next link to another host (a client must not send its token there).
        host = ("https://graph.attacker.invalid/v1.0"
                if core.tenants.roll(core.tenants.faults.gdap_foreign_next_link)
                else core.graph_url)
        body["@odata.nextLink"] = (
            f"{host}/tenantRelationships/delegatedAdminRelationships"
            f"?$top={top}&$skiptoken={quote(str(skip + top))}"
        )
    return json_response(200, body)


def _relationship(t: CustomerTenant) -> dict[str, Any]:
    return {
        "@odata.type": "#microsoft.graph.delegatedAdminRelationship",
        "id": f"{t.tenant_id[:8]}-gdap-{t.tenant_id}",
        "displayName": f"comms-{t.domain}"[:50],
        "duration": "P730D",
        "status": t.gdap_status,
        "autoExtendDuration": "P180D",
        "createdDateTime": "2026-11-01T00:00:00Z",
        "lastModifiedDateTime": "2026-11-01T00:00:00Z",
        "activatedDateTime": "2026-11-02T00:00:00Z" if t.gdap_status == "active" else None,
        "endDateTime": "2028-11-01T00:00:00Z",
        "customer": {"tenantId": t.tenant_id, "displayName": t.company_name},
        "accessDetails": {"unifiedRoles": [
            {"roleDefinitionId": "f2ef992c-3afb-46b9-b7cf-a126ee74c451"}  # Global Reader
        ]},
    }


def _company_subscriptions(core: Core, t: CustomerTenant) -> list[dict[str, Any]]:
    # Graph's order is not defined: the partner's CSP subscriptions come first here, so with
    # a small page size the direct one is on a later page.
    out: list[dict[str, Any]] = []
    for sub in t.csp:
        if sub.get("billingType") != "license":
            continue  # an Azure plan is no companySubscription of the directory
        out.append({
            "id": sub["id"], "commerceSubscriptionId": sub["id"],
            "createdDateTime": sub["creationDate"], "isTrial": bool(sub.get("isTrial")),
            "nextLifecycleDateTime": sub["commitmentEndDate"],
            "ownerId": None, "ownerTenantId": core.tenant_id, "ownerType": "Company",
            **_sku(sub), "status": CSP_STATUS.get(str(sub["status"]), "Enabled"),
            "totalLicenses": sub["quantity"], "serviceStatus": [],
        })
    if t.direct is not None:
        out.append(dict(t.direct))
    out += [{k: v for k, v in p.items() if k != "assigned"} for p in t.products]
    return out


def _sku(sub: dict[str, Any]) -> dict[str, str]:
    """The SKU of a Partner Center subscription as the directory shows it: an add-on's own,
    else Microsoft 365 E3."""
    if sub.get("parentSubscriptionId"):
        return {"skuId": ADD_ON_SKU_ID, "skuPartNumber": ADD_ON_SKU_PART}
    return {"skuId": CSP_SKU_ID, "skuPartNumber": "SPE_E3"}


def _subscribed_skus(t: CustomerTenant) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if t.direct is not None:
        status = str(t.direct["status"])
        total = int(t.direct["totalLicenses"])
        units = {"enabled": 0, "suspended": 0, "warning": 0, "lockedOut": 0}
        key = {"Enabled": "enabled", "Suspended": "suspended", "Warning": "warning",
               "LockedOut": "lockedOut"}.get(status)
        if key:
            units[key] = total
        out.append({
            "accountId": t.tenant_id, "accountName": t.company_name, "appliesTo": "User",
            "capabilityStatus": status, "consumedUnits": t.assigned,
            "id": f"{t.tenant_id}_{t.direct['skuId']}", "prepaidUnits": units,
            "servicePlans": [], "skuId": t.direct["skuId"],
            "skuPartNumber": t.direct["skuPartNumber"],
            "subscriptionIds": [t.direct["commerceSubscriptionId"]],
        })
    for p in t.products:
        out.append({
            "accountId": t.tenant_id, "accountName": t.company_name, "appliesTo": "User",
            "capabilityStatus": p["status"], "consumedUnits": p["assigned"],
            "id": f"{t.tenant_id}_{p['skuId']}",
            "prepaidUnits": {"enabled": p["totalLicenses"] if p["status"] == "Enabled" else 0,
                             "suspended": 0, "warning": 0, "lockedOut": 0},
            "servicePlans": [], "skuId": p["skuId"], "skuPartNumber": p["skuPartNumber"],
            "subscriptionIds": [p["commerceSubscriptionId"]],
        })
    active = [s for s in t.csp if s["status"] == "active" and s.get("billingType") == "license"
              and not s.get("parentSubscriptionId")]  # an add-on is a product of its own
    if active:
        out.append({
            "accountId": t.tenant_id, "accountName": t.company_name, "appliesTo": "User",
            "capabilityStatus": "Enabled", "consumedUnits": 0,
            "id": f"{t.tenant_id}_{CSP_SKU_ID}",
            "prepaidUnits": {"enabled": sum(int(s["quantity"]) for s in active),
                             "suspended": 0, "warning": 0, "lockedOut": 0},
            "servicePlans": [], "skuId": CSP_SKU_ID, "skuPartNumber": "SPE_E3",
            "subscriptionIds": [s["id"] for s in active],
        })
    return out

