"""The state of the partner's world outside mail: customer tenants as Partner Center and each
customer's own directory see them, the partner's GDAP relationships, and their rate limits.

A test or the demo drives it (``Sandbox.add_customer_tenant``, ``accept_relationship`` ...,
or ``POST /_sandbox/tenants/...``); the ``partner_center`` and ``directory`` modules serve it.

Limits (windows scaled by ``time_scale`` like the mail limits; the real numbers are not all
published, see docs/sandbox.md):

- Partner Center: ``pc_requests_per_minute`` requests per rolling minute per partner tenant
  (429 with ``Retry-After``, computed so that waiting exactly that long is let through);
- Graph directory reads: ``directory_requests_per_10s`` per customer tenant (429
  ``TooManyRequests`` with ``Retry-After``); GDAP reads share the partner tenant's window.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

DIRECT_STATUSES = ("Enabled", "Warning", "Suspended", "Deleted", "LockedOut")
CSP_STATUSES = ("active", "suspended", "deleted", "disabled", "pending", "expired")
GDAP_STATUSES = (
    "activating", "active", "approvalPending", "approved", "created", "expired", "expiring",
    "terminated", "terminating", "terminationRequested",
)
E3_SKU_ID = "6fd2c87f-b296-42f0-b197-1e91e994b900"


def _stamp(at: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(at if at is not None else time.time(), dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "comms-sandbox:" + ":".join(parts)))


@dataclass
class SyncFaults:
    """Fault knobs for the Partner Center and directory endpoints (shares between 0 and 1)."""

    pc_throttle_rate: float = 0.0  # Partner Center answers 429 with Retry-After
    pc_error_rate: float = 0.0  # Partner Center answers 500/503
    directory_throttle_rate: float = 0.0
    directory_error_rate: float = 0.0  # Graph directory answers 503/504
    # Paging faults: a Partner Center customers page whose links.next hands back the
    # continuation token just sent (a cycle), a GDAP page whose @odata.nextLink points to
    # another host.
    pc_repeat_token: float = 0.0
    gdap_foreign_next_link: float = 0.0
    # A 200 whose body is Partner Center's error shape ({"code", "description", ...}) instead
    # of the collection: on the customers listing's first page, on its later pages, on a
    # customer's subscriptions.
    pc_error_body_first_page: float = 0.0
    pc_error_body_next_page: float = 0.0
    pc_error_body_subscriptions: float = 0.0
    # An entry that is not an object among the items of a list: a null among Partner Center's
    # customers, a string among a customer's subscriptions, a number among the GDAP
    # relationships, a null among a tenant's directory/subscriptions.
    pc_customers_non_object: float = 0.0
    pc_subscriptions_non_object: float = 0.0
    gdap_non_object: float = 0.0
    directory_non_object: float = 0.0
    # A customer's subscriptions page (``subscriptions_page_size``) with more left but no
    # links.next: its totalCount says more than the items received.
    pc_subscriptions_no_next: float = 0.0
    seed: int | None = None  # seeds the fault dice, so a test's storm is the same every run

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "seed":
                continue
            value = float(getattr(self, f.name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"sync fault {f.name} must be between 0 and 1, got {value!r}")


PC_RELATIONSHIPS = ("none", "reseller", "advisor", "syndication", "microsoft_support")
SYNC_FAULT_FIELDS = frozenset(f.name for f in dataclasses.fields(SyncFaults))


@dataclass
class CustomerTenant:
    tenant_id: str
    domain: str
    company_name: str
    relationship: bool = False  # reseller relationship accepted (listed by Partner Center)
    # relationshipToPartner as the listing shows it (Partner Center: none, reseller, advisor,
    # syndication, microsoft_support); an advisor-only customer is listed but no reseller's.
    listed_as: str = "reseller"
    gdap_status: str | None = None  # None: no GDAP relationship
    consented: bool = True  # the partner's multi-tenant app has admin consent in this tenant
    csp: list[dict[str, Any]] = field(default_factory=list)  # Partner Center subscriptions
    direct: dict[str, Any] | None = None  # the direct/Advisor companySubscription
    assigned: int = 0  # licences of the direct SKU assigned to users (consumedUnits)
    # Other products billed directly (an add-on, Power BI (free)): companySubscriptions, each
    # with its own "assigned" (consumedUnits).
    products: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id, "domain": self.domain,
            "company_name": self.company_name, "relationship": self.relationship,
            "gdap_status": self.gdap_status, "consented": self.consented,
            "csp": [dict(s) for s in self.csp],
            "direct": dict(self.direct) if self.direct else None, "assigned": self.assigned,
            "products": [dict(p) for p in self.products],
        }


class RateWindow:
    """At most ``limit`` requests per rolling ``window`` seconds per key."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._hits: dict[str, deque[float]] = {}

    def take(self, key: str, now: float) -> float | None:
        """None when let through (and counted), else the seconds until a slot frees."""
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            return hits[len(hits) - self.limit] + self.window - now
        hits.append(now)
        return None


