"""Waves (tags): list them, send proofs to the operator, approve or hold them.

A proof is one copy of each message the wave's customers will get next — one per message ×
locale × licence branch present in the wave, rendered for the first customer (by key) of that
variant — with ``[PROOF]`` before the subject, sent to the operator only. The copies go through
the normal outbox (pacing, leases, reconciliation, so a crash never sends a proof twice) as
internal rows named ``proof:<message>`` (see comms.store.wave_models): the planner never counts
them and status, report and run figures leave them out. Their recipient is the operator's
address, frozen in the row; no customer contact is ever copied.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from comms import outbox
from comms.campaign import Campaign
from comms.config import Settings
from comms.delivery.base import Transport
from comms.domain import CustomerInfo, PlannedMessage
from comms.errors import NotFound, RequestRefused, StateConflict, UsageError
from comms.render import Renderer
from comms.services import engine
from comms.services.outbox_admin import normalise_email
from comms.services.sending import worker_id
from comms.services.wave_gate import Approval, ContentHasher, approvals, combined_hash, is_starter
from comms.store import repo
from comms.store.db import Database
from comms.store.models import Contact, Customer, CustomerTag, Message, new_message_row
from comms.store.wave_models import PROOF_PREFIX, WaveEvent


@dataclass(frozen=True)
class ProofItem:
    """One variant of the wave's next messages and the customer it is rendered for."""

    message: str
    locale: str
    branch: str  # self_service | support (licences below / at or above the threshold)
    customer: CustomerInfo
    planned: PlannedMessage
    customers: int  # customers of the wave that get this variant


@dataclass
class WaveSummary:
    tag: str
    customers: int
    by_stage: dict[str, int]
    next_due_at: datetime | None
    due_now: int  # customers with a message due now (window aside)
    approval: str  # not required | awaiting approval | approved | held | re-held: content changed
    approved_by: str = ""
    approved_at: datetime | None = None
    next_messages: dict[str, int] = field(default_factory=dict)


def _tag_ids(s: Session, tag: str) -> list[int]:
    ids = s.exec(select(CustomerTag.customer_id).where(CustomerTag.tag == tag)).all()
    return sorted(ids)


def _branch(settings: Settings, c: CustomerInfo) -> str:
    return "self_service" if c.licences < settings.partner.licence_threshold else "support"


def next_messages(
    db: Database, settings: Settings, campaign: Campaign, tag: str, now: datetime
) -> list[ProofItem]:
    """The variants (message × locale × licence branch) of what the wave's customers get next;
    the send window is ignored (a proof shows what will go out when it opens)."""
    with db.session() as s:
        ids = _tag_ids(s, tag)
        if not ids:
            raise NotFound(f"No customer has the tag {tag!r}. See `comms wave list`.")
        customers = repo.load_customers(s, ids)
        history = engine.load_history(s, ids)
    variants: dict[tuple[str, str, str], ProofItem] = {}
    counts: Counter[tuple[str, str, str]] = Counter()
    for c in sorted(customers.values(), key=lambda c: c.key):
        p = engine.plan_one(c, history.get(c.id or 0, []), now, campaign)
        for pm in (*p.due, *p.deferred):
            if pm.internal:
                continue  # notes to the account manager are not part of the wave's mail
            key = (pm.message, c.locale, _branch(settings, c))
            counts[key] += 1
            variants.setdefault(key, ProofItem(pm.message, c.locale, key[2], c, pm, 0))
    return [
        ProofItem(v.message, v.locale, v.branch, v.customer, v.planned, counts[k])
        for k, v in sorted(variants.items())
    ]


@dataclass
class ProofResult:
    tag: str
    to: str
    items: list[ProofItem]
    message_ids: list[int]
    content_hash: str
    dispatch: outbox.DispatchReport


