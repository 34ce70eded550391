"""Writing what sync saw into the ledger: evidence (only when it changed), freshness checks,
tenant ids filled by a unique domain match, licence counts from reality, and stage moves as
normal audit events citing their evidence."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from comms import outbox, stages
from comms.campaign import Campaign
from comms.domain import CustomerInfo, SentMessage
from comms.outbox import PENDING
from comms.services.customers import apply_stage_event
from comms.store import repo
from comms.store.db import Database
from comms.store.models import Customer, Message
from comms.store.sync_models import ATTENTION, SyncCheck, SyncEvidence
from comms.sync.rules import SOURCE_OF, Decision, Facts, SyncRules, decide, onsets
from comms.sync.standing import (
    Context,
    attention,
    evidence_history,
    manual_moves,
    stage_message,
    stage_messages,
)

SOURCES = ("partner_center", "gdap", "tenant")
# Which source an observation comes from (the evidence a move cites).
OBSERVATION_SOURCE = SOURCE_OF
_CHUNK = 5000
_APPLY_CHUNK = 200


@dataclass(slots=True)  # one per customer for the whole sync: no __dict__ each
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
        if any(p.startswith(ATTENTION) for p in self.problems.values()):
            return "needs attention"
        if self.problems:
            return "cannot verify"
        if self.held:
            return "held"
        return "seen"


@dataclass(slots=True)
class _Target:
    id: int
    key: str
    name: str
    tenant_id: str
    domain: str


def _digest(seen: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(seen, sort_keys=True).encode()).hexdigest()


def facts_of(seen: dict[str, dict[str, Any]]) -> Facts:
    pc, gdap, tenant = seen.get("partner_center"), seen.get("gdap"), seen.get("tenant")
    live = [s for s in (pc or {}).get("subscriptions", []) if _seat_subscription(s)]
    direct = None if tenant is None else str(tenant.get("status"))
    return Facts(
        relationship_accepted=None if pc is None else bool(pc.get("listed")),
        gdap_status=None if gdap is None else str(gdap.get("status")),
        csp_active=None if pc is None or "subscriptions" not in pc else bool(live),
        csp_quantity=sum(int(s.get("quantity") or 0) for s in live) if live else None,
        # "unknown": several direct products, none known to be the one replaced: no claim.
        direct_status=None if direct == "unknown" else direct,
        direct_total=None if tenant is None else tenant.get("total"),
        assigned=None if tenant is None else tenant.get("assigned"),
    )


# Azure plan (new commerce) and legacy Azure offers: usage-billed, never Microsoft 365 seats.
_AZURE_OFFERS = ("DZH318Z0BPS6", "MS-AZR-")


def _seat_subscription(sub: dict[str, Any]) -> bool:
    """A Partner Center subscription that makes the CSP replacement live: active, not a trial
    (``isTrial``), licence-based (``billingType`` "license", or ``unitType`` "Licenses" when
    the billing type is not given), an online-services product (``productType`` OnlineServices
    / OnlineServicesNCE when given), not an Azure offer. An Azure plan or a trial bought
    through the partner replaces nothing the customer must cancel."""
    if sub.get("status") != "active" or sub.get("trial") is True:
        return False
    billing = str(sub.get("billing") or "").lower()
    if billing != "license" and (billing or str(sub.get("unit") or "").lower() != "licenses"):
        return False
    product = str(sub.get("product") or "")
    if product and not product.lower().startswith("onlineservices"):
        return False
    return not str(sub.get("offer_id") or "").upper().startswith(_AZURE_OFFERS)


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


def _first_evidence(session: Session, ids: list[int]) -> dict[tuple[int, str], datetime]:
    """When each source first recorded evidence of each customer."""
    out: dict[tuple[int, str], datetime] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        rows = session.exec(
            select(SyncEvidence.customer_id, SyncEvidence.source,
                   sa.func.min(col(SyncEvidence.at)))
            .where(col(SyncEvidence.customer_id).in_(chunk))
            .group_by(col(SyncEvidence.customer_id), col(SyncEvidence.source))
        ).all()
        out.update({(cid, src): at for cid, src, at in rows if at is not None})
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
    ids = [t.id for t in targets]
    read_with = {t.id: t.tenant_id.strip().lower() for t in targets}
    ctx = Context(campaign, rules, now)
    with db.session(immediate=not dry_run) as session:
        latest = _latest_evidence(session, ids)
        first = _first_evidence(session, ids)
        for start in range(0, len(ids), _APPLY_CHUNK):
            keys = [t.key for t in targets[start : start + _APPLY_CHUNK]]
            rows = repo.get_customers(session, keys, lock=not dry_run)
            infos = repo.customer_infos(session, rows)
            chunk_ids = [r.id for r in rows if r.id is not None]
            # Read once the rows are locked: a stage set by hand and committed while this sync
            # ran is seen with its stage event (read before, on PostgreSQL, the new stage came
            # without the correction that holds it, and sync undid the correction).
            manual = manual_moves(session, chunk_ids, ctx.order)
            checks = _Checks(session, chunk_ids)
            history = stage_messages(session, chunk_ids, ctx.wait_messages)
            # A move withdraws queued messages of other stages; asked once for the chunk
            # (its customer rows are locked), so customers with none skip that UPDATE.
            queued = set(session.exec(
                select(Message.customer_id).distinct()
                .where(col(Message.customer_id).in_(chunk_ids),
                       col(Message.status).in_(PENDING))).all())
            # Evidence first, in one INSERT for the chunk (its ids go into the notes), then
            # the moves; evidence and checks are plain rows, not ORM objects, so the session
            # holds only the customers and their events.
            chunk_fills = _tenants_checked(session, rows, fills, read_with, results)
            new = _insert_evidence(session, [
                ev for r in rows for ev in _evidence(r.id or 0, results[r.id or 0], now, latest)
            ])
            # A correction holds until the fact behind a move begins after it: the evidence
            # history (this sync's included) of the customers corrected by hand, which are few.
            past = evidence_history(session, [i for i in chunk_ids if i in manual])
            with session.no_autoflush:
                for row, info in zip(rows, infos, strict=True):
                    assert row.id is not None
                    _apply(session, ctx, row, info, results[row.id],
                           chunk_fills.get(row.id, ""), latest, first,
                           (manual.get(row.id), past.get(row.id, [])),
                           new.get(row.id, {}), checks, row.id in queued,
                           history.get(row.id, []))
            checks.write(session)
            # The outbox's withdraw evaluates its UPDATE against every object the session
            # holds: keep that small so ten thousand moves stay linear.
            session.flush()
            session.expunge_all()
        if dry_run:
            session.rollback()


def _apply(
    session: Session,
    ctx: Context,
    row: Customer,
    info: CustomerInfo,
    res: CustomerSync,
    fill: str,
    latest: dict[tuple[int, str], SyncEvidence],
    first: dict[tuple[int, str], datetime],
    manual: tuple[datetime | None, list[tuple[str, datetime, dict[str, Any]]]],
    new: dict[str, int],
    checks: _Checks,
    has_queued: bool,
    history: list[SentMessage],
) -> None:
    assert row.id is not None
    now = ctx.now
    evidence: dict[str, int] = {}
    evidence_at: dict[str, datetime] = {}
    first_at: dict[str, datetime] = {}
    for src in SOURCES:
        prev = latest.get((row.id, src))
        if prev is not None:
            evidence[src], evidence_at[src] = prev.id or 0, prev.at
        if src in new:
            evidence[src], evidence_at[src] = new[src], now
        if src in evidence_at:
            first_at[src] = first.get((row.id, src), evidence_at[src])
    if fill and not row.tenant_id:
        res.tenant_filled = fill
        repo.record_event(session, row, stages.Event(
            kind="update", at=now, by="sync:partner_center", source="sync",
            note=f"tenant id {fill} filled from Partner Center (unique domain match "
                 f"{row.primary_domain}, evidence #{evidence.get('partner_center', 0)})"))
        row.tenant_id = fill
    facts = facts_of(res.seen)
    why = attention(ctx, info, facts, res.seen.get("partner_center"))
    if why:
        res.problems["partner_center"] = ATTENTION + why
    else:
        why = _attention_unread(checks, row.id, res)
    for src in SOURCES:
        if src in res.seen or src in res.problems:
            checks.add(row.id, src, now, res.problems.get(src, ""))
    _licences_from_reality(session, row, facts, res, now, evidence.get("tenant", 0))
    if not why:  # while it needs attention, nothing moves (its stage is not moved back)
        manual_at, past = manual  # a correction by hand, and the evidence history it is held by
        decision: Decision = decide(
            ctx.campaign.stage_names, ctx.allowed, ctx.rules, info, facts, manual_at=manual_at,
            evidence_at=evidence_at, first_at=first_at,
            onset=onsets(past, facts_of, ctx.rules) if manual_at else {},
            stage_message=stage_message(ctx, info, history))
        res.held = decision.held
        for from_stage, to_stage, observation in decision.moves:
            _move(session, ctx, row, res, (from_stage, to_stage, observation), evidence,
                  has_queued)
    _follow_attention(session, ctx, row, res, checks, has_queued)


def _attention_unread(checks: _Checks, customer_id: int, res: CustomerSync) -> str:
    """A customer needing attention whose Partner Center was not read this time (an outage,
    or a sync of other sources) still needs it: what was wrong is kept (with why it was not
    read again), so nothing is planned or moved on a guess that it was mended."""
    before = checks.problems.get((customer_id, "partner_center"), "")
    if not before.startswith(ATTENTION) or "partner_center" in res.seen:
        return ""
    failure = res.problems.get("partner_center")
    if failure is not None:
        kept = before.split(" (not read again: ")[0]
        res.problems["partner_center"] = f"{kept} (not read again: {failure})"
    return before[len(ATTENTION):]


def _move(session: Session, ctx: Context, row: Customer, res: CustomerSync,
          move: tuple[str, str, str], evidence: dict[str, int], has_queued: bool) -> None:
    from_stage, to_stage, observation = move
    src = OBSERVATION_SOURCE[observation]
    event = stages.Event(
        kind="stage", at=ctx.now, by=f"sync:{src}", source="sync", from_stage=from_stage,
        to_stage=to_stage, note=f"observed {observation} (evidence #{evidence.get(src, 0)})"
        + (f"; {res.held}" if res.held else ""),
    )
    apply_stage_event(session, row, event, csp_live_stage=ctx.campaign.csp_live_stage,
                      has_queued=has_queued)
    res.moved.append(f"{from_stage} -> {to_stage} ({observation})")


def _follow_attention(session: Session, ctx: Context, row: Customer, res: CustomerSync,
                       checks: _Checks, has_queued: bool) -> None:
    """Queued mail goes when attention starts (it was rendered and planned for a customer in
    a state that no longer holds) or when the licence count changed; when attention ends, the
    customer is planned again straight away."""
    assert row.id is not None
    now_attention = res.problems.get("partner_center", "").startswith(ATTENTION)
    before = checks.problems.get((row.id, "partner_center"), "").startswith(ATTENTION)
    if before and not now_attention and "partner_center" in res.seen:
        row.next_due_at = ctx.now
        session.add(row)
    reason = ""
    if now_attention and has_queued:
        reason = f"sync: {res.problems['partner_center']}"
    elif res.licences and has_queued:
        # Queued mail was rendered with the old count, which picks the cancellation route.
        reason = "licences {} -> {} observed by sync".format(*res.licences)
    if reason:
        outbox.withdraw_for_new_content(session, [row.id], reason, ctx.now)


def _fill_refused(session: Session, row: Customer, fill: str, res: CustomerSync) -> bool:
    """A tenant id found by domain that another ledger customer already holds is never filled
    in (checked again here, inside the write transaction): what was read with it is dropped and
    the customer reported, not moved."""
    holder = session.exec(select(Customer.key).where(
        sa.func.lower(col(Customer.tenant_id)) == fill, col(Customer.id) != row.id)).first()
    if holder is None:
        return False
    for src in SOURCES:
        res.seen.pop(src, None)
    res.problems["partner_center"] = (
        f"cannot verify: Partner Center tenant {fill} matches {row.key}'s domain "
        f"{row.primary_domain} but is already the tenant of {holder}; nothing was filled or "
        f"moved: set the right tenant_id on {row.key} in the CSV and re-import")
    return True


def _tenants_checked(session: Session, rows: list[Customer], fills: dict[int, str],
                     read_with: dict[int, str],
                     results: dict[int, CustomerSync]) -> dict[int, str]:
    """The tenant ids found by domain that are filled in, checked in the write transaction
    before any evidence is written: nothing read with a tenant another customer took meanwhile
    (``_fill_refused``), or with a tenant id that changed meanwhile (``_tenant_changed``), is
    recorded."""
    kept = {r.id: fills[r.id] for r in rows if r.id in fills and not r.tenant_id
            and not _fill_refused(session, r, fills[r.id], results[r.id])}
    for r in rows:
        _tenant_changed(r, read_with.get(r.id or 0, ""), fills.get(r.id or 0, ""),
                        results[r.id or 0])
    return {k: v for k, v in kept.items() if k is not None}


def _tenant_changed(row: Customer, read_with: str, fill: str, res: CustomerSync) -> None:
    """What was read of a customer whose tenant id changed meanwhile (a corrected CSV imported
    during a long sync) is another tenant's: dropped, the customer reported, nothing moved (it
    was recorded and acted on as the customer's). The next sync reads the new tenant."""
    now_id = (row.tenant_id or "").strip().lower()
    if now_id == read_with or (not read_with and (not now_id or now_id == fill)):
        return
    for src in SOURCES:
        res.seen.pop(src, None)
    res.problems["tenant"] = (
        f"cannot verify: tenant id changed while sync read it ({read_with or 'none'} -> "
        f"{now_id or 'none'}); nothing read with the old one was recorded or moved: the next "
        "sync reads the new one")


