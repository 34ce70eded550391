"""One dispatch run's shared state: the send budget, per-mailbox hints and circuit breaker,
and the loop each sending thread runs (claim, send, record)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from comms import pacing
from comms.delivery.base import Outcome, SendResult
from comms.errors import CommsError
from comms.outbox.claims import Claimed, DispatchReport, claim, put_back, record

if TYPE_CHECKING:
    from comms.outbox.dispatcher import Dispatcher


@dataclass
class RunState:
    """What the sending threads of one ``Dispatcher.run`` share."""

    dispatcher: Dispatcher
    report: DispatchReport
    deadline: float  # monotonic
    requested: threading.Event  # a clean stop was asked for (a signal)
    only_ids: frozenset[int] | None = None
    tag: str | None = None
    budget: int = -1  # messages still allowed this run; -1: no limit
    halt: threading.Event = field(default_factory=threading.Event)  # an error, or all tripped
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Per-mailbox "not before" hints (monotonic): a local shortcut that spares the database a
    # claim attempt on a mailbox known to be at its limit. The database stays the authority.
    hints: dict[str, float] = field(default_factory=dict)
    # Circuit breaker: ambiguous outcomes in a row per mailbox.
    streak: dict[str, int] = field(default_factory=dict)
    # Mailboxes a thread of this run is asking the database about right now: the others do
    # not ask too (with several workers per host, N threads polling one mailbox's row cost
    # more CPU than sending; measured in bench/bench_load.py).
    claiming: set[str] = field(default_factory=set)
    # Signalled when a thread's question ends: waiting threads look again at once instead of
    # polling (many idle threads in many processes were measurable CPU on two cores).
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)
        for lim in self.dispatcher.limits:
            self.hints.setdefault(lim.mailbox, 0.0)
            self.streak.setdefault(lim.mailbox, 0)

    # -- budget (--limit) -----------------------------------------------------------------

    def take_budget(self) -> bool:
        with self.lock:
            if self.budget == 0:
                return False
            if self.budget > 0:
                self.budget -= 1
            return True

    def give_back(self) -> None:
        with self.lock:
            if self.budget >= 0:
                self.budget += 1

    # -- mailboxes ----------------------------------------------------------------------

    def note_outcome(self, mailbox: str, outcome: Outcome) -> None:
        """Past ``max_consecutive_unknown`` ambiguous outcomes in a row the mailbox sends
        nothing more this run: Graph may be down, and each try only adds an unknown."""
        trip_after = self.dispatcher.settings.delivery.max_consecutive_unknown
        with self.lock:
            self.streak[mailbox] = self.streak[mailbox] + 1 if outcome is Outcome.UNKNOWN else 0
            if self.streak[mailbox] >= trip_after and mailbox not in self.report.tripped:
                self.report.tripped[mailbox] = (
                    f"{self.streak[mailbox]} ambiguous outcomes in a row (timeouts/5xx): "
                    "stopped sending from it for this run")
                self.hints[mailbox] = float("inf")
                if len(self.report.tripped) == len(self.hints):
                    self.halt.set()  # nothing left to send from

    def stopped(self, mailbox: str) -> bool:
        with self.lock:
            return mailbox in self.report.tripped

    def take_turn(self, index: int, tried: set[str]) -> pacing.Limits | None:
        """A mailbox this thread may ask for a slot now: its hint has passed, no other thread
        of this run is asking, and this thread has not tried it this turn. Marked as being
        asked until ``end_turn``. Threads start at different mailboxes (``index``)."""
        now_m = time.monotonic()
        with self.lock:
            ready = [lim for lim in self.dispatcher.limits
                     if self.hints[lim.mailbox] <= now_m and lim.mailbox not in self.claiming
                     and lim.mailbox not in tried and lim.mailbox not in self.report.tripped]
            if not ready:
                return None
            ready.sort(key=lambda lim: self.hints[lim.mailbox])
            lim = ready[index % len(ready)]
            self.claiming.add(lim.mailbox)
            return lim

    def end_turn(self, lim: pacing.Limits, claimed_at: float | None,
                 wait: pacing.Wait | None = None) -> None:
        """The question about ``lim`` ended: ``claimed_at`` is the monotonic time just before
        a claim that got a slot; ``wait`` the database's answer when there was none. The new
        hint is in place before waiting threads are woken."""
        if wait is not None:
            self._wait_on(lim, wait)
        with self.lock:
            self.claiming.discard(lim.mailbox)
            if claimed_at is not None:
                # The slot started at about ``claimed_at``, and no send can start on this
                # mailbox within one interval of it (the database enforces it; this spares it
                # the question).
                self.hints[lim.mailbox] = max(
                    self.hints[lim.mailbox], claimed_at + lim.interval.total_seconds())
            self.changed.notify_all()

    def pause(self) -> bool:
        """Wait until a mailbox may be worth asking again: the soonest hint, or the end of
        another thread's question (it answers in milliseconds). False when the soonest hint
        is past the deadline (this thread ends)."""
        with self.changed:
            now_m = time.monotonic()
            if self.claiming:
                wait_for = 0.05  # woken by end_turn long before
            else:
                wait_for = min(self.hints.values()) - now_m
                if now_m + wait_for >= self.deadline:
                    return False
            self.changed.wait(min(max(wait_for, 0.002), 0.5))
        return True

    def _wait_on(self, lim: pacing.Limits, got: pacing.Wait) -> None:
        d = self.dispatcher
        pause = (got.until - d.clock.real()).total_seconds() if got.until is not None else 0.01
        if got.until is not None and pause > 1.0:
            with self.report.lock:
                self.report.waiting[got.reason] = got.until
        with self.lock:
            if lim.mailbox not in self.report.tripped:  # a stopped mailbox stays stopped
                self.hints[lim.mailbox] = time.monotonic() + max(pause, 0.0)

    # -- the sending threads --------------------------------------------------------------

    def running(self) -> bool:
        return (not self.halt.is_set() and not self.requested.is_set()
                and time.monotonic() < self.deadline)

    def claim_next(self, index: int) -> Claimed | bool:
        """A claimed message; True when nothing is claimable now (wait), False when nothing
        is due at all or nothing can be claimed before the deadline (this thread ends)."""
        d = self.dispatcher
        tried: set[str] = set()
        while (lim := self.take_turn(index, tried)) is not None:
            got: Claimed | pacing.Wait | None = None
            asked = time.monotonic()
            try:
                got = claim(d.db, lim, settings=d.settings, clock=d.clock, worker=d.worker,
                            lease=d.lease, only_ids=self.only_ids, tag=self.tag,
                            report=self.report, window=d.window)
            finally:
                self.end_turn(lim, asked if isinstance(got, Claimed) else None,
                              got if isinstance(got, pacing.Wait) else None)
            if isinstance(got, Claimed):
                if not self.stopped(lim.mailbox):
                    return got
                # The breaker tripped while this thread was asking: nothing leaves.
                put_back(d.db, got, clock=d.clock, worker=d.worker)
                continue
            if got is None:
                return False  # nothing due on any mailbox
            tried.add(lim.mailbox)
        return self.pause()

    def send(self, claimed: Claimed) -> None:
        d = self.dispatcher
        try:
            result = d.transport.send(claimed.email)
        except CommsError:
            # The transport cannot be used at all (no token, bad config): nothing was
            # accepted. Put the row back and stop the run with that error.
            put_back(d.db, claimed, clock=d.clock, worker=d.worker)
            raise
        except Exception as exc:  # a transport bug must not strand the row in `sending`
            result = SendResult(
                Outcome.UNKNOWN, error_code=type(exc).__name__,
                message=f"the transport failed unexpectedly ({exc}); the request may have "
                "left: Sent Items is checked before any resend",
            )
        # Counted before the slot is released by ``record``: a thread that claims the freed
        # slot must already see a breaker this outcome trips.
        self.note_outcome(claimed.slot.mailbox, result.outcome)
        record(d.db, claimed, result, clock=d.clock, worker=d.worker, report=self.report,
               server_hold=d.server_hold)
        if result.outcome is not Outcome.SENT:
            self.give_back()
        if d.on_progress:
            d.on_progress(self.report)

    def loop(self, index: int) -> None:
        """One sending thread: claim and send until nothing is due, the budget is spent, the
        deadline passes or a stop is requested (in-flight sends always finish)."""
        try:
            while self.running():
                if not self.take_budget():
                    return
                claimed = self.claim_next(index)
                if not isinstance(claimed, Claimed):
                    self.give_back()
                    if claimed:
                        continue
                    return
                self.send(claimed)
        except BaseException as exc:  # surfaced to the caller by Dispatcher.run
            self.errors.append(exc)
            self.halt.set()
