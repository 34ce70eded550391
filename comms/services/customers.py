"""The customer ledger: list, show with a timeline, stage moves (one or in bulk), pause, resume,
opt-out, and the CSV import/export (in ``comms.services.importer``).

Every function takes the ``Database`` and runs in one transaction; times and the acting user come
in as ``now`` and ``by``. Errors are ``comms.errors`` exceptions whose message says what to do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from comms import outbox, stages
from comms.campaign import Campaign
from comms.domain import CustomerInfo, Event
from comms.errors import NotFound, RequestRefused, StageMoveRefused, StateConflict
from comms.services.engine import load_history, plan_one
from comms.services.importer import ImportResult, export_customers, import_customers
from comms.stages import SideAction
from comms.store import repo
from comms.store.customer_upsert import SharedContact
from comms.store.customer_upsert import shared_contacts as _shared_contacts
from comms.store.db import Database
from comms.store.models import Customer, Message
from comms.wording import plural

__all__ = [
    "CustomerDetail",
    "CustomerInfo",
    "ImportResult",
    "SharedContact",
    "SideAction",
    "StageChange",
    "StageMoveResult",
    "TimelineEntry",
    "apply_stage_event",
    "export_customers",
    "import_customers",
    "list_customers",
    "move_customers",
    "select_keys",
    "set_stage",
    "shared_contacts",
    "show_customer",
    "side_action",
]



@dataclass(frozen=True)
class TimelineEntry:
    """One line of a customer's history: a stage event or an outbox message."""

    at: datetime
    kind: str  # "event" or "message"
    title: str  # event kind (stage, pause, ...) or message name
    detail: str  # from -> to / status and sequence
    by: str = ""
    source: str = ""
    note: str = ""


@dataclass(frozen=True)
class CustomerDetail:
    info: CustomerInfo
    next_due_at: datetime | None
    created_at: datetime
    timeline: tuple[TimelineEntry, ...]


@dataclass(frozen=True)
class StageChange:
    """One planned or applied stage move."""

    key: str
    name: str
    from_stage: str
    to_stage: str
    forced: bool
    # Dry runs: the messages entering the stage would send now (or at the window's opening).
    triggers: tuple[str, ...] = ()


def inbound_timeline(session: Session, customer_id: int) -> list[TimelineEntry]:
    """Replies, bounces and auto-replies read from the sender mailboxes (`comms inbox`)."""
    from comms.inbox.service import timeline_entries

    return [
        TimelineEntry(at=m.received_at or m.processed_at, kind="inbound", title=m.kind,
                      detail=f"from {m.from_address}: {m.subject}",
                      note=" | ".join(x for x in (m.preview.replace("\n", " / ")
                                                  if m.kind in ("reply", "optout") else "",
                                                  m.effects) if x))
        for m in timeline_entries(session, customer_id)
    ]


def list_customers(
    db: Database, *, stage: str | None = None, tag: str | None = None
) -> list[CustomerInfo]:
    """Customers (with contacts and tags), filtered by stage and/or tag, ordered by key."""
    with db.session() as session:
        return repo.customer_infos(session, repo.find_customers(session, stage=stage, tag=tag))


def shared_contacts(db: Database) -> list[SharedContact]:
    """Contact addresses (ignoring case) that several customers share, with those customers."""
    with db.session() as session:
        return _shared_contacts(session)


def show_customer(db: Database, key: str) -> CustomerDetail:
    """A customer's details and its timeline: stage events and outbox messages by time."""
    with db.session() as session:
        row = repo.get_customer(session, key)
        assert row.id is not None
        entries: list[TimelineEntry] = []
        for e in repo.events_of(session, row.id):
            if e.kind == "stage" or (e.kind == "import" and e.to_stage):
                detail = f"{e.from_stage or '(new)'} -> {e.to_stage}"
                if e.forced:
                    detail += " (forced)"
            else:
                detail = f"in {e.to_stage}" if e.to_stage else ""
            entries.append(TimelineEntry(at=e.at, kind="event", title=e.kind, detail=detail,
                                         by=e.by, source=e.source, note=e.note))
        for m in session.exec(
            select(Message).where(col(Message.customer_id) == row.id).order_by(col(Message.id))
        ):
            at = m.sent_at or m.created_at
            # Shown at sent_at when sent, else when it was queued.
            detail = f"#{m.sequence} {m.status}" + (" (internal)" if m.internal else "")
            entries.append(TimelineEntry(at=at, kind="message", title=m.message, detail=detail,
                                         note=m.last_error))
        for ev in repo.evidence_of(session, row.id):
            entries.append(TimelineEntry(at=ev.at, kind="observed", title=f"sync:{ev.source}",
                                         detail=ev.summary, by="sync", source="sync",
                                         note=f"evidence #{ev.id}"))
        entries += inbound_timeline(session, row.id)
        entries.sort(key=lambda t: t.at)
        return CustomerDetail(
            info=repo.customer_info(session, row),
            next_due_at=row.next_due_at,
            created_at=row.created_at,
            timeline=tuple(entries),
        )


