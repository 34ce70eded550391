"""What stage sync reads in the partner's own tenant (``comms.sync.clients`` holds the shared
reader, the paging guard and the customers' tenants):

- ``PartnerCenter``: ``GET /v1/customers`` (paged: ``links.next`` with its
  ``MS-ContinuationToken`` header, followed to the end through ``follow_pages``) and
  ``GET /v1/customers/{tenant}/subscriptions`` (``links.next`` followed the same way when the
  answer has one; a ``totalCount`` above the items received is a failed read, never a partial
  list taken for the whole); app-only token for ``https://api.partnercenter.microsoft.com/.default``
  in the partner tenant. A 429 from Partner Center (one budget per partner) holds all its
  reads in the process until ``Retry-After`` (``scope``).
- ``Gdap``: Graph ``GET /tenantRelationships/delegatedAdminRelationships`` in the partner
  tenant (``@odata.nextLink`` followed to the end).

Every list entry must be a JSON object (``page_items``), and so must the objects read inside
one (a customer's ``companyProfile``, a relationship's ``customer``): anything else fails
that source's read (``SourceFailed``), reported, nothing concluded from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import requests

from comms.config import Settings
from comms.sync.clients import (
    MAX_LISTING_PAGES,
    PartnerCustomer,
    Reader,
    SourceFailed,
    Tokens,
    describe,
    follow_pages,
    obj,
    odata_next,
    page_items,
)

PARTNER_CENTER_RESOURCE = "https://api.partnercenter.microsoft.com"
# A customer's subscriptions are few: more pages than this is an answer not understood.
MAX_SUBSCRIPTION_PAGES = 100


class PartnerCenter:
    name = "partner_center"

    def __init__(self, settings: Settings, session: requests.Session, reader: Reader) -> None:
        self.base = settings.sync.partner_center_url.rstrip("/") + "/v1"
        self.page_size = settings.sync.page_size
        self.reader = reader
        self.tokens = Tokens(settings, session, settings.graph.tenant_id, PARTNER_CENTER_RESOURCE)

    def customers(self) -> Iterator[PartnerCustomer]:
        """Every customer with a reseller relationship (``relationshipToPartner``; pages by
        ``links.next`` and its ``MS-ContinuationToken`` header, through ``follow_pages``)."""
        first, what = f"{self.base}/customers?size={self.page_size}", "Partner Center customers"
        get = self._getter(what)
        pages = follow_pages(get(first, {}, 1), lambda body: self._next(body, what), get,
                             what=what, base=self.base, first=first,
                             max_pages=MAX_LISTING_PAGES)
        for page, body in enumerate(pages, start=1):
            for item in page_items(body, "items", what, page):
                if str(item.get("relationshipToPartner") or "reseller").lower() != "reseller":
                    continue  # advisor, syndication, microsoft_support, none: not a reseller's
                profile = obj(item.get("companyProfile"), f"{what}: page {page}: a customer's "
                              "companyProfile")
                yield PartnerCustomer(
                    str(item.get("id") or profile.get("tenantId") or "").lower(),
                    str(profile.get("domain") or "").lower(),
                    str(profile.get("companyName") or ""),
                )

    def subscriptions(self, tenant_id: str) -> list[dict[str, Any]]:
        """Every subscription of the customer: ``links.next`` followed (through
        ``follow_pages``) as in the customers listing. When no next link is left and a page
        said there are more (``totalCount``) than were received, the read fails: a missing
        active CSP subscription would otherwise read as "no active CSP subscription"."""
        what = f"Partner Center subscriptions of {tenant_id}"
        first = f"{self.base}/customers/{tenant_id}/subscriptions"
        get = self._getter(what)
        pages = follow_pages(get(first, {}, 1), lambda body: self._next(body, what), get,
                             what=what, base=self.base, first=first,
                             max_pages=MAX_SUBSCRIPTION_PAGES)
        items: list[dict[str, Any]] = []
        total = 0
        for page, body in enumerate(pages, start=1):
            items.extend(page_items(body, "items", what, page))
            count = body.get("totalCount")
            if isinstance(count, int) and not isinstance(count, bool):
                total = max(total, count)
        if total > len(items):
            raise SourceFailed(
                f"{what}: totalCount {total} but {len(items)} received and no next link; "
                "nothing was concluded from a partial list (a subscription missing from it "
                "may be the active CSP one): run `comms sync` again later")
        return items

    def _getter(self, what: str) -> Callable[[str, dict[str, str], int], dict[str, Any]]:
        def get(url: str, headers: dict[str, str], page: int) -> dict[str, Any]:
            return self.reader.get_json(url, self.tokens.token, self.tokens.refresh, headers,
                                        what if page == 1 else f"{what} (page {page})",
                                        scope=PARTNER_CENTER_RESOURCE)
        return get

    def _next(self, body: dict[str, Any], what: str) -> tuple[str, dict[str, str]] | None:
        nxt = obj(body.get("links"), f"{what}: links").get("next")
        if not nxt:
            return None
        if not isinstance(nxt, dict):
            raise SourceFailed(f"{what}: links.next is {describe(nxt)}")
        uri = str(nxt.get("uri") or "")
        url = uri if uri.startswith("https://") else self.base + "/" + uri.lstrip("/")
        headers: dict[str, str] = {}
        for header in nxt.get("headers") or []:
            if not isinstance(header, dict) or "key" not in header or "value" not in header:
                raise SourceFailed(f"{what}: a header of links.next is {describe(header)}, "
                                   "not a {key, value} object")
            headers[str(header["key"])] = str(header["value"])
        return url, headers

    def close(self) -> None:
        pass


class Gdap:
    name = "gdap"

    def __init__(self, settings: Settings, session: requests.Session, reader: Reader) -> None:
        self.base = settings.graph.base_url
        self.url = self.base + "/tenantRelationships/delegatedAdminRelationships"
        self.reader = reader
        self.tokens = Tokens(settings, session, settings.graph.tenant_id)

    def relationships(self) -> dict[str, str]:
        """Customer tenant id -> the most advanced relationship status (``@odata.nextLink``
        followed through ``follow_pages``)."""
        rank = {"active": 3, "approved": 2, "activating": 2, "approvalPending": 1}
        out: dict[str, str] = {}
        first, what = self.url + "?$top=300", "GDAP relationships"
        pages = follow_pages(self._get(first, {}, 1), odata_next, self._get, what=what,
                             base=self.base, first=first, max_pages=MAX_LISTING_PAGES)
        for page, body in enumerate(pages, start=1):
            for rel in page_items(body, "value", what, page):
                customer = obj(rel.get("customer"), f"{what}: page {page}: a relationship's "
                               "customer")
                tid = str(customer.get("tenantId") or "").lower()
                status = str(rel.get("status") or "")
                if tid and rank.get(status, 0) >= rank.get(out.get(tid, ""), 0):
                    out[tid] = status
        return out

    def _get(self, url: str, headers: dict[str, str], page: int) -> dict[str, Any]:
        return self.reader.get_json(url, self.tokens.token, self.tokens.refresh, None,
                                    f"GDAP relationships (page {page})")

    def close(self) -> None:
        pass
