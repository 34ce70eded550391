"""Graph JSON batching: ``POST /v1.0/$batch`` with ``{"requests": [{"id", "method", "url",
"headers"?, "body"?, "dependsOn"?}, ...]}`` (at most 20), answered ``{"responses": [{"id",
"status", "headers", "body"}, ...]}`` (in request order; Graph may answer in any order, clients
match by ``id``).

Each request is answered by the same routes as on its own, with the batch's Authorization, so
each is authenticated, throttled (a 429 with its own ``Retry-After``) and counted toward the
mailbox concurrency limit separately.

Sequencing (``dependsOn``, an array of ids of earlier requests): a request runs only after the
requests it depends on; if one of them did not succeed (not 2xx) it is not run and is answered
``424`` with a Graph error (code ``FailedDependency``). An id that is not an earlier request's,
or a batch mixing sequenced and independent requests (anything but the first request without
``dependsOn`` while others have it: Graph answers such batches "Batch should be either fully
sequential or fully parallel"), is refused whole with 400.

Concurrency: Graph dispatches the independent requests of a batch to the Outlook service
together (four at a time, and the Outlook service may run them in parallel), so a batch of 20
independent reads to one mailbox meets its limit of 4 in flight: the sandbox runs the requests
of one level (independent ones; then those whose dependencies are all in earlier levels) with
every mailbox slot they take held until the whole level has been answered. The first few get
through, the rest 429 ``MailboxConcurrency`` (fewer get through when the mailbox already has
requests in flight). A chain (request n depends on n-1) has one request a level: one request in
flight for the mailbox at a time. A JSON body is answered as JSON, any other body
base64-encoded, as Graph does.
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


class _Invalid(ValueError):
    """The batch is refused whole (400)."""


def handle(core: Core, req: Request) -> Response | None:
    """Answer ``/v1.0/$batch``; None for any other path."""
    if [s.lower() for s in req.segments] != ["v1.0", "$batch"]:
        return None
    if req.method != "POST":
        return graph_error(req, 405, "Request_BadRequest", "$batch takes POST.")
    core.state.count("batches")
    try:
        payload = json.loads(req.body or b"{}")
        items = payload["requests"]
        if not isinstance(items, list) or not items or not all(
                isinstance(item, dict) for item in items):
            raise ValueError("no requests")
    except (ValueError, KeyError, TypeError):
        return graph_error(req, 400, "BadRequest", "Invalid batch payload: expected "
                                                   "{\"requests\": [...]}.")
    if len(items) > MAX_REQUESTS:
        return graph_error(req, 400, "BadRequest", f"Number of batch request steps exceeds the "
                                                   f"maximum of {MAX_REQUESTS}.")
    try:
        levels = _levels(items)
    except _Invalid as exc:
        return graph_error(req, 400, "BadRequest", str(exc))
    from comms.sandbox.routes import route  # routes imports this module

    answers: dict[int, dict[str, Any]] = {}
    for level in levels:
        # Graph runs a level's requests in parallel: their mailbox slots are all taken at once.
        with core.state.together():
            for n in level:
                item = items[n]
                failed = [d for d in _depends(item) if not _ok(answers, items, d)]
                answers[n] = (_failed_dependency(req, item, failed[0]) if failed
                              else _one(core, req, item, route))
    return json_response(200, {"responses": [answers[n] for n in range(len(items))]})


def _depends(item: dict[str, Any]) -> list[str]:
    return [str(d) for d in item.get("dependsOn") or []]


def _ok(answers: dict[int, dict[str, Any]], items: list[dict[str, Any]], ident: str) -> bool:
    n = next(i for i, item in enumerate(items) if str(item.get("id", "")) == ident)
    return 200 <= int(answers[n]["status"]) < 300


def _levels(items: list[dict[str, Any]]) -> list[list[int]]:
    """The requests' indexes by level: independent ones first, then each request one level
    after the latest request it depends on. Raises ``_Invalid`` for a bad ``dependsOn``."""
    level_of: dict[str, int] = {}
    levels: list[list[int]] = []
    sequenced = any("dependsOn" in item for item in items)
    for n, item in enumerate(items):
        ident = str(item.get("id", ""))
        deps = item.get("dependsOn")
        if deps is not None and (not isinstance(deps, list) or not deps or not all(
                isinstance(d, str | int) for d in deps)):
            raise _Invalid(f"dependsOn of request {ident!r} must be an array of request ids.")
        if sequenced and n > 0 and deps is None:
            raise _Invalid("Batch should be either fully sequential or fully parallel.")
        unknown = [str(d) for d in deps or [] if str(d) not in level_of]
        if unknown:
            raise _Invalid(f"Invalid dependency for request Id {ident!r}: {unknown[0]!r} is not "
                           "the id of an earlier request in the batch.")
        if ident in level_of:
            raise _Invalid(f"Request Id {ident!r} is used more than once in the batch.")
        level = 1 + max((level_of[str(d)] for d in deps or []), default=-1)
        level_of[ident] = level
        while len(levels) <= level:
            levels.append([])
        levels[level].append(n)
    return levels


def _failed_dependency(outer: Request, item: dict[str, Any], failed: str) -> dict[str, Any]:
    ident = str(item.get("id", ""))
    bad = graph_error(outer, 424, "FailedDependency",
                      f"The request depends on request {failed!r}, which failed.")
    return {"id": ident, "status": 424, "headers": {"Content-Type": "application/json"},
            "body": json.loads(bad.body)}


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
