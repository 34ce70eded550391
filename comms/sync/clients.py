"""The sources stage sync reads, one small client each, behind one interface (``Source``):

- ``PartnerCenter``: ``GET /v1/customers`` (paged: ``links.next`` with its
  ``MS-ContinuationToken`` header, followed to the end through ``follow_pages``) and
  ``GET /v1/customers/{tenant}/subscriptions``; app-only token for
  ``https://api.partnercenter.microsoft.com/.default`` in the partner tenant.
- ``Gdap``: Graph ``GET /tenantRelationships/delegatedAdminRelationships`` in the partner tenant
  (``@odata.nextLink`` followed to the end). Every paged read goes through ``follow_pages``:
  a next link outside the service's base URL is never followed, a next link or continuation
  token seen before fails the read (a cycle), and so do more pages than a cap.
- ``CustomerTenant``: Graph ``GET /directory/subscriptions`` and ``GET /subscribedSkus``, in one
  JSON batch (``POST /$batch``), with a token issued in the customer's own tenant (authority
  ``{authority_host}/{customer tenant}``); one msal application per tenant (msal binds an
  application to one authority and caches its tokens there), all sharing the process's HTTP
  session and one client credential whose certificate key is loaded once, kept in a bounded
  cache so ten thousand tenants do not keep ten thousand applications alive.

Every request is a read (a GET, or a JSON batch of GETs), so 429 (after ``Retry-After``),
500/502/503/504 are retried with backoff, unlike sendMail (``comms.delivery.reads``, the policy
the inbox reader uses too); so is a read throttled inside a batch. A 429 from Partner Center
(one budget per partner) holds all its reads in the process until ``Retry-After`` (``scope``). The
session (timeouts, ``[graph] ca_file`` trust, national-cloud resource) and the msal error mapping
are the Graph transport's (``comms.delivery.auth``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import requests

from comms.config import Settings
from comms.delivery.auth import AppTokenProvider
from comms.delivery.credentials import app_credential
from comms.delivery.reads import (
    ReadPolicy,
    ReadsExhausted,
    RetryingReads,
    UntrustedServer,
    doubling,
)
from comms.errors import AuthError, CommsError

PARTNER_CENTER_RESOURCE = "https://api.partnercenter.microsoft.com"
# Reads are idempotent: every transient answer is retried (500/502 too, which Partner Center
# returns for its own transient faults).
RETRIED = frozenset({429, 500, 502, 503, 504})
TENANT_APPS_KEPT = 256
# A tenant's directory collections are small; more pages than this is an answer not understood.
MAX_PAGES = 20
# The partner's listings (Partner Center customers, GDAP relationships) can be long, but not
# endless: past this many pages (or on a next link seen before) the listing is a failed read.
MAX_LISTING_PAGES = 5000


class SourceFailed(CommsError):
    """A read failed after its retries (a 5xx storm, an unexpected answer): try again later."""


class NoAccess(CommsError):
    """401/403 for a customer's data: it cannot be verified until consent/role is fixed."""


@dataclass(frozen=True)
class PartnerCustomer:
    tenant_id: str
    domain: str
    company_name: str


class Source(Protocol):
    """A place sync reads. ``name`` is recorded as the evidence source (``sync:<name>``)."""

    name: str

    def close(self) -> None: ...