def _check_operator(s: Session, to: str) -> None:
    """``to`` (normalised as contacts are: ``anna@xn--mller-kva.example`` is the contact
    ``anna@müller.example``) is no customer's contact."""
    hit = s.exec(select(Customer.key).join(Contact, col(Contact.customer_id) == col(Customer.id))
                 .where(sa.func.lower(Contact.email) == to)).first()
    if hit is not None:
        raise UsageError(
            f"{to} is a contact of customer {hit}; proofs go to the operator only. "
            "Pass your own address with --to."
        )


def _next_sequences(s: Session, items: Sequence[ProofItem]) -> dict[tuple[int, str], int]:
    out: dict[tuple[int, str], int] = {}
    for it in items:
        cid, name = it.customer.id or 0, PROOF_PREFIX + it.message
        if (cid, name) not in out:
            top = s.exec(select(sa.func.max(Message.sequence)).where(
                Message.customer_id == cid, Message.message == name)).one()
            out[(cid, name)] = (top or 0) + 1
    return out


def send_proof(
    db: Database, settings: Settings, campaign: Campaign, renderer: Renderer,
    transport: Transport, tag: str, *, to: str | None, by: str, clock: outbox.Clock,
) -> ProofResult:
    """Queue and send one proof copy per variant to the operator (``to``, default the
    partner's reply-to address); records the proof and its content hash in the audit trail."""
    now = clock.now()
    given = (to or settings.partner.reply_to).strip()
    try:
        address = normalise_email(given)
    except RequestRefused as exc:
        raise UsageError(f"--to: {exc}") from None
    items = next_messages(db, settings, campaign, tag, now)
    if not items:
        raise StateConflict(
            f"Nothing is due for the customers of wave {tag!r}: no proof to send. Move them to "
            "the stage that starts the wave (`comms customers set-stage`) first."
        )
    hashes = ContentHasher(settings, renderer).hashes(i.message for i in items)
    with db.session(immediate=True) as s:
        _check_operator(s, address)
        seq = _next_sequences(s, items)
        rows = []
        for it in items:
            r = renderer.render(it.message, it.customer, now=now,
                                reminder_number=it.planned.reminder_number,
                                recipient=it.planned.to[0] if it.planned.to else None,
                                extra=it.planned.context or None)
            name = PROOF_PREFIX + it.message
            rows.append(new_message_row(
                customer_id=it.customer.id or 0, message=name,
                sequence=seq[(it.customer.id or 0, name)], stage=it.planned.stage,
                to_json=outbox.addresses_json([(address, "")]), subject=f"[PROOF] {r.subject}",
                html=r.html, text=r.text, now=now, internal=True, locale=r.locale,
                note=f"wave {tag} proof: {it.locale}, {it.branch}, as for {it.customer.key}",
            ))
        ids = outbox.insert_messages(s, rows)
        s.add(WaveEvent(tag=tag, action="proof", at=now, by=by, note=f"to {address}",
                        content_hash=combined_hash(hashes), hashes_json=json.dumps(hashes),
                        detail_json=json.dumps({"message_ids": ids})))
    report = engine.dispatch_ids(db, settings, transport, ids, clock=clock, worker=worker_id())
    return ProofResult(tag, address, items, ids, combined_hash(hashes), report)


def approve(
    db: Database, settings: Settings, campaign: Campaign, renderer: Renderer, tag: str, *,
    by: str, note: str, now: datetime,
) -> WaveEvent:
    """Approve the wave's current content; refused unless a proof of exactly it was sent."""
    if not by.strip():
        raise UsageError("--by NAME is required: the audit trail records who approved.")
    items = next_messages(db, settings, campaign, tag, now)
    hashes = ContentHasher(settings, renderer).hashes(i.message for i in items)
    current = combined_hash(hashes)
    with db.session(immediate=True) as s:
        proof = s.exec(select(WaveEvent).where(WaveEvent.tag == tag, WaveEvent.action == "proof")
                       .order_by(col(WaveEvent.id).desc())).first()
        if not items or proof is None or json.loads(proof.hashes_json) != hashes:
            raise StateConflict(
                f"Wave {tag!r} has no proof of what it would send now (none sent, or the "
                f"templates or the customers' next messages changed since). Run `comms wave "
                f"proof {tag}`, check it, then approve."
            )
        ev = WaveEvent(tag=tag, action="approve", at=now, by=by.strip(), note=note,
                       content_hash=current, hashes_json=json.dumps(hashes),
                       detail_json=json.dumps({"proof_event": proof.id,
                                               "proof_at": proof.at.isoformat()}))
        s.add(ev)
        s.flush()
        s.expunge(ev)
    return ev