def select_keys(db: Database, *, where_stage: str, tag: str | None = None) -> list[str]:
    """Keys of the customers in ``where_stage`` (and with ``tag``), for a bulk move."""
    with db.session() as session:
        return [r.key for r in repo.find_customers(session, stage=where_stage, tag=tag)]


def apply_stage_event(
    session: Session, customer: Customer, event: Event, *, csp_live_stage: str,
    has_queued: bool = True,
) -> int:
    """Record a stage event and update the customer: stage, times, CSP-live clock; withdraw
    queued messages planned for other stages. Returns how many messages were withdrawn.

    ``has_queued=False``: the caller checked, in this transaction and with the customer row
    locked, that the customer has no queued message, so the withdraw (an ORM UPDATE that
    would match nothing) is skipped; stage sync moves thousands of customers at once."""
    assert customer.id is not None and event.to_stage is not None
    repo.record_event(session, customer, event)
    customer.stage = event.to_stage
    customer.stage_entered_at = event.at
    # The planner looks at the customer straight away in its new stage.
    customer.next_due_at = event.at
    customer.updated_at = event.at
    # Entering the CSP-live stage starts the double-billing clock (once).
    if event.to_stage == csp_live_stage and customer.csp_live_at is None:
        customer.csp_live_at = event.at
    session.add(customer)
    if not has_queued:
        return 0
    return outbox.withdraw_stale(session, customer.id, event.to_stage, event.at)


def _plan(
    session: Session,
    campaign: Campaign,
    keys: list[str],
    stage: str,
    *,
    now: datetime,
    by: str,
    note: str,
    force: bool,
    source: str,
    lock: bool = False,
) -> list[tuple[Customer, Event]]:
    if not keys:
        raise RequestRefused("No customers to move: give one or more keys, or --where-stage.")
    rows = repo.get_customers(session, keys, lock=lock)
    planned: list[tuple[Customer, Event]] = []
    refused: list[str] = []
    for row, info in zip(rows, repo.customer_infos(session, rows), strict=True):
        try:
            event = stages.move(campaign, info, stage, at=now, by=by, source=source,
                                note=note, force=force)
        except StageMoveRefused as exc:
            refused.append(exc.message)
            continue
        planned.append((row, event))
    if refused:
        if len(refused) == 1 and len(rows) == 1:
            raise StageMoveRefused(refused[0])
        raise StageMoveRefused(
            f"{len(refused)} of {plural(len(rows), 'customer')} cannot move to {stage!r}; "
            "nothing was changed:",
            problems=refused,
        )
    return planned


def set_stage(
    db: Database,
    campaign: Campaign,
    keys: list[str],
    stage: str,
    *,
    now: datetime,
    by: str,
    note: str = "",
    force: bool = False,
    source: str = "cli",
    dry_run: bool = False,
    shown: list[StageChange] | None = None,
) -> list[StageChange]:
    """Move every customer of ``keys`` to ``stage`` in one transaction: all or none.

    A move the campaign does not allow is refused (listing the allowed ones) unless ``force``
    with a ``note``. Each move records an event, restarts the stage clock, makes the customer
    due for planning and withdraws queued messages of its former stage. With ``shown`` (the
    plan the operator confirmed), nothing moves if a customer's stage changed since.
    """
    # Read-then-write: take the write lock up front (SQLite) / lock the rows (PostgreSQL), so a
    # concurrent `comms run` cannot move the same customers in between.
    with db.session(immediate=not dry_run) as session:
        planned = _plan(session, campaign, keys, stage, now=now, by=by, note=note,
                        force=force, source=source, lock=not dry_run)
        if shown is not None:
            _same_as_shown(shown, [(row.key, ev.from_stage or "") for row, ev in planned])
        if not dry_run:
            for row, event in planned:
                apply_stage_event(session, row, event, csp_live_stage=campaign.csp_live_stage)
        triggers = _triggers(session, campaign, [r for r, _ in planned], stage, now) \
            if dry_run else {}
        return [
            StageChange(row.key, row.name, ev.from_stage or "", stage, ev.forced,
                        triggers.get(row.key, ()))
            for row, ev in planned
        ]


