"""Queue one step for N customers (plan + render + inline CSS + persist), target 100,000 in
<= 30 s, and show that a scheduled run's memory stays flat as customers grow.

    .venv/bin/python bench/bench_queue.py [--customers 100000]
    .venv/bin/python bench/bench_queue.py --memory 10000 100000   # one process per size

Customers are imported (not timed) into a SQLite ledger in stage `invited`; then the code
`comms run` uses (`engine.plan_and_queue`) plans every due customer, renders its
partner_invitation and inserts the outbox rows, 500 customers per transaction. The memory mode
runs each size in a fresh process and reports the peak RSS growth during planning + queueing.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(n: int) -> dict[str, float]:
    from comms.campaign import load_campaign
    from comms.config import load_settings
    from comms.render import Renderer
    from comms.services import customers as customer_service
    from comms.services import engine
    from comms.store.db import open_database

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "c.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["key", "name", "licences", "time_zone", "stage", "locale",
                        "primary_contact_name", "primary_contact_email"])
            for i in range(n):
                w.writerow([f"Q{i:07d}", f"Queue Customer {i} Ltd", 5 + i % 40, "Europe/London",
                            "invited", "de" if i % 10 == 0 else "en", f"Admin {i}",
                            f"admin@q{i}.example"])
        settings = load_settings(env={"COMMS_DATABASE_URL": f"sqlite:///{work / 'q.db'}"})
        db = open_database(settings.database_url())
        campaign = load_campaign()
        customer_service.import_customers(db, path, settings=settings, campaign=campaign, now=T0,
                                     by="bench")
        renderer = Renderer(settings)
        renderer.render  # noqa: B018 (templates compile lazily; the run pays that once)
        before = _rss_mb()
        started = time.perf_counter()
        report = engine.plan_and_queue(db, settings, campaign, renderer, now=T0)
        elapsed = time.perf_counter() - started
        grew = _rss_mb() - before
        db.dispose()
    return {"customers": n, "queued": report.queued, "seconds": elapsed,
            "per_second": report.queued / elapsed, "rss_growth_mb": grew,
            "peak_rss_mb": _rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--memory", type=int, nargs="*", help="sizes to compare, one process each")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory:
        print(f"{'customers':>10} {'queued':>8} {'seconds':>8} {'msgs/s':>8} "
              f"{'RSS growth MB':>13} {'peak RSS MB':>11}")
        for n in args.memory:
            out = subprocess.run([sys.executable, __file__, "--customers", str(n), "--json"],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{r['customers']:>10} {r['queued']:>8} {r['seconds']:>8.1f} "
                  f"{r['per_second']:>8.0f} {r['rss_growth_mb']:>13.1f} "
                  f"{r['peak_rss_mb']:>11.0f}", flush=True)
        return
    r = one(args.customers)
    if args.json:
        print(json.dumps(r))
        return
    print(f"queued {r['queued']:,} messages for {r['customers']:,} customers in "
          f"{r['seconds']:.1f} s ({r['per_second']:.0f}/s; target: 100,000 in <= 30 s); "
          f"RSS grew {r['rss_growth_mb']:.1f} MB while queueing")


if __name__ == "__main__":
    main()
