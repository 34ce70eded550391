"""Partner Center's REST API as the sandbox serves it (under ``/v1``, app-only tokens for
``https://api.partnercenter.microsoft.com`` issued in the partner tenant).

- ``GET /v1/customers?size=N``: the customers with a reseller relationship, a page at a time.
  The collection carries ``continuationToken`` and ``links.next`` (``uri`` with
  ``seekOperation=Next`` and the ``MS-ContinuationToken`` header to send with it).
- ``GET /v1/customers/{tenant}/subscriptions``: the partner's (CSP) subscriptions of that
  customer (add-ons carry ``parentSubscriptionId``); 404 for a customer without a relationship.
  All in one answer, or ``subscriptions_page_size`` a page with ``links.next`` like the
  customers (``totalCount``: all of them); whether Partner Center pages this collection is not
  documented.

Throttling (per partner tenant, rolling minute scaled by ``time_scale``) answers 429 with
``Retry-After``; the fault knobs add 429 storms and 500/503 answers.
"""

from __future__ import annotations

import base64
import math
from typing import Any
from urllib.parse import quote

from comms.sandbox import bearer
from comms.sandbox.core import Core
from comms.sandbox.state import retry_after_text
from comms.sandbox.tenants import CustomerTenant
from comms.sandbox.tokens import PARTNER_CENTER_RESOURCE, InvalidToken
from comms.sandbox.web import Request, Response, json_response

DEFAULT_PAGE = 100


def _error(status: int, code: int, description: str, headers: dict[str, str] | None = None
           ) -> Response:
    # Partner Center's error body (code, description, data, source).
    body = {"code": code, "description": description, "data": [], "source": "PartnerFD"}
    return json_response(status, body, headers)


def handle(core: Core, req: Request) -> Response | None:
    """Answer a request under ``/v1`` (not ``/v1.0``), or None for another path."""
    segs = req.segments
    if not segs or segs[0].lower() != "v1":
        return None
    world = core.tenants
    world.count("pc_requests")
    try:
        who = bearer.principal(core, req, [PARTNER_CENTER_RESOURCE, PARTNER_CENTER_RESOURCE + "/"])
    except InvalidToken as exc:
        core.state.count("unauthorized")
        return _error(401, 401, f"Unauthorized: {exc}")
    if who.tenant_id.lower() != core.tenant_id.lower():
        return _error(403, 403, "The token is not for the partner tenant.")
    wait = world.take_pc()
    if wait is not None:
        world.count("pc_throttled")
        return _throttled(wait)
    faults = world.faults
    if world.roll(faults.pc_throttle_rate):
        world.count("pc_throttled")
        return _throttled(world.rng.uniform(0.5, 2.0) * min(1.0, max(world.time_scale, 0.02)))
    if world.roll(faults.pc_error_rate):
        world.count("pc_errors")
        if world.roll(0.5):
            return _error(503, 503, "The service is temporarily unavailable.",
                          {"Retry-After": "1"})
        return _error(500, 500, "An internal error occurred.")
    if req.method != "GET":
        return _error(405, 405, "Only GET is emulated.")
    rest = [s.lower() for s in segs[1:]]
    if rest == ["customers"]:
        return _customers(core, req)
    if len(rest) == 3 and rest[0] == "customers" and rest[2] == "subscriptions":
        return _subscriptions(core, req, segs[2])
    return _error(404, 404, f"No Partner Center resource {req.path}")


def _throttled(seconds: float) -> Response:
    whole = max(1, math.ceil(seconds)) if seconds >= 1 else None
    text = retry_after_text(seconds)
    return json_response(
        429,
        {"statusCode": 429,
         "message": f"Rate limit is exceeded. Try again in {whole or text} seconds."},
        {"Retry-After": text},
    )


