"""Which emulated service answers a request: one module per service.

- ``/_sandbox/...``: ``admin``
- ``/v1/...``: ``partner_center`` (Partner Center REST)
- ``/v1.0/...``: the Graph services in ``GRAPH_SERVICES`` order, each answering or passing
  (None); ``graph`` (mail) answers the rest, with Graph's own 400 for unknown resources
- anything else: ``identity`` (the Microsoft identity platform), else 404
"""

from __future__ import annotations

from collections.abc import Callable

from comms.sandbox import admin, batch, directory, graph, identity, partner_center
from comms.sandbox.core import Core
from comms.sandbox.web import Request, Response, json_response

GraphService = Callable[[Core, Request], Response | None]

# Graph services tried before mail; a new one (e.g. inbox delta) registers with one line here.
GRAPH_SERVICES: list[GraphService] = [
    batch.handle,  # JSON batching: each request routed as if sent on its own
    directory.handle,
]


def route(core: Core, req: Request) -> Response:
    segs = req.segments
    if segs and segs[0] == "_sandbox":
        return admin.handle(core, req)
    if segs and segs[0].lower() == "v1.0":
        for service in GRAPH_SERVICES:
            answer = service(core, req)
            if answer is not None:
                return answer
        return graph.handle(core, req)
    answer = partner_center.handle(core, req)
    if answer is not None:
        return answer
    answer = identity.handle(core, req)
    if answer is not None:
        return answer
    return json_response(404, {"error": {"code": "NotFound", "message": f"No route {req.path}"}})
