"""Rendering and compressing the outbox bodies of a queueing run, in this process or in worker
processes (issue 16).

Rendering is about two thirds of the time a scheduled run takes to queue, and one Python process
renders on one core. Both ways below take the same chunks of (customer, planned message) and
give back, per message, its subject, locale and stored body (``comms.store.bodies``):

- ``LocalRenderer`` renders in this thread and compresses on a helper thread (zstd releases the
  GIL), a chunk at a time, while the next chunk renders. Small runs and dry runs use it.
- ``ProcessRenderer`` renders and compresses in worker processes, so a run that queues thousands
  of customers uses every core while this process reads, plans and writes. Workers are started
  with ``spawn`` (no fork of a process holding database connections and threads) and build their
  own ``Renderer`` from the same settings and template folder, once.

What is queued is the same byte for byte either way (tests/test_queue_render.py); a template
error in a worker reaches the caller as the same ``TemplateError``, and the batch it was in
is rolled back as before.
"""

from __future__ import annotations

import gc
import multiprocessing
import signal
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from comms.config import Settings
from comms.domain import CustomerInfo, PlannedMessage
from comms.errors import RenderWorkerFailed
from comms.render import RenderedEmail, Renderer
from comms.store import bodies

CHUNK = 100  # messages per job: large enough that handing it over costs little
POOL_MIN_CUSTOMERS = 3000  # fewer due customers render in-process: workers start in ~0.5 s

Job = tuple[CustomerInfo, PlannedMessage]


@dataclass(frozen=True)
class Rendered:
    """One message as the outbox row stores it."""

    subject: str
    locale: str
    body: bytes


def render_one(renderer: Renderer, customer: CustomerInfo, pm: PlannedMessage,
               now: datetime) -> RenderedEmail:
    """The one way a planned message is rendered for the outbox (and for a dry run's preview)."""
    recipient = pm.to[0] if pm.to else None
    return renderer.render(
        pm.message, customer, now=now, reminder_number=pm.reminder_number, recipient=recipient,
        extra=pm.context or None,
    )


def _encode(emails: Sequence[RenderedEmail]) -> list[Rendered]:
    return [Rendered(e.subject, e.locale, bodies.encode(e.html, e.text)) for e in emails]


class ChunkRenderer(Protocol):
    def submit(self, jobs: list[Job]) -> Future[list[Rendered]]: ...

    def close(self) -> None: ...


class LocalRenderer:
    """Render here, compress on one helper thread while the next chunk renders."""

    def __init__(self, renderer: Renderer, now: datetime) -> None:
        self.renderer = renderer
        self.now = now
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comms-encode")

    def submit(self, jobs: list[Job]) -> Future[list[Rendered]]:
        emails = [render_one(self.renderer, c, pm, self.now) for c, pm in jobs]
        return self._encoder.submit(_encode, emails)

    def close(self) -> None:
        self._encoder.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- worker processes

_worker_renderer: Renderer | None = None


def _start_worker(settings: Settings, template_dir: Path | None, time_budget: float) -> None:
    global _worker_renderer
    # Ctrl-C reaches the whole process group and systemd signals the whole unit: the run
    # itself decides how to stop (it finishes queueing, then stops cleanly; see
    # comms.services.shutdown) and shuts its workers down; a worker never stops on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _worker_renderer = Renderer(settings, template_dir=template_dir, time_budget=time_budget)
    gc.freeze()  # what lives for the worker's life is never walked by the collector again


@contextmanager
def collections_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block: while the run plans and writes one batch,
    and while a worker renders one chunk. A batch makes tens of thousands of short-lived
    objects (rows, views, SQL parameters) that live until its commit, so the collector would
    walk them again and again (with it off, the run's own work took a quarter less CPU;
    ``bench_queue.py --run-only``). The garbage of one block is bounded; collection resumes
    after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _render_chunk(jobs: list[Job], now: datetime) -> list[Rendered]:
    assert _worker_renderer is not None, "worker started without its renderer"
    with collections_paused():
        return _encode([render_one(_worker_renderer, c, pm, now) for c, pm in jobs])


def _started() -> None:
    """A worker's first job: done once it has started (imported comms, built its renderer)."""


class ProcessRenderer:
    """Render and compress in ``processes`` worker processes. They are started at once, and
    take about half a second to be ready (``ready``)."""

    def __init__(self, renderer: Renderer, now: datetime, processes: int) -> None:
        self.now = now
        self._pool = ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(renderer.settings, renderer.user_folder, renderer.time_budget),
        )
        # Each job submitted while no worker is idle starts one more: all start now.
        self._started = [self._pool.submit(_started) for _ in range(processes)]

    def ready(self) -> bool:
        """Whether the workers have started (a worker that failed to start counts: the next
        ``submit`` or ``results`` reports it)."""
        return all(f.done() for f in self._started)

    def submit(self, jobs: list[Job]) -> Future[list[Rendered]]:
        try:
            return self._pool.submit(_render_chunk, jobs, self.now)
        except BrokenProcessPool as exc:
            raise _worker_died(exc) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class StartingPool:
    """Chunks render in this process until the worker processes are ready, then in them: a
    large run does not wait the half second the workers take to start."""

    def __init__(self, local: LocalRenderer, pool: ProcessRenderer) -> None:
        self.local = local
        self.pool = pool

    def submit(self, jobs: list[Job]) -> Future[list[Rendered]]:
        return (self.pool if self.pool.ready() else self.local).submit(jobs)

    def close(self) -> None:
        self.pool.close()


def results(jobs: Iterable[Future[list[Rendered]]]) -> Iterator[Rendered]:
    """The rendered messages of ``jobs``, in order."""
    try:
        for job in jobs:
            yield from job.result()
    except BrokenProcessPool as exc:
        raise _worker_died(exc) from exc


def _worker_died(exc: BrokenProcessPool) -> RenderWorkerFailed:
    return RenderWorkerFailed(
        f"A render worker process stopped unexpectedly ({exc}): killed, or out of memory. "
        "Nothing of the batch being queued was written (batches before it were). Run again; "
        "if it happens again, set [templates] render_processes = 1 to render in-process."
    )