class Tenants:
    """Customer tenants, the partner's relationships, limits and counters, behind one lock."""

    def __init__(
        self,
        partner_tenant_id: str,
        *,
        time_scale: float,
        pc_requests_per_minute: int = 300,
        directory_requests_per_10s: int = 100,
        page_size_max: int = 500,
        directory_page_size: int = 100,
        gdap_page_size: int = 300,
        subscriptions_page_size: int = 0,
    ) -> None:
        self.partner_tenant_id = partner_tenant_id
        self.time_scale = time_scale
        self.lock = threading.Lock()
        self.customers: dict[str, CustomerTenant] = {}  # by lower-case tenant id
        self.faults = SyncFaults()
        self.rng = random.Random()
        self.page_size_max = page_size_max
        self.directory_page_size = directory_page_size
        self.gdap_page_size = gdap_page_size  # GDAP relationships a page at most (Graph: 300)
        # A customer's Partner Center subscriptions a page (0: all in one answer).
        self.subscriptions_page_size = subscriptions_page_size
        self.pc_window = RateWindow(pc_requests_per_minute, 60.0 * time_scale)
        self.directory_window = RateWindow(directory_requests_per_10s, 10.0 * time_scale)
        self.counters: dict[str, int] = dict.fromkeys(
            ("pc_requests", "pc_throttled", "pc_errors", "directory_requests",
             "directory_throttled", "directory_errors", "directory_denied"),
            0,
        )

    # -- driving the world (tests, demo, admin endpoint) --------------------------------

    def add(
        self,
        tenant_id: str,
        domain: str,
        company_name: str = "",
        *,
        direct_licences: int = 0,
        assigned: int | None = None,
        consented: bool = True,
        sku_part_number: str = "ENTERPRISEPACK",
    ) -> CustomerTenant:
        """A customer tenant with, when ``direct_licences`` > 0, an Enabled direct
        subscription of that many licences (``assigned`` of them assigned to users)."""
        key = tenant_id.strip().lower()
        tenant = CustomerTenant(key, domain.strip().lower(), company_name or domain,
                                consented=consented)
        if direct_licences > 0:
            tenant.direct = {
                "id": _uuid(key, "direct"),
                "commerceSubscriptionId": _uuid(key, "direct-commerce"),
                "createdDateTime": "2021-03-01T00:00:00Z",
                "isTrial": False,
                "nextLifecycleDateTime": "2027-03-01T00:00:00Z",
                "ownerId": None,
                "ownerTenantId": None,
                "ownerType": None,
                "skuId": E3_SKU_ID,
                "skuPartNumber": sku_part_number,
                "status": "Enabled",
                "totalLicenses": direct_licences,
                "serviceStatus": [],
            }
            tenant.assigned = direct_licences if assigned is None else assigned
        with self.lock:
            self.customers[key] = tenant
        return tenant

    def get(self, tenant_id: str) -> CustomerTenant:
        tenant = self.customers.get(tenant_id.strip().lower())
        if tenant is None:
            raise KeyError(f"no customer tenant {tenant_id!r} in the sandbox")
        return tenant

    def change(self, tenant_id: str, action: str, **args: Any) -> dict[str, Any]:
        """Apply one named change (what a customer or Microsoft does); the tenant's summary."""
        with self.lock:
            tenant = self.get(tenant_id)
            if action == "accept_relationship":
                tenant.relationship = True
            elif action == "gdap":
                status = str(args.get("status", "active"))
                if status not in GDAP_STATUSES:
                    raise ValueError(f"GDAP status {status!r} is not one of {GDAP_STATUSES}")
                tenant.gdap_status = status
            elif action == "activate_csp":
                quantity = int(args.get("quantity", 1))
                tenant.relationship = True
                sub = self._csp_subscription(tenant, quantity, len(tenant.csp))
                tenant.csp.append(_offer(sub, str(args.get("offer", "m365")),
                                         bool(args.get("trial", False)), tenant))
            elif action == "listed_as":  # listed, with another relationshipToPartner
                value = str(args["relationship"])
                if value not in PC_RELATIONSHIPS:
                    raise ValueError(f"relationshipToPartner {value!r} is not one of "
                                     f"{PC_RELATIONSHIPS}")
                tenant.relationship, tenant.listed_as = True, value
            elif action == "add_direct_product":
                tenant.products.append(_direct_product(tenant, args))
            elif action == "csp_status":
                status = str(args["status"])
                if status not in CSP_STATUSES:
                    raise ValueError(f"CSP status {status!r} is not one of {CSP_STATUSES}")
                for sub in tenant.csp:
                    sub["status"] = status
            elif action == "direct_status":
                status = str(args["status"])
                if status == "absent":
                    tenant.direct = None
                elif status not in DIRECT_STATUSES:
                    raise ValueError(
                        f"direct status {status!r} is not one of {DIRECT_STATUSES} or 'absent'"
                    )
                elif tenant.direct is None:
                    raise ValueError(f"tenant {tenant_id} has no direct subscription")
                else:
                    tenant.direct["status"] = status
            elif action == "assigned":
                tenant.assigned = int(args["count"])
            elif action == "consent":
                tenant.consented = bool(args.get("granted", True))
            else:
                raise ValueError(
                    f"unknown tenant action {action!r}; known: accept_relationship, gdap, "
                    "activate_csp, add_direct_product, csp_status, direct_status, assigned, "
                    "consent, listed_as"
                )
            return tenant.summary()

    def _csp_subscription(
        self, tenant: CustomerTenant, quantity: int, n: int
    ) -> dict[str, Any]:
        now = _stamp()
        sub_id = _uuid(tenant.tenant_id, "csp", str(n))
        return {
            "id": sub_id,
            "entitlementId": _uuid(tenant.tenant_id, "entitlement", str(n)),
            "offerId": "CFQ7TTC0LFLZ:0002",
            "offerName": "Microsoft 365 E3",
            "friendlyName": "Microsoft 365 E3",
            "productType": {"id": "OnlineServicesNCE", "displayName": "OnlineServicesNCE"},
            "quantity": quantity,
            "unitType": "Licenses",
            "creationDate": now,
            "effectiveStartDate": now,
            "commitmentEndDate": _stamp(time.time() + 365 * 86400),
            "status": "active",
            "autoRenewEnabled": True,
            "billingType": "license",
            "billingCycle": "monthly",
            "termDuration": "P1Y",
            "isTrial": False,
            "links": {
                "self": {
                    "uri": f"/customers/{tenant.tenant_id}/subscriptions/{sub_id}",
                    "method": "GET", "headers": [],
                }
            },
            "attributes": {"etag": _uuid(sub_id, "etag"), "objectType": "Subscription"},
        }

    def set_faults(self, **fields: Any) -> SyncFaults:
        unknown = set(fields) - SYNC_FAULT_FIELDS
        if unknown:
            raise TypeError(
                f"unknown sync fault field(s) {sorted(unknown)}; known: {sorted(SYNC_FAULT_FIELDS)}"
            )
        with self.lock:
            faults = dataclasses.replace(self.faults, **fields)
            faults.validate()
            self.faults = faults
            if "seed" in fields:
                self.rng = random.Random(faults.seed)
            return faults

    # -- serving ------------------------------------------------------------------------

    def roll(self, share: float) -> bool:
        if share <= 0:
            return False
        with self.lock:
            return self.rng.random() < share

    def count(self, key: str) -> None:
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + 1

    def take_pc(self) -> float | None:
        with self.lock:
            return self.pc_window.take(self.partner_tenant_id, time.monotonic())

    def take_directory(self, tenant_id: str) -> float | None:
        with self.lock:
            return self.directory_window.take(tenant_id.lower(), time.monotonic())

    def snapshot(self) -> list[CustomerTenant]:
        """Copies of every tenant, in a stable order (so paging is stable)."""
        with self.lock:
            return [dataclasses.replace(t, csp=[dict(s) for s in t.csp],
                                        direct=dict(t.direct) if t.direct else None,
                                        products=[dict(p) for p in t.products])
                    for _, t in sorted(self.customers.items())]

    def find(self, tenant_id: str) -> CustomerTenant | None:
        with self.lock:
            tenant = self.customers.get(tenant_id.strip().lower())
            if tenant is None:
                return None
            return dataclasses.replace(tenant, csp=[dict(s) for s in tenant.csp],
                                       direct=dict(tenant.direct) if tenant.direct else None,
                                       products=[dict(p) for p in tenant.products])

    def known(self, tenant_id: str) -> bool:
        with self.lock:
            return tenant_id.lower() in self.customers

    def stats(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counters)


