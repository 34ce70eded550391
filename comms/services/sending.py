"""What `comms send` and `comms run` do: prepare and send chosen messages now, or run the
scheduled job; both close the transport they were given."""

from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime

from comms import pacing, planner
from comms.campaign import Campaign
from comms.config import Settings
from comms.delivery.base import Transport
from comms.errors import CommsError, NotFound, RequestRefused
from comms.outbox import Clock, DispatchReport, ProgressFn
from comms.render import Renderer
from comms.services import engine, one_off, preflight
from comms.services.engine import QueueReport, RunSummary
from comms.services.one_off import Prepared
from comms.store.db import Database
from comms.timezones import zone

__all__ = ["Forecast", "LimitForecast", "Prepared", "RecipientTime", "RunSummary", "SendPlan",
           "forecast", "prepare_send", "run_scheduled", "send_now", "worker_id"]


@dataclass(frozen=True)
class LimitForecast:
    name: str  # mailbox rate | mailbox daily recipients | tenant budget
    minutes: float
    detail: str  # e.g. "14,230 external recipients at 8,600 a day"


@dataclass(frozen=True)
class Forecast:
    """How long a dry run's mail takes and which limit binds."""

    messages: int
    recipients: int
    external: int
    limits: tuple[LimitForecast, ...]
    window_minutes: float = 0.0  # the campaign's send window a day (0: not known)

    @property
    def binding(self) -> LimitForecast:
        return max(self.limits, key=lambda x: x.minutes)

    @property
    def windows(self) -> int:
        """How many send windows (days) the mailboxes' rate needs for it: more than one means
        what is not sent when a customer's window closes waits for its next one."""
        rate = self.limits[0].minutes
        return math.ceil(rate / self.window_minutes) if self.window_minutes and rate else 1


def forecast(summary: RunSummary, settings: Settings,
             window_minutes: float = 0.0) -> Forecast:
    """The dry run's forecast under each limit: the mailboxes' rate, their daily recipient
    limits and the tenant's external-recipient budget. Recipients are counted from the messages
    this run would queue; messages queued earlier count as one external recipient each."""
    rows = summary.queue.preview
    earlier = max(summary.pending.get("queued", 0) - summary.queue.queued, 0)
    messages = len(rows) + earlier
    addresses = [a for r in rows for a in r.to]
    external = pacing.TenantBudget.of(settings).external(addresses) + earlier
    recipients = len(addresses) + earlier
    per_minute = sum(x.messages_per_minute for x in settings.senders)
    per_day = sum(x.recipients_per_day for x in settings.senders)
    budget = settings.tenant.budget
    day = 24 * 60.0

    def days(n: int, cap: int) -> float:
        # A daily limit only stretches the run when there is more than one day's worth.
        return n / cap * day if cap and n > cap else 0.0

    return Forecast(messages, recipients, external, (
        LimitForecast("mailbox rate", pacing.forecast_minutes(messages, settings.senders),
                      f"{messages:,} at {per_minute:,} a minute"),
        LimitForecast("mailbox daily recipients", days(recipients, per_day),
                      f"{recipients:,} recipients at {per_day:,} a day"),
        LimitForecast("tenant budget", days(external, budget),
                      f"{external:,} external recipients at {budget:,} a day"),
    ), window_minutes)


