"""Microsoft Graph's mail endpoints as the sandbox serves them (the Graph mail service).

- ``POST /v1.0/users/{id}/sendMail`` (application ``Mail.Send``; the application access
  policy scope applies) and ``POST /v1.0/me/sendMail`` (delegated ``Mail.Send``), validated as
  Graph does; 202 with an empty body on success.
- ``GET /v1.0/users/{id}/mailFolders/sentitems/messages`` (and ``/me/...``, ``.../messages``)
  with ``$filter`` on a single-value extended property, ``$select``, ``$top``, ``$skip`` and
  ``$expand=singleValueExtendedProperties($filter=id eq '...')``; needs ``Mail.Read``.
- ``GET /v1.0/users/{id}`` (any app token) and ``GET /v1.0/me`` (delegated).
"""

from __future__ import annotations

import base64
import datetime as dt
import html as html_lib
import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from comms.delivery.base import SEND_ID_HEADER, SEND_ID_PROPERTY_ID, Address, OutgoingEmail
from comms.delivery.eml import build_eml
from comms.sandbox.core import Core
from comms.sandbox.state import State, User, retry_after_text
from comms.sandbox.tokens import InvalidToken, Principal
from comms.sandbox.web import Request, Response, graph_error, json_response

MAX_RECIPIENTS = 500
MAX_HEADERS = 5
ACCESS_DENIED = "Access is denied. Check credentials and try again."
POLICY_DENIED = (
    "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy "
    "settings."
)
READ_ROLES = frozenset({"Mail.Read", "Mail.ReadWrite"})
WELL_KNOWN_FOLDERS = frozenset(
    {"sentitems", "inbox", "drafts", "deleteditems", "outbox", "archive", "junkemail"}
)
MESSAGE_PROPERTIES = frozenset(
    {
        "subject", "body", "toRecipients", "ccRecipients", "bccRecipients", "replyTo", "from",
        "sender", "importance", "internetMessageHeaders", "singleValueExtendedProperties",
        "multiValueExtendedProperties", "attachments", "isDeliveryReceiptRequested",
        "isReadReceiptRequested", "categories", "flag", "inferenceClassification", "mentions",
        "internetMessageId", "conversationId", "bodyPreview", "isRead", "isDraft", "id",
        "uniqueBody", "extensions", "hasAttachments", "parentFolderId", "webLink",
    }
)
_ADDRESS = re.compile(r"^[^@\s<>,;:\"()\[\]\\]+@[^@\s<>,;:\"()\[\]\\]+\.[^@\s<>,;:\"()\[\]\\]+$")
_EXT_PROP_ID = re.compile(
    r"^(String|Integer|Boolean|SystemTime|Binary|Double|Float|Long|Short|Guid|Currency)\s+"
    r"(\{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}\s+"
    r"(Name\s+\S.*|Id\s+0x[0-9a-fA-F]+)|0x[0-9a-fA-F]{1,4})$"
)
_EXT_FILTER = re.compile(
    r"^\s*singleValueExtendedProperties/any\(\s*(\w+)\s*:\s*"
    r"\1/id\s+eq\s+'((?:[^']|'')*)'\s+and\s+\1/value\s+eq\s+'((?:[^']|'')*)'\s*\)\s*$",
    re.IGNORECASE,
)
_EXPAND = re.compile(
    r"^\s*singleValueExtendedProperties\s*(?:\(\s*\$filter\s*=\s*id\s+eq\s+'((?:[^']|'')*)'"
    r"\s*\))?\s*$",
    re.IGNORECASE,
)


class BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# -- entry point -------------------------------------------------------------------------


def restore_sent_items(state: State) -> None:
    """Rebuild Sent Items from the record of a sandbox restarted on the same state dir."""
    for record in state.records():
        if record.get("save_to_sent_items", True):
            sender = str(record.get("sender", ""))
            with state.lock:
                state.sent_items.setdefault(sender, []).append(resource_from_record(record))


