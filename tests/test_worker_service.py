"""`services.worker.run`: rounds until the ``stop`` event is set (what SIGTERM will set)."""

from __future__ import annotations

import threading
from pathlib import Path

import factories

from comms.campaign import load_campaign
from comms.config import Settings
from comms.delivery.outbox_dir import OutboxDirTransport
from comms.outbox import Clock
from comms.services import worker
from comms.store.db import Database


def _settings(folder: Path) -> Settings:
    return Settings.model_validate({
        "senders": [{"address": "a@fabrikam.example"}],
        "delivery": {"transport": "outbox_dir", "outbox_dir": str(folder)},
    })


def test_worker_stops_between_rounds_when_told(db: Database, tmp_path: Path) -> None:
    settings = _settings(tmp_path / "eml")
    cid = factories.customer(db, "C1", time_zone="UTC")
    factories.queued(db, cid, send_before=None)
    stop = threading.Event()
    rounds: list[int] = []

    def on_round(report: worker.DispatchReport) -> None:
        rounds.append(report.sent)
        stop.set()  # as a signal handler would, while the worker is busy

    totals = worker.run(db, settings, load_campaign(), OutboxDirTransport(settings),
                        clock=Clock(factories.T0), stop=stop, on_round=on_round)
    assert rounds == [1]
    assert (totals.sent, totals.failed, totals.exit_code) == (1, 0, 0)
    assert len(list((tmp_path / "eml").glob("*.eml"))) == 1


def test_worker_already_stopped_does_nothing(db: Database, tmp_path: Path) -> None:
    settings = _settings(tmp_path / "eml")
    factories.queued(db, factories.customer(db, "C1", time_zone="UTC"))
    stop = threading.Event()
    stop.set()
    totals = worker.run(db, settings, load_campaign(), OutboxDirTransport(settings),
                        clock=Clock(factories.T0), stop=stop)
    assert (totals.sent, totals.failed) == (0, 0)
    assert not (tmp_path / "eml").exists()
