"""`comms worker`: dispatch queued messages round after round until told to stop.

Several workers (on one host or many) share one PostgreSQL database; they share each sender
mailbox's limits through it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field

from comms.campaign import Campaign
from comms.config import Settings
from comms.delivery.base import Transport
from comms.outbox import Clock, Dispatcher, DispatchReport
from comms.services.sending import worker_id
from comms.store.db import Database

__all__ = ["DispatchReport", "WorkerTotals", "run"]

ROUND_SECONDS = 60.0  # one dispatch round at most; then the stop flag is looked at again
IDLE_SECONDS = 1.0  # pause between rounds


@dataclass
class WorkerTotals:
    sent: int = 0
    confirmed: int = 0  # an unclear answer, then found in Sent Items: sent once, not again
    failed: int = 0
    tripped: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.tripped else 0


def run(
    db: Database, settings: Settings, campaign: Campaign, transport: Transport, *,
    clock: Clock, once: bool = False, max_minutes: float = 0.0,
    stop: threading.Event | None = None,
    on_round: Callable[[DispatchReport], None] | None = None,
) -> WorkerTotals:
    """Dispatch rounds until ``stop`` is set, ``max_minutes`` pass (0: no limit) or, with
    ``once``, after one round. ``stop`` is checked between rounds. Closes ``transport``."""
    stop = stop if stop is not None else threading.Event()
    totals = WorkerTotals()
    end = time.monotonic() + (max_minutes * 60 if max_minutes else 10 * 365 * 86400)
    with closing(transport):
        dispatcher = Dispatcher(db, settings, transport, clock=clock, worker=worker_id(),
                                window=campaign.window)
        while time.monotonic() < end and not stop.is_set():
            report = dispatcher.run(deadline=min(end, time.monotonic() + ROUND_SECONDS),
                                    stop=stop)
            totals.sent += report.sent
            totals.confirmed += report.confirmed
            totals.failed += report.failed
            totals.tripped.update(report.tripped)
            if on_round is not None:
                on_round(report)
            if once:
                break
            stop.wait(IDLE_SECONDS)
    return totals
