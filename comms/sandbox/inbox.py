"""Each sender mailbox's Inbox as Graph serves it: delta queries, attachments, and the NDRs,
replies and auto-replies that land there.

- ``GET /v1.0/users/{id}/mailFolders/inbox/messages/delta`` (and ``/me/...``): a round of pages.
  The first request may carry ``$select``; each page answers ``@odata.nextLink`` (a
  ``$skiptoken``) until the round is complete, whose last page answers ``@odata.deltaLink`` (a
  ``$deltatoken``); a later request with that link returns only what arrived since. The query
  options of the first request are encoded into the tokens, as Graph does. Page size: 10, or
  ``Prefer: odata.maxpagesize=N`` (answered with ``Preference-Applied``).
- ``GET /v1.0/users/{id}/messages/{mid}/attachments`` (``fileAttachment`` with ``contentBytes``,
  ``itemAttachment`` without) and ``.../attachments/{aid}/$value`` (an item attachment's MIME).
- ``GET .../mailFolders/sentitems/messages?$filter=internetMessageId eq '<...>'`` (the lookup that
  matches a reply or an NDR to the message it answers).

Reads need ``Mail.Read``/``Mail.ReadWrite`` (or ``Mail.ReadBasic``: then no body, no
attachments), count toward the mailbox concurrency limit like every mailbox call, and can be
answered 429 + ``Retry-After`` or 503 by the read fault knobs.

Admin (``/_sandbox/inbox/...``, no token): ``POST inject`` (``kind`` = reply, auto_reply, ndr,
raw), ``POST dead`` (addresses that bounce: a message sent to one produces an NDR by itself),
``POST faults`` (``read_throttle_rate``, ``read_error_rate``; ``read_throttle_at``: which of
the coming reads, 1 = the next, are answered 429), ``POST clock`` (``now``,
``ndr_delay_seconds``: what arrives is dated on a simulated timeline), ``GET messages``.
In-process, ``InboxAdmin.set_clock`` takes any clock (the demo's simulated one).

What an Exchange Online NDR looks like here: from ``postmaster@<sender domain>`` (or the
``MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@`` system mailbox), subject
"Undeliverable: <original subject>", a body naming the recipient and ``Remote Server returned
'550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'``, headers ``X-MS-Exchange-Message-Is-Ndr``,
``Auto-Submitted: auto-replied``, ``In-Reply-To``/``References`` = the original's Message-ID,
and two attachments: the delivery status (``message/delivery-status``, ``Status: 5.1.1``) and
the original message (an ``itemAttachment``, or with ``attach="file"`` a ``fileAttachment`` of
``message/rfc822``, or ``attach="headers"`` a ``text/rfc822-headers`` file) whose headers keep
``x-comms-send-id``.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from comms.delivery.base import SEND_ID_HEADER, SEND_ID_PROPERTY_ID
from comms.sandbox.web import Request, Response, graph_error, json_response

if TYPE_CHECKING:
    from comms.sandbox.core import Core
    from comms.sandbox.tokens import Principal

DEFAULT_PAGE = 10
MAX_PAGE = 1000
SYSTEM_MAILBOX = "MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e"
NDR_TEXT = {
    "5.1.1": "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
    "5.1.10": "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address "
              "lookup",
    "5.2.2": "552 5.2.2 STOREDRV.Deliver; mailbox full",
    "5.7.1": "550 5.7.1 RESOLVER.RST.AuthRequired; authentication required",
    "4.4.7": "450 4.4.7 Message expired",
    "4.2.2": "452 4.2.2 The email account that you tried to reach is over quota",
}
DEFAULT_SELECT = (
    "subject", "bodyPreview", "body", "receivedDateTime", "sentDateTime", "hasAttachments",
    "internetMessageId", "conversationId", "from", "sender", "toRecipients", "ccRecipients",
    "replyTo", "isRead", "parentFolderId", "createdDateTime", "lastModifiedDateTime",
    "importance",
)
_MIME_FILTER = re.compile(
    r"^\s*(internetMessageId|conversationId)\s+eq\s+'((?:[^']|'')*)'\s*$", re.IGNORECASE
)


@dataclass
class InboxStore:
    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    by_id: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (mailbox, id)
    seq: int = 0
    dead: set[str] = field(default_factory=set)
    read_throttle_rate: float = 0.0
    read_error_rate: float = 0.0
    # Deterministic throttling: the reads (1 = the next one, counted from when set) answered 429.
    read_throttle_at: frozenset[int] = frozenset()
    reads_seen: int = 0
    # The Inbox's clock (None: real time). A simulation (`comms demo`) sets its own, so that
    # what arrives is dated on its timeline; NDRs produced by a send arrive ``ndr_delay`` later.
    clock: Callable[[], dt.datetime] | None = None
    ndr_delay: dt.timedelta = field(default_factory=dt.timedelta)
    counters: dict[str, int] = field(default_factory=lambda: {
        "delta_requests": 0, "attachment_requests": 0, "read_throttled": 0, "read_errors": 0,
        "ndr_generated": 0, "injected": 0,
    })


def store(core: Core) -> InboxStore:
    """The inbox state of one sandbox (kept on its Core, created on first use)."""
    found = core.__dict__.get("_inbox_store")
    if found is None:
        with core.devices_lock:
            found = core.__dict__.setdefault("_inbox_store", InboxStore())
    assert isinstance(found, InboxStore)
    return found


def _now(at: dt.datetime | None = None) -> str:
    return (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clock_now(core: Core) -> dt.datetime:
    """The time on the Inbox's clock (real time unless a simulation set one)."""
    clock = store(core).clock
    return clock() if clock is not None else dt.datetime.now(dt.UTC)


