"""Reading a sender mailbox's Inbox through Microsoft Graph (msal token + requests, the same
session, CA trust and token provider as the Graph transport).

- ``pages(mailbox, delta_link)``: one round of ``/mailFolders/inbox/messages/delta``, page by
  page; the last page carries the ``@odata.deltaLink`` to store for the next round.
- ``attachments(mailbox, message_id)``: the NDR's attached original / delivery status, decoded;
  ``attachments_many`` does it for many NDRs through Graph JSON batching (``$batch``, 20 reads
  a request, chained with ``dependsOn`` so they run one at a time).
- ``sent_send_id`` / ``sent_index``: Sent Items lookups.

Reads are idempotent, so unlike ``sendMail`` they are retried (``comms.delivery.reads``, the
policy stage sync uses too): 429 and 503/504 after ``Retry-After`` (or a growing backoff), a
broken connection after a backoff, up to ``MAX_ATTEMPTS``; 401 once with a fresh token; a read
throttled inside a batch goes into a later batch (with the reads chained after it, answered
424). Anything else raises ``InboxError`` naming the fix.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser
from typing import Any
from urllib.parse import quote

import requests

from comms.config import Settings
from comms.delivery.auth import TokenProvider, make_session, token_provider_for
from comms.delivery.base import SEND_ID_PROPERTY_ID
from comms.delivery.reads import (
    BATCH_LIMIT,
    ReadPolicy,
    ReadsExhausted,
    RetryingReads,
    UntrustedServer,
    doubling,
)
from comms.errors import DeliveryError
from comms.inbox.classify import Attachment

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
BACKOFF_BASE = 0.5  # seconds, doubled per attempt (scaled by [delivery] time_scale), capped
BACKOFF_CAP = 30.0
RETRIABLE = frozenset({429, 503, 504})
BATCH_SIZE = BATCH_LIMIT  # reads in one JSON batch: Graph's limit
SELECT_BASIC = (
    "subject", "from", "sender", "toRecipients", "receivedDateTime", "internetMessageId",
    "conversationId", "internetMessageHeaders", "hasAttachments",
)
SELECT_BODY = ("bodyPreview", "body")


class InboxError(DeliveryError):
    """Reading a mailbox failed in a way a retry does not fix. ``status``: Graph's HTTP status
    when it answered the read with an error (0: unreachable, throttled, untrusted)."""

    status: int = 0
    code: str = ""  # Graph's error code, when it answered

    @classmethod
    def answered(cls, status: int, message: str, code: str = "") -> InboxError:
        err = cls(message)
        err.status, err.code = status, code
        return err

    @property
    def sync_state_lost(self) -> bool:
        """Graph no longer knows the delta link (it expired, or was never valid)."""
        return self.status == 410 or self.code in ("SyncStateNotFound", "SyncStateInvalid")


@dataclass
class Page:
    messages: list[dict[str, Any]]
    next_link: str | None
    delta_link: str | None


class InboxReader:
    """Graph reads for one sync; safe to share between threads."""

    def __init__(
        self, settings: Settings, *, read_body: bool = True, page_size: int = 100,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.base_url = settings.graph.base_url.rstrip("/")
        self.session = make_session(settings.graph)
        self._tokens: TokenProvider | None = None
        self.read_body = read_body
        self.page_size = page_size
        self._reads = RetryingReads(self.session, ReadPolicy(
            max_attempts=MAX_ATTEMPTS, retried=RETRIABLE,
            backoff=doubling(BACKOFF_BASE, cap=BACKOFF_CAP, jitter=True),
            time_scale=max(settings.delivery.time_scale, 0.001), request_ids=True), sleep=sleep)
        self._lock = threading.Lock()

    @property
    def tokens(self) -> TokenProvider:
        with self._lock:
            if self._tokens is None:
                self._tokens = token_provider_for(self.settings)
            return self._tokens

    def close(self) -> None:
        self.session.close()

    # -- plumbing ----------------------------------------------------------------------------

    def _user(self, mailbox: str) -> str:
        return f"{self.base_url}/users/{quote(mailbox, safe='@')}"

    def get(self, url: str, *, prefer: str = "", raw: bool = False) -> requests.Response:
        """GET with the retry policy above; returns the 2xx response."""
        headers = {"Accept": "*/*" if raw else "application/json"}
        if prefer:
            headers["Prefer"] = prefer
        return self._send(url, headers)

    def _send(self, url: str, headers: dict[str, str], *, method: str = "GET",
              json: Any = None) -> requests.Response:
        tokens = self.tokens
        try:
            response = self._reads.send(url, token=tokens.token, refresh=tokens.refresh,
                                        headers=headers, method=method, json=json)
        except UntrustedServer as exc:
            raise InboxError(
                f"the TLS certificate of {exc.host} is not trusted ({exc.detail}); set "
                "[graph] ca_file to the CA bundle that signs it"
            ) from exc
        except ReadsExhausted as exc:
            if exc.last.startswith("HTTP"):
                raise _throttled(url, exc.attempts) from exc
            raise InboxError(
                f"reading {_short(url)} failed {exc.attempts} times ({exc.last}); "
                "check that Graph is reachable and run `comms inbox sync` again"
            ) from exc
        if 200 <= response.status_code < 300:
            return response
        error = _error_of(response)
        raise InboxError.answered(response.status_code,
                                  _explain(response.status_code, error, url), code=error[0])

    @property
    def requests(self) -> int:
        """HTTP requests sent (every attempt; a $batch counts once)."""
        return self._reads.requests

    @property
    def retries(self) -> int:
        return self._reads.retries

    # -- reads -------------------------------------------------------------------------------

    def first_url(self, mailbox: str) -> str:
        fields = SELECT_BASIC + (SELECT_BODY if self.read_body else ())
        return (f"{self._user(mailbox)}/mailFolders/inbox/messages/delta"
                f"?$select={','.join(fields)}")

    def page(self, url: str) -> Page:
        prefer = f"odata.maxpagesize={self.page_size}"
        if self.read_body:
            prefer += ', outlook.body-content-type="text"'
        body = self.get(url, prefer=prefer).json()
        return Page(list(body.get("value") or []), body.get("@odata.nextLink"),
                    body.get("@odata.deltaLink"))

    def pages(self, mailbox: str, delta_link: str | None) -> Iterator[Page]:
        """One delta round from ``delta_link`` (None: from the start of the Inbox)."""
        url: str | None = delta_link or self.first_url(mailbox)
        while url:
            page = self.page(url)
            yield page
            url = page.next_link

    def attachments(self, mailbox: str, message_id: str) -> list[Attachment]:
        """The attachments' text: headers/MIME of an attached original, a delivery status."""
        base = self._attachments_url(mailbox, message_id)
        items = self.get(base).json().get("value") or []
        raws = {str(item["id"]): self.get(url, raw=True).content
                for item, url in _item_urls(base, items)}
        return _decoded(items, raws)

    def attachments_many(self, mailbox: str, message_ids: list[str]) -> dict[str, list[Attachment]]:
        """``attachments`` of many messages through JSON batching: the lists in batches of 20,
        then the attached items' MIME in batches of 20 (a request per 20 reads, not per read)."""
        bases = [self._attachments_url(mailbox, mid) for mid in message_ids]
        lists = [body.get("value") or [] if isinstance(body, dict) else []
                 for body in self.batch_get(bases)]
        wanted = [(i, str(item["id"]), url) for i, (base, items) in enumerate(zip(
            bases, lists, strict=True)) for item, url in _item_urls(base, items)]
        raws: list[dict[str, bytes]] = [{} for _ in message_ids]
        for (i, item_id, _), body in zip(wanted, self.batch_get([u for *_, u in wanted],
                                                               raw=True), strict=True):
            raws[i][item_id] = body if isinstance(body, bytes) else b""
        return {mid: _decoded(items, raw) for mid, items, raw in zip(
            message_ids, lists, raws, strict=True)}

    def batch_get(self, urls: list[str], *, raw: bool = False) -> list[Any]:
        """GET ``urls`` through Graph JSON batching (``POST /$batch``, ``BATCH_SIZE`` a
        request, each read depending on the one before: one read in flight for the mailbox at a
        time, since a batch of independent reads to one mailbox would be run in parallel and
        meet the mailbox's concurrency limit, 4); the bodies in order: parsed JSON, or bytes
        with ``raw``. A read answered 429/503/504 inside a batch goes into a later batch, with
        the reads after it (answered 424, not run), after the longest ``Retry-After``; a read
        is tried ``MAX_ATTEMPTS`` times (a 424 is no attempt). The batch request itself has the
        retry policy of ``get``; any other error raises ``InboxError`` as ``get`` would
        (``RetryingReads.batch_get``)."""
        return self._reads.batch_get(
            [url[len(self.base_url):] for url in urls],
            post=lambda payload: self._send(f"{self.base_url}/$batch",
                                            {"Accept": "application/json"},
                                            method="POST", json=payload).json(),
            fail=lambda i, status, body: InboxError.answered(
                status, _explain(status, _batch_error(body), urls[i])),
            exhausted=lambda i: _throttled(urls[i], MAX_ATTEMPTS),
            chained=True, size=BATCH_SIZE,
            headers={"Accept": "*/*" if raw else "application/json"}, raw=raw)

    def _attachments_url(self, mailbox: str, message_id: str) -> str:
        return f"{self._user(mailbox)}/messages/{quote(message_id, safe='')}/attachments"

    def sent_send_id(self, mailbox: str, field: str, value: str) -> str | None:
        """The comms send id of the Sent Items message whose ``field`` (internetMessageId or
        conversationId) is ``value``; None when there is none (or it was not sent by comms)."""
        literal = value.replace("'", "''")
        prop = SEND_ID_PROPERTY_ID.replace("'", "''")
        flt = f"{field} eq '{literal}'"
        expand = f"singleValueExtendedProperties($filter=id eq '{prop}')"
        query = (f"$filter={quote(flt, safe='')}&$select=id&$top=1"
                 f"&$expand={quote(expand, safe='')}")
        body = self.get(f"{self._user(mailbox)}/mailFolders/sentitems/messages?{query}").json()
        for item in body.get("value") or []:
            for p in item.get("singleValueExtendedProperties") or []:
                if str(p.get("id", "")).lower() == SEND_ID_PROPERTY_ID.lower():
                    return str(p.get("value") or "") or None
        return None


    def sent_index(self, mailbox: str, since: datetime) -> dict[str, str]:
        """internetMessageId -> send id of the comms messages in Sent Items sent since
        ``since``: one listing of 1,000 a page (newest first) instead of a lookup per reply."""
        prop = SEND_ID_PROPERTY_ID.replace("'", "''")
        expand = quote(f"singleValueExtendedProperties($filter=id eq '{prop}')", safe="")
        url: str | None = (
            f"{self._user(mailbox)}/mailFolders/sentitems/messages?$select=internetMessageId,"
            f"sentDateTime&$top=1000&$expand={expand}"
        )
        out: dict[str, str] = {}
        while url:
            body = self.get(url).json()
            for item in body.get("value") or []:
                sent = str(item.get("sentDateTime") or "")
                if sent and sent.replace("Z", "+00:00") < since.isoformat():
                    return out
                for p in item.get("singleValueExtendedProperties") or []:
                    if str(p.get("id", "")).lower() == SEND_ID_PROPERTY_ID.lower():
                        out[str(item.get("internetMessageId") or "")] = str(p.get("value"))
            url = body.get("@odata.nextLink")
        return out


