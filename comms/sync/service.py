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

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from comms import stages
from comms.campaign import Campaign
from comms.config import Settings
from comms.errors import CampaignError, ConfigError, UsageError
from comms.services.customers import apply_stage_event
from comms.store import repo
from comms.store.db import Database
from comms.store.models import Customer, StageEvent
from comms.store.sync_models import SyncCheck, SyncEvidence
from comms.sync import clients
from comms.sync.rules import OBSERVATIONS, Decision, Facts, SyncRules, decide

SOURCES = ("partner_center", "gdap", "tenant")
# Which source an observation comes from (the evidence a move cites).
OBSERVATION_SOURCE = {"relationship_accepted": "partner_center", "gdap_active": "gdap",
                      "csp_active": "partner_center", "direct_inactive": "tenant"}
_CHUNK = 5000
_APPLY_CHUNK = 200


@dataclass
class CustomerSync:
    key: str
    name: str
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> what was seen
    problems: dict[str, str] = field(default_factory=dict)  # source -> cannot verify / failed
    failed: bool = False
    moved: list[str] = field(default_factory=list)
    held: str = ""
    new_evidence: int = 0
    licences: tuple[int, int] | None = None  # (before, after)
    tenant_filled: str = ""

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        if self.moved:
            return "moved"
        if self.problems:
            return "cannot verify"
        if self.held:
            return "held"
        return "seen"


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


def _digest(seen: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(seen, sort_keys=True).encode()).hexdigest()


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


@dataclass
class _Target:
    id: int
    key: str
    name: str
    tenant_id: str
    domain: str


def _targets(db: Database, keys: list[str] | None, tag: str | None) -> list[_Target]:
    with db.session() as session:
        rows = repo.get_customers(session, keys) if keys else repo.find_customers(session, tag=tag)
        return [_Target(r.id or 0, r.key, r.name, r.tenant_id.strip().lower(),
                        r.primary_domain.strip().lower()) for r in rows]


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
    targets = _targets(db, keys, tag)
    results = {t.id: CustomerSync(t.key, t.name) for t in targets}
    report = SyncReport(now, sources, dry_run, list(results.values()), [], [])
    fills = _read(settings, sources, targets, results, report, progress)
    _record(db, campaign, rules, now, targets, results, fills, dry_run)
    return report


def _read(
    settings: Settings,
    sources: tuple[str, ...],
    targets: list[_Target],
    results: dict[int, CustomerSync],
    report: SyncReport,
    progress: Callable[[int, int], None] | None,
) -> dict[int, str]:
    """Read every source; returns the tenant ids found by a unique domain match."""
    session = clients.open_session(settings)
    reader = clients.Reader(session, max_attempts=settings.sync.max_attempts,
                            time_scale=settings.delivery.time_scale)
    fills: dict[int, str] = {}
    tenant_of = {t.id: t.tenant_id for t in targets}
    try:
        pc = clients.PartnerCenter(settings, session, reader) if "partner_center" in sources \
            else None
        if pc is not None:
            matched = _match(list(pc.customers()), targets, report, fills)
            tenant_of.update(fills)
            for t in targets:
                results[t.id].seen["partner_center"] = {"listed": t.id in matched}
        if "gdap" in sources:
            rels = clients.Gdap(settings, session, reader).relationships()
            for t in targets:
                if tenant_of[t.id]:
                    results[t.id].seen["gdap"] = {"status": rels.get(tenant_of[t.id], "none")}
        tenant = clients.CustomerTenant(settings, session, reader) \
            if "tenant" in sources else None
        work = [t for t in targets if (pc is not None and
                                       results[t.id].seen["partner_center"]["listed"])
                or tenant is not None]
        done = 0

        def one(t: _Target) -> None:
            tid = tenant_of[t.id]
            res = results[t.id]
            if pc is not None and res.seen["partner_center"]["listed"]:
                _guard(res, "partner_center", lambda: _csp(res, pc.subscriptions(tid)))
            if tenant is not None:
                if not tid:
                    res.problems["tenant"] = (
                        "cannot verify: no tenant id (add tenant_id to the CSV, or enable "
                        "[sync] partner_center to find it by domain)")
                else:
                    _guard(res, "tenant", lambda: _direct(res, settings, *tenant.read(tid)))

        with ThreadPoolExecutor(max_workers=settings.sync.concurrency) as pool:
            for _ in pool.map(one, work):
                done += 1
                if progress:
                    progress(done, len(work))
    finally:
        report.retries = reader.retries
        session.close()
    return fills


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
    targets: list[_Target],
    report: SyncReport,
    fills: dict[int, str],
) -> set[int]:
    """Ledger customers Partner Center lists: by tenant id, else by a unique primary domain."""
    by_tenant = {t.tenant_id: t.id for t in targets if t.tenant_id}
    by_domain: dict[str, list[_Target]] = {}
    for t in targets:
        if t.domain:
            by_domain.setdefault(t.domain, []).append(t)
    matched: set[int] = set()
    for pcc in listed:
        if pcc.tenant_id in by_tenant:
            matched.add(by_tenant[pcc.tenant_id])
            continue
        candidates = by_domain.get(pcc.domain, [])
        label = f"{pcc.company_name} ({pcc.domain}, tenant {pcc.tenant_id})"
        if len(candidates) > 1:
            report.ambiguous.append(
                f"{label}: domain matches {', '.join(c.key for c in candidates)}; set "
                "tenant_id on the right one")
        elif candidates and not candidates[0].tenant_id:
            matched.add(candidates[0].id)
            fills[candidates[0].id] = pcc.tenant_id
        else:
            report.unmatched.append(label)
    return matched