def _new_id(prefix: str = "AAMkAD") -> str:
    return prefix + base64.urlsafe_b64encode(os.urandom(24)).decode("ascii").rstrip("=")


def _addr(address: str, name: str = "") -> dict[str, Any]:
    return {"emailAddress": {"name": name or address, "address": address}}


# -- delivering into an Inbox ------------------------------------------------------------------


def deliver(
    core: Core, mailbox: str, message: dict[str, Any], *, at: dt.datetime | None = None
) -> dict[str, Any]:
    """Put a Graph message resource into ``mailbox``'s Inbox (fills ids and times: ``at``, or
    now on the Inbox's clock)."""
    st = store(core)
    stamp = _now(at or clock_now(core))
    message.setdefault("id", _new_id())
    message.setdefault("internetMessageId", f"<{os.urandom(16).hex()}@sandbox.example>")
    message.setdefault("conversationId", _new_id("AAQkAD"))
    for key in ("createdDateTime", "lastModifiedDateTime", "receivedDateTime", "sentDateTime"):
        message.setdefault(key, stamp)
    message.setdefault("toRecipients", [_addr(mailbox)])
    message.setdefault("ccRecipients", [])
    message.setdefault("replyTo", [])
    message.setdefault("importance", "normal")
    message.setdefault("isRead", False)
    message.setdefault("parentFolderId", "inbox")
    message.setdefault("internetMessageHeaders", [])
    message.setdefault("body", {"contentType": "text", "content": ""})
    message.setdefault("_attachments", [])
    message["hasAttachments"] = bool(message["_attachments"])
    content = str(message["body"].get("content") or "")
    message.setdefault("bodyPreview", " ".join(content.split())[:255])
    with st.lock:
        st.seq += 1
        message["_seq"] = st.seq
        st.messages.setdefault(mailbox.lower(), []).append(message)
        st.by_id[(mailbox.lower(), str(message["id"]))] = message
        st.counters["injected"] += 1
    return message


def refile(core: Core, mailbox: str, message_id: str) -> dict[str, Any]:
    """A message moved out of the Inbox and back (filed in a folder and dragged back, restored
    from Deleted Items): Graph gives it a new id (ids are not immutable unless asked for with
    ``Prefer: IdType="ImmutableId"``) and the Inbox's delta lists it again as a new message;
    its internetMessageId stays."""
    st = store(core)
    box = mailbox.lower()
    with st.lock:
        message = st.by_id.pop((box, message_id), None)
        if message is None:
            raise KeyError(f"no message {message_id} in {mailbox}'s Inbox")
        st.messages[box].remove(message)
        message["id"] = _new_id()
        st.seq += 1
        message["_seq"] = st.seq
        st.messages[box].append(message)
        st.by_id[(box, str(message["id"]))] = message
    return message