def handle(core: Core, req: Request) -> Response:
    """Answer one request under ``/v1.0``."""
    state = core.state
    state.count("requests")
    faults = state.faults
    seconds = faults.latency
    if state.roll(faults.latency_spike_rate):
        seconds += faults.latency_spike
    delay = _Delay(core, seconds)
    try:
        return _route(core, req, delay)
    except BadRequest as exc:
        delay.wait()
        state.count("rejected")
        return graph_error(req, exc.status, exc.code, exc.message)


class _Delay:
    """The injected latency, waited exactly once per request wherever it is reached first."""

    def __init__(self, core: Core, seconds: float) -> None:
        self.core, self.seconds, self.done = core, seconds, False

    def wait(self) -> None:
        if not self.done:
            self.done = True
            self.core.sleep(self.seconds)


def _route(core: Core, req: Request, delay: _Delay) -> Response:
    segs = req.segments[1:]
    low = [s.lower() for s in segs]
    if not segs:
        raise BadRequest(400, "BadRequest", "Invalid request: no resource segment.")
    principal = _authenticate(core, req)
    if isinstance(principal, Response):
        delay.wait()
        return principal
    if low[0] == "me":
        if not principal.delegated or principal.user is None:
            raise BadRequest(
                400, "BadRequest", "/me request is only valid with delegated authentication flow."
            )
        ident, rest = principal.user, low[1:]
    elif low[0] == "users" and len(segs) >= 2:
        ident, rest = segs[1], low[2:]
    else:
        raise BadRequest(400, "BadRequest", f"Resource not found for the segment '{segs[0]}'.")

    if not rest:
        _method(req, "GET")
        delay.wait()
        return _get_user(core, req, principal, ident)
    from comms.sandbox import inbox  # Inbox delta, attachments, lookup by internetMessageId

    if (answer := inbox.route(core, req, principal, ident, rest, delay)) is not None:
        return answer
    if rest == ["sendmail"]:
        _method(req, "POST")
        return _mailbox_call(core, req, principal, ident, delay, write=True)
    if rest == ["messages"] or (
        len(rest) == 3 and rest[0] == "mailfolders" and rest[2] == "messages"
    ):
        _method(req, "GET")
        folder = rest[1] if len(rest) == 3 else ""
        if folder and folder not in WELL_KNOWN_FOLDERS:
            raise BadRequest(400, "ErrorInvalidIdMalformed", "Id is malformed.")
        return _mailbox_call(core, req, principal, ident, delay, write=False, folder=folder)
    raise BadRequest(400, "BadRequest", f"Resource not found for the segment '{segs[-1]}'.")


def _method(req: Request, allowed: str) -> None:
    if req.method != allowed:
        raise BadRequest(
            405, "Request_BadRequest",
            "Specified HTTP method is not allowed for the request target.",
        )


def _authenticate(core: Core, req: Request) -> Principal | Response:
    auth = req.header("authorization")
    scheme, _, token = auth.partition(" ")
    try:
        if auth and scheme.lower() != "bearer":
            raise InvalidToken("Access token validation failure: the scheme must be Bearer.")
        return core.tokens.verify_access_token(token.strip(), core.graph_audiences())
    except InvalidToken as exc:
        core.state.count("unauthorized")
        return graph_error(
            req, 401, "InvalidAuthenticationToken", str(exc),
            headers={
                "WWW-Authenticate": (
                    f'Bearer realm="", authorization_uri="{core.authority}/oauth2/authorize", '
                    'client_id="00000003-0000-0000-c000-000000000000"'
                )
            },
        )


def _target_mailbox(
    core: Core, principal: Principal, ident: str, roles: frozenset[str]
) -> User:
    """Check permission, existence and the access policy for a mailbox call."""
    if principal.delegated:
        if not (principal.scopes & roles):
            raise BadRequest(403, "ErrorAccessDenied", ACCESS_DENIED)
    elif not (principal.roles & roles):
        raise BadRequest(403, "ErrorAccessDenied", ACCESS_DENIED)
    user = core.state.find_user(ident)
    if user is None:
        raise BadRequest(404, "ErrorInvalidUser", f"The requested user '{ident}' is invalid.")
    if principal.delegated and user.address != principal.user:
        # Another user's mailbox needs the .Shared permissions and a mailbox grant.
        raise BadRequest(403, "ErrorAccessDenied", ACCESS_DENIED)
    if not user.mailbox:
        raise BadRequest(
            404, "MailboxNotEnabledForRESTAPI",
            "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
        )
    if not principal.delegated:
        app = core.state.apps.get(principal.app_id)
        if app is not None and app.mailboxes is not None and user.address not in app.mailboxes:
            raise BadRequest(403, "ErrorAccessDenied", POLICY_DENIED)
    return user


