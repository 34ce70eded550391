"""Stage sync reads customers a page at a time, in worker processes for a large sync, and
records each page once it is read (issue 13's speed and memory targets). What it concludes is
the same either way; a page is recorded whole or not at all; a worker that dies is a clear
error. End to end over HTTPS against the sandbox, with the real msal and requests."""

from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select
from test_sync_guesses import BASE, Row, _import, _row, _world

from comms.campaign import load_campaign
from comms.config import load_settings
from comms.errors import SyncWorkerFailed
from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.sync_models import SyncCheck, SyncEvidence
from comms.sync import reading, service

COUNT = 13


def _tenant(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-00000000000{i % 10}"


def _mixed(world: Sandbox, cli: Any, tmp_path: Path) -> list[str]:
    """Customers in every state sync tells apart: not accepted yet, accepted, CSP live, old
    subscription suspended, no consent, and one whose tenant Partner Center finds by domain."""
    rows: list[Row] = []
    for i in range(COUNT):
        key, domain, tid = f"K{i:02d}", f"k{i:02d}.example", _tenant(i)
        kind = i % 5
        world.add_customer_tenant(tid, domain, f"Customer {i}", direct_licences=10 + i,
                                  consented=kind != 4)
        if kind in (1, 2, 3):
            world.tenant_change(tid, "accept_relationship")
        if kind in (2, 3):
            world.tenant_change(tid, "activate_csp", quantity=10 + i)
        if kind == 3:
            world.tenant_change(tid, "direct_status", status="Suspended")
        stage = "awaiting_cancellation" if kind == 3 else "invited"
        rows.append((key, f"Customer {i}", "" if i == 7 else tid, domain, 10 + i, stage, ""))
    _import(cli, tmp_path, rows)
    return [r[0] for r in rows]


def _sync(db: Database, *, dry_run: bool = False, keep_seen: bool = True) -> service.SyncReport:
    return service.run_sync(db, load_settings(), load_campaign(), now=BASE, dry_run=dry_run,
                            keep_seen=keep_seen)


def _seen(report: service.SyncReport) -> list[dict[str, Any]]:
    return [asdict(c) for c in report.customers]


def _pooled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every sync from here reads in two worker processes; returns the pools started."""
    monkeypatch.setenv("COMMS_SYNC_PROCESSES", "2")
    monkeypatch.setattr(reading, "POOL_MIN_CUSTOMERS", 0)
    started: list[int] = []
    real = reading.ProcessPoolExecutor

    def counting(*args: Any, **kwargs: Any) -> Any:
        started.append(kwargs["max_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(reading, "ProcessPoolExecutor", counting)
    return started


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    return _world(sandbox_factory, tmp_path, database_url, monkeypatch)


def test_worker_processes_conclude_exactly_what_this_process_does(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = _mixed(world, cli, tmp_path)
    monkeypatch.setenv("COMMS_SYNC_PROCESSES", "1")
    here = _sync(db, dry_run=True)  # one page, this process
    statuses = {c.key: c.status for c in here.customers}
    assert set(statuses.values()) == {"seen", "moved", "cannot verify"}, statuses
    assert sum(bool(c.moved) for c in here.customers) >= 6

    monkeypatch.setattr(reading, "PAGE", 3)  # several pages, several in flight
    started = _pooled(monkeypatch)
    pooled = _sync(db, dry_run=True)
    assert started == [2]
    assert [c.key for c in pooled.customers] == keys
    assert _seen(pooled) == _seen(here)

    done = _sync(db)  # and for real: the ledger follows
    assert _seen(done) == _seen(here)
    for c in here.customers:
        moved_to = c.moved[-1].split(" -> ")[1].split()[0] if c.moved else None
        if moved_to:
            assert _row(db, c.key).stage == moved_to, c.moved
    assert _row(db, "K07").tenant_id == _tenant(7)  # found by domain, filled in


def test_a_scheduled_sync_keeps_each_outcome_but_not_what_was_seen(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`comms run --sync` needs the outcomes (its summary, the moves), not every customer's
    reads: dropping them once recorded keeps a large sync's memory that of a few pages."""
    _mixed(world, cli, tmp_path)
    monkeypatch.setattr(reading, "PAGE", 4)
    full = _sync(db, dry_run=True)
    lean = _sync(db, dry_run=True, keep_seen=False)

    def outcome(c: service.CustomerSync) -> tuple[Any, ...]:
        return c.key, c.status, c.moved, c.problems, c.licences, c.tenant_filled

    assert [outcome(c) for c in lean.customers] == [outcome(c) for c in full.customers]
    assert lean.summary() == full.summary()
    assert all(c.seen for c in full.customers)
    assert not any(c.seen for c in lean.customers)


def test_each_page_is_recorded_once_read_and_a_stop_keeps_whole_pages(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = _mixed(world, cli, tmp_path)
    monkeypatch.setattr(reading, "PAGE", 4)
    real = service._record
    calls: list[list[str]] = []

    def failing_third(db: Database, campaign: Any, rules: Any, now: Any, targets: Any,
                      *rest: Any) -> None:
        calls.append([t.key for t in targets])
        if len(calls) == 3:
            raise RuntimeError("the machine stopped")
        real(db, campaign, rules, now, targets, *rest)

    monkeypatch.setattr(service, "_record", failing_third)
    with pytest.raises(RuntimeError, match="machine stopped"):
        _sync(db)
    assert calls == [keys[0:4], keys[4:8], keys[8:12]]

    def checked() -> set[int]:
        with db.session() as s:
            return set(s.exec(select(SyncCheck.customer_id)).all())

    recorded = {_row(db, k).id for k in keys[:8]}
    assert checked() == recorded  # the first two pages, whole; nothing of the third
    with db.session() as s:
        assert {e.customer_id for e in s.exec(select(SyncEvidence)).all()} <= recorded

    monkeypatch.setattr(service, "_record", real)
    again = _sync(db)  # the next sync reads every customer again and records the rest
    assert checked() == {_row(db, k).id for k in keys}
    assert again.count("failed") == 0


def test_a_sync_worker_that_is_killed_is_a_clear_error(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _mixed(world, cli, tmp_path)
    _pooled(monkeypatch)
    settings = load_settings()
    sources = settings.sync.sources
    readers = reading.Readers(settings, sources)
    pager = reading.PageReader(settings, sources, COUNT, readers)
    try:
        job = reading.Job(0, _tenant(1), service.CustomerSync("K01", "Customer 1"))
        pages = pager.read(iter([[job]] * 40))
        next(pages)
        for w in multiprocessing.active_children():  # the OOM killer, say
            if w.pid is not None and w.name.startswith("SpawnProcess"):
                os.kill(w.pid, signal.SIGKILL)
                w.join(10)
        with pytest.raises(SyncWorkerFailed, match=r"\[sync\] processes = 1"):
            for _ in pages:
                pass
    finally:
        pager.close()
        readers.close()