def _sent_resource(core: Core, mailbox: str, send_id: str) -> dict[str, Any] | None:
    """A message in ``mailbox``'s Sent Items by its comms send id."""
    with core.state.lock:
        items = list(core.state.sent_items.get(mailbox.lower(), []))
    for m in reversed(items):
        props = [(p["id"].lower(), p["value"]) for p in m.get("_properties") or []]
        heads = [(h["name"].lower(), h["value"]) for h in m.get("internetMessageHeaders") or []]
        if (SEND_ID_PROPERTY_ID.lower(), send_id) in props or (SEND_ID_HEADER, send_id) in heads:
            return dict(m)
    return None


def _headers_text(original: dict[str, Any], mailbox: str) -> str:
    """The original message's header block, as Exchange attaches it to an NDR."""
    to = ", ".join(r["emailAddress"]["address"] for r in original.get("toRecipients") or [])
    lines = [
        f"From: {mailbox}",
        f"To: {to}",
        f"Subject: {original.get('subject', '')}",
        f"Date: {original.get('sentDateTime', _now())}",
        f"Message-ID: {original.get('internetMessageId', '')}",
        "MIME-Version: 1.0",
        "Content-Type: text/html; charset=utf-8",
    ]
    lines += [f"{h['name']}: {h['value']}" for h in original.get("internetMessageHeaders") or []]
    return "\r\n".join(lines) + "\r\n"


def ndr(
    core: Core, mailbox: str, *, send_id: str | None = None, recipient: str,
    status: str = "5.1.1", attach: str = "item", system_sender: bool = False,
    original: dict[str, Any] | None = None, at: dt.datetime | None = None,
) -> dict[str, Any]:
    """An Exchange Online non-delivery report for ``recipient`` in ``mailbox``'s Inbox, received
    ``at`` (default: now on the Inbox's clock).

    The original is found in Sent Items by ``send_id`` (or given as a resource). ``attach``:
    ``item`` (itemAttachment, MIME via ``$value``), ``file`` (fileAttachment message/rfc822),
    ``headers`` (text/rfc822-headers), ``none``."""
    mailbox = mailbox.lower()
    at = at or clock_now(core)
    if original is None:
        if send_id is None:
            raise KeyError("an NDR needs send_id (a message in Sent Items) or the original")
        original = _sent_resource(core, mailbox, send_id)
        if original is None:
            raise KeyError(f"no message with send id {send_id} in {mailbox}'s Sent Items")
    domain = mailbox.partition("@")[2]
    sender = f"{SYSTEM_MAILBOX}@{domain}" if system_sender else f"postmaster@{domain}"
    code = NDR_TEXT.get(status, f"550 {status} delivery failed")
    hard = status.startswith("5")
    text = (
        f"Your message to {recipient} couldn't be delivered.\r\n"
        + ("The address couldn't be found, or the mailbox can't accept messages.\r\n" if hard
           else "Delivery is delayed; Exchange keeps trying.\r\n")
        + "\r\nDiagnostic information for administrators:\r\n"
        f"Generating server: AM6PR01MB0001.eurprd01.prod.exchangelabs.com\r\n{recipient}\r\n"
        f"Remote Server returned '{code}'\r\n"
    )
    original_id = str(original.get("internetMessageId") or "")
    headers_text = _headers_text(original, mailbox)
    dsn = (
        f"Reporting-MTA: dns;AM6PR01MB0001.eurprd01.prod.exchangelabs.com\r\n\r\n"
        f"Final-Recipient: rfc822;{recipient}\r\nAction: {'failed' if hard else 'delayed'}\r\n"
        f"Status: {status}\r\nDiagnostic-Code: smtp;{code}\r\n"
    )
    attachments: list[dict[str, Any]] = [_file("details.txt", "message/delivery-status",
                                               dsn.encode(), at)]
    if attach == "item":
        mime = headers_text + "\r\n" + str((original.get("body") or {}).get("content") or "")
        attachments.append({
            "@odata.type": "#microsoft.graph.itemAttachment",
            "id": _new_id("AAMkADAtt"),
            "lastModifiedDateTime": _now(at),
            "name": str(original.get("subject") or "message"),
            "contentType": "message/rfc822",
            "size": len(mime),
            "isInline": False,
            "_mime": mime,
        })
    elif attach == "file":
        mime = headers_text + "\r\n" + str((original.get("body") or {}).get("content") or "")
        attachments.append(_file("message.eml", "message/rfc822", mime.encode(), at))
    elif attach == "headers":
        attachments.append(_file("headers.txt", "text/rfc822-headers", headers_text.encode(),
                                 at))
    message = {
        "subject": f"Undeliverable: {original.get('subject', '')}",
        "from": _addr(sender, "Microsoft Outlook"),
        "sender": _addr(sender, "Microsoft Outlook"),
        "toRecipients": [_addr(mailbox)],
        "body": {"contentType": "text", "content": text},
        "conversationId": original.get("conversationId") or _new_id("AAQkAD"),
        "internetMessageHeaders": [
            {"name": "From", "value": f"Microsoft Outlook <{sender}>"},
            {"name": "To", "value": mailbox},
            {"name": "Subject", "value": f"Undeliverable: {original.get('subject', '')}"},
            {"name": "Content-Type",
             "value": "multipart/report; report-type=delivery-status; boundary=\"b1\""},
            {"name": "In-Reply-To", "value": original_id},
            {"name": "References", "value": original_id},
            {"name": "X-MS-Exchange-Message-Is-Ndr", "value": ""},
            {"name": "Auto-Submitted", "value": "auto-replied"},
        ],
        "_attachments": attachments if attach != "none" else [],
    }
    return deliver(core, mailbox, message, at=at)


