"""The Microsoft Graph transport: ``sendMail`` with one request per ``send()``, outcomes mapped.

How a response becomes an outcome (``comms.delivery.base.Outcome``):

====================================  ==========  ==============================================
Graph says                            outcome     why
====================================  ==========  ==============================================
202 Accepted                          SENT        accepted; later failures arrive as bounces
429 Too Many Requests                 THROTTLED   definitely not accepted; retry after
                                                  ``Retry-After``
503 / 504                             UNKNOWN     a gateway may time out after Exchange accepted
                                                  the message; the send id must be looked up
                                                  before a resend. With a ``Retry-After`` the
                                                  mailbox pauses that long; without one it does
                                                  not (Exchange asked for no pause; the circuit
                                                  breaker stops a mailbox that keeps failing)
other 5xx                             UNKNOWN     same reason
401                                   (retry)     the token is refused: one fresh token, the same
                                                  request once more; a second 401 is FAILED
400 / 403 / 404 / 413 / other 4xx     FAILED      rejected; the message names the fix
read timeout, connection reset        UNKNOWN     the request left; never retried blindly
TLS broken (bad record MAC, an        UNKNOWN     the TLS stream may break after the request
alert), not a certificate failure                 was written: looked up like a reset
connect timeout, connection refused   THROTTLED   the request never left; safe to try later
certificate not trusted (verify)      (raised)    ``DeliveryError``: the handshake failed, so
                                                  nothing left; nothing will until trust is fixed
====================================  ==========  ==============================================

No POST is ever retried by the HTTP layer (Microsoft's own SDK retries POST on 503/504 and can
send an email twice). Token failures raise ``AuthError``: the transport is then unusable.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import requests

from comms.config import Settings
from comms.delivery.auth import (
    TokenProvider,
    make_session,
    token_claims,
    token_provider_for,
)
from comms.delivery.base import (
    SEND_ID_HEADER,
    SEND_ID_PROPERTY_ID,
    Address,
    LookupUnavailable,
    Outcome,
    OutgoingEmail,
    SendResult,
)
from comms.delivery.failures import certificate_refused, never_left
from comms.errors import DeliveryError

log = logging.getLogger(__name__)

# When Graph throttles without a Retry-After (it normally sends one), wait this long.
DEFAULT_RETRY_AFTER = 5.0
# When the Graph host cannot be reached at all, nothing was sent; try again after this long.
UNREACHABLE_RETRY_AFTER = 30.0


def parse_retry_after(value: str | None, default: float = DEFAULT_RETRY_AFTER) -> float:
    """Seconds to wait from a ``Retry-After`` header: seconds (fractional allowed) or an
    HTTP date; a missing or unreadable value gives ``default``."""
    if value is None or not value.strip():
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return default
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return default
    return max(0.0, seconds)


def _recipients(addresses: tuple[Address, ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for a in addresses:
        entry: dict[str, str] = {"address": a.address}
        if a.name:
            entry["name"] = a.name
        out.append({"emailAddress": entry})
    return out


def message_payload(email: OutgoingEmail) -> dict[str, Any]:
    """The JSON body of ``sendMail`` for one message."""
    headers = [{"name": SEND_ID_HEADER, "value": email.send_id}]
    headers += [
        {"name": name, "value": value}
        for name, value in email.headers
        if name.lower() != SEND_ID_HEADER
    ]
    message: dict[str, Any] = {
        "subject": email.subject,
        # Graph's message has one body, so the plain-text version cannot ride along: Exchange
        # derives a text part itself. The text is kept for the .eml outbox and the sandbox record.
        "body": {"contentType": "HTML", "content": email.html},
        "toRecipients": _recipients(email.to),
        "internetMessageHeaders": headers,
        "singleValueExtendedProperties": [
            {"id": SEND_ID_PROPERTY_ID, "value": email.send_id}
        ],
    }
    if email.cc:
        message["ccRecipients"] = _recipients(email.cc)
    if email.reply_to:
        message["replyTo"] = _recipients(email.reply_to)
    return {"message": message, "saveToSentItems": True}


def _graph_error(response: requests.Response) -> tuple[str, str]:
    """Graph's error code and message from an error body (``{"error": {"code", "message"}}``)."""
    try:
        body = response.json()
    except ValueError:
        return "", response.text[:300].strip()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or ""), str(error.get("message") or "")
    return "", str(body)[:300]