def _same_as_shown(shown: list[StageChange], now: list[tuple[str, str]]) -> None:
    """Refuse (nothing moved) when a customer's stage changed since the plan was shown (stage
    sync, another operator): a forced move would otherwise drag it back from where it is."""
    before = {c.key: c.from_stage for c in shown}
    changed = [f"{key} (shown in {before[key]}, now in {stage})" for key, stage in now
               if key in before and before[key] != stage]
    changed += [f"{key} (not in the plan shown)" for key, _ in now if key not in before]
    if changed:
        raise StateConflict(
            f"Stages changed since the plan was shown: {'; '.join(changed[:20])}"
            f"{'; ...' if len(changed) > 20 else ''}. Nothing was moved; run the command again "
            "to see the plan as it is now.")


def _triggers(session: Session, campaign: Campaign, rows: list[Customer], stage: str,
              now: datetime) -> dict[str, tuple[str, ...]]:
    """What the planner would send each customer right after the move (nothing is written)."""
    history = load_history(session, [r.id for r in rows if r.id is not None])
    out: dict[str, tuple[str, ...]] = {}
    for row, info in zip(rows, repo.customer_infos(session, rows), strict=True):
        moved = dataclasses.replace(info, stage=stage, stage_entered_at=now)
        p = plan_one(moved, history.get(row.id or 0, []), now, campaign)
        out[row.key] = tuple(pm.message for pm in (*p.due, *p.deferred))
    return out


@dataclass(frozen=True)
class StageMoveResult:
    changes: list[StageChange]
    applied: bool  # False: a dry run, nothing changed


def move_customers(
    db: Database,
    campaign: Campaign,
    keys: list[str],
    stage: str,
    *,
    where_stage: str | None = None,
    tag: str | None = None,
    now: datetime,
    by: str,
    note: str = "",
    force: bool = False,
    dry_run: bool = False,
    review: Callable[[list[StageChange]], None] | None = None,
) -> StageMoveResult:
    """`comms customers set-stage`: pick the customers (by key, or every one in
    ``where_stage`` [with ``tag``]) and move them. A bulk move or a dry run is planned first and
    shown to ``review``, which may abort (by raising) before anything changes."""
    if where_stage:
        if keys:
            raise RequestRefused("Give either customer keys or --where-stage, not both.")
        keys = select_keys(db, where_stage=where_stage, tag=tag)
        if not keys:
            which = f" with tag {tag!r}" if tag else ""
            raise NotFound(f"No customers in stage {where_stage!r}{which}; nothing to move.")
    elif tag:
        raise RequestRefused("--tag selects customers only together with --where-stage.")
    if not keys:
        raise RequestRefused("Give the keys of the customers to move, or --where-stage.")
    if len(keys) > 1 or where_stage or dry_run:
        plan = set_stage(db, campaign, keys, stage, now=now, by=by, note=note, force=force,
                         dry_run=True)
        if review is not None:
            review(plan)
        if dry_run:
            return StageMoveResult(plan, applied=False)
        done = set_stage(db, campaign, keys, stage, now=now, by=by, note=note, force=force,
                         shown=plan)
        return StageMoveResult(done, applied=True)
    done = set_stage(db, campaign, keys, stage, now=now, by=by, note=note, force=force)
    return StageMoveResult(done, applied=True)


def side_action(
    db: Database,
    key: str,
    action: stages.SideAction,
    *,
    now: datetime,
    by: str,
    note: str = "",
    source: str = "cli",
) -> bool:
    """Pause, resume, opt out (...) one customer; False when it already was in that state.

    Opting out (or marking lost) withdraws every queued message, pausing the customer's own
    queued mail; resuming makes the customer due for planning again, and what was withdrawn
    by the pause is queued again with what is true then.
    """
    with db.session(immediate=True) as session:
        row = repo.get_customer(session, key, lock=True)
        assert row.id is not None
        event = stages.side_event(repo.customer_info(session, row), action, at=now, by=by,
                                  source=source, note=note)
        if event is None:
            return False
        repo.record_event(session, row, event)
        flag, value = stages.side_flag(action)
        setattr(row, flag, value)
        row.updated_at = now
        if action in ("resume", "opt_in", "found"):
            row.next_due_at = now
        session.add(row)
        if action in ("opt_out", "lost", "pause"):
            # Planned again on resume (or found) with what is true then; never on opt-out.
            reason = {"opt_out": "customer opted out", "lost": "customer marked lost",
                      "pause": "customer paused"}[action]
            outbox.withdraw_all_queued(session, row.id, reason, now,
                                       internal_too=action != "pause")
        return True
