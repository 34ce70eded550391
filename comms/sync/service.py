"""Stage sync: read what Microsoft sees of each customer, keep it as evidence, and move stages
by the campaign's ``[sync]`` rules.

No database transaction stays open across network calls: the partner's listings are read
first, then the customers a page at a time (bounded concurrency, retries in the clients; in
worker processes for a large sync, ``comms.sync.reading``), and each page, once read, is
recorded in one transaction while the next pages are read: the evidence that changed, tenant
ids found by a unique domain match, licence counts from reality, and the stage moves (each a
normal audit event, ``by = sync:<source>``, the note naming the evidence id). With nothing new,
nothing is written but each customer's ``sync_checks`` row (the freshness ``comms status``
shows). A sync stopped halfway has recorded whole pages, each customer in full or not at all;
the next sync reads every customer again.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
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
from comms.sync import clients, partner, reading
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
    """The customers to sync: ``keys``, else those with ``tag``, else all, in key order. Only
    the five columns sync needs are read: a sync of any size holds little per customer."""
    with db.session() as session:
        if keys:
            rows = repo.get_customers(session, keys)
            found = [(r.id, r.key, r.name, r.tenant_id, r.primary_domain) for r in rows]
        else:
            query = sa.select(col(Customer.id), col(Customer.key), col(Customer.name),
                              col(Customer.tenant_id), col(Customer.primary_domain))
            if tag:
                query = query.where(col(Customer.id).in_(repo.tagged(tag)))
            found = [tuple(r) for r in session.execute(query.order_by(col(Customer.key)))]
        return [_Target(int(cid or 0), str(key), str(name), str(tid or "").strip().lower(),
                        str(domain or "").strip().lower()) for cid, key, name, tid, domain in found]


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
    keep_seen: bool = True,
) -> SyncReport:
    """Sync the customers (all, ``keys`` or ``tag``) from the enabled sources (or ``source``).
    ``keep_seen=False``: the report keeps each customer's outcome (status, moves, problems)
    but not what was seen once it is recorded, so a scheduled sync of any size holds a few
    pages of what it read (`comms sync` shows what was seen, so it keeps it)."""
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
    report = SyncReport(now, sources, dry_run, [], [], [])
    ledger = _ledger(db) if "partner_center" in sources else targets
    readers = reading.Readers(settings, sources)
    try:
        fills, tenant_of = _listings(settings, sources, readers, targets, ledger, results,
                                     report)
        report.retries = readers.reader.retries
        with closing(_read(db, settings, sources, readers, targets, tenant_of, results,
                           report, progress)) as pages:
            for page in pages:
                _record(db, campaign, rules, now, page, results, fills, dry_run)
                if not keep_seen:
                    for t in page:
                        results[t.id].seen = {}
    finally:
        readers.close()
    report.customers = [results[t.id] for t in targets]
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


def _listings(
    settings: Settings,
    sources: tuple[str, ...],
    readers: reading.Readers,
    targets: list[_Target],
    ledger: list[_Target],
    results: dict[int, CustomerSync],
    report: SyncReport,
) -> tuple[dict[int, str], dict[int, str]]:
    """Read the partner's listings (Partner Center's customers, GDAP relationships); returns
    the tenant ids found by a unique domain match, and every target's tenant id with them. A
    listing that fails after its retries fails that source for every customer (reported, exit
    code 1, nothing concluded from it): the other sources are still read, and
    `comms run --sync` plans on the ledger's stages."""
    fills: dict[int, str] = {}
    tenant_of = {t.id: t.tenant_id for t in targets}
    pc = readers.pc
    if pc is not None and (listed := _listing("partner_center", pc.customers, targets,
                                                    results)) is not None:
        matched = _match(listed, ledger, {t.id for t in targets}, report, fills)
        tenant_of.update(fills)
        for t in targets:
            results[t.id].seen["partner_center"] = {"listed": t.id in matched}
    if "gdap" in sources:
        _gdap(partner.Gdap(settings, readers.session, readers.reader), targets, tenant_of,
              results)
    return fills, tenant_of


def _read(
    db: Database,
    settings: Settings,
    sources: tuple[str, ...],
    readers: reading.Readers,
    targets: list[_Target],
    tenant_of: dict[int, str],
    results: dict[int, CustomerSync],
    report: SyncReport,
    progress: Callable[[int, int], None] | None,
) -> Generator[list[_Target], None, None]:
    """Read every customer, a page at a time (``comms.sync.reading``), and hand back each page
    once read, in order, its results in ``results``: the caller records it while the next
    pages are read. Memory stays that of a few pages whatever the number of customers."""
    pages = [targets[i : i + reading.PAGE] for i in range(0, len(targets), reading.PAGE)]
    work = sum(1 for t in targets
               if reading.is_listed(results[t.id]) or readers.tenant is not None)

    def page_jobs() -> Iterator[list[reading.Job]]:
        for page in pages:
            yield [reading.Job(t.id, tenant_of[t.id], results[t.id]) for t in page]

    def attach(jobs: list[reading.Job]) -> None:
        # The direct subscription each customer's last tenant evidence identified, read from
        # the ledger a page at a time, just before the page is read.
        if readers.tenant is not None:
            previous = _previous_direct(db, [j.id for j in jobs])
            for job in jobs:
                job.previous = previous.get(job.id)

    pager = reading.PageReader(settings, sources, work, readers)
    done = 0
    try:
        for n, (jobs, page) in enumerate(pager.read(page_jobs(), attach)):  # in order
            for job, res in zip(jobs, page.results, strict=True):
                results[job.id] = res  # a worker process sends back a copy
            report.retries += page.retries
            yield pages[n]
            done += len(jobs)
            if progress:
                progress(done, len(targets))
    finally:
        pager.close()


def _gdap(gdap: partner.Gdap, targets: list[_Target], tenant_of: dict[int, str],
          results: dict[int, CustomerSync]) -> None:
    rels = _listing("gdap", lambda: gdap.relationships().items(), targets, results)
    if rels is not None:
        found = dict(rels)
        for t in targets:
            if tenant_of[t.id]:
                results[t.id].seen["gdap"] = {"status": found.get(tenant_of[t.id], "none")}


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
    by_tenant: dict[str, list[_Target]] = {}
    for t in ledger:
        if t.tenant_id:
            by_tenant.setdefault(t.tenant_id, []).append(t)
    by_domain: dict[str, list[_Target]] = {}
    for t in ledger:
        if t.domain:
            by_domain.setdefault(t.domain, []).append(t)
    pc_domains = Counter(p.domain for p in listed if p.tenant_id not in by_tenant)
    matched: set[int] = set()
    for pcc in listed:
        owners = by_tenant.get(pcc.tenant_id, [])
        if owners:  # the tenant is listed: every ledger customer holding it (was: the last)
            matched.update(o.id for o in owners if o.id in selected)
            if len(owners) > 1:
                report.ambiguous.append(
                    f"{pcc.company_name} (tenant {pcc.tenant_id}) is held by ledger customers "
                    f"{', '.join(o.key for o in owners)}: one tenant, one customer; fix "
                    "tenant_id in the CSV (and re-import)")
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
    report = run_sync(db, settings, campaign, now=now, tag=tag, dry_run=dry_run,
                      keep_seen=False)
    if echo:
        echo("sync: " + report.summary())
        if report.count("failed"):
            echo(f"sync: {report.count('failed')} customer(s) failed to sync (see `comms sync`)"
                 "; they are planned on their ledger stage")
        for c in report.customers:
            for m in c.moved:
                echo(f"sync: {c.key} {m}")
    return report