def _file(name: str, content_type: str, data: bytes, at: dt.datetime) -> dict[str, Any]:
    return {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "@odata.mediaContentType": content_type,
        "id": _new_id("AAMkADAtt"),
        "lastModifiedDateTime": _now(at),
        "name": name,
        "contentType": content_type,
        "size": len(data),
        "isInline": False,
        "contentId": None,
        "contentLocation": None,
        "contentBytes": base64.b64encode(data).decode("ascii"),
    }


def reply(
    core: Core, mailbox: str, *, sender: str, body: str, send_id: str | None = None,
    subject: str | None = None, auto: bool = False, headers: list[dict[str, str]] | None = None,
    thread: bool = True,
) -> dict[str, Any]:
    """A reply (or, with ``auto``, an automatic reply) from ``sender`` to the message with
    ``send_id``: ``In-Reply-To``/``References`` and ``conversationId`` follow the original when
    ``thread`` (a mail client that drops them: ``thread=False``)."""
    mailbox = mailbox.lower()
    original = _sent_resource(core, mailbox, send_id) if send_id else None
    if send_id and original is None:
        raise KeyError(f"no message with send id {send_id} in {mailbox}'s Sent Items")
    base = str(original.get("subject", "")) if original else ""
    prefix = "Automatic reply: " if auto else "RE: "
    hdrs: list[dict[str, str]] = [
        {"name": "From", "value": sender},
        {"name": "To", "value": mailbox},
    ]
    message: dict[str, Any] = {
        "subject": subject if subject is not None else prefix + base,
        "from": _addr(sender),
        "sender": _addr(sender),
        "body": {"contentType": "text", "content": body},
    }
    if original is not None and thread:
        mid = str(original.get("internetMessageId") or "")
        hdrs += [{"name": "In-Reply-To", "value": mid}, {"name": "References", "value": mid}]
        message["conversationId"] = original.get("conversationId")
    if auto:
        hdrs += [{"name": "Auto-Submitted", "value": "auto-replied"},
                 {"name": "X-Auto-Response-Suppress", "value": "All"}]
    hdrs += list(headers or [])
    message["internetMessageHeaders"] = hdrs
    return deliver(core, mailbox, message)


