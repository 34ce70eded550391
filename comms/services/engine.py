"""The campaign engine: plan what is due, freeze it into the outbox, dispatch it.

``plan_and_queue`` walks the customers whose ``next_due_at`` has come (an index on
(stage, next_due_at) makes this cheap at a million customers), asks the pure planner what each is
due, renders it and inserts outbox rows in the same transaction that moves ``next_due_at`` on.
``run`` is the scheduled job: one at a time per database, plan + queue + dispatch + summary.
``prepare_send`` / ``queue_prepared`` / ``dispatch_ids`` serve `comms send` (through
``comms.services.sending``) for one customer or a tagged group.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from comms import outbox, pacing, planner, stages
from comms.campaign import Campaign
from comms.config import Settings, worker_processes
from comms.delivery.base import Transport
from comms.domain import CustomerInfo, MessageStatus, PlannedMessage, SentMessage
from comms.errors import UnknownTimeZone
from comms.render import Renderer
from comms.services import queue_render, wave_gate
from comms.services.run_preview import PreviewRow, preview_rows
from comms.store import repo
from comms.store.db import Database
from comms.store.locks import RunLock
from comms.store.models import Customer, CustomerTag, Message, new_message_row

BATCH = 2500  # customers planned per write transaction
ID_BATCH = 5000  # due customer ids read per query (a few bytes each)
# How long `comms send` dispatches what it queued; a leftover then waits for the send window.
ONE_OFF_MINUTES = 10.0
# What an operator does about a customer whose time zone cannot be loaded here.
ZONE_FIX = "re-import with a valid time_zone"


def plan_one(customer: CustomerInfo, history: Sequence[SentMessage], now: datetime,
             campaign: Campaign) -> planner.Plan:
    """``planner.plan`` for a command that looks at customers one by one (waves, stage moves,
    `comms send`): a time zone that cannot be loaded here stops it with the customer named
    and the fix (a scheduled run skips that customer instead and reports it)."""
    try:
        return planner.plan(customer, history, now, campaign)
    except UnknownTimeZone as exc:
        raise UnknownTimeZone(f"Customer {customer.key}: {exc} Fix: {ZONE_FIX}.") from exc


# --------------------------------------------------------------------------- loading


def sendable() -> list[Any]:
    """The customers a run may send to: not paused, not opted out, not lost."""
    return [col(Customer.paused).is_(False), col(Customer.opted_out).is_(False),
            col(Customer.lost).is_(False)]


def due_customers_query(
    stage: str, now: datetime, *, tag: str | None = None, keys: Sequence[str] = (),
    after: tuple[datetime, int] | None = None, limit: int = ID_BATCH,
) -> Any:
    """One batch of customers in ``stage`` whose next_due_at has come, in (next_due_at, id)
    order after ``after``: a range scan of ix_customers_stage_next_due, never a table scan."""
    q = select(Customer.id, Customer.next_due_at).where(
        col(Customer.stage) == stage, col(Customer.next_due_at) <= now, *sendable())
    if after is not None:
        last_due, last_id = after
        q = q.where(sa.or_(
            col(Customer.next_due_at) > last_due,
            sa.and_(col(Customer.next_due_at) == last_due, col(Customer.id) > last_id),
        ))
    if tag:
        q = q.where(
            col(Customer.id).in_(select(CustomerTag.customer_id).where(CustomerTag.tag == tag))
        )
    if keys:
        q = q.where(col(Customer.key).in_(list(keys)))
    return q.order_by(col(Customer.next_due_at), col(Customer.id)).limit(limit)


def due_batches(
    db: Database, campaign: Campaign, now: datetime, *, tag: str | None = None,
    keys: Sequence[str] = (),
) -> Iterator[list[int]]:
    """Ids of the customers due now, batch by batch, stage by stage (memory stays flat).

    Each batch is read in its own short transaction; the keyset (next_due_at, id) stays valid
    while processed customers move their next_due_at on (they leave the range)."""
    for stage in campaign.stage_names:
        after: tuple[datetime, int] | None = None
        while True:
            with db.session() as session:
                rows = session.exec(
                    due_customers_query(stage, now, tag=tag, keys=keys, after=after)
                ).all()
            if not rows:
                break
            after = (rows[-1][1], rows[-1][0])
            ids = [r[0] for r in rows]
            for start in range(0, len(ids), BATCH):
                yield ids[start : start + BATCH]
            if len(rows) < ID_BATCH:
                break


load_customers = repo.load_customers  # the one customer loader (see comms.store.repo)


# Only the columns the planner needs: never the frozen bodies. Built once; the ids are bound
# at execution.
_HISTORY = (
    sa.select(col(Message.customer_id), col(Message.message), col(Message.sequence),
              col(Message.status), col(Message.stage), col(Message.created_at),
              col(Message.sent_at), col(Message.error_code))
    .where(col(Message.customer_id).in_(sa.bindparam("ids", expanding=True)))
    .order_by(col(Message.id))
)


def load_history(session: Session, ids: Sequence[int]) -> dict[int, list[SentMessage]]:
    history: dict[int, list[SentMessage]] = defaultdict(list)
    if not ids:
        return history
    rows = session.execute(_HISTORY, {"ids": list(ids)}).all()
    for cid, message, seq, status, stage, created, sent, code in rows:
        history[cid].append(SentMessage(
            message, seq, status, stage, created, sent,
            by_operator=status == MessageStatus.WITHDRAWN and code == outbox.BY_OPERATOR))
    return history


# --------------------------------------------------------------------------- planning


@dataclass
class QueueReport:
    customers: int = 0
    queued: int = 0
    deferred: int = 0
    held: int = 0  # customers whose wave awaits `comms wave approve` (require_approval)
    # Customers skipped because their time zone cannot be loaded (key -> why): nothing is
    # planned for them, and they stay due until re-imported with a valid time_zone.
    zone_problems: dict[str, str] = field(default_factory=dict)
    by_message: Counter[str] = field(default_factory=Counter)
    preview: list[PreviewRow] = field(default_factory=list)  # dry runs only


def _row(
    settings: Settings, customer: CustomerInfo, pm: PlannedMessage, subject: str, locale: str,
    now: datetime, send_before: datetime | None = None, *, body: bytes,
    send_id: str | None = None,
) -> dict[str, Any]:
    """The outbox row of a rendered message; ``body`` as ``comms.store.bodies`` stores it."""
    assert customer.id is not None
    fresh = {"send_id": send_id} if send_id else {}
    return new_message_row(
        customer_id=customer.id, message=pm.message, sequence=pm.sequence, stage=pm.stage,
        to_json=outbox.addresses_json((c.email, c.name) for c in pm.to),
        subject=subject, body=body, now=now, internal=pm.internal,
        cc_json=outbox.addresses_json((c.email, c.name) for c in pm.cc),
        reply_to=settings.partner.reply_to, locale=locale, send_before=send_before, **fresh,
    )


def plan_and_queue(
    db: Database,
    settings: Settings,
    campaign: Campaign,
    renderer: Renderer,
    *,
    now: datetime,
    tag: str | None = None,
    keys: Sequence[str] = (),
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> QueueReport:
    """Plan every due customer and queue what is due, batch by batch (memory stays flat).

    Each batch is read, planned, rendered and written in one transaction. Rendering and
    compressing go through ``comms.services.queue_render``: in this process for a small run,
    in worker processes when more than ``POOL_MIN_CUSTOMERS`` customers are due (in this
    process until the workers have started; the outbox rows are the same byte for byte)."""
    report = QueueReport()
    gate = wave_gate.load_gate(db, settings, campaign, renderer)
    processes = worker_processes(settings.templates.render_processes)
    local = queue_render.LocalRenderer(renderer, now)
    render: queue_render.ChunkRenderer = local
    if (not dry_run and processes > 1
            and _due_at_least(db, campaign, now, queue_render.POOL_MIN_CUSTOMERS + 1,
                              tag=tag, keys=keys)):
        render = queue_render.StartingPool(
            local, queue_render.ProcessRenderer(renderer, now, processes))
    try:
        for ids in due_batches(db, campaign, now, tag=tag, keys=keys):
            with queue_render.collections_paused(), db.session(immediate=not dry_run) as s:
                _queue_batch(s, ids, settings, campaign, renderer, now, dry_run, report,
                             render, _send_ids(), gate)
            if progress:
                progress(len(ids))
    finally:
        local.close()
        if render is not local:
            render.close()
    return report


def _due_at_least(db: Database, campaign: Campaign, now: datetime, n: int, *,
                  tag: str | None, keys: Sequence[str]) -> bool:
    """Whether at least ``n`` customers are due now (counted no further than that)."""
    found = 0
    with db.session() as s:
        for stage in campaign.stage_names:
            due = due_customers_query(stage, now, tag=tag, keys=keys, limit=n - found)
            found += s.execute(sa.select(sa.func.count()).select_from(due.subquery())).scalar_one()
            if found >= n:
                return True
    return False


def _send_ids(block: int = BATCH) -> Callable[[], str]:
    """Fresh send ids exactly like ``uuid4().hex``, from one os.urandom call per ``block``:
    each call releases the GIL, and while the compressing thread runs, getting it back cost
    ~0.2 ms per message (profiled), more than the call itself."""
    pool: list[str] = []

    def take() -> str:
        if not pool:
            raw = os.urandom(16 * block)
            pool.extend(uuid.UUID(bytes=raw[i:i + 16], version=4).hex
                        for i in range(0, len(raw), 16))
        return pool.pop()

    return take


# Customers read and planned at a time: the first part of a batch small (the render workers
# wait for it), then larger (each read is seven queries).
FIRST_PART = 100
LOAD_PART = 500
INSERT_ROWS = 200  # outbox rows inserted at a time, as their chunks come back rendered

Planned = tuple[CustomerInfo, PlannedMessage, datetime | None]


class _Chunks:
    """The planned messages of one batch, handed to ``render`` a chunk at a time; ``write``
    inserts their rows in planned order as the chunks come back, so the inserts of the first
    chunks overlap the rendering of the last ones (all in the batch's transaction)."""

    def __init__(self, render: queue_render.ChunkRenderer) -> None:
        self.render = render
        self.chunk: list[Planned] = []
        self.jobs: list[tuple[Future[list[queue_render.Rendered]], list[Planned]]] = []

    def add(self, item: Planned) -> None:
        self.chunk.append(item)
        if len(self.chunk) == queue_render.CHUNK:
            self._submit()

    def _submit(self) -> None:
        self.jobs.append((self.render.submit([(c, pm) for c, pm, _ in self.chunk]), self.chunk))
        self.chunk = []

    def write(self, s: Session, settings: Settings, now: datetime,
              send_id: Callable[[], str]) -> int:
        if self.chunk:
            self._submit()
        inserted = 0
        rows: list[dict[str, Any]] = []
        for job, items in self.jobs:
            done = queue_render.results([job])
            rows += [_row(settings, customer, pm, r.subject, r.locale, now, closes,
                          body=r.body, send_id=send_id())
                     for (customer, pm, closes), r in zip(items, done, strict=True)]
            if len(rows) >= INSERT_ROWS:
                inserted += outbox.queue_messages(s, rows)
                rows = []
        return inserted + outbox.queue_messages(s, rows)


def _queue_batch(
    s: Session, ids: list[int], settings: Settings, campaign: Campaign, renderer: Renderer,
    now: datetime, dry_run: bool, report: QueueReport, render: queue_render.ChunkRenderer,
    send_id: Callable[[], str], gate: wave_gate.WaveGate | None,
) -> None:
    """Plan one batch of customers and queue what is due (rendered and compressed by
    ``render`` a chunk at a time while the next ones are planned); a dry run counts and
    previews, and writes nothing. Customers are read a part at a time (``_parts``), in the
    batch's transaction like the rest."""
    preview: list[dict[str, Any]] = []  # a dry run's rows: rendered here, never stored
    next_due: list[dict[str, Any]] = []
    chunks = _Chunks(render)
    for part in _parts(ids):
        customers = load_customers(s, part, lock="" if dry_run else "skip")
        history = load_history(s, part)
        for cid in part:
            customer = customers.get(cid)
            if customer is None or not stages.is_sendable(customer):
                continue  # changed since the ids were read, or being changed (locked) now
            try:
                p = planner.plan(customer, history.get(cid, []), now, campaign)
                closes = planner.window_end(now, campaign.window, customer.time_zone)
            except UnknownTimeZone as exc:  # this customer only; next_due_at stays
                report.zone_problems[customer.key] = str(exc)
                continue
            report.customers += 1
            if gate is not None and gate.holds(customer, history.get(cid, []),
                                               (*p.due, *p.deferred)):
                report.held += 1  # next_due_at stays: the next run looks again
                continue
            report.deferred += len(p.deferred)
            for pm in p.due:
                report.by_message[pm.message] += 1
                if not dry_run:
                    chunks.add((customer, pm, closes))
                    continue
                rendered = queue_render.render_one(renderer, customer, pm, now)
                preview.append(_row(settings, customer, pm, rendered.subject, rendered.locale,
                                    now, closes, body=b"", send_id=send_id()))
            if dry_run:
                later = [queue_render.render_one(renderer, customer, pm, now).locale
                         for pm in p.deferred]
                report.preview += preview_rows(customer, p, now, preview, later)
            next_due.append({"cid": cid, "due": p.next_due_at})
    if dry_run:
        report.queued += len(preview)
        return
    report.queued += chunks.write(s, settings, now, send_id)
    if next_due:
        s.execute(_MOVE_NEXT_DUE, next_due)


def _parts(ids: list[int]) -> Iterator[list[int]]:
    """``FIRST_PART`` ids, then ``LOAD_PART`` at a time."""
    start, size = 0, min(FIRST_PART, LOAD_PART)
    while start < len(ids):
        yield ids[start:start + size]
        start, size = start + size, LOAD_PART


# One executemany in Core: the ORM's bulk UPDATE by primary key does more Python work a row.
_customers = Customer.__table__  # type: ignore[attr-defined]
_MOVE_NEXT_DUE = (
    sa.update(_customers).where(_customers.c.id == sa.bindparam("cid"))
    .values(next_due_at=sa.bindparam("due", type_=_customers.c.next_due_at.type))
)


# --------------------------------------------------------------------------- the run


@dataclass
class RunSummary:
    queue: QueueReport
    dispatch: outbox.DispatchReport
    dry_run: bool = False
    pending: Counter[str] = field(default_factory=Counter)
    forecast_minutes: float = 0.0
    daily_cap_reached: bool = False

    @property
    def zone_problems(self) -> dict[str, str]:
        """Customers whose time zone cannot be loaded (key -> why): skipped by planning, or
        their queued mail held by the dispatcher's window check."""
        return {**self.dispatch.zone_problems, **self.queue.zone_problems}

    def zone_problem_rows(self) -> list[dict[str, str]]:
        return [{"customer": key, "error": why, "fix": ZONE_FIX}
                for key, why in sorted(self.zone_problems.items())]

    @property
    def exit_code(self) -> int:
        return 1 if self.dispatch.failed or self.dispatch.tripped or self.zone_problems else 0


def run(
    db: Database,
    settings: Settings,
    campaign: Campaign,
    renderer: Renderer,
    transport: Transport | None,
    *,
    clock: outbox.Clock,
    worker: str,
    tag: str | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    max_minutes: float = 50.0,
    deadline: float | None = None,
    on_queued: Callable[[QueueReport], None] | None = None,
    on_progress: outbox.ProgressFn | None = None,
    plan_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """The scheduled job. Holds the run lock for its whole duration. ``stop`` (set by a
    signal handler) ends dispatching cleanly: in-flight sends finish and are recorded."""
    with RunLock(db):
        now = clock.now()
        queued = plan_and_queue(db, settings, campaign, renderer, now=now, tag=tag,
                                dry_run=dry_run, progress=plan_progress)
        if on_queued:
            on_queued(queued)
        summary = RunSummary(queue=queued, dispatch=outbox.DispatchReport(), dry_run=dry_run)
        if dry_run:
            with db.session() as s:
                flt = [col(Message.status) == MessageStatus.QUEUED]
                if tag:
                    flt.append(col(Message.customer_id).in_(
                        select(CustomerTag.customer_id).where(CustomerTag.tag == tag)))
                already = s.exec(select(sa.func.count()).select_from(Message).where(*flt)).one()
            total = queued.queued + int(already)
            summary.pending["queued"] = total
            summary.forecast_minutes = pacing.forecast_minutes(total, settings.senders)
            summary.daily_cap_reached = total > sum(x.recipients_per_day for x in settings.senders)
            return summary
        assert transport is not None
        dispatcher = outbox.Dispatcher(db, settings, transport, clock=clock, worker=worker,
                                       on_progress=on_progress, window=campaign.window)
        end = deadline if deadline is not None else time.monotonic() + max_minutes * 60
        dispatcher.run(deadline=end, tag=tag, limit=limit,
                       report=summary.dispatch, stop=stop)
        summary.pending = dispatcher.pending(None, tag)
        with db.session(immediate=True) as s:
            pacing.prune(s, now=clock.real(), keep=timedelta(days=2))
        return summary


def dispatch_ids(
    db: Database, settings: Settings, transport: Transport, ids: Iterable[int], *,
    clock: outbox.Clock, worker: str, max_minutes: float = ONE_OFF_MINUTES,
) -> outbox.DispatchReport:
    """Send exactly these outbox rows now (within pacing), e.g. for `comms send`: the send
    window is not checked (the operator decided); what is left after ``max_minutes`` waits
    for the customer's window in the next run (``one_off.queue_prepared`` sets its end)."""
    dispatcher = outbox.Dispatcher(db, settings, transport, clock=clock, worker=worker)
    return dispatcher.run(deadline=time.monotonic() + max_minutes * 60, only_ids=frozenset(ids))