def _csp(res: CustomerSync, subs: list[dict[str, Any]]) -> None:
    seen = res.seen["partner_center"]
    seen["subscriptions"] = sorted(
        ({"id": s.get("id"), "offer": s.get("offerName") or s.get("offerId"),
          "quantity": s.get("quantity"), "status": s.get("status"),
          "start": s.get("effectiveStartDate")} for s in subs),
        key=lambda s: str(s["id"]),
    )


def _direct(
    res: CustomerSync, settings: Settings, subs: list[dict[str, Any]], skus: list[dict[str, Any]]
) -> None:
    partner = settings.graph.tenant_id.lower()
    direct = [s for s in subs if str(s.get("ownerTenantId") or "").lower() != partner]
    seen: dict[str, Any] = {"status": "absent"}
    if direct:
        # The subscription that still bills, if any: an Enabled one first, then the largest.
        main = sorted(direct, key=lambda s: (s.get("status") != "Enabled",
                                             -int(s.get("totalLicenses") or 0)))[0]
        sku = next((k for k in skus if k.get("skuId") == main.get("skuId")), None)
        seen = {"id": main.get("id"), "sku": main.get("skuPartNumber"),
                "status": main.get("status"), "total": main.get("totalLicenses"),
                "assigned": sku.get("consumedUnits") if sku else None}
    res.seen["tenant"] = seen


def facts_of(seen: dict[str, dict[str, Any]]) -> Facts:
    pc, gdap, tenant = seen.get("partner_center"), seen.get("gdap"), seen.get("tenant")
    active = [s for s in (pc or {}).get("subscriptions", []) if s.get("status") == "active"]
    return Facts(
        relationship_accepted=None if pc is None else bool(pc.get("listed")),
        gdap_status=None if gdap is None else str(gdap.get("status")),
        csp_active=None if pc is None or "subscriptions" not in pc else bool(active),
        csp_quantity=sum(int(s.get("quantity") or 0) for s in active) if active else None,
        direct_status=None if tenant is None else str(tenant.get("status")),
        direct_total=None if tenant is None else tenant.get("total"),
        assigned=None if tenant is None else tenant.get("assigned"),
    )


def _latest_evidence(session: Session, ids: list[int]) -> dict[tuple[int, str], SyncEvidence]:
    out: dict[tuple[int, str], SyncEvidence] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        latest = (select(sa.func.max(col(SyncEvidence.id)))
                  .where(col(SyncEvidence.customer_id).in_(chunk))
                  .group_by(col(SyncEvidence.customer_id), col(SyncEvidence.source)))
        for ev in session.exec(select(SyncEvidence).where(col(SyncEvidence.id).in_(latest))):
            out[(ev.customer_id, ev.source)] = ev
    return out


def _manual_moves(session: Session, ids: list[int]) -> dict[int, datetime]:
    out: dict[int, datetime] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        rows = session.exec(
            select(StageEvent.customer_id, sa.func.max(col(StageEvent.at)))
            .where(col(StageEvent.customer_id).in_(chunk), col(StageEvent.kind) == "stage",
                   sa.not_(col(StageEvent.by).startswith("sync:")),
                   col(StageEvent.source) != "import")
            .group_by(col(StageEvent.customer_id))
        ).all()
        out.update({cid: at for cid, at in rows if at is not None})
    return out


def _record(
    db: Database,
    campaign: Campaign,
    rules: SyncRules,
    now: datetime,
    targets: list[_Target],
    results: dict[int, CustomerSync],
    fills: dict[int, str],
    dry_run: bool,
) -> None:
    allowed = {s.name: s.next for s in campaign.stages}
    ids = [t.id for t in targets]
    with db.session(immediate=not dry_run) as session:
        latest = _latest_evidence(session, ids)
        manual = _manual_moves(session, ids)
        for start in range(0, len(ids), _APPLY_CHUNK):
            keys = [t.key for t in targets[start : start + _APPLY_CHUNK]]
            rows = repo.get_customers(session, keys, lock=not dry_run)
            infos = repo.customer_infos(session, rows)
            chunk_ids = [r.id for r in rows if r.id is not None]
            checks = {(c.customer_id, c.source): c for c in session.exec(
                select(SyncCheck).where(col(SyncCheck.customer_id).in_(chunk_ids)))}
            # Evidence first, one flush for the chunk (ids for the notes), then the moves:
            # a flush per row would make the session re-scan everything it holds each time.
            with session.no_autoflush:
                new = {r.id: _evidence(session, r, results[r.id or 0], now, latest)
                       for r in rows}
            session.flush()
            with session.no_autoflush:
                for row, info in zip(rows, infos, strict=True):
                    assert row.id is not None
                    _apply(session, campaign, rules, allowed, now, row, info, results[row.id],
                           fills.get(row.id, ""), latest, manual.get(row.id), new[row.id],
                           checks)
            # The outbox's withdraw evaluates its UPDATE against every object the session
            # holds: keep that small so ten thousand moves stay linear.
            session.flush()
            session.expunge_all()
        if dry_run:
            session.rollback()