def after_accept(core: Core, mailbox: str, record: dict[str, Any]) -> None:
    """Called once sendMail accepted a message: a recipient on the dead list bounces."""
    st = store(core)
    with st.lock:
        dead = set(st.dead)
    if not dead:
        return
    bounced = [a for a in record.get("to", []) + record.get("cc", []) if a.lower() in dead]
    if not bounced:
        return
    original = _sent_resource(core, mailbox, str(record.get("send_id") or ""))
    if original is None:  # saveToSentItems=false: build it from the record
        from comms.sandbox.graph import resource_from_record

        original = resource_from_record(record)
    at = clock_now(core) + st.ndr_delay  # the send's time on the Inbox's clock, plus the trip
    for address in bounced:
        ndr(core, mailbox, recipient=address, original=original, at=at)
        with st.lock:
            st.counters["ndr_generated"] += 1


# -- Graph routes ------------------------------------------------------------------------------


def route(
    core: Core, req: Request, principal: Principal, ident: str, rest: list[str], delay: Any
) -> Response | None:
    """Answer the inbox routes (``rest`` = lower-case segments after the user); None: not ours."""
    from comms.sandbox import graph

    folder_delta = (len(rest) == 4 and rest[0] == "mailfolders" and rest[2] == "messages"
                    and rest[3] == "delta")
    attachments = len(rest) >= 3 and rest[0] == "messages" and rest[2] == "attachments"
    sent_lookup = (
        len(rest) == 3 and rest[0] == "mailfolders" and rest[1] == "sentitems"
        and rest[2] == "messages"
        and bool(_MIME_FILTER.match(_query(req).get("filter", "")))
    )
    if not (folder_delta or attachments or sent_lookup):
        return None
    graph._method(req, "GET")
    roles = graph.READ_ROLES | (frozenset() if attachments else {"Mail.ReadBasic",
                                                                "Mail.ReadBasic.All"})
    user = graph._target_mailbox(core, principal, ident, frozenset(roles))
    state = core.state
    throttle = state.begin_request(user.address)
    if throttle is not None:
        return graph._throttled(req, throttle.status, throttle.code, throttle.message,
                                throttle.retry_after)
    try:
        delay.wait()
        fault = _read_fault(core, req)
        if fault is not None:
            return fault
        if folder_delta:
            if rest[1] != "inbox":
                raise graph.BadRequest(400, "ErrorInvalidIdMalformed",
                                       "The sandbox serves delta for the Inbox only.")
            return _delta(core, req, user.address, ident)
        if sent_lookup:
            return _sent_lookup(core, req, user.address)
        return _attachments(core, req, user.address, req.segments[1:], rest)
    finally:
        state.end_request(user.address)


def _read_fault(core: Core, req: Request) -> Response | None:
    st = store(core)
    state = core.state
    with st.lock:
        throttle_rate, error_rate = st.read_throttle_rate, st.read_error_rate
        st.reads_seen += 1
        chosen = st.reads_seen in st.read_throttle_at
    if chosen or state.roll(throttle_rate):
        with st.lock:
            st.counters["read_throttled"] += 1
        from comms.sandbox.state import retry_after_text

        retry = min(1.0, max(0.01, 2.0 * state.time_scale))
        return graph_error(req, 429, "ApplicationThrottled",
                           "Application is over its MailboxConcurrency limit.",
                           headers={"Retry-After": retry_after_text(retry)})
    if state.roll(error_rate):
        with st.lock:
            st.counters["read_errors"] += 1
        return graph_error(req, 503, "ErrorServerBusy", "The server is busy. Try again later.",
                           headers={"Retry-After": "0.05"})
    return None


def _query(req: Request) -> dict[str, str]:
    return {k.lower().lstrip("$"): v for k, v in req.query.items()}


