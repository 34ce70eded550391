"""Rendering in worker processes (issue 16): a large run renders and compresses its outbox bodies
in worker processes; what it queues is the same, byte for byte, as rendering in the run's own
process, and a template that fails in a worker fails the run the same way (nothing of its batch
is written)."""

from __future__ import annotations

import csv
import gc
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, seed
from sqlmodel import col, select

from comms import outbox
from comms.campaign import load_campaign
from comms.config import load_settings
from comms.domain import PlannedMessage
from comms.errors import RenderWorkerFailed, TemplateError
from comms.render import Renderer
from comms.services import customers as customer_service
from comms.services import engine, queue_render
from comms.store.db import Database, open_database
from comms.store.models import Message

STAGES = ("announced", "invited", "approved", "awaiting_cancellation", "completed")


def _seed(db: Database, tmp_path: Path, n: int) -> None:
    """Customers in every sending stage, on both sides of the licence threshold, some German."""
    path = tmp_path / "mix.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "locale", "time_zone", "stage",
                    "account_manager_name", "account_manager_email",
                    "primary_contact_name", "primary_contact_email"])
        for i in range(n):
            w.writerow([f"M{i:04d}", f"Kunde {i} & Söhne" if i % 3 == 0 else f"Customer {i}",
                        10 + i % 31, "de" if i % 3 == 0 else "en", "Europe/Berlin",
                        STAGES[i % len(STAGES)], "Alex Manager", "am@fabrikam.example",
                        f"Admin {i}", f"admin{i}@customer{i}.example"])
    customer_service.import_customers(db, path, settings=load_settings(env={}),
                                      campaign=load_campaign(), now=T0, by="test")


def _queued(db: Database) -> list[tuple[Any, ...]]:
    with db.session() as s:
        msgs = s.exec(select(Message).order_by(col(Message.customer_id),
                                               col(Message.message))).all()
        return [(m.customer_id, m.message, m.sequence, m.stage, m.to_json, m.cc_json,
                 m.subject, m.locale, m.send_before, bytes(m.body), m.bodies())
                for m in msgs]


def _queue(db: Database, processes: int) -> engine.QueueReport:
    settings = load_settings(env={"COMMS_TEMPLATES_RENDER_PROCESSES": str(processes)})
    return engine.plan_and_queue(db, settings, load_campaign(), Renderer(settings), now=T0)


def _pool_starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The worker counts of every render pool started from now on, in order."""
    started: list[int] = []
    real = queue_render.ProcessRenderer.__init__

    def counting(self: Any, renderer: Renderer, now: Any, processes: int) -> None:
        started.append(processes)
        real(self, renderer, now, processes)

    monkeypatch.setattr(queue_render.ProcessRenderer, "__init__", counting)
    return started


def test_worker_processes_queue_exactly_what_the_run_itself_would(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 150
    _seed(db, tmp_path, n)
    other = open_database(f"sqlite:///{tmp_path / 'in-process.db'}")
    try:
        _seed(other, tmp_path, n)
        here = _queue(other, processes=1)
        # Workers from the first customer on, with small chunks: a chunk's bodies landing on
        # another chunk's rows would show.
        monkeypatch.setattr(queue_render, "POOL_MIN_CUSTOMERS", 0)
        monkeypatch.setattr(queue_render, "CHUNK", 7)
        # Customers read 40 at a time, rows inserted 10 at a time as their chunks come back.
        monkeypatch.setattr(engine, "LOAD_PART", 40)
        monkeypatch.setattr(engine, "INSERT_ROWS", 10)
        started = _pool_starts(monkeypatch)
        _every_chunk_to_the_workers(monkeypatch)
        pooled = _queue(db, processes=2)
        assert started == [2]
        expected, got = _queued(other), _queued(db)
    finally:
        other.dispose()
    assert here.queued == pooled.queued == len(got) >= n
    assert here.by_message == pooled.by_message
    assert {m for _, m, *_ in got} >= {"kickoff", "partner_invitation", "lose_access_warning",
                                       "cancel_instructions", "transition_complete"}
    assert {loc for *_, loc, _, _, _ in got} == {"en", "de"}
    assert got == expected  # every stored byte, subject and locale


def test_a_template_that_fails_in_a_worker_fails_the_run_and_writes_nothing(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "templates"
    (folder / "partner_invitation").mkdir(parents=True)
    builtin = Path(Renderer(load_settings(env={})).folders[-1])
    page = (builtin / "partner_invitation" / "body.html").read_text(encoding="utf-8")
    # Fails only for customers with more than 30 licences: the run gets some way first.
    (folder / "partner_invitation" / "body.html").write_text(
        page.replace("{% block content %}",
                     "{% block content %}{% if customer.licences > 30 %}{{ no_such_value }}"
                     "{% endif %}", 1), encoding="utf-8")
    seed(db, tmp_path, 60)  # all invited (one batch), 5 to 44 licences
    monkeypatch.setattr(queue_render, "POOL_MIN_CUSTOMERS", 0)
    # Small chunks, read and inserted a few at a time: rows of the chunks that rendered are
    # written before the failing one comes back, and must be rolled back with the batch.
    monkeypatch.setattr(queue_render, "CHUNK", 3)
    monkeypatch.setattr(engine, "LOAD_PART", 10)
    monkeypatch.setattr(engine, "INSERT_ROWS", 3)
    inserted: list[int] = []
    real_insert = outbox.queue_messages

    def counting(s: Any, rows: Any) -> int:
        queued = real_insert(s, rows)
        inserted.append(queued)
        return queued

    monkeypatch.setattr(outbox, "queue_messages", counting)
    _every_chunk_to_the_workers(monkeypatch)
    settings = load_settings(env={"COMMS_TEMPLATES_RENDER_PROCESSES": "2",
                                  "COMMS_TEMPLATES_FOLDER": str(folder)})
    with pytest.raises(TemplateError, match=r"partner_invitation/body\.html:\d+: .*no_such_value"):
        engine.plan_and_queue(db, settings, load_campaign(), Renderer(settings), now=T0)
    assert sum(inserted) > 0  # some rows were written before the error...
    with db.session() as s:
        assert s.exec(select(Message)).all() == []  # ...and rolled back with the batch


def _every_chunk_to_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """No chunk renders in the run's own process while the workers start: each waits for
    them, so the test exercises the workers whatever the machine's speed."""
    monkeypatch.setattr(queue_render.ProcessRenderer, "ready", lambda self: True)


