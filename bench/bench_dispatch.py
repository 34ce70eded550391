"""Sustained dispatch rate against the sandbox, as a fraction of Exchange's allowed rate
(target >= 0.95 for 1, 2, 5 and 10 sender mailboxes), with no failure from throttling.

    .venv/bin/python bench/bench_dispatch.py [--time-scale 0.1] [--seconds 20]
        [--mailboxes 1 2 5 10]

Time is scaled in both the sandbox and comms (a Graph "minute" of 60 * time-scale seconds), so a
30-per-minute mailbox allows 30 / (60 * time-scale) messages a second. The real `comms run` code
path (plan, render, queue, pace, send over HTTPS with msal + requests, record) runs in-process
against SQLite. The rate is measured on the sandbox's clock, per mailbox, from its first to its
last accepted message.
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from comms.campaign import load_campaign
from comms.config import load_settings
from comms.delivery.factory import make_transport
from comms.outbox import Clock
from comms.render import Renderer
from comms.sandbox import Sandbox
from comms.services import customers as customer_service
from comms.services import engine
from comms.store.db import open_database

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)  # a Tuesday, inside the send window
SECRET = "bench-only-sandbox-secret"
CLIENT_ID = "b3nc4000-0000-4000-8000-000000000001"


def seed_csv(path: Path, n: int) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "time_zone", "stage", "primary_contact_email"])
        for i in range(n):
            w.writerow([f"B{i:06d}", f"Bench {i}", 10, "Europe/London", "invited",
                        f"admin@b{i}.example"])
    return path


def measure(mailboxes: int, time_scale: float, seconds: float, work: Path) -> dict[str, float]:
    per_second = 30 / (60 * time_scale)
    n = int(per_second * mailboxes * seconds)
    senders = [f"sender{i}@fabrikam.example" for i in range(mailboxes)]
    with Sandbox(work / "sandbox", time_scale=time_scale) as sb:
        for s in senders:
            sb.add_mailbox(s)
        sb.register_app(CLIENT_ID, secret=SECRET)
        config = work / "bench.toml"
        config.write_text("".join(f'[[senders]]\naddress = "{s}"\n\n' for s in senders))
        settings = load_settings(config, env={
            "COMMS_DATABASE_URL": f"sqlite:///{work / 'bench.db'}",
            "COMMS_GRAPH_BASE_URL": sb.graph_url,
            "COMMS_GRAPH_AUTHORITY_HOST": sb.authority_host,
            "COMMS_GRAPH_TENANT_ID": sb.tenant_id,
            "COMMS_GRAPH_CLIENT_ID": CLIENT_ID,
            "COMMS_GRAPH_CA_FILE": str(sb.ca_file),
            "COMMS_GRAPH_AUTH": "secret",
            "COMMS_GRAPH_CLIENT_SECRET": SECRET,
            "COMMS_DELIVERY_TIME_SCALE": str(time_scale),
        })
        db = open_database(settings.database_url())
        campaign = load_campaign()
        customer_service.import_customers(db, seed_csv(work / "c.csv", n), settings=settings,
                                     campaign=campaign, now=T0, by="bench")
        started = time.monotonic()
        summary = engine.run(db, settings, campaign, Renderer(settings), make_transport(settings),
                             clock=Clock(T0), worker="bench", max_minutes=seconds / 60 * 4)
        wall = time.monotonic() - started
        db.dispose()
        by_box: dict[str, list[datetime]] = defaultdict(list)
        for rec in sb.sent():
            by_box[rec["sender"]].append(datetime.fromisoformat(rec["received_at"]))
        stats = sb.stats()
    fractions = []
    for times in by_box.values():
        times.sort()
        span = (times[-1] - times[0]).total_seconds()
        # n messages span n - 1 intervals
        fractions.append(((len(times) - 1) / span) / per_second if span else 0.0)
    return {
        "mailboxes": mailboxes,
        "messages": n,
        "sent": summary.dispatch.sent,
        "failed": summary.dispatch.failed,
        "throttled": summary.dispatch.throttled,
        "sandbox_429": stats["throttled_rate"] + stats["throttled_concurrency"],
        "allowed_per_s": per_second * mailboxes,
        "min_fraction": min(fractions) if fractions else 0.0,
        "mean_fraction": sum(fractions) / len(fractions) if fractions else 0.0,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--time-scale", type=float, default=0.1)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--mailboxes", type=int, nargs="+", default=[1, 2, 5, 10])
    args = ap.parse_args()
    print(f"time scale {args.time_scale} (a Graph minute = {60 * args.time_scale:.1f} s), "
          f"~{args.seconds:.0f} s of sending per configuration")
    print(f"{'mailboxes':>9} {'messages':>8} {'sent':>5} {'failed':>6} {'429s':>5} "
          f"{'allowed/s':>9} {'min frac':>8} {'mean frac':>9} {'wall s':>7}")
    worst = 1.0
    for m in args.mailboxes:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(m, args.time_scale, args.seconds, Path(tmp))
        worst = min(worst, r["min_fraction"])
        print(f"{r['mailboxes']:>9} {r['messages']:>8} {r['sent']:>5} {r['failed']:>6} "
              f"{r['sandbox_429']:>5} {r['allowed_per_s']:>9.1f} {r['min_fraction']:>8.3f} "
              f"{r['mean_fraction']:>9.3f} {r['wall_s']:>7.1f}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"worst mailbox fraction {worst:.3f} (target >= 0.95); peak RSS {rss:.0f} MB")
    sys.exit(0 if worst >= 0.95 else 1)


if __name__ == "__main__":
    main()