def _apply(
    session: Session,
    campaign: Campaign,
    rules: SyncRules,
    allowed: dict[str, tuple[str, ...]],
    now: datetime,
    row: Customer,
    info: Any,
    res: CustomerSync,
    fill: str,
    latest: dict[tuple[int, str], SyncEvidence],
    manual_at: datetime | None,
    new: dict[str, SyncEvidence],
    checks: dict[tuple[int, str], SyncCheck],
) -> None:
    assert row.id is not None
    evidence: dict[str, int] = {}
    observed_before: datetime | None = None
    for src in SOURCES:
        prev = latest.get((row.id, src))
        if prev is not None:
            evidence[src] = prev.id or 0
            observed_before = max(observed_before or prev.at, prev.at)
        if src in new:
            evidence[src] = new[src].id or 0
    for src in SOURCES:
        if src in res.seen or src in res.problems:
            _check(session, checks, row.id, src, now, res.problems.get(src, ""))
    if fill and not row.tenant_id:
        res.tenant_filled = fill
        repo.record_event(session, row, stages.Event(
            kind="update", at=now, by="sync:partner_center", source="sync",
            note=f"tenant id {fill} filled from Partner Center (unique domain match "
                 f"{row.primary_domain}, evidence #{evidence.get('partner_center', 0)})"))
        row.tenant_id = fill
    facts = facts_of(res.seen)
    count = facts.assigned if facts.assigned is not None else facts.direct_total
    if count is not None and facts.direct_status not in (None, "absent") \
            and int(count) != row.licences:
        which = "assigned licences" if facts.assigned is not None else "totalLicenses"
        res.licences = (row.licences, int(count))
        repo.record_event(session, row, stages.Event(
            kind="update", at=now, by="sync:tenant", source="sync",
            note=f"licences {row.licences} -> {count} ({which} of the direct subscription "
                 f"observed in the tenant, evidence #{evidence.get('tenant', 0)})"))
        row.licences = int(count)
        row.updated_at = now
        session.add(row)
    decision: Decision = decide(
        campaign.stage_names, allowed, rules, info, facts, manual_at=manual_at,
        observed_before=observed_before, new_evidence=res.new_evidence > 0,
    )
    res.held = decision.held
    for from_stage, to_stage, observation in decision.moves:
        src = OBSERVATION_SOURCE[observation]
        event = stages.Event(
            kind="stage", at=now, by=f"sync:{src}", source="sync", from_stage=from_stage,
            to_stage=to_stage, note=f"observed {observation} (evidence #{evidence.get(src, 0)})",
        )
        apply_stage_event(session, row, event, csp_live_stage=campaign.csp_live_stage)
        res.moved.append(f"{from_stage} -> {to_stage} ({observation})")


def _evidence(
    session: Session,
    row: Customer,
    res: CustomerSync,
    now: datetime,
    latest: dict[tuple[int, str], SyncEvidence],
) -> dict[str, SyncEvidence]:
    """New evidence rows (not flushed) for what changed since each source's last evidence."""
    out: dict[str, SyncEvidence] = {}
    for src in SOURCES:
        seen = res.seen.get(src)
        if seen is None or row.id is None:
            continue
        digest = _digest(seen)
        prev = latest.get((row.id, src))
        if prev is not None and prev.digest == digest:
            continue
        ev = SyncEvidence(customer_id=row.id, source=src, at=now,
                          seen_json=json.dumps(seen, sort_keys=True), digest=digest)
        session.add(ev)
        out[src] = ev
        res.new_evidence += 1
    return out


def _check(
    session: Session,
    checks: dict[tuple[int, str], SyncCheck],
    customer_id: int,
    source: str,
    now: datetime,
    problem: str,
) -> None:
    row = checks.get((customer_id, source))
    if row is None:
        row = SyncCheck(customer_id=customer_id, source=source, checked_at=now, problem=problem)
    else:
        row.checked_at, row.problem = now, problem
    session.add(row)


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
        for c in report.customers:
            for m in c.moved:
                echo(f"sync: {c.key} {m}")
    return report
