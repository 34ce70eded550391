"""Render 100,000 messages (subject + text + HTML with CSS inlined): the fast path (premailer once
per template skeleton) against render-then-premailer per message.

    .venv/bin/python bench/bench_render.py [--count 100000] [--slow-sample 300]

The per-message premailer path takes ~15 minutes for 100,000, so it is measured on
--slow-sample messages and extrapolated (printed as such). Customers cycle through licence
counts on both sides of the threshold, day counts and reminder numbers, across the customer
messages of the default campaign.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comms.config import Settings
from comms.domain import ContactInfo, CustomerInfo
from comms.render import Renderer, build_context

MESSAGES = ["kickoff", "partner_invitation", "partner_invitation_reminder", "lose_access_warning",
            "cancel_instructions", "cancel_reminder", "transition_complete"]
NOW = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)


def customers(n: int) -> list[CustomerInfo]:
    out = []
    for i in range(n):
        out.append(CustomerInfo(
            key=f"cust-{i:06d}", name=f"Customer {i} & Partners Ltd", licences=5 + i % 40,
            stage="awaiting_cancellation", stage_entered_at=NOW,
            locale="de" if i % 10 == 0 else "en", tenant_id=f"tenant-{i}",
            primary_domain=f"c{i}.example",
            contacts=(ContactInfo(f"Admin {i}", f"admin@c{i}.example"),),
            csp_live_at=NOW - timedelta(days=i % 30),
        ))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--slow-sample", type=int, default=300)
    args = ap.parse_args()
    settings = Settings()
    cs = customers(args.count)
    jobs = [(MESSAGES[i % len(MESSAGES)], c, 1 + i % 3) for i, c in enumerate(cs)]

    renderer = Renderer(settings)
    t0, c0 = time.perf_counter(), time.process_time()
    size = 0
    for message, c, reminder in jobs:
        size += len(renderer.render(message, c, now=NOW, reminder_number=reminder).html)
    fast_wall, fast_cpu = time.perf_counter() - t0, time.process_time() - c0

    slow_renderer = Renderer(settings)
    sample = jobs[: args.slow_sample]
    t0, c0 = time.perf_counter(), time.process_time()
    for message, c, reminder in sample:
        ctx = build_context(settings, c, message=message, now=NOW, reminder_number=reminder)
        slow_renderer.render_context(message, c.locale, ctx, fast=False)
    slow_wall, slow_cpu = time.perf_counter() - t0, time.process_time() - c0
    per_slow = slow_wall / len(sample)

    print(f"python {platform.python_version()} on {platform.machine()}, "
          f"{args.count:,} messages, mean HTML {size // args.count:,} bytes, "
          f"{len(renderer._skeletons)} skeletons inlined")
    print(f"fast path   : {fast_wall:7.2f} s wall ({fast_cpu:.2f} s CPU), "
          f"{fast_wall / args.count * 1e6:6.1f} us/message")
    print(f"per message : {per_slow * args.count:7.1f} s wall extrapolated from "
          f"{len(sample)} messages ({slow_cpu / len(sample) * 1e3:.2f} ms CPU, "
          f"{per_slow * 1e3:.2f} ms wall each)")
    print(f"speed-up    : {per_slow * args.count / fast_wall:5.0f}x")


if __name__ == "__main__":
    main()