def _encode(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _decode(token: str) -> dict[str, Any]:
    from comms.sandbox import graph

    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return data
    except (ValueError, json.JSONDecodeError) as exc:
        raise graph.BadRequest(400, "SyncStateNotFound",
                               "The sync state generation was not found.") from exc


def _page_size(req: Request) -> tuple[int, bool]:
    prefer = req.header("prefer")
    match = re.search(r"odata\.maxpagesize\s*=\s*(\d+)", prefer)
    if not match:
        return DEFAULT_PAGE, False
    return max(1, min(MAX_PAGE, int(match.group(1)))), True


def _delta(core: Core, req: Request, mailbox: str, ident: str) -> Response:
    from comms.sandbox import graph

    query = _query(req)
    for key in query:
        if key not in ("select", "skiptoken", "deltatoken", "changetype"):
            raise graph.BadRequest(400, "BadRequest",
                                   f"Query option '${key}' is not supported with delta.")
    if "skiptoken" in query:
        token = _decode(query["skiptoken"])
        after, upto, select = int(token["after"]), int(token["upto"]), token.get("select") or []
    else:
        if "deltatoken" in query:
            token = _decode(query["deltatoken"])
            after, select = int(token["after"]), token.get("select") or []
        else:
            after = 0
            select = [s.strip() for s in query.get("select", "").split(",") if s.strip()]
        with store(core).lock:
            upto = store(core).seq
    st = store(core)
    with st.lock:
        st.counters["delta_requests"] += 1
        pending = [m for m in st.messages.get(mailbox, []) if after < m["_seq"] <= upto]
    size, preferred = _page_size(req)
    page = pending[:size]
    values = [_shape(m, select) for m in page]
    base = f"{core.graph_url}/users/{quote(ident, safe='@')}/mailFolders/inbox/messages/delta"
    body: dict[str, Any] = {
        "@odata.context": f"{core.graph_url}/$metadata#Collection(message)",
        "value": values,
    }
    if len(pending) > size:
        skip = _encode({"after": page[-1]["_seq"], "upto": upto, "select": select})
        body["@odata.nextLink"] = f"{base}?$skiptoken={skip}"
    else:
        delta = _encode({"after": upto, "select": select})
        body["@odata.deltaLink"] = f"{base}?$deltatoken={delta}"
    headers = {"Preference-Applied": f"odata.maxpagesize={size}"} if preferred else {}
    return json_response(200, body, headers)


def _shape(message: dict[str, Any], select: list[str]) -> dict[str, Any]:
    from comms.sandbox import graph

    public = {k: v for k, v in message.items() if not k.startswith("_")}
    names = select or list(DEFAULT_SELECT)
    by_lower = {k.lower(): k for k in public}
    out: dict[str, Any] = {"@odata.type": "#microsoft.graph.message",
                           "@odata.etag": f'W/"{message["id"][-16:]}"', "id": public["id"]}
    for name in names:
        key = by_lower.get(name.lower())
        if key is None:
            if name.lower() in {p.lower() for p in graph.MESSAGE_PROPERTIES}:
                continue
            raise graph.BadRequest(
                400, "RequestBroker--ParseUri",
                f"Could not find a property named '{name}' on type 'microsoft.graph.message'.",
            )
        out[key] = public[key]
    return out


def _find(core: Core, mailbox: str, message_id: str) -> dict[str, Any] | None:
    st = store(core)
    with st.lock:
        return st.by_id.get((mailbox, message_id))


def _attachments(
    core: Core, req: Request, mailbox: str, segs: list[str], rest: list[str]
) -> Response:
    from comms.sandbox import graph

    st = store(core)
    with st.lock:
        st.counters["attachment_requests"] += 1
    # segs: users, {id}, messages, {mid}, attachments[, {aid}[, $value]] (or me, messages, ...)
    offset = 1 if segs and segs[0].lower() != "me" else 0
    tail = segs[offset:]
    message = _find(core, mailbox, tail[2]) if len(tail) > 2 else None
    if message is None:
        raise graph.BadRequest(404, "ErrorItemNotFound",
                               "The specified object was not found in the store.")
    items = message["_attachments"]
    if len(rest) == 3:
        values = [{k: v for k, v in a.items() if not k.startswith("_")} for a in items]
        return json_response(200, {
            "@odata.context": f"{core.graph_url}/$metadata#users('{mailbox}')/messages"
                              f"('{message['id']}')/attachments",
            "value": values,
        })
    found = next((a for a in items if a["id"] == tail[4]), None)
    if found is None:
        raise graph.BadRequest(404, "ErrorItemNotFound",
                               "The specified object was not found in the store.")
    if len(rest) == 5 and rest[4] == "$value":
        if "_mime" in found:
            return Response(200, str(found["_mime"]).encode(), content_type="message/rfc822")
        return Response(200, base64.b64decode(found.get("contentBytes") or ""),
                        content_type=str(found.get("contentType") or "application/octet-stream"))
    return json_response(200, {k: v for k, v in found.items() if not k.startswith("_")})


def _sent_lookup(core: Core, req: Request, mailbox: str) -> Response:
    from comms.sandbox import graph

    query = _query(req)
    match = _MIME_FILTER.match(query.get("filter", ""))
    assert match is not None
    key = "internetMessageId" if match.group(1).lower() == "internetmessageid" else "conversationId"
    wanted = match.group(2).replace("''", "'")
    with core.state.lock:
        items = [m for m in core.state.sent_items.get(mailbox, []) if m.get(key) == wanted]
    select = [s.strip() for s in query.get("select", "").split(",") if s.strip()]
    expand = query.get("expand", "")
    values = []
    for m in items[:1]:
        out = graph._shape(m, select, bool(expand), SEND_ID_PROPERTY_ID.lower() if expand
                           else None)
        values.append(out)
    return json_response(200, {"@odata.context": f"{core.graph_url}/$metadata#messages",
                               "value": values})


# -- admin ---------------------------------------------------------------------------------


def admin(core: Core, req: Request, what: str, payload: dict[str, Any]) -> Response | None:
    """``/_sandbox/inbox/...``; None when ``what`` is not an inbox endpoint."""
    if not what.startswith("inbox/"):
        return None
    action = what[len("inbox/"):]
    st = store(core)
    try:
        if action == "inject" and req.method == "POST":
            return json_response(200, _public(inject(core, payload)))
        if action == "dead" and req.method == "POST":
            with st.lock:
                st.dead.update(str(a).strip().lower() for a in payload.get("addresses", []))
                return json_response(200, {"dead": sorted(st.dead)})
        if action == "faults" and req.method == "POST":
            with st.lock:
                for key in ("read_throttle_rate", "read_error_rate"):
                    if key in payload:
                        value = float(payload[key])
                        if not 0.0 <= value <= 1.0:
                            raise ValueError(f"{key} must be between 0 and 1")
                        setattr(st, key, value)
                if "read_throttle_at" in payload:
                    st.read_throttle_at = frozenset(int(n) for n in payload["read_throttle_at"])
                    st.reads_seen = 0
                return json_response(200, {"read_throttle_rate": st.read_throttle_rate,
                                           "read_error_rate": st.read_error_rate,
                                           "read_throttle_at": sorted(st.read_throttle_at)})
        if action == "clock" and req.method == "POST":
            _set_clock(st, payload)
            return json_response(200, {"now": _now(clock_now(core)),
                                       "ndr_delay_seconds": st.ndr_delay.total_seconds()})
        if action == "messages" and req.method == "GET":
            mailbox = req.query.get("mailbox", "").lower()
            with st.lock:
                boxes = [mailbox] if mailbox else sorted(st.messages)
                out = {b: [_public(m) for m in st.messages.get(b, [])] for b in boxes}
            return json_response(200, out)
        if action == "stats" and req.method == "GET":
            with st.lock:
                return json_response(200, dict(st.counters))
    except KeyError as exc:
        return json_response(404, {"error": str(exc.args[0])})
    except (TypeError, ValueError) as exc:
        return json_response(400, {"error": str(exc)})
    return json_response(404, {"error": f"no admin endpoint {req.method} /_sandbox/{what}"})


def _set_clock(st: InboxStore, payload: dict[str, Any]) -> None:
    """``{"now": "2026-11-30T00:00:00Z" | null, "ndr_delay_seconds": 60}``: the Inbox's clock
    runs on from ``now`` (null: real time again)."""
    start = payload.get("now")
    delay = dt.timedelta(seconds=float(payload.get("ndr_delay_seconds", 0)))
    clock: Callable[[], dt.datetime] | None = None
    if start is not None:
        at = dt.datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        if at.tzinfo is None:
            raise ValueError("now needs a time zone (end it with Z)")
        clock = functools.partial(_shifted, at - dt.datetime.now(dt.UTC))
    with st.lock:
        st.clock, st.ndr_delay = clock, delay


def _shifted(offset: dt.timedelta) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + offset


def _public(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if not k.startswith("_")}


def inject(core: Core, payload: dict[str, Any]) -> dict[str, Any]:
    """One inbound message from an admin payload: ``{"kind": "reply"|"auto_reply"|"ndr"|"raw",
    "mailbox", ...}`` (see ``ndr`` and ``reply`` for the other fields)."""
    kind = str(payload.get("kind", ""))
    mailbox = str(payload.get("mailbox", "")).lower()
    if core.state.find_user(mailbox) is None:
        raise KeyError(f"no mailbox {mailbox!r} in the sandbox")
    send_id = payload.get("send_id")
    if kind == "ndr":
        return ndr(core, mailbox, send_id=str(send_id) if send_id else None,
                   recipient=str(payload["recipient"]), status=str(payload.get("status", "5.1.1")),
                   attach=str(payload.get("attach", "item")),
                   system_sender=bool(payload.get("system_sender", False)))
    if kind in ("reply", "auto_reply"):
        return reply(core, mailbox, sender=str(payload["from"]), body=str(payload.get("body", "")),
                     send_id=str(send_id) if send_id else None, subject=payload.get("subject"),
                     auto=kind == "auto_reply", thread=bool(payload.get("thread", True)),
                     headers=list(payload.get("headers") or []))
    if kind == "raw":
        message = dict(payload.get("message") or {})
        return deliver(core, mailbox, message)
    raise ValueError("kind must be one of reply, auto_reply, ndr, raw")


class InboxAdmin:
    """In-process access for tests and the demo: ``InboxAdmin(sandbox).reply(...)``."""

    def __init__(self, sandbox: Any) -> None:
        self.core: Core = sandbox._core

    def inject(self, **payload: Any) -> dict[str, Any]:
        return _public(inject(self.core, payload))

    def refile(self, mailbox: str, message_id: str) -> dict[str, Any]:
        """Move a message out of the Inbox and back: a new id, listed again by the delta."""
        return _public(refile(self.core, mailbox, message_id))

    def set_dead(self, *addresses: str) -> None:
        st = store(self.core)
        with st.lock:
            st.dead.update(a.lower() for a in addresses)

    def set_faults(self, *, read_throttle_rate: float = 0.0, read_error_rate: float = 0.0,
                   read_throttle_at: tuple[int, ...] = ()) -> None:
        """Read faults: shares of reads answered 429 / 503, and ``read_throttle_at``: which
        of the coming reads (1 = the next one) are answered 429."""
        st = store(self.core)
        with st.lock:
            st.read_throttle_rate, st.read_error_rate = read_throttle_rate, read_error_rate
            st.read_throttle_at, st.reads_seen = frozenset(read_throttle_at), 0

    def set_clock(
        self, clock: Callable[[], dt.datetime] | None, *,
        ndr_delay: dt.timedelta = dt.timedelta(0),
    ) -> None:
        """Date what arrives on ``clock`` (a simulated one; None: real time again); an NDR
        produced by a send arrives ``ndr_delay`` after it on that clock."""
        st = store(self.core)
        with st.lock:
            st.clock, st.ndr_delay = clock, ndr_delay

    def messages(self, mailbox: str) -> list[dict[str, Any]]:
        st = store(self.core)
        with st.lock:
            return [_public(m) for m in st.messages.get(mailbox.lower(), [])]

    def stats(self) -> dict[str, int]:
        st = store(self.core)
        with st.lock:
            return dict(st.counters)
