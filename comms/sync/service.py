"""Stage sync: read what Microsoft sees of each customer, keep it as evidence, and move stages
by the campaign's ``[sync]`` rules.

Two phases so no database transaction stays open across network calls: first every source is
read (bounded concurrency, retries in the clients), then one transaction records the evidence
that changed, fills tenant ids found by a unique domain match, updates licence counts from
reality, and applies the stage moves (each a normal audit event, ``by = sync:<source>``, the
note naming the evidence id). With nothing new, nothing is written but each customer's
``sync_checks`` row (the freshness ``comms status`` shows).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from comms.campaign import Campaign
from comms.config import Settings
from comms.errors import CampaignError, ConfigError, UsageError
from comms.store import repo
from comms.store.db import Database
from comms.store.models import Customer
from comms.sync import clients
from comms.sync.ledger import (
    SOURCES,
    CustomerSync,
    _latest_evidence,
    _record,
    _Target,
)
from comms.sync.rules import OBSERVATIONS, SyncRules


@dataclass
class SyncReport:
    at: datetime
    sources: tuple[str, ...]
    dry_run: bool
    customers: list[CustomerSync]
    unmatched: list[str]  # Partner Center customers matching no ledger customer
    ambiguous: list[str]  # Partner Center customers whose domain matches several
    retries: int = 0

    def count(self, status: str) -> int:
        return sum(1 for c in self.customers if c.status == status)

    @property
    def exit_code(self) -> int:
        return 1 if self.count("failed") else 0

    def summary(self) -> str:
        verb = "would move" if self.dry_run else "moved"
        return (
            f"{len(self.customers)} customer(s) synced from {', '.join(self.sources)}: "
            f"{self.count('moved')} {verb}, {self.count('cannot verify')} cannot be verified, "
            f"{self.count('failed')} failed, {self.count('held')} held, "
            f"{sum(c.new_evidence for c in self.customers)} new observation(s); "
            f"{len(self.unmatched)} unmatched and {len(self.ambiguous)} ambiguous Partner "
            "Center customer(s)"
        )


def check_rules(campaign: Campaign) -> SyncRules:
    rules = campaign.sync
    for name in OBSERVATIONS:
        stage = rules.stage_for(name)
        if stage and not campaign.has_stage(stage):
            raise CampaignError(
                f"[sync] {name} = {stage!r} is not a stage of the campaign "
                f"({', '.join(campaign.stage_names)}); fix it or set it to \"\" to turn it off"
            )
    return rules


def _targets(db: Database, keys: list[str] | None, tag: str | None) -> list[_Target]:
    with db.session() as session:
        rows = repo.get_customers(session, keys) if keys else repo.find_customers(session, tag=tag)
        return [_Target(r.id or 0, r.key, r.name, r.tenant_id.strip().lower(),
                        r.primary_domain.strip().lower()) for r in rows]


def _ledger(db: Database) -> list[_Target]:
    """Every ledger customer's tenant id and domain (whatever ``--customer``/``--tag`` select):
    Partner Center's customers are matched against the whole ledger, so a tenant held by a
    customer outside the selection is never given to one inside it."""
    with db.session() as session:
        rows = session.execute(sa.select(
            col(Customer.id), col(Customer.key), col(Customer.name), col(Customer.tenant_id),
            col(Customer.primary_domain))).all()
        return [_Target(int(cid or 0), str(key), str(name), str(tid or "").strip().lower(),
                        str(domain or "").strip().lower()) for cid, key, name, tid, domain in rows]


def run_sync(
    db: Database,
    settings: Settings,
    campaign: Campaign,
    *,
    now: datetime,
    keys: list[str] | None = None,
    tag: str | None = None,
    source: str | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SyncReport:
    """Sync the customers (all, ``keys`` or ``tag``) from the enabled sources (or ``source``)."""
    rules = check_rules(campaign)
    sources = settings.sync.sources
    if source:
        if source not in SOURCES:
            raise UsageError(f"--source {source!r} is not one of {', '.join(SOURCES)}")
        if source not in sources:
            raise ConfigError(f"source {source!r} is not enabled: set it to true in [sync]")
        sources = (source,)
    if not sources:
        raise ConfigError(
            "no stage-sync source is enabled: set partner_center, gdap and/or "
            "customer_tenants = true in the [sync] section of comms.toml (see docs/sync.md)"
        )
    if "tenant" in sources:
        _require_partner_tenant_guid(settings)
    targets = _targets(db, keys, tag)
    results = {t.id: CustomerSync(t.key, t.name) for t in targets}
    report = SyncReport(now, sources, dry_run, list(results.values()), [], [])
    ledger = _ledger(db) if "partner_center" in sources else targets
    previous = _previous_direct(db, [t.id for t in targets]) if "tenant" in sources else {}
    fills = _read(settings, sources, targets, ledger, results, report, progress, previous)
    _record(db, campaign, rules, now, targets, results, fills, dry_run)
    return report


def _previous_direct(db: Database, ids: list[int]) -> dict[int, dict[str, Any]]:
    """What each customer's last tenant evidence saw of its direct subscription: the one
    identified then (``id``, ``tenant_id``) is the one followed now."""
    with db.session() as session:
        latest = _latest_evidence(session, ids)
    out: dict[int, dict[str, Any]] = {}
    for (cid, src), ev in latest.items():
        if src == "tenant":
            try:
                seen = json.loads(ev.seen_json)
            except ValueError:
                continue
            if isinstance(seen, dict):
                out[cid] = seen
    return out


def _require_partner_tenant_guid(settings: Settings) -> None:
    """The customer-tenant read tells the partner's CSP subscriptions from the direct one by
    ``ownerTenantId``, a GUID: a domain name in ``[graph] tenant_id`` would make every CSP
    subscription look direct."""
    try:
        uuid.UUID(settings.graph.tenant_id.strip())
    except ValueError:
        raise ConfigError(
            f"[graph] tenant_id is {settings.graph.tenant_id!r}, not a tenant id (a GUID): "
            "stage sync compares it with each subscription's ownerTenantId to tell your CSP "
            "subscriptions from the customer's direct one. Set it to your tenant's id (Microsoft "
            "Entra admin center > Overview > Tenant ID)."
        ) from None


def _read(
    settings: Settings,
    sources: tuple[str, ...],
    targets: list[_Target],
    ledger: list[_Target],
    results: dict[int, CustomerSync],
    report: SyncReport,
    progress: Callable[[int, int], None] | None,
    previous: dict[int, dict[str, Any]],
) -> dict[int, str]:
    """Read every source; returns the tenant ids found by a unique domain match. A partner
    listing (Partner Center's customers, GDAP relationships) that fails after its retries fails
    that source for every customer (reported, exit code 1, nothing concluded from it): the
    other sources are still read, and `comms run --sync` plans on the ledger's stages."""
    session = clients.open_session(settings)
    reader = clients.Reader(session, max_attempts=settings.sync.max_attempts,
                            time_scale=settings.delivery.time_scale)
    fills: dict[int, str] = {}
    tenant_of = {t.id: t.tenant_id for t in targets}
    try:
        pc = clients.PartnerCenter(settings, session, reader) if "partner_center" in sources \
            else None
        if pc is not None and (listed := _listing("partner_center", pc.customers, targets,
                                                        results)) is not None:
            matched = _match(listed, ledger, {t.id for t in targets}, report, fills)
            tenant_of.update(fills)
            for t in targets:
                results[t.id].seen["partner_center"] = {"listed": t.id in matched}
        if "gdap" in sources:
            _gdap(clients.Gdap(settings, session, reader), targets, tenant_of, results)
        tenant = clients.CustomerTenant(settings, session, reader) \
            if "tenant" in sources else None
        work = [t for t in targets if _listed(results[t.id]) or tenant is not None]
        done = 0

        def one(t: _Target) -> None:
            tid = tenant_of[t.id]
            res = results[t.id]
            if pc is not None and _listed(res):
                _guard(res, "partner_center", lambda: _csp(res, pc.subscriptions(tid)))
            if tenant is not None:
                if problem := _unreadable_tenant(tid, settings):
                    res.problems["tenant"] = problem
                else:
                    _guard(res, "tenant", lambda: _direct(
                        res, settings, *tenant.read(tid), tenant_id=tid,
                        previous=previous.get(t.id)))

        with ThreadPoolExecutor(max_workers=settings.sync.concurrency) as pool:
            for _ in pool.map(one, work):
                done += 1
                if progress:
                    progress(done, len(work))
    finally:
        report.retries = reader.retries
        session.close()
    return fills


def _gdap(gdap: clients.Gdap, targets: list[_Target], tenant_of: dict[int, str],
          results: dict[int, CustomerSync]) -> None:
    rels = _listing("gdap", lambda: gdap.relationships().items(), targets, results)
    if rels is not None:
        found = dict(rels)
        for t in targets:
            if tenant_of[t.id]:
                results[t.id].seen["gdap"] = {"status": found.get(tenant_of[t.id], "none")}


def _listed(res: CustomerSync) -> bool:
    return bool(res.seen.get("partner_center", {}).get("listed"))


def _listing(
    source: str, read: Callable[[], Any], targets: list[_Target],
    results: dict[int, CustomerSync],
) -> list[Any] | None:
    """A partner listing, read to the end; None when it failed after its retries: the source
    is then "failed" for every customer (reported, exit code 1), like a failed read of one
    customer, instead of an exception that stops the whole sync (and `comms run --sync`)."""
    try:
        return list(read())
    except clients.SourceFailed as exc:
        for t in targets:
            results[t.id].problems[source] = f"failed: {exc.message}"
            results[t.id].failed = True
        return None


def _unreadable_tenant(tid: str, settings: Settings) -> str:
    """Why a customer's tenant is not read ("" when it is)."""
    if not tid:
        return ("cannot verify: no tenant id (add tenant_id to the CSV, or enable "
                "[sync] partner_center to find it by domain)")
    if tid.lower() == settings.graph.tenant_id.strip().lower():
        return (f"cannot verify: tenant id {tid} is your own tenant ([graph] tenant_id), not "
                "the customer's; set the customer's tenant_id in the CSV and re-import")
    return ""


def _guard(res: CustomerSync, source: str, call: Callable[[], None]) -> None:
    try:
        call()
    except clients.NoAccess as exc:
        res.problems[source] = (
            f"cannot verify: no consent/role ({exc.message}); grant admin consent to the "
            "app in the customer's tenant (Organization.Read.All) or a GDAP role such as "
            "Global Reader")
        res.seen.pop(source, None)
    except clients.SourceFailed as exc:
        res.problems[source] = f"failed: {exc.message}"
        res.failed = True
        res.seen.pop(source, None)


def _match(
    listed: list[clients.PartnerCustomer],
    ledger: list[_Target],
    selected: set[int],
    report: SyncReport,
    fills: dict[int, str],
) -> set[int]:
    """The selected ledger customers Partner Center lists: by tenant id, else by a primary
    domain unique in the whole ledger and among Partner Center's customers. Uniqueness is
    judged on the whole ledger (``ledger``), never on the selection: a tenant id another
    customer holds is never filled into a second one."""
    by_tenant = {t.tenant_id: t for t in ledger if t.tenant_id}
    by_domain: dict[str, list[_Target]] = {}
    for t in ledger:
        if t.domain:
            by_domain.setdefault(t.domain, []).append(t)
    pc_domains = Counter(p.domain for p in listed if p.tenant_id not in by_tenant)
    matched: set[int] = set()
    for pcc in listed:
        owner = by_tenant.get(pcc.tenant_id)
        if owner is not None:
            if owner.id in selected:
                matched.add(owner.id)
            continue
        candidates = by_domain.get(pcc.domain, [])
        label = f"{pcc.company_name} ({pcc.domain}, tenant {pcc.tenant_id})"
        if len(candidates) > 1:
            report.ambiguous.append(
                f"{label}: domain matches ledger customers "
                f"{', '.join(c.key for c in candidates)}; set tenant_id on the right one in "
                "the CSV (and re-import) so sync matches it by tenant id")
        elif candidates and pc_domains[pcc.domain] > 1:
            report.ambiguous.append(
                f"{label}: Partner Center lists {pc_domains[pcc.domain]} customers with this "
                f"domain; set tenant_id of {candidates[0].key} in the CSV (and re-import)")
        elif candidates and not candidates[0].tenant_id:
            if candidates[0].id in selected:
                matched.add(candidates[0].id)
                fills[candidates[0].id] = pcc.tenant_id
        else:
            report.unmatched.append(label)
    return matched


def _csp(res: CustomerSync, subs: list[dict[str, Any]]) -> None:
    """The partner's subscriptions of the customer, with what tells a licence-based seat
    subscription (``billingType``, ``unitType``, ``productType``, ``offerId``) from an Azure
    plan or a trial (``isTrial``): only the former make the CSP subscription live
    (``comms.sync.ledger.facts_of``)."""
    seen = res.seen["partner_center"]
    seen["subscriptions"] = sorted(
        ({"id": s.get("id"), "offer": s.get("offerName") or s.get("offerId"),
          "offer_id": s.get("offerId"), "quantity": s.get("quantity"),
          "status": s.get("status"), "start": s.get("effectiveStartDate"),
          "trial": s.get("isTrial"), "billing": s.get("billingType"),
          "unit": s.get("unitType"),
          "product": (s.get("productType") or {}).get("id")
          if isinstance(s.get("productType"), dict) else None} for s in subs),
        key=lambda s: str(s["id"]),
    )


def _direct(
    res: CustomerSync,
    settings: Settings,
    subs: list[dict[str, Any]],
    skus: list[dict[str, Any]],
    *,
    tenant_id: str = "",
    previous: dict[str, Any] | None = None,
) -> None:
    """What the customer's tenant (``tenant_id``, recorded with what was seen) shows of its
    direct subscription, the one to cancel (``_candidate``). Its status and licences only:
    never those of another product. When which one it is cannot be told, the status is
    "unknown" (no claim either way, nothing moves, no licence count) and the customer is
    reported as not verifiable."""
    partner = settings.graph.tenant_id.strip().lower()
    csp_skus = {s.get("skuId") for s in subs
                if str(s.get("ownerTenantId") or "").lower() == partner and s.get("skuId")}
    direct = [s for s in subs if str(s.get("ownerTenantId") or "").lower() != partner
              and s.get("isTrial") is not True]
    main, several = _candidate(direct, csp_skus, tenant_id, previous)
    seen: dict[str, Any] = {"tenant_id": tenant_id, "status": "absent"}
    if main is not None:
        sku = next((k for k in skus if k.get("skuId") == main.get("skuId")), None)
        seen.update(id=main.get("id"), sku=main.get("skuPartNumber"),
                    status=main.get("status"), total=main.get("totalLicenses"),
                    assigned=sku.get("consumedUnits") if sku else None)
    elif several:
        seen.update(status="unknown", several=several)
        res.problems["tenant"] = (
            f"cannot verify: several products billed directly ({', '.join(several)}), none "
            "known to be the one the CSP subscription replaces; its status and licences are "
            "not taken from another product: set the stage by hand when it is cancelled")
    res.seen["tenant"] = seen


def _candidate(
    direct: list[dict[str, Any]],
    csp_skus: set[Any],
    tenant_id: str,
    previous: dict[str, Any] | None,
) -> tuple[dict[str, Any] | None, list[str]]:
    """(the direct subscription being replaced or None, the products when it is unknown).

    1. The one identified by the previous tenant evidence (its ``id``), followed whatever
       other products show: once it left the directory of that same tenant, it is gone
       ("absent"), never replaced by another product.
    2. Else a direct subscription with the SKU of one of the partner's CSP subscriptions in
       the tenant (the product being replaced), others (free, add-ons) left out.
    3. Else the direct products, when they are one product; several products (none named by a
       CSP subscription): unknown.
    Among subscriptions of that one product, an Enabled one first, then the largest."""
    prev = previous or {}
    if prev.get("id"):
        found = next((s for s in direct if s.get("id") == prev["id"]), None)
        if found is not None:
            return found, []
        if tenant_id and prev.get("tenant_id") == tenant_id:
            return None, []
    pool = [s for s in direct if s.get("skuId") in csp_skus] or direct
    products = sorted({str(s.get("skuPartNumber") or s.get("skuId")) for s in pool})
    if len(products) > 1:
        return None, products
    if not pool:
        return None, []
    return sorted(pool, key=lambda s: (s.get("status") != "Enabled",
                                       -int(s.get("totalLicenses") or 0)))[0], []


def sync_before_run(
    db: Database,
    settings: Settings,
    campaign: Campaign,
    *,
    now: datetime,
    tag: str | None,
    dry_run: bool,
    echo: Callable[[str], None] | None,
) -> SyncReport:
    """`comms run --sync`: sync every enabled source before planning; a customer that failed
    to sync is planned on its ledger stage (the summary says so), auth/config errors stop."""
    report = run_sync(db, settings, campaign, now=now, tag=tag, dry_run=dry_run)
    if echo:
        echo("sync: " + report.summary())
        if report.count("failed"):
            echo(f"sync: {report.count('failed')} customer(s) failed to sync (see `comms sync`)"
                 "; they are planned on their ledger stage")
        for c in report.customers:
            for m in c.moved:
                echo(f"sync: {c.key} {m}")
    return report
