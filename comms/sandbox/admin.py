"""The sandbox's own admin endpoints (no token; loopback only), for tests, the demo and
``comms sandbox``: inspect what was sent, set fault knobs, approve device codes, revoke tokens,
and drive the customer tenants that Partner Center and the directory report.

- ``GET /_sandbox/sent``, ``GET /_sandbox/stats``, ``GET|POST /_sandbox/faults``
- ``POST /_sandbox/device/approve`` (``{"user_code", "user"}``), ``POST /_sandbox/revoke``
- ``GET /_sandbox/tenants``; ``POST /_sandbox/tenants`` (``{"tenant_id", "domain",
  "company_name", "direct_licences", "assigned", "consented"}``) adds one;
  ``POST /_sandbox/tenants/{id}/{action}`` applies ``accept_relationship``, ``gdap``
  (``{"status"}``), ``activate_csp`` (``{"quantity", "offer": "m365"|"azure_plan"|"add_on",
  "trial"}``),
  ``add_direct_product`` (``{"sku_part_number", "total", "assigned", "status"}``),
  ``csp_status`` (``{"status"}``),
  ``direct_status`` (``{"status"}``: Enabled, Warning, Suspended, Deleted, LockedOut, absent),
  ``assigned`` (``{"count"}``) or ``consent`` (``{"granted"}``)
- ``GET|POST /_sandbox/sync-faults``: 429 storms and 5xx for Partner Center and the directory
"""

from __future__ import annotations

import dataclasses
import json

from comms.sandbox import identity
from comms.sandbox.core import Core
from comms.sandbox.web import Request, Response, json_response


def handle(core: Core, req: Request) -> Response:
    what = "/".join(req.segments[1:])
    state = core.state
    try:
        payload = json.loads(req.body) if req.body.strip() else {}
    except json.JSONDecodeError:
        return json_response(400, {"error": "body must be JSON"})
    from comms.sandbox import inbox  # /_sandbox/inbox/...: inject replies, NDRs, dead addresses

    if (answer := inbox.admin(core, req, what, payload)) is not None:
        return answer
    if what == "sent" and req.method == "GET":
        return json_response(200, state.records())
    if what == "stats" and req.method == "GET":
        return json_response(200, {**state.stats(), **core.tenants.stats()})
    if what == "faults":
        if req.method == "POST":
            try:
                state.set_faults(**payload)
            except (TypeError, ValueError) as exc:
                return json_response(400, {"error": str(exc)})
        return json_response(200, state.faults.as_dict())
    if what == "device/approve" and req.method == "POST":
        try:
            identity.approve_device_code(core, str(payload["user_code"]), str(payload["user"]))
        except KeyError as exc:
            return json_response(404, {"error": str(exc.args[0])})
        return json_response(200, {"approved": True})
    if what == "revoke" and req.method == "POST":
        core.tokens.revoke_all()
        return json_response(200, {"revoked": True})
    if req.segments[1:2] == ["tenants"] or what == "sync-faults":
        return _tenants(core, req, payload)
    return json_response(404, {"error": f"no admin endpoint {req.method} /_sandbox/{what}"})


def _tenants(core: Core, req: Request, payload: dict[str, object]) -> Response:
    world = core.tenants
    rest = req.segments[2:]
    try:
        if req.segments[1] == "sync-faults":
            if req.method == "POST":
                world.set_faults(**payload)
            return json_response(200, dataclasses.asdict(world.faults))
        if not rest and req.method == "GET":
            return json_response(200, [t.summary() for t in world.snapshot()])
        if not rest and req.method == "POST":
            tenant = world.add(
                str(payload["tenant_id"]), str(payload["domain"]),
                str(payload.get("company_name") or ""),
                direct_licences=int(str(payload.get("direct_licences") or 0)),
                assigned=None if payload.get("assigned") is None
                else int(str(payload["assigned"])),
                consented=bool(payload.get("consented", True)),
            )
            return json_response(201, tenant.summary())
        if len(rest) == 2 and req.method == "POST":
            return json_response(200, world.change(rest[0], rest[1], **payload))
    except KeyError as exc:
        return json_response(404, {"error": f"missing or unknown: {exc.args[0]}"})
    except (TypeError, ValueError) as exc:
        return json_response(400, {"error": str(exc)})
    return json_response(404, {"error": f"no admin endpoint {req.method} {req.path}"})