AZURE_PLAN_OFFER = "DZH318Z0BPS6:0001"
# An add-on (licence billed, online services, like its base); ids of the sandbox's own making.
ADD_ON_OFFER = "CFQ7TTC0LFK5:0001"
ADD_ON_SKU_ID = "f61d4aba-134f-44e9-a2a0-f81a5adb26e4"
ADD_ON_SKU_PART = "INFORMATION_PROTECTION_COMPLIANCE"


def _offer(sub: dict[str, Any], offer: str, trial: bool, tenant: CustomerTenant
           ) -> dict[str, Any]:
    """A Partner Center subscription of ``offer``: "m365" (Microsoft 365 E3 seats, licence
    billed), "azure_plan" (usage billed, no seats) or "add_on" (Microsoft 365 E5 Compliance,
    licence billed, on the customer's latest subscription: ``parentSubscriptionId``, or on a
    base subscription Partner Center does not list when it has none), a trial when ``trial``."""
    if offer == "azure_plan":
        sub.update(offerId=AZURE_PLAN_OFFER, offerName="Azure plan", friendlyName="Azure plan",
                   productType={"id": "Azure", "displayName": "Azure"}, quantity=1,
                   unitType="Usage-based", billingType="usage", termDuration=None)
    elif offer == "add_on":
        parent = tenant.csp[-1]["id"] if tenant.csp else _uuid(tenant.tenant_id, "unlisted")
        sub.update(offerId=ADD_ON_OFFER, offerName="Microsoft 365 E5 Compliance",
                   friendlyName="Microsoft 365 E5 Compliance", parentSubscriptionId=parent)
    elif offer != "m365":
        raise ValueError(f"CSP offer {offer!r} is not one of m365, azure_plan, add_on")
    if trial:
        sub.update(isTrial=True, offerName=f"{sub['offerName']} Trial",
                   friendlyName=f"{sub['friendlyName']} Trial", autoRenewEnabled=False)
    return sub