def _customer(t: CustomerTenant) -> dict[str, Any]:
    return {
        "id": t.tenant_id,
        "commerceId": t.tenant_id,
        "companyProfile": {
            "tenantId": t.tenant_id,
            "domain": t.domain,
            "companyName": t.company_name,
            "links": {"self": {"uri": f"/customers/{t.tenant_id}/profiles/company",
                               "method": "GET", "headers": []}},
            "attributes": {"objectType": "CustomerCompanyProfile"},
        },
        "relationshipToPartner": t.listed_as,
        "allowDelegatedAccess": t.gdap_status == "active",
        "links": {"self": {"uri": f"/customers/{t.tenant_id}", "method": "GET", "headers": []}},
        "attributes": {"objectType": "Customer"},
    }


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode("ascii")


def _offset(token: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
        return int(text.removeprefix("offset:")) if text.startswith("offset:") else None
    except (ValueError, UnicodeError):
        return None


def _customers(core: Core, req: Request) -> Response:
    world = core.tenants
    try:
        size = int(req.query.get("size") or DEFAULT_PAGE)
    except ValueError:
        return _error(400, 400, f"size must be a number, got {req.query.get('size')!r}")
    size = max(1, min(size, world.page_size_max))
    offset = _seek(req)
    if offset is None:
        return _bad_token()
    if world.roll(world.faults.pc_error_body_next_page if offset
                  else world.faults.pc_error_body_first_page):
        return _error_body()
    listed = [t for t in world.snapshot() if t.relationship]
    page = listed[offset : offset + size]
    items: list[Any] = [_customer(t) for t in page]
    if world.roll(world.faults.pc_customers_non_object):
        items.insert(len(items) // 2, None)  # the fault: a null among the customers
    body: dict[str, Any] = {
        "totalCount": len(page),
        "items": items,
        "links": {"self": {"uri": f"/customers?size={size}", "method": "GET", "headers": []}},
        "attributes": {"objectType": "Collection"},
    }
    if offset + size < len(listed):
        token = _token(offset + size)
        if offset and world.roll(world.faults.pc_repeat_token):
            token = _token(offset)  # the fault: the token just sent again (a cycle)
        body["continuationToken"] = token
        body["links"]["next"] = {
            "uri": f"/customers?size={size}&seekOperation=Next",
            "method": "GET",
            "headers": [{"key": "MS-ContinuationToken", "value": token}],
        }
    return json_response(200, body)


def _seek(req: Request) -> int | None:
    """Where a page starts: 0, or the offset of ``links.next``'s ``MS-ContinuationToken``
    (None when it is missing or invalid)."""
    if req.query.get("seekOperation", "").lower() != "next":
        return 0
    token = req.header("MS-ContinuationToken")
    return _offset(token) if token else None


def _bad_token() -> Response:
    return _error(400, 400, "The continuation token is missing or invalid: send the "
                  "MS-ContinuationToken header of links.next.")


def _error_body() -> Response:
    """The fault: 200 with Partner Center's error shape instead of the collection."""
    return json_response(200, {"code": 3000, "description": "Service error",
                               "data": [], "source": "PartnerFD"})


def _subscriptions(core: Core, req: Request, tenant_id: str) -> Response:
    world = core.tenants
    if world.roll(world.faults.pc_error_body_subscriptions):
        return _error_body()
    tenant = world.find(tenant_id)
    if tenant is None or not tenant.relationship:
        return _error(404, 600, f"Customer {quote(tenant_id)} was not found for this partner.")
    offset = _seek(req)
    if offset is None:
        return _bad_token()
    size = world.subscriptions_page_size or max(1, len(tenant.csp))
    items: list[Any] = tenant.csp[offset : offset + size]
    if world.roll(world.faults.pc_subscriptions_non_object):
        items.insert(len(items) // 2, "subscription")  # the fault: a string among them
    uri = f"/customers/{tenant.tenant_id}/subscriptions"
    body: dict[str, Any] = {
        "totalCount": len(tenant.csp),
        "items": items,
        "links": {"self": {"uri": uri, "method": "GET", "headers": []}},
        "attributes": {"objectType": "Collection"},
    }
    if offset + size < len(tenant.csp) and not world.roll(world.faults.pc_subscriptions_no_next):
        token = _token(offset + size)
        body["continuationToken"] = token
        body["links"]["next"] = {
            "uri": f"{uri}?seekOperation=Next", "method": "GET",
            "headers": [{"key": "MS-ContinuationToken", "value": token}],
        }
    return json_response(200, body)