class Reader:
    """GET with the shared read retries (``comms.delivery.reads``): 429 waits ``Retry-After``;
    500/502/503/504 and dropped connections back off exponentially (``time_scale`` shortens the
    waits for the sandbox); 401 gets one fresh token."""

    def __init__(
        self,
        session: requests.Session,
        *,
        max_attempts: int = 8,
        time_scale: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.session = session
        self.max_attempts = max_attempts
        self._reads = RetryingReads(session, ReadPolicy(
            max_attempts=max_attempts, retried=RETRIED, backoff=doubling(1.0),
            backoff_when_unreadable=True, time_scale=time_scale, follow_redirects=True,
        ), sleep=sleep)

    @property
    def retries(self) -> int:
        return self._reads.retries

    def get_json(
        self,
        url: str,
        token: Callable[[], str],
        refresh: Callable[[str], str],
        headers: dict[str, str] | None = None,
        what: str = "",
        scope: str | None = None,
    ) -> dict[str, Any]:
        """GET ``url``, decoded (``json_body``): an answer that is not a JSON object fails the
        read. ``scope``: its throttling budget (``RetryingReads.send``)."""
        return json_body(self._send(url, token, refresh, headers, what, scope=scope), what)

    def batch_get(
        self,
        base: str,
        paths: list[str],
        token: Callable[[], str],
        refresh: Callable[[str], str],
        what: str = "",
    ) -> list[Any]:
        """The JSON bodies of a few Graph GETs (``paths`` relative to ``base``), in order, sent
        as one JSON batch (``POST {base}/$batch``, independent requests) with the shared read
        retries (``RetryingReads.batch_get``): a read answered 429/5xx inside the batch is asked
        again in a later batch after its ``Retry-After`` (or the backoff), up to
        ``max_attempts`` attempts. Each read counts its own attempts; the reads are
        independent, so every read left is in every later batch and the count is that of the
        batches sent. 401/403 inside is ``NoAccess`` like on its own; an error inside wins over
        a read out of attempts in the same batch."""

        def fail(i: int, status: int, body: Any) -> CommsError:
            if status in (401, 403):
                return NoAccess(f"{what}: HTTP {status} {_batch_error(body)}")
            return SourceFailed(f"{what}: {paths[i]} answered HTTP {status} {_batch_error(body)}")

        def exhausted(i: int) -> CommsError:
            return SourceFailed(f"{what}: still failing after {self.max_attempts} attempts "
                                "(throttled or 5xx inside a batch); run `comms sync` again later")

        bodies = self._reads.batch_get(
            paths, post=lambda payload: json_body(self._send(
                f"{base}/$batch", token, refresh, None, what, json=payload), what),
            fail=fail, exhausted=exhausted)
        return [body or {} for body in bodies]

    def _send(
        self,
        url: str,
        token: Callable[[], str],
        refresh: Callable[[str], str],
        headers: dict[str, str] | None,
        what: str,
        json: Any = None,
        scope: str | None = None,
    ) -> requests.Response:
        try:
            response = self._reads.send(url, token=token, refresh=refresh, headers={
                "Accept": "application/json", **(headers or {})},
                method="GET" if json is None else "POST", json=json, scope=scope)
        except UntrustedServer as exc:
            raise AuthError(
                f"{what or url}: the TLS certificate of {exc.host} is not trusted "
                "; set [graph] ca_file to the CA bundle that signs it"
            ) from exc
        except ReadsExhausted as exc:
            raise SourceFailed(f"{what}: still failing after {self.max_attempts} attempts "
                               f"({exc.last}); run `comms sync` again later") from exc
        status = response.status_code
        if status in RETRIED:
            raise SourceFailed(f"{what}: still failing after {self.max_attempts} attempts "
                               f"(HTTP {status}); run `comms sync` again later")
        if status in (401, 403):
            raise NoAccess(f"{what}: HTTP {status} {error_text(response)}")
        if status >= 400:
            raise SourceFailed(f"{what}: HTTP {status} {error_text(response)}")
        return response


def follow_pages(
    body: dict[str, Any],
    next_link: Callable[[dict[str, Any]], tuple[str, dict[str, str]] | None],
    get: Callable[[str, dict[str, str], int], dict[str, Any]],
    *,
    what: str,
    base: str,
    first: str,
    max_pages: int,
) -> Iterator[dict[str, Any]]:
    """Every page from ``body`` (read from ``first``); ``next_link`` gives the next URL and
    headers (None at the end), ``get`` reads it. A next link outside ``base`` (the token would
    go to another host), one seen before (URL and headers: a repeated continuation token) or
    more than ``max_pages`` pages is a failed read (``SourceFailed``), never an endless loop."""
    seen = {first + "\n"}  # the first page: no headers
    for page in range(1, max_pages + 1):
        yield body
        link = next_link(body)
        if link is None:
            return
        url, headers = link
        if not url.startswith(base.rstrip("/") + "/"):
            raise SourceFailed(f"{what}: next link {url[:120]!r} is not under {base}; not "
                               "followed (check [graph] base_url / [sync] partner_center_url)")
        key = url + "\n" + "\n".join(f"{k.lower()}={v}" for k, v in sorted(headers.items()))
        if key in seen:
            raise SourceFailed(f"{what}: page {page} links to a page already read (a repeated "
                               "continuation token or next link); nothing was concluded from "
                               "the listing: run `comms sync` again later")
        seen.add(key)
        body = get(url, headers, page + 1)
    raise SourceFailed(f"{what}: more than {max_pages} pages; nothing was concluded from "
                       "an incomplete list: run `comms sync` again later")


def json_body(response: requests.Response, what: str) -> dict[str, Any]:
    """The decoded JSON object of a 2xx answer; anything else is a failed read of ``what``
    (reported, nothing concluded), never an exception that stops the whole sync."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = response.headers.get("Content-Type", "no Content-Type")
        raise SourceFailed(f"{what}: HTTP {response.status_code} answered {kind}, not a JSON "
                           "object; nothing was concluded from it: run `comms sync` again later")
    return body


def _batch_error(body: Any) -> str:
    """The error code and message of a read's body inside a batch answer."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return f"{err.get('code', '')}: {err.get('message', '')}"
    return ""


def page_items(body: Any, key: str, what: str, page: int) -> list[Any]:
    """The ``key`` list of a page (``items`` in Partner Center, ``value`` in Graph). A page without
    one (a 200 answer with an error body) is a failed read, never an empty page."""
    items = body.get(key) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise SourceFailed(f"{what}: page {page} has no {key!r} list (answered {_shape(body)}); "
                           "nothing was concluded from it: run `comms sync` again later")
    return items


def _shape(body: Any) -> str:
    """What a body that is not a Graph collection looks like, for an error message."""
    keys = ", ".join(sorted(body)[:6]) if isinstance(body, dict) else None
    return f"a {type(body).__name__}" if keys is None else f"an object with keys {keys or 'none'}"


def error_text(response: requests.Response) -> str:
    """The error code and message of a Graph or Partner Center error body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
        if "description" in body:
            return f"{body.get('code', '')}: {body['description']}"
        if "message" in body:
            return str(body["message"])
    return str(body)[:200]


class _Tokens:
    """App-only tokens for one resource in one tenant (one msal application)."""

    def __init__(self, settings: Settings, session: requests.Session, tenant_id: str,
                 resource: str | None = None, credential: str | dict[str, Any] | None = None
                 ) -> None:
        graph = settings.graph.model_copy(update={"tenant_id": tenant_id})
        self.provider = AppTokenProvider(graph, session, resource=resource,
                                         credential=credential)

    def token(self) -> str:
        return self.provider.token()

    def refresh(self, stale: str) -> str:
        return self.provider.refresh(stale)


class PartnerCenter:
    name = "partner_center"

    def __init__(self, settings: Settings, session: requests.Session, reader: Reader) -> None:
        self.base = settings.sync.partner_center_url.rstrip("/") + "/v1"
        self.page_size = settings.sync.page_size
        self.reader = reader
        self.tokens = _Tokens(settings, session, settings.graph.tenant_id, PARTNER_CENTER_RESOURCE)

    def customers(self) -> Iterator[PartnerCustomer]:
        """Every customer with a reseller relationship (``relationshipToPartner``; pages by
        ``links.next`` and its ``MS-ContinuationToken`` header, through ``follow_pages``)."""
        first, what = f"{self.base}/customers?size={self.page_size}", "Partner Center customers"
        pages = follow_pages(self._get(first, {}, 1), self._next, self._get, what=what,
                             base=self.base, first=first, max_pages=MAX_LISTING_PAGES)
        for page, body in enumerate(pages, start=1):
            for item in page_items(body, "items", what, page):
                if str(item.get("relationshipToPartner") or "reseller").lower() != "reseller":
                    continue  # advisor, syndication, microsoft_support, none: not a reseller's
                profile = item.get("companyProfile") or {}
                yield PartnerCustomer(
                    str(item.get("id") or profile.get("tenantId") or "").lower(),
                    str(profile.get("domain") or "").lower(),
                    str(profile.get("companyName") or ""),
                )

    def _get(self, url: str, headers: dict[str, str], page: int) -> dict[str, Any]:
        return self.reader.get_json(url, self.tokens.token, self.tokens.refresh, headers,
                                    f"Partner Center customers (page {page})",
                                    scope=PARTNER_CENTER_RESOURCE)

    def _next(self, body: dict[str, Any]) -> tuple[str, dict[str, str]] | None:
        nxt = (body.get("links") or {}).get("next")
        if not nxt:
            return None
        if not isinstance(nxt, dict):
            raise SourceFailed(f"Partner Center customers: links.next is {_shape(nxt)}")
        uri = str(nxt.get("uri") or "")
        url = uri if uri.startswith("https://") else self.base + "/" + uri.lstrip("/")
        return url, {str(h["key"]): str(h["value"]) for h in nxt.get("headers") or []}

    def subscriptions(self, tenant_id: str) -> list[dict[str, Any]]:
        what = f"Partner Center subscriptions of {tenant_id}"
        body = self.reader.get_json(f"{self.base}/customers/{tenant_id}/subscriptions",
                                    self.tokens.token, self.tokens.refresh, None, what,
                                    scope=PARTNER_CENTER_RESOURCE)
        return list(page_items(body, "items", what, 1))

    def close(self) -> None:
        pass


class Gdap:
    name = "gdap"

    def __init__(self, settings: Settings, session: requests.Session, reader: Reader) -> None:
        self.base = settings.graph.base_url
        self.url = self.base + "/tenantRelationships/delegatedAdminRelationships"
        self.reader = reader
        self.tokens = _Tokens(settings, session, settings.graph.tenant_id)

    def relationships(self) -> dict[str, str]:
        """Customer tenant id -> the most advanced relationship status (``@odata.nextLink``
        followed through ``follow_pages``)."""
        rank = {"active": 3, "approved": 2, "activating": 2, "approvalPending": 1}
        out: dict[str, str] = {}
        first, what = self.url + "?$top=300", "GDAP relationships"
        pages = follow_pages(self._get(first, {}, 1), _odata_next, self._get, what=what,
                             base=self.base, first=first, max_pages=MAX_LISTING_PAGES)
        for page, body in enumerate(pages, start=1):
            for rel in page_items(body, "value", what, page):
                tid = str((rel.get("customer") or {}).get("tenantId") or "").lower()
                status = str(rel.get("status") or "")
                if tid and rank.get(status, 0) >= rank.get(out.get(tid, ""), 0):
                    out[tid] = status
        return out

    def _get(self, url: str, headers: dict[str, str], page: int) -> dict[str, Any]:
        return self.reader.get_json(url, self.tokens.token, self.tokens.refresh, None,
                                    f"GDAP relationships (page {page})")

    def close(self) -> None:
        pass


def _odata_next(body: dict[str, Any]) -> tuple[str, dict[str, str]] | None:
    link = body.get("@odata.nextLink")
    return (str(link), {}) if link else None


class CustomerTenant:
    name = "tenant"

    def __init__(self, settings: Settings, session: requests.Session, reader: Reader) -> None:
        self.settings = settings
        self.session = session
        self.reader = reader
        self.base = settings.graph.base_url
        # Made once for every tenant's application (a configuration problem is an AuthError
        # here, not "cannot verify" for each customer), the certificate's key loaded once.
        self.credential = app_credential(settings.graph, loaded_key=True)
        self._apps: OrderedDict[str, _Tokens] = OrderedDict()
        self._lock = threading.Lock()

    def _tokens(self, tenant_id: str) -> _Tokens:
        with self._lock:
            found = self._apps.get(tenant_id)
            if found is not None:
                self._apps.move_to_end(tenant_id)
                return found
        try:
            made = _Tokens(self.settings, self.session, tenant_id, credential=self.credential)
            made.token()
        except AuthError as exc:
            # The app cannot get a token in that tenant: not consented there (or no such
            # tenant). That customer cannot be verified; it is not a configuration error.
            raise NoAccess(f"no token for tenant {tenant_id}: {exc.message}") from exc
        with self._lock:
            self._apps[tenant_id] = made
            while len(self._apps) > TENANT_APPS_KEPT:
                self._apps.popitem(last=False)
        return made

    def read(self, tenant_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(companySubscriptions, subscribedSkus) of the tenant."""
        tokens = self._tokens(tenant_id)
        # One request instead of two (JSON batching): Graph answers each read as on its own.
        what = f"directory of tenant {tenant_id}"
        subs, skus = self.reader.batch_get(
            self.base, ["/directory/subscriptions", "/subscribedSkus"], tokens.token,
            tokens.refresh, what)
        return (self._all_pages(subs, tokens, f"{what}: /directory/subscriptions"),
                self._all_pages(skus, tokens, f"{what}: /subscribedSkus"))

    def _all_pages(self, body: Any, tokens: _Tokens, what: str) -> list[dict[str, Any]]:
        """Every item of a Graph collection: an explicit ``value`` list on each page, each
        ``@odata.nextLink`` followed (a plain GET, also for a link inside a batch answer) through
        ``follow_pages`` (under ``[graph] base_url`` only, never twice, at most ``MAX_PAGES``
        pages). Anything less is a failed read, never an empty collection: "no direct
        subscription" must not come from a page not read."""
        items: list[dict[str, Any]] = []

        def get(url: str, headers: dict[str, str], page: int) -> dict[str, Any]:
            return self.reader.get_json(url, tokens.token, tokens.refresh, None,
                                        f"{what} (page {page})")

        pages = follow_pages(body if isinstance(body, dict) else {"": body}, _odata_next, get,
                             what=what, base=self.base, first="", max_pages=MAX_PAGES)
        for page, one in enumerate(pages, start=1):
            value = page_items(body if page == 1 and not isinstance(body, dict) else one,
                               "value", what, page)
            items.extend(v for v in value if isinstance(v, dict))
        return items

    def close(self) -> None:
        with self._lock:
            self._apps.clear()

