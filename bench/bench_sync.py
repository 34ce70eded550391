"""Benchmark: stage sync of N customers (default 10,000) against the sandbox at its limits.

The sandbox's Partner Center allows ``--pc-per-minute`` requests per (scaled) minute and each
customer tenant's directory ``100`` per (scaled) 10 s; ``--time-scale`` shortens those windows
the way the mail limits are shortened. Every customer has accepted, half have an active CSP
subscription; sync reads Partner Center (pages + one subscriptions call each) and each
customer's tenant (a token per tenant + two directory reads). Target: <= 60 s, 0 failures from
throttling, memory flat (peak RSS for N vs N/5 customers).

    .venv/bin/python bench/bench_sync.py [--customers 10000] [--time-scale 0.02]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from comms.campaign import load_campaign  # noqa: E402
from comms.config import load_settings  # noqa: E402
from comms.delivery.auth import forget_token_providers  # noqa: E402
from comms.sandbox import Sandbox  # noqa: E402
from comms.services import customers as customer_service  # noqa: E402
from comms.store.db import open_database  # noqa: E402
from comms.sync.service import run_sync  # noqa: E402

CLIENT_ID = "b5c0ffee-0000-4000-8000-00000000b5c0"
SECRET = "bench-only-secret"


def one(n: int, time_scale: float, pc_per_minute: int, concurrency: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sb = Sandbox(work / "sandbox", time_scale=time_scale,
                     pc_requests_per_minute=pc_per_minute).start()
        try:
            sb.register_app(CLIENT_ID, secret=SECRET, roles=("Organization.Read.All",))
            path = work / "c.csv"
            with path.open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["key", "name", "tenant_id", "primary_domain", "licences", "stage",
                            "primary_contact_email"])
                for i in range(n):
                    tid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench:{i}"))
                    sb.add_customer_tenant(tid, f"c{i}.example", f"C{i}",
                                           direct_licences=10 + i % 30)
                    sb.tenant_change(tid, "accept_relationship")
                    if i % 2:
                        sb.tenant_change(tid, "activate_csp", quantity=10)
                    w.writerow([f"K{i:05d}", f"C{i}", tid, f"c{i}.example", 10 + i % 30,
                                "invited", f"a@c{i}.example"])
            env = {
                "COMMS_HOME": str(work), "COMMS_DATABASE_URL": f"sqlite:///{work / 'c.db'}",
                "COMMS_GRAPH_BASE_URL": sb.graph_url,
                "COMMS_GRAPH_AUTHORITY_HOST": sb.authority_host,
                "COMMS_GRAPH_TENANT_ID": sb.tenant_id, "COMMS_GRAPH_CLIENT_ID": CLIENT_ID,
                "COMMS_GRAPH_CA_FILE": str(sb.ca_file), "COMMS_GRAPH_AUTH": "secret",
                "COMMS_GRAPH_CLIENT_SECRET": SECRET, "COMMS_DELIVERY_TIME_SCALE": str(time_scale),
                "COMMS_SYNC_PARTNER_CENTER": "true", "COMMS_SYNC_CUSTOMER_TENANTS": "true",
                "COMMS_SYNC_PARTNER_CENTER_URL": sb.base_url,
                "COMMS_SYNC_CONCURRENCY": str(concurrency), "COMMS_SYNC_MAX_ATTEMPTS": "50",
            }
            settings = load_settings(env=env)
            campaign = load_campaign()
            db = open_database(settings.database_url())
            customer_service.import_customers(db, path, settings=settings, campaign=campaign,
                                              now=datetime.now(UTC), by="bench")
            forget_token_providers()
            start = time.perf_counter()
            report = run_sync(db, settings, campaign, now=datetime.now(UTC))
            seconds = time.perf_counter() - start
            stats = sb.sync_stats()
            db.dispose()
        finally:
            sb.stop()
    return {
        "customers": n, "seconds": seconds, "failed": report.count("failed"),
        "moved": report.count("moved"), "pc_throttled": stats["pc_throttled"],
        "directory_throttled": stats["directory_throttled"], "retries": report.retries,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--time-scale", type=float, default=0.02)
    ap.add_argument("--pc-per-minute", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(one(args.customers, args.time_scale, args.pc_per_minute, args.concurrency))
        return
    # Each size in its own process, so peak RSS is that size's own.
    for n in (args.customers // 5, args.customers):
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--customers", str(n), "--time-scale",
             str(args.time_scale), "--pc-per-minute", str(args.pc_per_minute),
             "--concurrency", str(args.concurrency)],
            capture_output=True, text=True, check=True, env=dict(os.environ),
        )
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
