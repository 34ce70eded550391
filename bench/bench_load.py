"""Issue 19's scenario as a benchmark: many `comms worker` processes (plus one `comms run`) on
one ledger, several sender mailboxes, the sandbox with and without faults. Reports the rate
each mailbox achieved as a fraction of Exchange's allowed rate (goal: >= 0.95 without faults,
>= 0.8 with 10 % 5xx), duplicates (must be 0) and the sandbox's most requests in flight.

    .venv/bin/python bench/bench_load.py [--workers 8] [--mailboxes 4] [--messages 400]
        [--time-scale 0.25] [--database-url postgresql://...]

Without --database-url it uses a SQLite file (one writer at a time: PostgreSQL is what many
workers are for). The rate is measured on the sandbox's clock, per mailbox, two ways: over the
whole run (first to last accepted message) and in the steady state (from the 10th to the 90th
percentile of its accepted messages). A finite batch ends in a tail that is not pacing: with
faults, the last resends wait out the reconcile grace (Exchange may still be working on an
unclear request; never shorter than the server-side bound) while nothing else is queued.
With faults, the 5xx attempts use the mailbox's rate too (Exchange counts requests), so 10 %
5xx caps the accepted rate near 0.9.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

from comms.campaign import load_campaign
from comms.config import load_settings
from comms.sandbox import Sandbox
from comms.services import customers as customer_service
from comms.store.db import open_database

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
SECRET = "bench-only-sandbox-secret"
CLIENT_ID = "b3nc4000-0000-4000-8000-000000000019"


def _seed(path: Path, n: int) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "time_zone", "stage", "primary_contact_email"])
        for i in range(n):
            w.writerow([f"L{i:06d}", f"Load {i}", 10, "Europe/London", "invited",
                        f"admin@l{i}.example"])
    return path


def _fresh_pg(admin_url: str) -> str:
    import psycopg

    name = f"bench_load_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def _rate(times: list[datetime], first: int, last: int) -> float:
    """Accepted messages per second between the ``first`` and ``last`` of ``times``."""
    span = (times[last] - times[first]).total_seconds() if last > first else 0.0
    return (last - first) / span if span else 0.0


def measure(args: argparse.Namespace, faults: dict[str, float], work: Path) -> dict[str, object]:
    senders = [f"load{i}@fabrikam.example" for i in range(args.mailboxes)]
    url = (_fresh_pg(args.database_url) if args.database_url
           else f"sqlite:///{work / 'load.db'}")
    with Sandbox(work / "sandbox", time_scale=args.time_scale) as sb:
        for s in senders:
            sb.add_mailbox(s)
        sb.register_app(CLIENT_ID, secret=SECRET)
        sb.set_faults(seed=19, **faults)
        config = work / "load.toml"
        config.write_text("".join(f'[[senders]]\naddress = "{s}"\n\n' for s in senders))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COMMS_")},
            "COMMS_CONFIG": str(config), "COMMS_HOME": str(work / "home"),
            "COMMS_DATABASE_URL": url, "COMMS_GRAPH_BASE_URL": sb.graph_url,
            "COMMS_GRAPH_AUTHORITY_HOST": sb.authority_host,
            "COMMS_GRAPH_TENANT_ID": sb.tenant_id, "COMMS_GRAPH_CLIENT_ID": CLIENT_ID,
            "COMMS_GRAPH_CA_FILE": str(sb.ca_file), "COMMS_GRAPH_AUTH": "secret",
            "COMMS_GRAPH_CLIENT_SECRET": SECRET, "COMMS_GRAPH_TIMEOUT_SECONDS": "2",
            "COMMS_GRAPH_RECONCILE_GRACE_SECONDS": "0.5",
            "COMMS_DELIVERY_TIME_SCALE": str(args.time_scale),
            "COMMS_DELIVERY_MAX_CONSECUTIVE_UNKNOWN": "1000",
        }
        settings = load_settings(config, env=env)
        db = open_database(settings.database_url())
        customer_service.import_customers(db, _seed(work / "c.csv", args.messages),
                                          settings=settings, campaign=load_campaign(),
                                          now=T0, by="bench")
        db.dispose()
        comms = [sys.executable, "-m", "comms"]
        subprocess.run([*comms, "run", "--now", T0.isoformat(), "--limit", "0"], env=env,
                       check=True, capture_output=True)
        started = time.monotonic()
        procs = [subprocess.Popen([*comms, "run", "--now", T0.isoformat(), "--max-minutes", "5"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
        procs += [subprocess.Popen([*comms, "worker", "--once", "--max-minutes", "5", "--now",
                                    T0.isoformat()], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE) for _ in range(args.workers)]
        for p in procs:
            p.wait(timeout=600)
        wall = time.monotonic() - started
        by_box: dict[str, list[datetime]] = defaultdict(list)
        for rec in sb.sent():
            by_box[rec["sender"]].append(datetime.fromisoformat(rec["received_at"]))
        accepted = Counter(rec["send_id"] for rec in sb.sent())
        stats = sb.stats()
    allowed = 30 / (60 * args.time_scale)
    fractions, steady = [], []
    for times in by_box.values():
        times.sort()
        fractions.append(_rate(times, 0, len(times) - 1) / allowed)
        steady.append(_rate(times, len(times) // 10, len(times) * 9 // 10) / allowed)
    return {
        "faults": ", ".join(f"{k}={v}" for k, v in faults.items()) or "none",
        "accepted": sum(accepted.values()),
        "duplicates": sum(v - 1 for v in accepted.values() if v > 1),
        "min_fraction": min(fractions) if fractions else 0.0,
        "mean_fraction": sum(fractions) / len(fractions) if fractions else 0.0,
        "min_steady": min(steady) if steady else 0.0,
        "mean_steady": sum(steady) / len(steady) if steady else 0.0,
        "max_in_flight": max(stats["max_in_flight_per_mailbox"].values() or [0]),
        "concurrency_429": stats["throttled_concurrency"],
        "wall_s": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--mailboxes", type=int, default=4)
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--time-scale", type=float, default=0.25)
    ap.add_argument("--database-url", default=os.environ.get("COMMS_BENCH_DATABASE_URL", ""))
    args = ap.parse_args()
    print(f"{args.workers} workers + 1 run, {args.mailboxes} mailboxes, {args.messages} "
          f"messages, time scale {args.time_scale} (allowed "
          f"{30 / (60 * args.time_scale):.1f}/s per mailbox), "
          f"{'PostgreSQL' if args.database_url else 'SQLite'}")
    print(f"{'faults':<18} {'accepted':>8} {'dupes':>5} {'whole min/mean':>14} "
          f"{'steady min/mean':>15} {'max in flight':>13} {'conc 429':>8} {'wall s':>7}")
    for faults in ({}, {"error_rate": 0.1}):
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(args, faults, Path(tmp))
        whole = f"{r['min_fraction']:.3f}/{r['mean_fraction']:.3f}"
        steady = f"{r['min_steady']:.3f}/{r['mean_steady']:.3f}"
        print(f"{r['faults']:<18} {r['accepted']:>8} {r['duplicates']:>5} {whole:>14} "
              f"{steady:>15} {r['max_in_flight']:>13} {r['concurrency_429']:>8} "
              f"{r['wall_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