def hold(db: Database, tag: str, *, by: str, note: str, now: datetime) -> WaveEvent:
    """Hold the wave: its customers' first messages wait until it is approved again."""
    with db.session(immediate=True) as s:
        if not _tag_ids(s, tag):
            raise NotFound(f"No customer has the tag {tag!r}. See `comms wave list`.")
        ev = WaveEvent(tag=tag, action="hold", at=now, by=by, note=note)
        s.add(ev)
        s.flush()
        s.expunge(ev)
    return ev


def _approval_state(
    campaign: Campaign, a: Approval | None, wanted: dict[str, str], starters: int
) -> str:
    if a is not None and not a.approved:
        return "held"
    if a is None:
        return "awaiting approval" if campaign.require_approval else "not required"
    changed = any(a.hashes.get(m) != h for m, h in wanted.items())
    if changed and starters:
        return "re-held: content changed" if campaign.require_approval else "content changed"
    return "approved"


def list_waves(
    db: Database, settings: Settings, campaign: Campaign, renderer: Renderer, now: datetime
) -> list[WaveSummary]:
    """Every tag: customers per stage, next message due, approval state."""
    with db.session() as s:
        tags = s.exec(select(CustomerTag.tag).distinct().order_by(col(CustomerTag.tag))).all()
        current = approvals(s)
    hasher = ContentHasher(settings, renderer)
    out = []
    for tag in tags:
        with db.session() as s:
            ids = _tag_ids(s, tag)
            customers = repo.load_customers(s, ids)
            history = engine.load_history(s, ids)
        by_stage: Counter[str] = Counter(c.stage for c in customers.values())
        nexts = [c for c in (customers[i] for i in ids)]
        due: Counter[str] = Counter()
        wanted: dict[str, str] = {}
        starters = due_now = 0
        for c in nexts:
            h = history.get(c.id or 0, [])
            p = engine.plan_one(c, h, now, campaign)
            msgs = [pm.message for pm in (*p.due, *p.deferred) if not pm.internal]
            due.update(msgs)
            due_now += bool(msgs)
            if msgs and is_starter(h, campaign):
                starters += 1
                wanted.update(hasher.hashes(msgs))
        next_at = _next_due(s_ids=ids, db=db)
        a = current.get(tag)
        out.append(WaveSummary(
            tag=tag, customers=len(ids),
            by_stage={st: by_stage[st] for st in campaign.stage_names if by_stage[st]},
            next_due_at=next_at, due_now=due_now,
            approval=_approval_state(campaign, a, wanted, starters),
            approved_by=a.by if a and a.approved else "",
            approved_at=a.at if a and a.approved and isinstance(a.at, datetime) else None,
            next_messages=dict(sorted(due.items())),
        ))
    return out


def _next_due(*, s_ids: list[int], db: Database) -> datetime | None:
    """When the wave's next message is due: a paused, opted-out or lost customer's
    next_due_at is not a send (a run skips them)."""
    with db.session() as s:
        value = s.exec(select(sa.func.min(Customer.next_due_at)).where(
            col(Customer.id).in_(s_ids), *engine.sendable())).one()
    return value if isinstance(value, datetime) else None


def audit_trail(db: Database, tag: str) -> list[WaveEvent]:
    """Every proof, approval and hold of a wave, oldest first."""
    with db.session() as s:
        rows = list(s.exec(select(WaveEvent).where(WaveEvent.tag == tag)
                           .order_by(col(WaveEvent.id))).all())
        for r in rows:
            s.expunge(r)
    return rows