def worker_id() -> str:
    """Who claims outbox rows: host and process, so a lease names the process holding it."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class RecipientTime:
    """What the operator should know before sending to one customer: its local time, whether
    that is inside the send window, and the template locale used for its language."""

    key: str
    local_time: datetime
    time_zone: str
    in_window: bool
    wanted_locale: str
    used_locale: str

    @property
    def falls_back(self) -> bool:
        return self.used_locale.lower() != (self.wanted_locale or "en").lower()


@dataclass
class SendPlan:
    """What `comms send` would send, and the tagged customers skipped (key, why)."""

    prepared: list[Prepared] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    times: list[RecipientTime] = field(default_factory=list)
    # Set when a real send would be refused (the all-zero partner id): a dry run shows it,
    # and `comms send` refuses before it asks.
    refusal: str | None = None


def _recipient_times(prepared: Sequence[Prepared], campaign: Campaign,
                     now: datetime) -> list[RecipientTime]:
    out: dict[str, RecipientTime] = {}
    for p in prepared:
        c = p.customer
        if c.key not in out:
            out[c.key] = RecipientTime(
                c.key, now.astimezone(zone(c.time_zone)), c.time_zone,
                planner.in_window(now, campaign.window, c.time_zone), c.locale,
                str(p.row.get("locale") or "en"),
            )
    return list(out.values())


def prepare_send(
    db: Database, settings: Settings, campaign: Campaign, renderer: Renderer, *,
    keys: Sequence[str], tag: str | None, clock: Clock, message: str | None = None,
    resend: bool = False, note: str = "", force: bool = False,
) -> SendPlan:
    """Render what each named (or tagged) customer gets now; nothing is written.

    With a tag, a customer that cannot be sent to is skipped (and listed); by key it is an error.
    A message of another stage than the customer's is refused unless ``force`` with a note.
    """
    if (resend or force) and not note.strip():
        flag = "--resend" if resend else "--force"
        raise RequestRefused(f"{flag} needs --note saying why; it is recorded in the audit trail.")
    if force and not message:
        raise RequestRefused("--force goes with --message NAME (a message of another stage).")
    if not keys and not tag:
        raise RequestRefused("Name a customer key, or a group with --tag.")
    targets = list(keys) + (one_off.tagged_keys(db, tag) if tag else [])
    plan = SendPlan()
    for key in targets:
        try:
            plan.prepared += one_off.prepare_send(
                db, settings, campaign, renderer, key, now=clock.now(), message=message,
                resend_note=note if resend else None, force_note=note if force else None,
            )
        except CommsError as exc:
            if not tag:
                raise
            plan.skipped.append((key, str(exc)))
    # A customer named twice (a key and its tag, two spellings of a key) is sent to once.
    once: dict[tuple[int | None, str, int], Prepared] = {}
    for p in plan.prepared:
        once.setdefault((p.customer.id, p.planned.message, p.planned.sequence), p)
    plan.prepared = list(once.values())
    if not plan.prepared:
        raise NotFound("Nothing to send.")
    plan.times = _recipient_times(plan.prepared, campaign, clock.now())
    plan.refusal = preflight.partner_problem(settings)
    return plan


def send_now(
    db: Database, settings: Settings, transport: Transport, plan: SendPlan, *, by: str,
    clock: Clock,
) -> tuple[DispatchReport, int]:
    """Queue the prepared messages and send exactly those now; (report, number queued).

    Closes ``transport``."""
    with closing(transport):
        preflight.require_partner(settings)
        ids = one_off.queue_prepared(db, plan.prepared, by=by, now=clock.now())
        report = engine.dispatch_ids(db, settings, transport, ids, clock=clock,
                                     worker=worker_id())
    return report, len(ids)


def run_scheduled(
    db: Database, settings: Settings, campaign: Campaign, renderer: Renderer,
    transport: Transport | None, *, clock: Clock, tag: str | None = None, dry_run: bool = False,
    limit: int | None = None, max_minutes: float = 50.0,
    on_queued: Callable[[QueueReport], None] | None = None,
    on_progress: ProgressFn | None = None, plan_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None, sync: bool = False, inbox: bool = False,
    echo: Callable[[str], None] | None = None,
) -> RunSummary:
    """The scheduled run (`comms run`); closes ``transport`` (None on a dry run).

    ``inbox`` (or ``[inbox] on_run``): replies and bounces are read first; ``sync`` (or
    ``[sync] on_run``): stage sync next, so the run plans on what Microsoft sees. ``stop`` (a
    signal) ends dispatching cleanly."""
    try:
        preflight.before_run(settings, transport)  # exit 3 before any row when sign-in fails
        if dry_run and echo is not None and (problem := preflight.partner_problem(settings)):
            echo(f"warning: a real run would stop here. {problem}")
        if echo is not None and (late := campaign.window.holidays_run_out(clock.now().date())):
            echo(f"warning: {late}")
        if inbox or campaign.inbox.on_run:
            # Replies and bounces first: a bounced address or an answered reminder changes
            # what this run may send.
            from comms.inbox import service as inbox_service

            got = inbox_service.sync(db, settings, campaign.inbox, now=clock.now(),
                                     dry_run=dry_run)
            if echo is not None:
                echo(inbox_service.summary_line(got))
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
