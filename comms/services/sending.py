"""What `comms send` and `comms run` do: prepare and send chosen messages now, or run the
scheduled job; both close the transport they were given."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field

from comms.campaign import Campaign
from comms.config import Settings
from comms.delivery.base import Transport
from comms.errors import CommsError, NotFound, RequestRefused
from comms.outbox import Clock, DispatchReport, ProgressFn
from comms.render import Renderer
from comms.services import engine, preflight
from comms.services.engine import Prepared, QueueReport, RunSummary
from comms.store.db import Database

__all__ = ["Prepared", "RunSummary", "SendPlan", "prepare_send", "run_scheduled", "send_now",
           "worker_id"]


def worker_id() -> str:
    """Who claims outbox rows: host and process, so a lease names the process holding it."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class SendPlan:
    """What `comms send` would send, and the tagged customers skipped (key, why)."""

    prepared: list[Prepared] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def prepare_send(
    db: Database, settings: Settings, campaign: Campaign, renderer: Renderer, *,
    keys: Sequence[str], tag: str | None, clock: Clock, message: str | None = None,
    resend: bool = False, note: str = "",
) -> SendPlan:
    """Render what each named (or tagged) customer gets now; nothing is written.

    With a tag, a customer that cannot be sent to is skipped (and listed); by key it is an error.
    """
    if resend and not note.strip():
        raise RequestRefused("--resend needs --note saying why; it is recorded in the audit trail.")
    if not keys and not tag:
        raise RequestRefused("Name a customer key, or a group with --tag.")
    targets = list(keys) + (engine.tagged_keys(db, tag) if tag else [])
    plan = SendPlan()
    for key in targets:
        try:
            plan.prepared += engine.prepare_send(
                db, settings, campaign, renderer, key, now=clock.now(), message=message,
                resend_note=note if resend else None,
            )
        except CommsError as exc:
            if not tag:
                raise
            plan.skipped.append((key, str(exc)))
    if not plan.prepared:
        raise NotFound("Nothing to send.")
    return plan


def send_now(
    db: Database, settings: Settings, transport: Transport, plan: SendPlan, *, by: str,
    clock: Clock,
) -> tuple[DispatchReport, int]:
    """Queue the prepared messages and send exactly those now; (report, number queued).

    Closes ``transport``."""
    with closing(transport):
        ids = engine.queue_prepared(db, plan.prepared, by=by, now=clock.now())
        report = engine.dispatch_ids(db, settings, transport, ids, clock=clock,
                                     worker=worker_id())
    return report, len(ids)


def run_scheduled(
    db: Database, settings: Settings, campaign: Campaign, renderer: Renderer,
    transport: Transport | None, *, clock: Clock, tag: str | None = None, dry_run: bool = False,
    limit: int | None = None, max_minutes: float = 50.0,
    on_queued: Callable[[QueueReport], None] | None = None,
    on_progress: ProgressFn | None = None, plan_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None, sync: bool = False,
    echo: Callable[[str], None] | None = None,
) -> RunSummary:
    """The scheduled run (`comms run`); closes ``transport`` (None on a dry run).

    ``sync`` (or ``[sync] on_run``): stage sync first, so the run plans on what Microsoft
    sees. ``stop`` (a signal) ends dispatching cleanly."""
    try:
        preflight.before_run(settings, transport)  # exit 3 before any row when sign-in fails
        if sync or settings.sync.on_run:
            from comms.sync.service import sync_before_run

            sync_before_run(db, settings, campaign, now=clock.now(), tag=tag, dry_run=dry_run,
                            echo=echo)
        return engine.run(
            db, settings, campaign, renderer, transport, clock=clock, worker=worker_id(),
            tag=tag, dry_run=dry_run, limit=limit, max_minutes=max_minutes,
            on_queued=on_queued, on_progress=on_progress, plan_progress=plan_progress,
            stop=stop,
        )
    finally:
        if transport is not None:
            transport.close()
