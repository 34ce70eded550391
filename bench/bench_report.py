"""Benchmark: `comms report` on a 10,000-customer ledger with ~50,000 messages (target < 5 s).

Builds the ledger in a temporary SQLite file (batched inserts), then times
  1. the real command, `python -m comms report --out FILE --now ...`, as a fresh process
     (interpreter start, imports, migrations check, figures, HTML, write), best of --runs;
  2. the service call `build_report` in this process (figures + HTML only).

    .venv/bin/python bench/bench_report.py [--customers 10000] [--runs 3] [--append-docs]

--append-docs appends the result to docs/benchmarks.md under "Report on 10,000 customers".
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from comms.campaign import load_campaign  # noqa: E402
from comms.config import Settings  # noqa: E402
from comms.services.report import build_report  # noqa: E402
from comms.store.db import open_database  # noqa: E402
from comms.store.models import Customer, Message  # noqa: E402

NOW = datetime(2026, 3, 4, 15, 0, tzinfo=UTC)
STAGES = (  # (stage, weight)
    ("imported", 10), ("announced", 10), ("invited", 30), ("approved", 10),
    ("awaiting_cancellation", 25), ("completed", 15),
)
STATUS_MIX = ("sent",) * 90 + ("queued",) * 5 + ("failed",) * 2 + ("unknown",) + \
    ("withdrawn",) * 2


def build_ledger(url: str, customers: int, seed: int = 7) -> int:
    """Fill the database with ``customers`` customers and ~5 messages each; return messages."""
    rng = random.Random(seed)
    db = open_database(url)
    names, weights = zip(*STAGES, strict=True)
    cust_rows = []
    for i in range(customers):
        stage = rng.choices(names, weights)[0]
        entered = NOW - timedelta(days=rng.uniform(0, 40))
        cust_rows.append({
            "id": i + 1, "key": f"CUST{i:05d}", "name": f"Customer {i:05d} & Co <Ltd>",
            "tenant_id": "", "primary_domain": f"c{i}.example", "licences": rng.randint(1, 300),
            "locale": "en", "time_zone": "Europe/London", "stage": stage,
            "stage_entered_at": entered, "paused": rng.random() < 0.03,
            "opted_out": rng.random() < 0.01, "lost": rng.random() < 0.01,
            "account_manager_name": "", "account_manager_email": "",
            "csp_live_at": entered if stage == "awaiting_cancellation" else None,
            "next_due_at": None, "created_at": entered, "updated_at": entered,
        })
    msg_rows = []
    for c in cust_rows:
        for seq in range(rng.randint(3, 7)):
            status = rng.choice(STATUS_MIX)
            at = NOW - timedelta(days=rng.uniform(0, 45))
            msg_rows.append({
                "send_id": uuid.uuid4().hex, "customer_id": c["id"],
                "message": "partner_invitation_reminder" if seq else "partner_invitation",
                "sequence": seq, "stage": c["stage"], "internal": False, "status": status,
                "to_json": f'[{{"address": "it@c{c["id"]}.example", "name": "IT"}}]',
                "cc_json": "[]", "reply_to": "", "subject": "Your move to CSP",
                "html": "<p>Hello</p>" * 20, "text": "Hello " * 40, "locale": "en",
                "sender": "transition@fabrikam.example", "send_after": at - timedelta(hours=1),
                "attempts": 1, "last_error": "", "error_code": "", "claimed_by": "",
                "unknown_since": at if status == "unknown" else None,
                "sent_at": at if status == "sent" else None, "request_id": "", "note": "",
                "created_at": at - timedelta(hours=1), "updated_at": at, "lease_until": None,
            })
    with db.engine.begin() as conn:
        for start in range(0, len(cust_rows), 1000):
            conn.execute(sa.insert(Customer.__table__), cust_rows[start:start + 1000])  # type: ignore[attr-defined]
        for start in range(0, len(msg_rows), 1000):
            conn.execute(sa.insert(Message.__table__), msg_rows[start:start + 1000])  # type: ignore[attr-defined]
    db.dispose()
    return len(msg_rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--append-docs", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        t0 = time.perf_counter()
        n_messages = build_ledger(url, args.customers)
        print(f"ledger: {args.customers:,} customers, {n_messages:,} messages "
              f"in {time.perf_counter() - t0:.1f} s")

        out = Path(tmp) / "report.html"
        env = {**os.environ, "COMMS_DATABASE_URL": url, "COMMS_HOME": tmp}
        env.pop("COMMS_CONFIG", None)
        cli_times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "comms", "report", "--out", str(out),
                 "--now", NOW.isoformat()],
                check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL,
            )
            cli_times.append(time.perf_counter() - t0)
        size = out.stat().st_size

        db = open_database(url)
        campaign = load_campaign(None)
        service_times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            build_report(db, Settings(), campaign, NOW)
            service_times.append(time.perf_counter() - t0)
        db.dispose()

    best_cli, best_service = min(cli_times), min(service_times)
    verdict = "meets" if best_cli < 5 else "MISSES"
    print(f"comms report (fresh process): best {best_cli:.2f} s of {args.runs} "
          f"({', '.join(f'{t:.2f}' for t in cli_times)}) -> {verdict} the 5 s target")
    print(f"build_report (in process):    best {best_service:.2f} s")
    print(f"report size: {size:,} bytes")

    if args.append_docs:
        docs = REPO / "docs" / "benchmarks.md"
        section = (
            "\n## Report on 10,000 customers\n\n"
            f"`bench/bench_report.py`: {args.customers:,} customers and {n_messages:,} messages "
            "in a temporary SQLite file; `comms report --out report.html` run as a fresh "
            f"process, best of {args.runs}. Target: under 5 s.\n\n"
            "| measure | result |\n|---|---|\n"
            f"| `comms report` (fresh process: start-up, figures, HTML, write) | "
            f"{best_cli:.2f} s ({verdict} the target) |\n"
            f"| `build_report` in process (figures + HTML) | {best_service:.2f} s |\n"
            f"| report file size | {size / 1e6:.1f} MB |\n\n"
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.machine()}, "
            f"{os.cpu_count()} cores shared with other work, Python "
            f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}.\n"
        )
        # Other benchmarks append their own sections: append only, never rewrite the file.
        docs.parent.mkdir(parents=True, exist_ok=True)
        tail = docs.read_bytes()[-1:] if docs.exists() else b""
        with docs.open("a", encoding="utf-8") as fh:
            if not tail:
                fh.write("# Benchmarks\n")
            elif tail != b"\n":
                fh.write("\n")
            fh.write(section)
        print(f"appended to {docs}")


if __name__ == "__main__":
    main()
