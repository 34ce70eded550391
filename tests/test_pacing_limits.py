"""Pacing under each Exchange limit, against the sandbox (which enforces the same limits and
answers 429 past them): no 429 reaches a failure, and the rate achieved is within 5 % of the
limit. Time is scaled in both (a Graph "minute" of 60 * SCALE seconds); rates are measured on
the sandbox's own record of when it accepted each message."""

from __future__ import annotations

import itertools
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from engine_helpers import T0, sandbox_env, seed, settings_from, statuses

from comms.campaign import load_campaign
from comms.delivery.factory import make_transport
from comms.outbox import Clock
from comms.render import Renderer
from comms.sandbox import Sandbox
from comms.services import engine
from comms.store.db import Database

SENDER = "transition@fabrikam.example"


def _run(env: dict[str, str], db: Database, minutes: float) -> engine.RunSummary:
    settings = settings_from(env)
    return engine.run(db, settings, load_campaign(), Renderer(settings), make_transport(settings),
                      clock=Clock(T0), worker="test", max_minutes=minutes)


def _write_sender(env: dict[str, str], **limits: int) -> None:
    extra = "".join(f"{k} = {v}\n" for k, v in limits.items())
    Path(env["COMMS_CONFIG"]).write_text(f'[[senders]]\naddress = "{SENDER}"\n{extra}',
                                         encoding="utf-8")


def test_rate_limit_is_used_to_within_5_percent_without_a_429(
    tmp_path: Path, db: Database, database_url: str, sandbox_factory: Any
) -> None:
    # 30 per 6 s = 5 messages a second: 200 ms per send leaves a busy 2-core CI machine room
    # to claim, send and record, so what is measured is the pacer, not the CPU.
    scale = 0.1
    sb: Sandbox = sandbox_factory(time_scale=scale)
    env = sandbox_env(sb, tmp_path, database_url, senders=[SENDER], time_scale=scale)
    n = 40
    seed(db, tmp_path, n)
    summary = _run(env, db, minutes=1)
    assert (summary.dispatch.sent, summary.dispatch.failed) == (n, 0)
    stats = sb.stats()
    # Requests leave at paced intervals; on a busy machine one may still land early in
    # Exchange's window. Such a 429 only defers that message: it is never a failure.
    assert stats["throttled_rate"] + stats["throttled_concurrency"] <= 2
    assert summary.dispatch.throttled == stats["throttled_rate"] + stats["throttled_concurrency"]
    times = sorted(datetime.fromisoformat(r["received_at"]) for r in sb.sent())
    allowed = 30 / (60 * scale)
    # The pacer's own rate: the typical gap between two arrivals. A stall of the machine (CI
    # runs this beside other jobs; 0.4 s is 5 % of this 8 s run) is not the pacer's doing,
    # and one gap cannot move the median.
    gaps = sorted((b - a).total_seconds() for a, b in itertools.pairwise(times))
    paced = 1 / statistics.median(gaps)
    assert 0.95 * allowed <= paced <= allowed * 1.01, (paced, allowed, gaps)
    # ... and over the whole run, stalls included: no systematic gap either.
    achieved = (len(times) - 1) / (times[-1] - times[0]).total_seconds()
    assert 0.85 * allowed <= achieved <= allowed * 1.01, (achieved, allowed, gaps)


def test_concurrency_limit_is_reached_and_never_exceeded(
    tmp_path: Path, db: Database, database_url: str, sandbox_factory: Any
) -> None:
    scale = 0.05
    # A fast rate limit and slow requests: concurrency is what binds.
    sb: Sandbox = sandbox_factory(time_scale=scale, messages_per_minute=6000)
    sb.set_faults(latency=0.4)
    env = sandbox_env(sb, tmp_path, database_url, senders=[SENDER], time_scale=scale,
                      timeout=5.0, lease=12.0)
    _write_sender(env, messages_per_minute=6000, max_concurrent=4)
    n = 24
    seed(db, tmp_path, n)
    summary = _run(env, db, minutes=1)
    assert (summary.dispatch.sent, summary.dispatch.failed) == (n, 0)
    stats = sb.stats()
    assert stats["max_in_flight_per_mailbox"][SENDER] == 4
    assert stats["throttled_concurrency"] == 0 and summary.dispatch.throttled == 0


def test_daily_recipient_cap_defers_instead_of_failing(
    tmp_path: Path, db: Database, database_url: str, sandbox_factory: Any
) -> None:
    scale = 0.001  # a "day" of 86 s, a "minute" of 60 ms
    sb: Sandbox = sandbox_factory(time_scale=scale, recipients_per_day=10)
    env = sandbox_env(sb, tmp_path, database_url, senders=[SENDER], time_scale=scale)
    _write_sender(env, recipients_per_day=10)
    seed(db, tmp_path, 14)
    summary = _run(env, db, minutes=0.05)  # 3 s: far less than the scaled day
    assert (summary.dispatch.sent, summary.dispatch.failed) == (10, 0)
    assert statuses(db) == {"sent": 10, "queued": 4}
    assert sb.stats()["throttled_recipients"] == 0
    assert len(sb.sent()) == 10