def _mailbox_call(
    core: Core,
    req: Request,
    principal: Principal,
    ident: str,
    delay: _Delay,
    *,
    write: bool,
    folder: str = "",
) -> Response:
    roles = frozenset({"Mail.Send"}) if write else READ_ROLES
    user = _target_mailbox(core, principal, ident, roles)
    state = core.state
    throttle = state.begin_request(user.address)
    if throttle is not None:
        return _throttled(req, throttle.status, throttle.code, throttle.message,
                          throttle.retry_after)
    try:
        delay.wait()
        if write:
            return _send_mail(core, req, principal, user)
        return _list_messages(core, req, user, ident, folder)
    finally:
        state.end_request(user.address)


def _throttled(req: Request, status: int, code: str, message: str, retry: float) -> Response:
    return graph_error(req, status, code, message, headers={"Retry-After": retry_after_text(retry)})


# -- users -------------------------------------------------------------------------------


def _get_user(core: Core, req: Request, principal: Principal, ident: str) -> Response:
    user = core.state.find_user(ident)
    if user is None:
        raise BadRequest(404, "ErrorInvalidUser", f"The requested user '{ident}' is invalid.")
    return json_response(
        200,
        {
            "@odata.context": f"{core.graph_url}/$metadata#users/$entity",
            "businessPhones": [],
            "displayName": user.display_name,
            "givenName": None,
            "jobTitle": None,
            "mail": user.address if user.mailbox else None,
            "mobilePhone": None,
            "officeLocation": None,
            "preferredLanguage": None,
            "surname": None,
            "userPrincipalName": user.address,
            "id": user.oid,
        },
    )


# -- sendMail ----------------------------------------------------------------------------


@dataclass
class MessageSpec:
    subject: str
    content_type: str  # "html" or "text"
    content: str
    to: list[dict[str, str]]
    cc: list[dict[str, str]]
    bcc: list[dict[str, str]]
    reply_to: list[dict[str, str]]
    headers: list[dict[str, str]]
    properties: list[dict[str, str]]
    from_address: str | None
    save_to_sent_items: bool

    @property
    def recipient_count(self) -> int:
        return len(self.to) + len(self.cc) + len(self.bcc)


def _body_read(message: str) -> BadRequest:
    return BadRequest(400, "RequestBodyRead", message)