def _licences_from_reality(session: Session, row: Customer, facts: Facts, res: CustomerSync,
                           now: datetime, evidence_id: int) -> None:
    """The direct subscription's assigned licences (else its totalLicenses) become the
    customer's licence count, with an event naming which number was used."""
    count = facts.assigned if facts.assigned is not None else facts.direct_total
    if count is None or facts.direct_status in (None, "absent") or int(count) == row.licences:
        return
    which = "assigned licences" if facts.assigned is not None else "totalLicenses"
    res.licences = (row.licences, int(count))
    repo.record_event(session, row, stages.Event(
        kind="update", at=now, by="sync:tenant", source="sync",
        note=f"licences {row.licences} -> {count} ({which} of the direct subscription "
             f"observed in the tenant, evidence #{evidence_id})"))
    row.licences = int(count)
    row.updated_at = now
    row.next_due_at = now
    session.add(row)


def _evidence(
    customer_id: int,
    res: CustomerSync,
    now: datetime,
    latest: dict[tuple[int, str], SyncEvidence],
) -> list[dict[str, Any]]:
    """New evidence rows for what changed since each source's last evidence."""
    out: list[dict[str, Any]] = []
    for src in SOURCES:
        seen = res.seen.get(src)
        if seen is None or not customer_id:
            continue
        digest = _digest(seen)
        prev = latest.get((customer_id, src))
        if prev is not None and prev.digest == digest:
            continue
        out.append({"customer_id": customer_id, "source": src, "at": now,
                    "seen_json": json.dumps(seen, sort_keys=True), "digest": digest})
        res.new_evidence += 1
    return out


