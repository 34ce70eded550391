"""The dispatcher: rounds of sending threads within each sender mailbox's limits, with
reconciliation and lease expiry between rounds."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import col, select

from comms import pacing
from comms.campaign import SendWindow
from comms.config import Settings
from comms.delivery.base import (
    Reconciler,
    Transport,
)
from comms.outbox.claims import DispatchReport, _claim_filter, expire_leases
from comms.outbox.queue import HELD, OPEN, Clock
from comms.outbox.reconcile import ReconcileLimits, reconcile
from comms.outbox.rounds import RunState
from comms.store.clocks import check_clock
from comms.store.db import Database
from comms.store.models import Message

MIN_PASS_SECONDS = 5.0  # the shortest time between two reconcile passes while sending
# How often a dispatcher compares its host's clock with the database server's (PostgreSQL).
CLOCK_CHECK_SECONDS = 600.0

# --------------------------------------------------------------------------- the dispatcher


ProgressFn = Callable[[DispatchReport], None]


class Dispatcher:
    """Sends due messages through one transport within each sender mailbox's limits."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        transport: Transport,
        *,
        clock: Clock,
        worker: str,
        on_progress: ProgressFn | None = None,
        window: SendWindow | None = None,
    ) -> None:
        self.db = db
        self.window = window
        self.settings = settings
        self.transport = transport
        self.clock = clock
        self.worker = worker
        self.on_progress = on_progress
        scale = settings.delivery.time_scale
        tenant = pacing.TenantBudget.of(settings)
        self.limits = [pacing.Limits.of(s, scale, tenant) for s in settings.senders]
        # A lease must outlast any request, or a live worker's row could look abandoned.
        self.lease = timedelta(
            seconds=max(settings.delivery.lease_seconds, 2 * settings.graph.timeout_seconds + 1)
        )
        graph = settings.graph
        # A request we gave up on (client timeout) may still run at Exchange until
        # server_timeout after it started: its concurrency slot stays taken that long.
        self.server_hold = timedelta(
            seconds=max(graph.server_timeout - graph.timeout_seconds, 0.0))
        # Only after the grace period does "not in Sent Items" mean "not sent": never shorter
        # than two request timeouts, nor than Exchange may still be working on a request.
        self.grace = timedelta(seconds=max(graph.reconcile_grace_seconds,
                                           2 * graph.timeout_seconds,
                                           graph.server_timeout))
        # A reconcile pass holds one row while it reads every mailbox that may have sent it.
        self.paced = ReconcileLimits(
            {lim.mailbox: lim for lim in self.limits},
            lease=timedelta(seconds=2 * graph.timeout_seconds * max(len(self.limits), 1) + 5),
            server_hold=self.server_hold,
        )
        reconciler = transport if isinstance(transport, Reconciler) else None
        self.reconciler = reconciler if settings.graph.reconcile else None
        self.clock_check_every = CLOCK_CHECK_SECONDS
        self._clock_checked: float | None = None  # monotonic time of the last clock check
        with db.session(immediate=True) as s:
            pacing.ensure_mailboxes(s, [lim.mailbox for lim in self.limits])

    def pending(
        self, only_ids: frozenset[int] | None, tag: str | None
    ) -> Counter[str]:
        with self.db.session() as s:
            rows = s.exec(
                select(Message.status, sa.func.count())
                .where(col(Message.status).in_(OPEN), *_claim_filter(only_ids, tag))
                .group_by(col(Message.status))
            ).all()
        return Counter({status: int(n) for status, n in rows})

    def run(
        self,
        *,
        deadline: float,
        only_ids: frozenset[int] | None = None,
        tag: str | None = None,
        limit: int | None = None,
        report: DispatchReport | None = None,
        stop: threading.Event | None = None,
    ) -> DispatchReport:
        """Dispatch until nothing is due (or sendable before ``deadline``, a monotonic time).

        Setting ``stop`` (a signal handler does) ends the run cleanly: nothing new is claimed,
        requests in flight finish and their outcomes are recorded, then it returns."""
        state = RunState(self, report or DispatchReport(), deadline,
                         stop or threading.Event(), only_ids, tag,
                         budget=limit if limit is not None else -1)
        threads_n = max(1, min(sum(lim.max_concurrent for lim in self.limits), 8))
        while state.running():
            self._reconcile(state)
            if state.requested.is_set():
                break
            threads = [threading.Thread(target=state.loop, args=(i,), daemon=True)
                       for i in range(threads_n)]
            for t in threads:
                t.start()
            self._wait_for(threads, state)
            if state.errors:
                raise state.errors[0]
            if state.budget == 0 or min(state.hints.values()) >= deadline:
                break  # --limit spent, or every mailbox waits past the deadline
            # Once a mailbox tripped, each unknown outcome gets one reconcile pass after its
            # grace period, then is left to the next run: Graph may not be answering, and
            # waiting for it must not keep a scheduled run alive.
            pause = self._more_to_do(only_ids, tag, deadline,
                                     wait_for_unknown=not state.report.tripped)
            if pause is None:
                break
            state.requested.wait(pause)
        return state.report

    def check_clock(self) -> None:
        """Refuse to dispatch (``ClockSkewed``) while this host's clock disagrees with the
        PostgreSQL server's: leases and the reconcile grace are judged on each host's clock.
        Asked before the first round, then every ``clock_check_every`` seconds."""
        now_m = time.monotonic()
        if (self._clock_checked is not None
                and now_m - self._clock_checked < self.clock_check_every):
            return
        check_clock(self.db, self.clock.real)
        self._clock_checked = now_m

    def _reconcile(self, state: RunState) -> None:
        self.check_clock()  # before anything is judged on this host's clock
        expire_leases(self.db, clock=self.clock)
        reconcile(self.db, self.reconciler, clock=self.clock, grace=self.grace,
                  report=state.report, worker=self.worker, paced=self.paced,
                  only_ids=state.only_ids, tag=state.tag)

    def _wait_for(self, threads: list[threading.Thread], state: RunState) -> None:
        """Join the sending threads; meanwhile, once per grace period (5 s at least), expire
        leases and reconcile unclear outcomes whose grace has passed, so that they are looked
        up (and resent if need be) while the queue is still long, not only once it is empty.
        An error there stops the threads first, then is raised."""
        every = max(self.grace.total_seconds(), MIN_PASS_SECONDS)
        next_pass = time.monotonic() + every
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(timeout=max(0.01, next_pass - time.monotonic()))
            if time.monotonic() < next_pass:
                continue
            next_pass = time.monotonic() + every
            if not state.running():
                continue
            try:
                self._reconcile(state)
            except BaseException:
                state.halt.set()
                for t in threads:
                    t.join()
                raise

    def _more_to_do(
        self, only_ids: frozenset[int] | None, tag: str | None,
        deadline: float, *, wait_for_unknown: bool = True,
    ) -> float | None:
        """Seconds to wait before work may be possible again, or None when nothing can
        get out before the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        now = self.clock.now()
        real = self.clock.real()
        horizon = now + timedelta(seconds=left)
        flt = _claim_filter(only_ids, tag)
        with self.db.session() as s:
            next_queued = s.exec(
                select(sa.func.min(Message.send_after)).where(
                    col(Message.status) == "queued", col(Message.send_after) <= horizon, *flt
                )
            ).one()
            sending = s.exec(
                select(sa.func.count()).select_from(Message).where(
                    col(Message.status) == "sending", *flt
                )
            ).one()
            oldest_unknown, newest_unknown = s.exec(
                select(sa.func.min(Message.unknown_since), sa.func.max(Message.unknown_since))
                .where(col(Message.status) == "unknown", col(Message.error_code) != HELD, *flt)
            ).one()
        waits: list[float] = []
        if next_queued is not None:
            waits.append((next_queued - now).total_seconds())
        if sending:
            waits.append(0.5)  # another worker's send, or a lease still to expire
        one_more_pass = newest_unknown is not None and newest_unknown + self.grace > real
        if oldest_unknown is not None and self.reconciler is not None and (
                wait_for_unknown or one_more_pass):
            waits.append((oldest_unknown + self.grace - real).total_seconds())
        if not waits:
            return None
        wait = max(min(waits), 0.02)
        return min(wait, left, 1.0)

