"""Finding the due work among 1,000,000 customers (target: <= 50 ms).

    .venv/bin/python bench/bench_due.py [--customers 1000000] [--due-share 0.01]

Builds a SQLite ledger (through the real migrations) with N customers spread over the stages and
next-due times, ~due-share of them due now, then times the query `comms run` uses to find them
(`comms.services.engine.due_customers_query`): the first batch and the whole due set, median of
several runs, and shows SQLite's query plan (it must use ix_customers_stage_next_due).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from comms.campaign import load_campaign
from comms.services.engine import ID_BATCH, due_batches, due_customers_query
from comms.store.db import open_database

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
INSERT = (
    "INSERT INTO customers (key, name, stage, stage_entered_at, next_due_at, created_at, "
    "updated_at, tenant_id, primary_domain, licences, locale, time_zone, paused, opted_out, "
    "lost, account_manager_name, account_manager_email) "
    "VALUES (?,?,?,?,?,?,?,'','',10,'en','Europe/London',0,0,0,'','')"
)


def build(path: Path, n: int, due_share: float) -> None:
    db = open_database(f"sqlite:///{path}")
    stages = ["imported", "announced", "invited", "approved", "awaiting_cancellation", "completed"]
    rng = random.Random(7)
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    t0 = NOW.replace(tzinfo=None)
    with db.engine.begin() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        rows = []
        for i in range(n):
            if rng.random() < due_share:
                due = (t0 - timedelta(minutes=rng.randint(1, 600))).strftime(fmt)
            elif rng.random() < 0.5:
                due = (t0 + timedelta(hours=rng.randint(1, 24 * 20))).strftime(fmt)
            else:
                due = None  # nothing scheduled (waiting on the customer)
            created = t0.strftime(fmt)
            rows.append((f"C{i:07d}", f"Customer {i}", rng.choice(stages), created, due,
                         created, created))
            if len(rows) == 10_000 or i == n - 1:
                raw.executemany(INSERT, rows)
                rows = []
        conn.exec_driver_sql("ANALYZE")
    db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--due-share", type=float, default=0.01)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "due.db"
        t = time.perf_counter()
        build(path, args.customers, args.due_share)
        print(f"built {args.customers:,} customers in {time.perf_counter() - t:.1f}s")
        db = open_database(f"sqlite:///{path}")
        campaign = load_campaign()
        first = due_customers_query("invited", NOW)
        with db.session() as s:
            sql = str(first.compile(db.engine, compile_kwargs={"literal_binds": True}))
            plan = s.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + sql).all()
            print("plan:", "; ".join(str(r[-1]) for r in plan))
        timings_first, timings_all = [], []
        n_due = 0
        for _ in range(args.repeat):
            t = time.perf_counter()
            with db.session() as s:
                s.exec(first).all()
            timings_first.append(time.perf_counter() - t)
            t = time.perf_counter()
            n_due = sum(len(batch) for batch in due_batches(db, campaign, NOW))
            timings_all.append(time.perf_counter() - t)
        db.dispose()
        print(f"due customers: {n_due:,}")
        first_ms = statistics.median(timings_first) * 1000
        print(f"first query ({ID_BATCH} ids max): median {first_ms:.1f} ms")
        print(f"all due ids: median {statistics.median(timings_all) * 1000:.1f} ms "
              "(target <= 50 ms)")


if __name__ == "__main__":
    main()