def parse_send_mail(body: bytes) -> MessageSpec:
    """Validate a sendMail payload as Graph does; raise ``BadRequest`` with Graph's code."""
    if not body.strip():
        raise BadRequest(400, "BadRequest", "Empty Payload. JSON content expected.")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(
            400, "BadRequest",
            "Unable to read JSON request payload. Please ensure Content-Type header is set and "
            "payload is of valid JSON format.",
        ) from exc
    if not isinstance(payload, dict):
        raise _body_read("An unexpected 'StartArray' node was found when reading from the JSON "
                         "reader. A 'StartObject' node was expected.")
    for key in payload:
        if key not in ("message", "saveToSentItems") and not key.startswith("@odata."):
            raise _body_read(
                f"The parameter '{key}' in the request payload is not a valid parameter for the "
                "operation 'sendMail'."
            )
    message = payload.get("message")
    if message is None:
        raise BadRequest(400, "ErrorInvalidParameter", "The value of the parameter 'Message' is "
                         "empty.")
    if not isinstance(message, dict):
        raise _body_read("An unexpected 'PrimitiveValue' node was found when reading from the JSON "
                         "reader. A 'StartObject' node was expected.")
    save = payload.get("saveToSentItems", True)
    if save is None:
        save = True
    if not isinstance(save, bool):
        raise _body_read("Cannot convert a primitive value to the expected type 'Edm.Boolean'.")
    for key in message:
        if key not in MESSAGE_PROPERTIES and not key.startswith("@odata."):
            raise _body_read(
                f"The property '{key}' does not exist on type 'microsoft.graph.message'. Make "
                "sure to only use property names that are defined by the type or mark the type "
                "as open type."
            )
    subject = message.get("subject") or ""
    if not isinstance(subject, str):
        raise _body_read("Cannot convert a primitive value to the expected type 'Edm.String'.")
    content_type, content = _parse_body(message.get("body"))
    to = _recipients(message, "toRecipients")
    cc = _recipients(message, "ccRecipients")
    bcc = _recipients(message, "bccRecipients")
    reply_to = _recipients(message, "replyTo")
    if not (to or cc or bcc):
        raise BadRequest(
            400, "ErrorInvalidRecipients",
            "At least one recipient isn't valid., A message can't be sent because it contains "
            "no recipients.",
        )
    total = len(to) + len(cc) + len(bcc)
    if total > MAX_RECIPIENTS:
        raise BadRequest(
            400, "ErrorInvalidRecipients",
            f"The message has {total} recipients; at most {MAX_RECIPIENTS} recipients (to, cc "
            "and bcc together) are allowed per message.",
        )
    from_address = None
    if message.get("from") is not None:
        sender = _recipient_list([message["from"]], "from")
        from_address = sender[0]["address"]
    return MessageSpec(
        subject=subject,
        content_type=content_type,
        content=content,
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to,
        headers=_headers(message.get("internetMessageHeaders")),
        properties=_properties(message.get("singleValueExtendedProperties")),
        from_address=from_address,
        save_to_sent_items=save,
    )


def _parse_body(body: Any) -> tuple[str, str]:
    if body is None:
        return "text", ""
    if not isinstance(body, dict):
        raise _body_read("An unexpected 'PrimitiveValue' node was found when reading from the JSON "
                         "reader. A 'StartObject' node was expected.")
    for key in body:
        if key not in ("contentType", "content") and not key.startswith("@odata."):
            raise _body_read(
                f"The property '{key}' does not exist on type 'microsoft.graph.itemBody'. Make "
                "sure to only use property names that are defined by the type or mark the type "
                "as open type."
            )
    kind = body.get("contentType") or "text"
    if not isinstance(kind, str) or kind.lower() not in ("html", "text"):
        raise _body_read(
            f"Cannot convert the literal '{kind}' to the expected type 'microsoft.graph.bodyType'."
        )
    content = body.get("content") or ""
    if not isinstance(content, str):
        raise _body_read("Cannot convert a primitive value to the expected type 'Edm.String'.")
    return kind.lower(), content


def _recipients(message: dict[str, Any], key: str) -> list[dict[str, str]]:
    value = message.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(
            400, "ErrorInvalidRecipients",
            f"At least one recipient isn't valid., '{key}' must be a list of "
            '{"emailAddress": {"address": ..., "name": ...}} objects.',
        )
    return _recipient_list(value, key)