def _batch_error(body: Any) -> tuple[str, str]:
    """(code, message) of a Graph error body inside a batch answer."""
    error = (body or {}).get("error") or {} if isinstance(body, dict) else {}
    return str(error.get("code") or ""), str(error.get("message") or "")


def _item_urls(base: str, items: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The ``$value`` URL of each item attachment (an attached message: its MIME)."""
    return [(item, f"{base}/{quote(str(item['id']), safe='')}/$value") for item in items
            if str(item.get("@odata.type") or "").endswith("itemAttachment")]


def _decoded(items: list[dict[str, Any]], raws: dict[str, bytes]) -> list[Attachment]:
    """The attachments' text, given the MIME of the item attachments by attachment id."""
    out: list[Attachment] = []
    for item in items:
        ctype = str(item.get("contentType") or "")
        kind = str(item.get("@odata.type") or "")
        if kind.endswith("itemAttachment"):
            out.append(Attachment("message/rfc822", _headers_only(raws.get(str(item["id"]),
                                                                            b""))))
        elif item.get("contentBytes"):
            try:
                data = base64.b64decode(item["contentBytes"])
            except (binascii.Error, ValueError):
                continue
            text = _headers_only(data) if ctype == "message/rfc822" else data.decode(
                "utf-8", "replace")
            out.append(Attachment(ctype, text))
    return out


def _headers_only(data: bytes) -> str:
    """The header block of a MIME message (the part that carries x-comms-send-id)."""
    try:
        parsed = BytesHeaderParser().parsebytes(data)
    except (ValueError, TypeError):
        return data[:20000].decode("utf-8", "replace")
    return "".join(f"{k}: {v}\n" for k, v in parsed.items())


def _throttled(url: str, attempts: int) -> InboxError:
    return InboxError(f"reading {_short(url)} was throttled {attempts} times; "
                      "run `comms inbox sync` again later")


def _short(url: str) -> str:
    return url.split("?")[0]


def _error_of(response: requests.Response) -> tuple[str, str]:
    """(code, message) of a Graph error body."""
    try:
        error = response.json().get("error") or {}
        return str(error.get("code") or ""), str(error.get("message") or "")
    except (ValueError, AttributeError):
        return "", response.text[:200]


def _explain(status: int, error: tuple[str, str], url: str) -> str:
    code, text = error
    where = f"({status} {code}: {text})"
    if status == 403:
        return (f"no permission to read {_short(url)} {where}: grant Mail.Read (or "
                "Mail.ReadBasic with [inbox] read_body = false) on the sender mailboxes, scoped "
                "with Exchange RBAC for Applications")
    if status == 404:
        return f"mailbox or message not found {where}: check the [[senders]] address"
    if status == 400 and code in ("SyncStateNotFound", "SyncStateInvalid"):
        return (f"Graph no longer knows the stored delta link {where}: run `comms inbox sync "
                "--restart` to read the Inbox from the start (already processed messages are "
                "skipped)")
    return f"reading {_short(url)} failed {where}"
