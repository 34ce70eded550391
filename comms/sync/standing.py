"""Where each customer stands before stage sync moves it: whether a stage set by hand was a
correction of sync (which holds until the fact behind a move begins after it: the evidence
history of corrected customers), where the current stage's on-enter message stands (sync waits
for it, ``[sync] wait_for_stage_message``), and what Partner Center shows that needs a person
(a relationship or CSP subscription gone)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from comms import outbox, planner
from comms.campaign import Campaign
from comms.domain import CustomerInfo, MessageStatus, SentMessage
from comms.store.models import Message, StageEvent
from comms.store.sync_models import SyncEvidence
from comms.sync.rules import Facts, StageMessage, SyncRules

_CHUNK = 5000


@dataclass
class Context:
    """What every customer's moves are judged by: the campaign, its sync rules, the time."""

    campaign: Campaign
    rules: SyncRules
    now: datetime

    def __post_init__(self) -> None:
        self.allowed = {s.name: s.next for s in self.campaign.stages}
        self.order = {name: i for i, name in enumerate(self.campaign.stage_names)}
        self.on_enter = {s.name: s.on_enter for s in self.campaign.stages
                         if s.on_enter and s.name in self.rules.wait_for_stage_message}
        self.wait_messages = {m for m in self.on_enter.values() if m}


def manual_moves(session: Session, ids: list[int],
                  order: dict[str, int]) -> dict[int, datetime]:
    """When a person last corrected each customer's stage by hand: a move backwards (in the
    campaign's stage order), or away from the stage sync had moved the customer to. A routine
    forward move by hand (``announced`` -> ``invited``, the normal workflow) is no correction:
    the customer's latest such move leaves it out, so observations move it on as usual;
    unless it follows a correction with no move by sync in between (back to ``approved``,
    then on to ``awaiting_cancellation``: it finishes the correction, which holds from it)."""
    out: dict[int, datetime] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        rows = session.execute(
            sa.select(col(StageEvent.customer_id), col(StageEvent.at), col(StageEvent.by),
                      col(StageEvent.source), col(StageEvent.from_stage),
                      col(StageEvent.to_stage))
            .where(col(StageEvent.customer_id).in_(chunk), col(StageEvent.kind) == "stage")
            .order_by(col(StageEvent.customer_id), col(StageEvent.at), col(StageEvent.id))
        ).all()
        last_by: dict[int, str] = {}
        for cid, at, by, source, from_stage, to_stage in rows:
            if not by.startswith("sync:") and source != "import" and at is not None:
                backwards = order.get(to_stage or "", -1) < order.get(from_stage or "", -1)
                if backwards or last_by.get(cid, "").startswith("sync:") or cid in out:
                    out[cid] = at
                else:
                    out.pop(cid, None)
            last_by[cid] = by
    return out


def evidence_history(session: Session,
                     ids: list[int]) -> dict[int, list[tuple[str, datetime, dict[str, Any]]]]:
    """Every evidence row of the customers, oldest first: (source, at, what was seen). Read for
    the customers corrected by hand only (``manual_moves``, rare), in one query: when the fact
    behind each observation began (``rules.onsets``) decides whether the correction holds."""
    out: dict[int, list[tuple[str, datetime, dict[str, Any]]]] = {}
    if not ids:
        return out
    for cid, source, at, seen_json in session.execute(
        sa.select(col(SyncEvidence.customer_id), col(SyncEvidence.source),
                  col(SyncEvidence.at), col(SyncEvidence.seen_json))
        .where(col(SyncEvidence.customer_id).in_(ids))
        .order_by(col(SyncEvidence.customer_id), col(SyncEvidence.id))
    ).all():
        try:
            seen = json.loads(seen_json)
        except ValueError:
            seen = None
        # An unreadable row is no reading of the fact: it ends a run, never extends one.
        out.setdefault(cid, []).append((source, at, seen if isinstance(seen, dict) else {}))
    return out


def stage_messages(session: Session, ids: list[int],
                    messages: set[str]) -> dict[int, list[SentMessage]]:
    """The customers' history of the on-enter messages sync waits for."""
    out: dict[int, list[SentMessage]] = {}
    if not messages or not ids:
        return out
    for cid, message, seq, status, stage, created, sent, code in session.execute(
        sa.select(col(Message.customer_id), col(Message.message), col(Message.sequence),
                  col(Message.status), col(Message.stage), col(Message.created_at),
                  col(Message.sent_at), col(Message.error_code))
        .where(col(Message.customer_id).in_(ids), col(Message.message).in_(sorted(messages)))
        .order_by(col(Message.id))
    ).all():
        out.setdefault(cid, []).append(SentMessage(
            message, seq, status, stage, created, sent,
            by_operator=status == MessageStatus.WITHDRAWN and code == outbox.BY_OPERATOR))
    return out


def stage_message(ctx: Context, info: CustomerInfo,
                   history: list[SentMessage]) -> StageMessage | None:
    """The current stage's on-enter message, when sync waits for it before moving on."""
    message = ctx.on_enter.get(info.stage)
    if not message:
        return None
    state = planner.stage_message_state(history, message)
    if state is None:
        # Planned by the next run, unless there is nobody it could go to.
        recipients = planner.recipients(info, ctx.campaign)
        state = "not planned yet" if recipients else "no contact it may go to"
    return StageMessage(message, {"pending": "queued", "skipped": "withdrawn by an operator"}
                        .get(state, state))


def attention(ctx: Context, info: CustomerInfo, facts: Facts,
              partner_center: dict[str, Any] | None) -> str:
    """What Partner Center shows (``partner_center``: what it showed of the customer) that a
    person must look at, recorded as the customer's partner_center problem (``ATTENTION`` +
    this): a customer at or past the stage the reseller relationship moves it
    to is no longer listed, or one at or past the CSP-live stage has no active CSP subscription.
    Stages are never moved back; no stage message is planned while it lasts."""
    stage = ctx.order.get(info.stage, -1)
    if info.stage not in ctx.order or ctx.campaign.stage(info.stage).final:
        return ""

    def reached(observation: str) -> bool:
        target = ctx.rules.stage_for(observation)
        return bool(target) and target in ctx.order and stage >= ctx.order[target]

    why = ""
    if facts.relationship_accepted is False and reached("relationship_accepted"):
        why = (f"Partner Center no longer lists this customer (no reseller relationship), yet "
               f"its stage is {info.stage!r}: it may have removed you as its reseller. No "
               "stage message goes out until Partner Center lists it again; call the customer")
    elif facts.csp_active is False and reached("csp_active"):
        subs = (partner_center or {}).get("subscriptions") or []
        statuses = ", ".join(sorted({str(s.get("status")) for s in subs})) or "none"
        why = (f"no active CSP subscription in Partner Center (status: {statuses}), yet its "
               f"stage is {info.stage!r}: cancelling the old subscription now would leave it "
               "without Microsoft 365. No cancel instructions or reminders go out until a CSP "
               "subscription is active again; check the CSP subscription")
    return why