class _Fake:
    def __init__(self, name: str, ready: list[bool]) -> None:
        self.name, self._ready, self.closed = name, ready, False
        self.got: list[Any] = []

    def ready(self) -> bool:
        return self._ready[0]

    def submit(self, jobs: Any) -> Any:
        self.got.append(jobs)
        return self.name

    def close(self) -> None:
        self.closed = True


def test_chunks_render_in_the_run_until_the_workers_have_started() -> None:
    started = [False]
    local, pool = _Fake("local", started), _Fake("pool", started)
    both = queue_render.StartingPool(local, pool)  # type: ignore[arg-type]
    assert both.submit("chunk 1") == "local"
    started[0] = True
    assert both.submit("chunk 2") == "pool"
    assert (local.got, pool.got) == (["chunk 1"], ["chunk 2"])
    both.close()
    assert pool.closed and not local.closed  # the run closes its own renderer itself


def test_a_large_run_starts_its_workers_before_the_first_batch(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a run is large is counted before the first batch (the workers start while it is
    planned): more than ``POOL_MIN_CUSTOMERS`` due customers."""
    started = _pool_starts(monkeypatch)
    monkeypatch.setattr(engine, "BATCH", 5)  # the first batch alone would not tell
    monkeypatch.setattr(queue_render, "POOL_MIN_CUSTOMERS", 12)
    small = open_database(f"sqlite:///{tmp_path / 'small.db'}")
    try:
        seed(small, tmp_path, 12)
        assert _queue(small, processes=2).queued == 12
    finally:
        small.dispose()
    assert started == []  # 12 due: rendered in the run's own process
    seed(db, tmp_path, 13)
    assert _queue(db, processes=2).queued == 13
    assert started == [2]


def _one_job(db: Database, tmp_path: Path) -> list[queue_render.Job]:
    seed(db, tmp_path, 1)
    with db.session() as s:
        customer = engine.load_customers(s, [1])[1]
    pm = PlannedMessage("partner_invitation", 0, "invited", to=customer.contacts[:1])
    return [(customer, pm)]


def test_workers_ignore_ctrl_c_and_the_run_decides_when_to_stop(
    db: Database, tmp_path: Path
) -> None:
    """Ctrl-C in a terminal (and systemd's SIGTERM) reaches every process of the run. The run
    finishes queueing and then stops cleanly (comms.services.shutdown); a worker that died of
    the signal would have broken the batch instead."""
    job = _one_job(db, tmp_path)
    pool = queue_render.ProcessRenderer(Renderer(load_settings(env={})), T0, 1)
    try:
        first = list(queue_render.results([pool.submit(job)]))
        workers = multiprocessing.active_children()
        assert workers
        for w in workers:
            assert w.pid is not None
            os.kill(w.pid, signal.SIGINT)
            os.kill(w.pid, signal.SIGTERM)
        again = list(queue_render.results([pool.submit(job)]))
        assert again == first and first[0].subject
        assert all(w.is_alive() for w in workers)
    finally:
        pool.close()


def test_a_render_worker_that_is_killed_is_a_clear_error(db: Database, tmp_path: Path) -> None:
    job = _one_job(db, tmp_path)
    pool = queue_render.ProcessRenderer(Renderer(load_settings(env={})), T0, 1)
    try:
        list(queue_render.results([pool.submit(job)]))
        for w in multiprocessing.active_children():  # the OOM killer, say
            assert w.pid is not None
            os.kill(w.pid, signal.SIGKILL)
            w.join(10)
        with pytest.raises(RenderWorkerFailed, match=r"render_processes = 1"):
            list(queue_render.results([pool.submit(job)]))
    finally:
        pool.close()


def test_the_collector_is_paused_inside_the_block_and_restored_as_it_was() -> None:
    assert gc.isenabled()
    with queue_render.collections_paused():
        assert not gc.isenabled()
        with queue_render.collections_paused():  # nested: the inner block must not re-enable
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), queue_render.collections_paused():
        raise RuntimeError("a failing batch")
    assert gc.isenabled()
    gc.disable()
    try:
        with queue_render.collections_paused():
            pass
        assert not gc.isenabled()  # a caller that had it off gets it back off
    finally:
        gc.enable()
