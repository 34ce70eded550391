"""The sources stage sync reads, one small client each, behind one interface (``Source``):
``PartnerCenter`` and ``Gdap`` (the partner's own tenant, ``comms.sync.partner``) and, here,
``CustomerTenant``: Graph ``GET /directory/subscriptions`` and ``GET /subscribedSkus``, in one
JSON batch (``POST /$batch``), with a token issued in the customer's own tenant (authority
``{authority_host}/{customer tenant}``); one msal application per tenant (msal binds an
application to one authority and caches its tokens there), all sharing the process's HTTP
session and one client credential whose certificate key is loaded once, kept in a bounded
cache so ten thousand tenants do not keep ten thousand applications alive. A tenant that gives
the app no token is that customer's "cannot verify" (``NoAccess``); the app's own credential
refused (a client secret expired or wrong: ``CredentialRejected``) stops the sync, since no
tenant can be read with it.

Every paged read goes through ``follow_pages``: a next link outside the service's base URL is
never followed, a next link or continuation token seen before fails the read (a cycle), and so
do more pages than a cap. Every list read goes through ``page_items``: a page without its list,
or with an entry that is not a JSON object, is a failed read (``SourceFailed``), never a short
or skipped list.

Every request is a read (a GET, or a JSON batch of GETs), so 429 (after ``Retry-After``),
500/502/503/504 are retried with backoff, unlike sendMail (``comms.delivery.reads``, the policy
the inbox reader uses too); so is a read throttled inside a batch. The session (timeouts,
``[graph] ca_file`` trust, national-cloud resource) and the msal error mapping are the Graph
transport's (``comms.delivery.auth``).
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
from comms.errors import AuthError, CommsError, CredentialRejected

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


def page_items(body: Any, key: str, what: str, page: int) -> list[dict[str, Any]]:
    """The ``key`` list of a page (``items`` in Partner Center, ``value`` in Graph), every entry
    a JSON object. A page without one (a 200 answer with an error body), or with an entry that
    is not an object (null, a string, a number...), is a failed read, never an empty page nor
    an entry skipped."""
    items = body.get(key) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise SourceFailed(f"{what}: page {page} has no {key!r} list (answered "
                           f"{describe(body)}); nothing was concluded from it: run `comms "
                           "sync` again later")
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise SourceFailed(f"{what}: page {page} has an entry that is not an object in its "
                               f"{key!r} list (entry {n}: {describe(item)}); nothing was "
                               "concluded from it: run `comms sync` again later")
    return items


def obj(value: Any, what: str) -> dict[str, Any]:
    """``value`` when it is a JSON object, {} when absent (null); anything else is an answer
    not understood (``what`` names it): a failed read."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SourceFailed(f"{what} is {describe(value)}, not an object; nothing was concluded "
                           "from it: run `comms sync` again later")
    return value


def describe(value: Any) -> str:
    """What a JSON value that is not the expected one is, for an error message."""
    if isinstance(value, dict):
        return f"an object with keys {', '.join(sorted(value)[:6]) or 'none'}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


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


class Tokens:
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


def odata_next(body: dict[str, Any]) -> tuple[str, dict[str, str]] | None:
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
        self._apps: OrderedDict[str, Tokens] = OrderedDict()
        self._lock = threading.Lock()

    def _tokens(self, tenant_id: str) -> Tokens:
        with self._lock:
            found = self._apps.get(tenant_id)
            if found is not None:
                self._apps.move_to_end(tenant_id)
                return found
        try:
            made = Tokens(self.settings, self.session, tenant_id, credential=self.credential)
            made.token()
        except CredentialRejected as exc:
            # The app's own secret or certificate: refused in this tenant, refused in all.
            raise CredentialRejected(
                f"Stage sync stopped reading the customer tenants (at {tenant_id}): "
                f"{exc.message}. The app's own credential is refused in every tenant, so no "
                "customer could be verified and nothing was recorded: renew it in the app "
                "registration (Microsoft Entra admin center > App registrations > Certificates "
                "& secrets), then check with `comms auth check`") from exc
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

    def _all_pages(self, body: Any, tokens: Tokens, what: str) -> list[dict[str, Any]]:
        """Every item of a Graph collection: an explicit ``value`` list on each page, each
        ``@odata.nextLink`` followed (a plain GET, also for a link inside a batch answer) through
        ``follow_pages`` (under ``[graph] base_url`` only, never twice, at most ``MAX_PAGES``
        pages). Anything less is a failed read, never an empty collection: "no direct
        subscription" must not come from a page not read."""
        items: list[dict[str, Any]] = []

        def get(url: str, headers: dict[str, str], page: int) -> dict[str, Any]:
            return self.reader.get_json(url, tokens.token, tokens.refresh, None,
                                        f"{what} (page {page})")

        pages = follow_pages(body if isinstance(body, dict) else {"": body}, odata_next, get,
                             what=what, base=self.base, first="", max_pages=MAX_PAGES)
        for page, one in enumerate(pages, start=1):
            value = page_items(body if page == 1 and not isinstance(body, dict) else one,
                               "value", what, page)
            items.extend(value)
        return items

    def close(self) -> None:
        with self._lock:
            self._apps.clear()

