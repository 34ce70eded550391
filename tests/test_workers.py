"""Several `comms worker` processes sharing one database and two sender mailboxes: nothing is
sent twice, and together they stay within each mailbox's rate and concurrency limits.
On PostgreSQL (CI's second pass) claims use FOR UPDATE SKIP LOCKED; on SQLite the write lock."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import (
    T0,
    assert_exactly_once,
    popen_comms,
    run_comms,
    sandbox_env,
    seed,
    statuses,
)

from comms.sandbox import Sandbox
from comms.store.db import Database

SENDERS = ["transition@fabrikam.example", "transition2@fabrikam.example"]
SCALE = 0.02  # a "minute" of 1.2 s: 25 messages a second per mailbox
PER_MINUTE = 30


def _max_in_any_window(times: list[datetime], window: timedelta) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_four_workers_two_mailboxes_no_duplicate_and_limits_held(
    tmp_path: Path, db: Database, database_url: str, sandbox_factory: Any
) -> None:
    sb: Sandbox = sandbox_factory(time_scale=SCALE)
    sb.set_faults(latency=0.01)
    n = 150
    seed(db, tmp_path, n)
    env = sandbox_env(sb, tmp_path, database_url, senders=SENDERS, time_scale=SCALE,
                      grace=0.5, timeout=2.0, lease=5.0)
    # Plan and queue only; the workers send.
    queued = run_comms(env, "run", "--now", T0.isoformat(), "--limit", "0")
    assert queued.returncode == 0, queued.stderr
    assert f"queued {n}, sent 0" in queued.stdout
    workers = [popen_comms(env, "worker", "--once", "--max-minutes", "2",
                           "--now", T0.isoformat()) for _ in range(4)]
    outputs = [w.communicate(timeout=180) for w in workers]
    for w, (out, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, out + err
    # A request that timed out on a busy machine is found in Sent Items afterwards: sent once.
    done = [out.rsplit("worker done: ", 1)[1] for out, _ in outputs]
    sent_by_workers = sum(int(d.split("sent ", 1)[1].split(",")[0]) for d in done)
    found_by_workers = sum(int(d.split("found in Sent Items ", 1)[1].split(",")[0]) for d in done)
    assert sent_by_workers + found_by_workers == n
    assert sum(1 for out, _ in outputs if "worker done: sent 0," not in out) >= 2, \
        "the work should be shared"
    assert_exactly_once(db, sb, expected=n)
    stats = sb.stats()
    assert stats["throttled_concurrency"] == 0
    assert all(v <= 4 for v in stats["max_in_flight_per_mailbox"].values())
    # The sandbox's own clock: never more than 30 accepted per (scaled) minute per mailbox.
    by_box: dict[str, list[datetime]] = defaultdict(list)
    for rec in sb.sent():
        by_box[rec["sender"]].append(datetime.fromisoformat(rec["received_at"]))
    assert set(by_box) == set(SENDERS)
    for box, times in by_box.items():
        assert _max_in_any_window(times, timedelta(seconds=60 * SCALE)) <= PER_MINUTE, box
    assert stats["throttled_rate"] <= 2  # arrival jitter at most; never a failure


def _stop_mid_run(tmp_path: Path, db: Database, database_url: str, sandbox_factory: Any,
                  sig: int, *args: str) -> tuple[int, str, Any]:
    sb: Sandbox = sandbox_factory(time_scale=SCALE)
    sb.set_faults(latency=0.3)  # every request is in flight for a while
    n = 40
    seed(db, tmp_path, n)
    env = sandbox_env(sb, tmp_path, database_url, senders=SENDERS, time_scale=SCALE,
                      grace=0.5, timeout=2.0, lease=5.0)
    if args[0] == "worker":
        queued = run_comms(env, "run", "--now", T0.isoformat(), "--limit", "0")
        assert queued.returncode == 0, queued.stderr
    proc = popen_comms(env, *args, "--now", T0.isoformat())
    deadline = time.monotonic() + 60
    while len(sb.sent()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out + err, sb


def _assert_clean_stop(db: Database, sb: Any, output: str) -> None:
    st = statuses(db)
    assert "sending" not in st, st  # every request in flight finished and was recorded
    assert st["sent"] == len(sb.sent()) and 0 < st["sent"] < 40, st
    assert st["sent"] + st["queued"] == 40
    assert "Traceback" not in output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_stops_cleanly_on_a_signal(
    sig: int, tmp_path: Path, db: Database, database_url: str, sandbox_factory: Any
) -> None:
    code, output, sb = _stop_mid_run(tmp_path, db, database_url, sandbox_factory, sig,
                                     "worker", "--max-minutes", "2")
    assert code == 0, output
    assert "worker stopped on request" in output and "worker done: sent " in output
    _assert_clean_stop(db, sb, output)


def test_run_stops_cleanly_on_sigterm(
    tmp_path: Path, db: Database, database_url: str, sandbox_factory: Any
) -> None:
    code, output, sb = _stop_mid_run(tmp_path, db, database_url, sandbox_factory,
                                     signal.SIGTERM, "run", "--max-minutes", "2")
    assert code == 0, output
    assert "stopped on request" in output and "queued 40, sent " in output
    _assert_clean_stop(db, sb, output)