def _insert_evidence(session: Session, rows: list[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """Insert the evidence rows; customer id -> source -> the new evidence id."""
    out: dict[int, dict[str, int]] = {}
    if rows:
        inserted = session.execute(
            sa.insert(SyncEvidence).returning(
                col(SyncEvidence.id), col(SyncEvidence.customer_id), col(SyncEvidence.source)),
            rows,
        )
        for evidence_id, customer_id, source in inserted:
            out.setdefault(customer_id, {})[source] = evidence_id
    return out


class _Checks:
    """A chunk's ``sync_checks`` (one row per customer and source: last checked, problem),
    written in two statements: an INSERT of the new ones, an UPDATE of the known ones."""

    def __init__(self, session: Session, customer_ids: list[int]) -> None:
        self.problems: dict[tuple[int, str], str] = {
            (cid, src): problem for cid, src, problem in session.exec(
                select(SyncCheck.customer_id, SyncCheck.source, SyncCheck.problem)
                .where(col(SyncCheck.customer_id).in_(customer_ids))).all()}
        self.known = set(self.problems)
        self.new: list[dict[str, Any]] = []
        self.changed: list[dict[str, Any]] = []

    def add(self, customer_id: int, source: str, now: datetime, problem: str) -> None:
        row = {"customer_id": customer_id, "source": source, "checked_at": now,
               "problem": problem}
        (self.changed if (customer_id, source) in self.known else self.new).append(row)

    def write(self, session: Session) -> None:
        if self.new:
            session.execute(sa.insert(SyncCheck), self.new)
        if self.changed:
            session.execute(sa.update(SyncCheck), self.changed)