def _request_id(response: requests.Response) -> str:
    return response.headers.get("request-id") or response.headers.get("client-request-id") or ""


class GraphTransport:
    """Sends through ``sendMail`` and finds sent messages in Sent Items (``Transport`` and
    ``Reconciler``). Safe to share between threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        token_provider: TokenProvider | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.settings = settings
        self.base_url = settings.graph.base_url
        self.session = session or make_session(settings.graph)
        self._tokens: TokenProvider | None = token_provider
        self._tokens_lock = threading.Lock()
        # Why the last find_sent() of the calling thread could not tell, for the operator:
        # per thread, because one transport is shared by the dispatch threads.
        self._local = threading.local()

    @property
    def last_lookup_problem(self) -> str:
        return str(getattr(self._local, "problem", ""))

    def _lookup_problem(self, text: str) -> str:
        self._local.problem = text
        return text

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def tokens(self) -> TokenProvider:
        # Created on first use, so building a transport never touches the network.
        with self._tokens_lock:
            if self._tokens is None:
                self._tokens = token_provider_for(self.settings)
            return self._tokens

    def _mailbox_path(self, sender: str) -> str:
        if self.tokens.delegated and sender.lower() == self._signed_in_user():
            return f"{self.base_url}/me"
        # App-only, or a delegated user sending as another mailbox (Graph checks send-as
        # rights): /me would silently send from the signed-in user's own mailbox instead.
        return f"{self.base_url}/users/{quote(sender, safe='@')}"

    def _signed_in_user(self) -> str:
        claims = token_claims(self.tokens.token())
        return str(claims.get("upn") or claims.get("preferred_username") or "").lower()

    def _request(
        self, method: str, url: str, *, body: bytes | None = None, token: str
    ) -> requests.Response:
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "client-request-id": str(uuid.uuid4()),
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            return self.session.request(
                method, url, data=body, headers=headers, allow_redirects=False
            )
        except requests.exceptions.SSLError as exc:
            if not certificate_refused(exc):
                # The TLS stream broke, perhaps after the request was written: the caller
                # treats it as a broken connection (for sendMail: an unknown outcome).
                raise
            # Verification failed in the handshake: nothing was sent, and nothing will be until
            # trust is fixed.
            raise DeliveryError(
                f"the TLS certificate of {url.split('/')[2]} is not trusted ({exc}); set [graph] "
                "ca_file to the CA bundle that signs it, or check [graph] base_url"
            ) from exc
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ) as exc:
            raise DeliveryError(f"[graph] base_url gives an unusable URL {url}: {exc}") from exc

    def _authorized(
        self, method: str, url: str, *, body: bytes | None = None
    ) -> requests.Response:
        """One request; on 401 one fresh token and the same request once more (a 401 means the
        request was refused before anything happened, so repeating it cannot duplicate)."""
        token = self.tokens.token()
        response = self._request(method, url, body=body, token=token)
        if response.status_code == 401:
            token = self.tokens.refresh(token)
            response = self._request(method, url, body=body, token=token)
        return response

    # -- Transport ---------------------------------------------------------------------------

    def send(self, email: OutgoingEmail) -> SendResult:
        """POST one message to ``sendMail``; exactly one request unless Graph answers 401."""
        url = f"{self._mailbox_path(email.sender)}/sendMail"
        body = json.dumps(message_payload(email), ensure_ascii=False).encode("utf-8")
        try:
            response = self._authorized("POST", url, body=body)
        except requests.exceptions.ConnectionError as exc:
            if never_left(exc):
                return SendResult(
                    Outcome.THROTTLED,
                    retry_after=UNREACHABLE_RETRY_AFTER,
                    error_code="Unreachable",
                    message=f"Graph at {self.base_url} could not be reached "
                    f"({type(exc).__name__}); nothing was sent, it will be tried again",
                )
            broke = ("the TLS connection broke while the request was sent or answered"
                     if isinstance(exc, requests.exceptions.SSLError)
                     else "the connection broke after the request was sent")
            return SendResult(
                Outcome.UNKNOWN,
                error_code="ConnectionLost",
                message=f"{broke} ({type(exc).__name__}); Graph may have accepted it: look the "
                "send id up in Sent Items before any resend",
            )
        except requests.exceptions.Timeout as exc:
            return SendResult(
                Outcome.UNKNOWN,
                maybe_in_flight=True,
                error_code="Timeout",
                message=f"no answer within {self.settings.graph.timeout_seconds:g} s "
                f"({type(exc).__name__}); Graph may have accepted it: look the send id up in "
                "Sent Items before any resend",
            )
        except requests.exceptions.RequestException as exc:  # e.g. a body cut off mid-read
            return SendResult(
                Outcome.UNKNOWN,
                error_code=type(exc).__name__,
                message=f"the answer could not be read ({exc}); Graph may have accepted it",
            )
        return self._outcome(response, email)

    def _outcome(self, response: requests.Response, email: OutgoingEmail) -> SendResult:
        status = response.status_code
        request_id = _request_id(response)
        details = {"client_request_id": response.request.headers.get("client-request-id", "")
                   if response.request is not None else ""}
        if 200 <= status < 300:
            return SendResult(Outcome.SENT, status=status, request_id=request_id, details=details)
        code, text = _graph_error(response)
        sender = email.sender
        retry_after = response.headers.get("Retry-After")
        # A 429 without a Retry-After pauses the mailbox DEFAULT_RETRY_AFTER seconds, on the
        # same (scaled) clock as its rate limits: 5 s against Exchange, 5 s x time_scale
        # against the sandbox.
        default_wait = DEFAULT_RETRY_AFTER * self.settings.delivery.time_scale
        if status == 429:
            return SendResult(
                Outcome.THROTTLED, status=status,
                retry_after=parse_retry_after(retry_after, default_wait),
                error_code=code or "TooManyRequests", request_id=request_id, details=details,
                message=f"throttled by Graph for {sender}: {text}",
            )
        if status >= 500:
            return SendResult(
                Outcome.UNKNOWN, status=status, request_id=request_id, details=details,
                retry_after=(parse_retry_after(retry_after, default_wait)
                             if status in (503, 504) and retry_after else None),
                error_code=code or f"HTTP{status}",
                message=f"Graph answered {status} ({text or response.reason}); it may have "
                "accepted the message: look the send id up in Sent Items before any resend",
            )
        return SendResult(
            Outcome.FAILED, status=status, error_code=code or f"HTTP{status}",
            request_id=request_id, details=details,
            message=self._rejection(status, code, text, sender),
        )

    def _rejection(self, status: int, code: str, text: str, sender: str) -> str:
        tenant = self.settings.graph.tenant_id
        where = f"({status} {code}: {text})" if code else f"({status}: {text})"
        if status == 401:
            return (
                f"Graph refused a freshly issued token {where}: check [graph] tenant_id and "
                "client_id, and that [graph] base_url and authority_host belong to the same cloud"
            )
        if status == 403:
            if self.tokens.delegated:
                return (
                    f"the signed-in user may not send as {sender} {where}: sign in as that "
                    "mailbox with `comms auth login`, or give the user Send As rights on it and "
                    "the app the delegated Mail.Send.Shared permission"
                )
            return (
                f"the app may not send as {sender} {where}: grant the app the Mail.Send "
                "application permission with admin consent, and check that no Exchange "
                f"application access policy / RBAC for Applications scope excludes mailbox "
                f"{sender}"
            )
        if status == 404 and code == "MailboxNotEnabledForRESTAPI":
            return (
                f"mailbox {sender} is not on Exchange Online or has no Exchange licence "
                f"{where}: use a licensed Exchange Online mailbox in [[senders]]"
            )
        if status == 404:
            return (
                f"mailbox {sender} does not exist in tenant {tenant} {where}: check the "
                "[[senders]] address"
            )
        if status == 413:
            return (
                f"the message is too large for Graph (about 4 MB per request) {where}: "
                "shrink the template (inline images, long HTML)"
            )
        if status == 400 and code == "InvalidInternetMessageHeaderCollection":
            return (
                f"Graph refused the message headers {where}: at most 5 internet headers, "
                "each name starting with x-"
            )
        if status == 400:
            return f"Graph rejected the message {where}: fix the message or its recipients"
        if 300 <= status < 400:
            return (
                f"Graph answered with a redirect {where}: check [graph] base_url "
                f"({self.base_url})"
            )
        return f"Graph rejected the message {where}"

    # -- Reconciler --------------------------------------------------------------------------

    def find_sent(self, sender: str, send_id: str) -> bool | None:
        """Look the send id up in the sender's Sent Items.

        True: found, it was sent. False: not there. None: cannot tell, ever: 403 (no Mail.Read
        on that mailbox: an operator decides). Throttling, 5xx, timeouts or a broken connection
        raise ``LookupUnavailable`` (ask again on a later pass). ``last_lookup_problem`` says
        why. Never resend on None. Token failures raise ``AuthError``.
        """
        literal = send_id.replace("'", "''")  # OData string literal
        prop = SEND_ID_PROPERTY_ID.replace("'", "''")
        flt = (
            "singleValueExtendedProperties/Any(ep: ep/id eq "
            f"'{prop}' and ep/value eq '{literal}')"
        )
        query = f"$filter={quote(flt, safe='')}&$select=id&$top=1"
        url = f"{self._mailbox_path(sender)}/mailFolders/sentitems/messages?{query}"
        self._lookup_problem("")
        try:
            response = self._authorized("GET", url)
        except requests.exceptions.RequestException as exc:
            self._lookup_problem(f"Sent Items lookup failed ({type(exc).__name__}: {exc})")
            raise LookupUnavailable(
                self.last_lookup_problem,
                maybe_in_flight=isinstance(exc, requests.exceptions.Timeout),
            ) from exc
        if response.status_code == 200:
            try:
                found = response.json().get("value") or []
            except (ValueError, AttributeError) as exc:
                self._lookup_problem("Sent Items lookup returned a body that is not JSON")
                raise LookupUnavailable(self.last_lookup_problem) from exc
            return bool(found)
        code, text = _graph_error(response)
        if response.status_code == 403:
            self._lookup_problem(
                f"no permission to read Sent Items of {sender} (403 {code}: {text}): grant "
                "Mail.Read on that mailbox, or decide unknown messages by hand"
            )
            log.warning("find_sent(%s, %s): %s", sender, send_id, self.last_lookup_problem)
            return None
        self._lookup_problem(
            f"Sent Items lookup for {sender} answered {response.status_code} {code}: {text}"
        )
        retry = response.headers.get("Retry-After")
        raise LookupUnavailable(
            self.last_lookup_problem,
            retry_after=parse_retry_after(retry) if retry is not None else None,
        )

    # -- diagnostics (used by the auth-check service) ---------------------------------------

    def token_claims(self) -> dict[str, Any]:
        """The claims of the current access token (who it is for, which permissions)."""
        return dict(token_claims(self.tokens.token()))

    def user_lookup(self, address: str) -> tuple[int | None, str, str]:
        """``GET /users/{address}``: (HTTP status or None when no answer, error code, text)."""
        url = f"{self.base_url}/users/{quote(address, safe='@')}"
        try:
            response = self._authorized("GET", url)
        except requests.exceptions.RequestException as exc:
            return None, type(exc).__name__, str(exc)
        code, text = _graph_error(response) if response.status_code >= 300 else ("", "")
        return response.status_code, code, text

    def close(self) -> None:
        self.session.close()


__all__ = [
    "DEFAULT_RETRY_AFTER",
    "GraphTransport",
    "message_payload",
    "parse_retry_after",
]