def _direct_product(tenant: CustomerTenant, args: dict[str, Any]) -> dict[str, Any]:
    """Another product billed directly (``sku_part_number``, ``sku_id``, ``total``,
    ``assigned``, ``status``), beside the direct subscription being replaced; with
    ``owner_tenant_id``, one created by that partner tenant instead (another reseller's, or an
    indirect provider's CSP subscription): Graph's ``ownerTenantId`` is "the partner tenant that
    has created the subscription on a customer tenant", none for a direct one."""
    part = str(args.get("sku_part_number", "VISIOCLIENT"))
    status = str(args.get("status", "Enabled"))
    if status not in DIRECT_STATUSES:
        raise ValueError(f"direct product status {status!r} is not one of {DIRECT_STATUSES}")
    sid = _uuid(tenant.tenant_id, "product", part, str(len(tenant.products)))
    return {
        "id": sid, "commerceSubscriptionId": sid, "createdDateTime": "2022-01-01T00:00:00Z",
        "isTrial": False, "nextLifecycleDateTime": "2027-01-01T00:00:00Z", "ownerId": None,
        "ownerTenantId": args.get("owner_tenant_id") or None,
        "ownerType": "Company" if args.get("owner_tenant_id") else None,
        "skuId": str(args.get("sku_id") or _uuid("sku", part)), "skuPartNumber": part,
        "status": status, "totalLicenses": int(args.get("total", 2)), "serviceStatus": [],
        "assigned": int(args.get("assigned", args.get("total", 2))),
    }