def _recipient_list(items: list[Any], key: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for item in items:
        email = item.get("emailAddress") if isinstance(item, dict) else None
        address = email.get("address") if isinstance(email, dict) else None
        name = email.get("name") if isinstance(email, dict) else None
        if not isinstance(email, dict) or not isinstance(address, str) or not address.strip():
            raise BadRequest(
                400, "ErrorInvalidRecipients",
                f"At least one recipient isn't valid., a recipient in '{key}' has no "
                'emailAddress.address (expected {"emailAddress": {"address": ..., "name": ...}}).',
            )
        if name is not None and not isinstance(name, str):
            raise _body_read("Cannot convert a primitive value to the expected type 'Edm.String'.")
        if not _ADDRESS.match(address.strip()):
            raise BadRequest(
                400, "ErrorInvalidRecipients",
                f"At least one recipient isn't valid., Recipient '{address}' isn't resolved. All "
                "recipients must be resolved before a message can be submitted.",
            )
        out.append({"address": address.strip(), "name": name or ""})
    return out


def _headers(value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _body_read("An unexpected 'StartObject' node was found when reading from the JSON "
                         "reader. A 'StartArray' node was expected.")
    if len(value) > MAX_HEADERS:
        raise BadRequest(
            400, "InvalidInternetMessageHeaderCollection",
            "Maximum number of headers in one message should be less than or equal to 5.",
        )
    out: list[dict[str, str]] = []
    for item in value:
        name = item.get("name") if isinstance(item, dict) else None
        val = item.get("value") if isinstance(item, dict) else None
        if not isinstance(name, str) or not isinstance(val, str):
            raise _body_read(
                "Each internetMessageHeaders entry must be {\"name\": string, \"value\": string}."
            )
        if not name.lower().startswith("x-"):
            raise BadRequest(
                400, "InvalidInternetMessageHeaderCollection",
                f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
            )
        out.append({"name": name, "value": val})
    return out


def _properties(value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _body_read("An unexpected 'StartObject' node was found when reading from the JSON "
                         "reader. A 'StartArray' node was expected.")
    out: list[dict[str, str]] = []
    for item in value:
        pid = item.get("id") if isinstance(item, dict) else None
        val = item.get("value") if isinstance(item, dict) else None
        if not isinstance(pid, str) or not isinstance(val, str):
            raise _body_read(
                "Each singleValueExtendedProperties entry must be {\"id\": string, "
                "\"value\": string}."
            )
        if not _EXT_PROP_ID.match(pid.strip()):
            raise BadRequest(
                400, "ErrorInvalidProperty",
                f"The extended property id '{pid}' is not valid; expected e.g. "
                "'String {00020386-0000-0000-c000-000000000046} Name x-my-header'.",
            )
        out.append({"id": pid.strip(), "value": val})
    return out


def _send_mail(core: Core, req: Request, principal: Principal, user: User) -> Response:
    state = core.state
    spec = parse_send_mail(req.body)
    if spec.from_address and spec.from_address.lower() != user.address:
        raise BadRequest(
            403, "ErrorSendAsDenied",
            "The user account which was used to submit this request does not have the right to "
            "send mail on behalf of the specified sending account., Cannot submit message.",
        )
    faults = state.faults
    if state.roll(faults.throttle_rate):
        state.count("throttled_injected")
        with state.lock:
            # Like every window here, Retry-After is scaled: a "second" is time_scale seconds.
            retry = state.rng.uniform(0.5, 2.0) * state.time_scale
        return _throttled(
            req, 429, "TooManyRequests",
            "Too many requests: the service is throttling this application. Retry after the "
            "time in the Retry-After header.", retry,
        )
    if state.roll(faults.error_rate):
        state.count("errors_injected")
        if state.roll(0.5):
            return graph_error(
                req, 503, "ErrorServerBusy", "The server is busy. Try again later.",
                headers={"Retry-After": retry_after_text(1.0 * state.time_scale)},
            )
        return graph_error(
            req, 504, "UnknownError", "The operation has timed out (gateway timeout)."
        )
    record = _record(core, req, principal, user, spec)
    resource = resource_from_record(record) if spec.save_to_sent_items else {}
    record["_eml_bytes"] = _eml(record, user)
    throttle = state.accept(user.address, spec.recipient_count, record, resource)
    if throttle is not None:
        return _throttled(req, throttle.status, throttle.code, throttle.message,
                          throttle.retry_after)
    from comms.sandbox import inbox  # a recipient on the dead list bounces (an NDR arrives)

    inbox.after_accept(core, user.address, record)
    if state.roll(faults.drop_after_accept_rate):
        state.count("dropped")
        return Response(0, drop=True)
    return Response(202, b"", content_type="")


def _record(
    core: Core, req: Request, principal: Principal, user: User, spec: MessageSpec
) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    send_id = next(
        (p["value"] for p in spec.properties if p["id"].lower() == SEND_ID_PROPERTY_ID.lower()),
        None,
    )
    header_send_id = next(
        (h["value"] for h in spec.headers if h["name"].lower() == SEND_ID_HEADER), None
    )
    raw_id = os.urandom(24)
    msg_id = "AAMkAD" + base64.urlsafe_b64encode(raw_id).decode("ascii").rstrip("=")
    domain = user.address.partition("@")[2]
    return {
        "id": msg_id,
        "send_id": send_id,
        "header_send_id": header_send_id,
        "sender": user.address,
        "from": spec.from_address or user.address,
        "to": [r["address"] for r in spec.to],
        "cc": [r["address"] for r in spec.cc],
        "bcc": [r["address"] for r in spec.bcc],
        "reply_to": [r["address"] for r in spec.reply_to],
        "to_recipients": spec.to,
        "cc_recipients": spec.cc,
        "bcc_recipients": spec.bcc,
        "reply_to_recipients": spec.reply_to,
        "subject": spec.subject,
        "content_type": spec.content_type,
        "html": spec.content if spec.content_type == "html" else None,
        "text": spec.content if spec.content_type == "text" else None,
        "headers": spec.headers,
        "extended_properties": spec.properties,
        "recipients": spec.recipient_count,
        "save_to_sent_items": spec.save_to_sent_items,
        "received_at": now.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "internet_message_id": f"<{raw_id.hex()[:32]}@{domain}>",
        "app_id": principal.app_id,
        "user": principal.user,
        "request_id": req.request_id,
        "client_request_id": req.client_request_id,
    }


def html_to_text(markup: str) -> str:
    """A readable plain-text rendering of HTML (for the .eml's text part and bodyPreview)."""
    text = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", "", markup)
    text = re.sub(r"(?i)<br\s*/?>", "\n", text)
    text = re.sub(r"(?i)</(p|div|h[1-6]|li|tr|table)>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html_lib.unescape(text)
    lines = [re.sub(r"[ \t\xa0]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _eml(record: dict[str, Any], user: User) -> bytes | None:
    def addrs(items: list[dict[str, str]]) -> tuple[Address, ...]:
        return tuple(Address(i["address"], i.get("name", "")) for i in items)

    if record["content_type"] == "html":
        markup = record["html"] or ""
        text = html_to_text(markup)
    else:
        text = record["text"] or ""
        markup = f"<pre>{html_lib.escape(text)}</pre>"
    email = OutgoingEmail(
        send_id=record["send_id"] or record["header_send_id"] or record["id"],
        sender=record["from"],
        to=addrs(record["to_recipients"]),
        cc=addrs(record["cc_recipients"]),
        reply_to=addrs(record["reply_to_recipients"]),
        subject=record["subject"],
        html=markup,
        text=text,
        headers=tuple((h["name"], h["value"]) for h in record["headers"]),
    )
    try:
        return build_eml(
            email, date=dt.datetime.fromisoformat(record["received_at"]),
            sender_name=user.display_name,
        )
    except (ValueError, TypeError, IndexError):
        # An address or header the email package refuses; the JSON record still has it all.
        return None


def resource_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """The Graph message resource (as Sent Items lists it) for a recorded message."""

    def recips(key: str) -> list[dict[str, Any]]:
        return [
            {"emailAddress": {"name": r.get("name") or r["address"], "address": r["address"]}}
            for r in record.get(key) or []
        ]

    content_type = record.get("content_type") or "text"
    content = (record.get("html") if content_type == "html" else record.get("text")) or ""
    preview = html_to_text(content) if content_type == "html" else content
    stamp = str(record.get("received_at", ""))
    sender = {"emailAddress": {"name": record.get("sender", ""),
                               "address": record.get("from") or record.get("sender", "")}}
    return {
        "@odata.etag": f'W/"{record["id"][-16:]}"',
        "id": record["id"],
        "createdDateTime": stamp[:19] + "Z",
        "lastModifiedDateTime": stamp[:19] + "Z",
        "receivedDateTime": stamp[:19] + "Z",
        "sentDateTime": stamp[:19] + "Z",
        "hasAttachments": False,
        "internetMessageId": record.get("internet_message_id", ""),
        "subject": record.get("subject", ""),
        "bodyPreview": " ".join(preview.split())[:255],
        "importance": "normal",
        "conversationId": "AAQkAD" + record["id"][-20:],
        "isDeliveryReceiptRequested": False,
        "isReadReceiptRequested": False,
        "isRead": True,
        "isDraft": False,
        "body": {"contentType": content_type, "content": content},
        "sender": sender,
        "from": sender,
        "toRecipients": recips("to_recipients"),
        "ccRecipients": recips("cc_recipients"),
        "bccRecipients": recips("bcc_recipients"),
        "replyTo": recips("reply_to_recipients"),
        "flag": {"flagStatus": "notFlagged"},
        "internetMessageHeaders": [
            {"name": h["name"], "value": h["value"]} for h in record.get("headers") or []
        ],
        "_properties": list(record.get("extended_properties") or []),
    }


# -- Sent Items query --------------------------------------------------------------------


def _unquote_odata(value: str) -> str:
    return value.replace("''", "'")


def _list_messages(core: Core, req: Request, user: User, ident: str, folder: str) -> Response:
    query = {k.lower().lstrip("$"): v for k, v in req.query.items()}
    known = {"filter", "select", "top", "skip", "expand", "orderby", "count"}
    for key in query:
        if key not in known:
            raise BadRequest(400, "BadRequest", f"Query option '${key}' is not supported.")
    with core.state.lock:
        items = list(core.state.sent_items.get(user.address, []))
    if folder not in ("", "sentitems"):
        items = []
    items.reverse()  # newest first, as Outlook lists a folder
    flt = query.get("filter", "").strip()
    if flt:
        match = _EXT_FILTER.match(flt)
        if not match:
            raise BadRequest(
                400, "BadRequest",
                f"Invalid filter clause: the sandbox supports singleValueExtendedProperties/"
                f"Any(ep: ep/id eq '...' and ep/value eq '...'), got {flt!r}.",
            )
        pid, value = _unquote_odata(match.group(2)).lower(), _unquote_odata(match.group(3))
        items = [
            m for m in items
            if any(p["id"].lower() == pid and p["value"] == value for p in m["_properties"])
        ]
    top = _int_option(query, "top", 10, 1, 1000)
    skip = _int_option(query, "skip", 0, 0, 10**9)
    page = items[skip : skip + top]
    expand_id: str | None = None
    expand = False
    if query.get("expand"):
        match = _EXPAND.match(query["expand"])
        if not match:
            raise BadRequest(
                400, "BadRequest",
                f"Parsing OData Select and Expand failed: unsupported $expand {query['expand']!r}.",
            )
        expand = True
        expand_id = _unquote_odata(match.group(1)).lower() if match.group(1) else None
    select = [s.strip() for s in query.get("select", "").split(",") if s.strip()]
    values = [_shape(m, select, expand, expand_id) for m in page]
    folder_part = f"/mailFolders('{folder}')" if folder else ""
    body: dict[str, Any] = {
        "@odata.context": (
            f"{core.graph_url}/$metadata#users('{quote(ident, safe='@')}'){folder_part}/messages"
        ),
        "value": values,
    }
    if skip + top < len(items):
        path = "/".join(quote(s, safe="@") for s in req.segments)
        params = {k: v for k, v in req.query.items() if k.lower().lstrip("$") != "skip"}
        params["$skip"] = str(skip + top)
        qs = "&".join(f"{quote(k)}={quote(v)}" for k, v in params.items())
        body["@odata.nextLink"] = f"{core.base_url}/{path}?{qs}"
    return json_response(200, body)


def _int_option(query: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = query.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(400, "BadRequest", f"Invalid value '{raw}' for ${key}.") from exc
    if not low <= value <= high:
        raise BadRequest(400, "BadRequest", f"Invalid value '{raw}' for ${key}.")
    return value


def _shape(
    message: dict[str, Any], select: list[str], expand: bool, expand_id: str | None
) -> dict[str, Any]:
    public = {k: v for k, v in message.items() if not k.startswith("_")}
    if select:
        by_lower = {k.lower(): k for k in public}
        out: dict[str, Any] = {"@odata.etag": public["@odata.etag"], "id": public["id"]}
        for name in select:
            key = by_lower.get(name.lower())
            if key is None:
                raise BadRequest(
                    400, "RequestBroker--ParseUri",
                    f"Could not find a property named '{name}' on type 'microsoft.graph.message'.",
                )
            out[key] = public[key]
    else:
        out = public
        out.pop("internetMessageHeaders", None)  # only returned when selected
    if expand:
        out["singleValueExtendedProperties"] = [
            dict(p) for p in message["_properties"]
            if expand_id is None or p["id"].lower() == expand_id
        ]
    return out
