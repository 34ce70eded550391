"""Graph JSON batching: ``POST /v1.0/$batch`` with ``{"requests": [{"id", "method", "url",
"headers"?, "body"?}, ...]}`` (at most 20), answered ``{"responses": [{"id", "status",
"headers", "body"}, ...]}``.

Each request is answered by the same routes as on its own, with the batch's Authorization, so
each is authenticated, throttled (a 429 with its own ``Retry-After``) and counted toward the
mailbox concurrency limit separately. The sandbox runs them one after the other, in order (Graph
may run them in parallel: a batch of reads to one mailbox can then meet its concurrency limit).
A JSON body is answered as JSON, any other body base64-encoded, as Graph does.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from comms.sandbox.web import Request, Response, graph_error, json_response

if TYPE_CHECKING:
    from comms.sandbox.core import Core

MAX_REQUESTS = 20


def handle(core: Core, req: Request) -> Response | None:
    """Answer ``/v1.0/$batch``; None for any other path."""
    if [s.lower() for s in req.segments] != ["v1.0", "$batch"]:
        return None
    if req.method != "POST":
        return graph_error(req, 405, "Request_BadRequest", "$batch takes POST.")
    try:
        payload = json.loads(req.body or b"{}")
        items = payload["requests"]
        if not isinstance(items, list) or not items:
            raise ValueError("no requests")
    except (ValueError, KeyError, TypeError):
        return graph_error(req, 400, "BadRequest", "Invalid batch payload: expected "
                                                   "{\"requests\": [...]}.")
    if len(items) > MAX_REQUESTS:
        return graph_error(req, 400, "BadRequest", f"Number of batch request steps exceeds the "
                                                   f"maximum of {MAX_REQUESTS}.")
    from comms.sandbox.routes import route  # routes imports this module

    responses = [_one(core, req, item, route) for item in items]
    return json_response(200, {"responses": responses})


def _one(core: Core, outer: Request, item: dict[str, Any], route: Any) -> dict[str, Any]:
    ident = str(item.get("id", ""))
    url = str(item.get("url", ""))
    if not ident or not url:
        bad = graph_error(outer, 400, "BadRequest", "A batch request needs an id and a url.")
        return {"id": ident, "status": 400, "headers": {}, "body": json.loads(bad.body)}
    split = urlsplit("/v1.0/" + url.lstrip("/"))
    headers = {k: v for k, v in outer.headers.items()
               if k in ("authorization", "client-request-id")}
    headers.update({str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()})
    body = item.get("body")
    sub = Request(
        method=str(item.get("method", "GET")).upper(), path=split.path,
        segments=[unquote(s) for s in split.path.split("/") if s],
        query=dict(parse_qsl(split.query, keep_blank_values=True)), headers=headers,
        body=json.dumps(body).encode() if body is not None else b"",
    )
    answer: Response = route(core, sub)
    if answer.drop:  # a connection dropped on its own: the batch answers a gateway timeout
        answer = graph_error(sub, 504, "GatewayTimeout", "The request timed out.")
    out_headers = dict(answer.headers)
    if answer.content_type:
        out_headers["Content-Type"] = answer.content_type
    out: dict[str, Any] = {"id": ident, "status": answer.status, "headers": out_headers}
    if answer.body:
        if answer.content_type.startswith("application/json"):
            out["body"] = json.loads(answer.body)
        else:
            out["body"] = base64.b64encode(answer.body).decode("ascii")
    return out
