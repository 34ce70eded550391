"""Queue one step for N customers (plan + render + inline CSS + persist), target 100,000 in
<= 15 s, stored outbox content <= 2.5 KB per message, and a scheduled run's memory flat.

    .venv/bin/python bench/bench_queue.py --all            # the issue 16 figures, one command
    .venv/bin/python bench/bench_queue.py [--customers 100000] [--profile]
    .venv/bin/python bench/bench_queue.py --memory 10000 100000   # one process per size
    .venv/bin/python bench/bench_queue.py --bytes 7000     # default campaign's message mix
    .venv/bin/python bench/bench_queue.py --customers 20000 --run-only   # the run's own CPU

Customers are imported (not timed) into a SQLite ledger in stage `invited`; then the code
`comms run` uses (`engine.plan_and_queue`) plans every due customer, renders its
partner_invitation and inserts the outbox rows, 2,500 customers per transaction. The memory
mode runs each size in a fresh process and reports the peak RSS growth during planning + queueing.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import pstats
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


def stored_bytes(db: object) -> tuple[float, float]:
    """Average bytes of frozen content per outbox row (subject + bodies, as stored) and the
    average size of the whole row's values, read back from the ledger."""
    import sqlalchemy as sa

    with db.engine.connect() as conn:  # type: ignore[attr-defined]
        cols = {c["name"] for c in sa.inspect(conn).get_columns("messages")}
        content = ("length(subject) + length(body)" if "body" in cols
                   else "length(CAST(subject AS BLOB)) + length(CAST(html AS BLOB))"
                        " + length(CAST(text AS BLOB))")
        row = " + ".join(f"coalesce(length(CAST({c} AS BLOB)), 0)" if c != "body"
                         else "length(body)" for c in sorted(cols))
        got = conn.execute(sa.text(f"SELECT avg({content}), avg({row}) FROM messages")).one()
    return float(got[0] or 0), float(got[1] or 0)


def campaign_bytes(n: int) -> dict[str, float]:
    """Raw and stored content bytes per message over the default campaign's customer messages
    (the mix bench_render.py uses: both sides of the threshold, reminders 1-3, 10 % German)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_render import MESSAGES, NOW, customers

    from comms.config import Settings
    from comms.render import Renderer
    from comms.store import bodies

    renderer = Renderer(Settings())
    raw = stored = plain = 0
    import zlib

    for i, c in enumerate(customers(n)):
        e = renderer.render(MESSAGES[i % len(MESSAGES)], c, now=NOW, reminder_number=1 + i % 3)
        subject = len(e.subject.encode())
        both = e.html.encode() + e.text.encode()
        raw += subject + len(both)
        stored += subject + len(bodies.encode(e.html, e.text))
        plain += subject + len(zlib.compress(both, 6))
    return {"messages": n, "raw": raw / n, "stored": stored / n, "zlib6_no_dict": plain / n}


def _without_rendering() -> None:
    """Measurement only: every chunk "renders" to one constant body at once, so what is left
    is the run's own work (read, plan, build rows, insert, commit)."""
    from concurrent.futures import Future

    from comms.services import queue_render

    class Constant:
        def __init__(self, *args: object) -> None:
            pass

        def submit(self, jobs: list[object]) -> Future[list[object]]:
            done: Future[list[object]] = Future()
            done.set_result([queue_render.Rendered("subject", "en", b"x" * 780) for _ in jobs])
            return done

        def ready(self) -> bool:
            return True

        def close(self) -> None:
            pass

    queue_render.LocalRenderer = Constant  # type: ignore[assignment,misc]
    queue_render.ProcessRenderer = Constant  # type: ignore[assignment,misc]


def _breakdown() -> dict[str, float]:
    """Measurement only: wall seconds spent in each part of the run's own work (the parts'
    own functions wrapped; the database's calls counted inside them too)."""
    import sqlalchemy.engine.default as dialects

    from comms import outbox, planner
    from comms.services import engine

    spent: dict[str, float] = {}

    def wrap(owner: object, name: str, label: str) -> None:
        real = getattr(owner, name)
        spent[label] = 0.0

        def timed(*args: object, **kwargs: object) -> object:
            t = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - t

        setattr(owner, name, timed)

    wrap(engine, "load_customers", "read customers (load_customers)")
    wrap(engine, "load_history", "read history (load_history)")
    wrap(planner, "plan", "plan (planner.plan)")
    wrap(engine, "_row", "build rows (_row)")
    wrap(outbox, "queue_messages", "insert rows (queue_messages)")
    wrap(dialects.DefaultDialect, "do_commit", "  of which: commit")
    wrap(dialects.DefaultDialect, "do_executemany", "  of which: executemany (SQLite itself)")
    wrap(dialects.DefaultDialect, "do_execute", "  of which: execute (SQLite itself)")
    return spent


def one(n: int, profile: bool = False, processes: int = 0) -> dict[str, float]:
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
        settings = load_settings(env={"COMMS_DATABASE_URL": f"sqlite:///{work / 'q.db'}",
                                      "COMMS_TEMPLATES_RENDER_PROCESSES": str(processes)})
        db = open_database(settings.database_url())
        campaign = load_campaign()
        customer_service.import_customers(db, path, settings=settings, campaign=campaign, now=T0,
                                     by="bench")
        renderer = Renderer(settings)
        renderer.render  # noqa: B018 (templates compile lazily; the run pays that once)
        before = _rss_mb()
        prof = cProfile.Profile() if profile else None
        started, cpu = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        report = engine.plan_and_queue(db, settings, campaign, renderer, now=T0)
        if prof:
            prof.disable()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        grew = _rss_mb() - before
        content, row = stored_bytes(db)
        db.dispose()
        db_bytes = (work / "q.db").stat().st_size
    if prof:
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(15)
        # Where the queue path's time goes, inclusive: render, plan, load, rows, writes.
        stats.sort_stats("cumulative").print_stats(
            r"engine.py.*\((_row|_queue_batch|plan_and_queue)\)|planner.py.*\(plan\)"
            r"|queue_render.py.*\((render_one|submit)\)"
            r"|repo.py.*load_customers|outbox.py.*insert_messages|queue_render.py.*_encode"
            r"|\(commit\)|method 'execute' of|posix.urandom|method 'result'")
        print(buf.getvalue())
    return {"customers": n, "queued": report.queued, "seconds": elapsed,
            "per_second": report.queued / elapsed, "rss_growth_mb": grew, "cpu_s": cpu,
            "peak_rss_mb": _rss_mb(), "content_bytes": content, "row_bytes": row,
            "db_bytes_per_message": db_bytes / max(report.queued, 1),
            # The largest render worker process (0 when the run rendered in-process).
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _fresh(n: int, processes: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--customers", str(n), "--json",
                          "--processes", str(processes)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--memory", type=int, nargs="*", help="sizes to compare, one process each")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help="cProfile the queueing, top 15")
    ap.add_argument("--processes", type=int, default=0,
                    help="[templates] render_processes: 0 = automatic (default), 1 = in-process")
    ap.add_argument("--bytes", type=int, metavar="N",
                    help="stored bytes per message over N default-campaign messages")
    ap.add_argument("--run-only", action="store_true",
                    help="measurement: rendering replaced by a constant body (the run's own "
                         "read, plan, rows and writes)")
    ap.add_argument("--all", action="store_true",
                    help="bytes (7,000 messages), then 20,000 and 100,000 customers queued")
    args = ap.parse_args()
    if args.bytes or args.all:
        b = campaign_bytes(args.bytes or 7000)
        print(f"default campaign, {b['messages']:,} messages: content {b['raw']:,.0f} bytes raw, "
              f"{b['stored']:,.0f} stored (zlib without dictionary: {b['zlib6_no_dict']:,.0f}); "
              "target <= 2,500", flush=True)
        if not args.all:
            return
        args.memory = [20_000, 100_000]
    if args.memory:
        print(f"{'customers':>10} {'queued':>8} {'seconds':>8} {'msgs/s':>8} "
              f"{'RSS growth MB':>13} {'peak RSS MB':>11} {'worker RSS MB':>13} "
              f"{'content B':>9} {'row B':>6} {'file B/msg':>10}")
        for n in args.memory:
            r = _fresh(n, args.processes)
            print(f"{r['customers']:>10} {r['queued']:>8} {r['seconds']:>8.1f} "
                  f"{r['per_second']:>8.0f} {r['rss_growth_mb']:>13.1f} "
                  f"{r['peak_rss_mb']:>11.0f} {r['worker_peak_rss_mb']:>13.0f} "
                  f"{r['content_bytes']:>9.0f} {r['row_bytes']:>6.0f} "
                  f"{r['db_bytes_per_message']:>10.0f}", flush=True)
        return
    if args.run_only:
        _without_rendering()
    spent = _breakdown() if args.run_only else {}
    r = one(args.customers, profile=args.profile, processes=args.processes)
    if args.run_only:
        print(f"the run's own work for {r['customers']:,} customers, rendering left out: "
              f"{r['seconds']:.2f} s, {r['cpu_s'] / r['customers'] * 1e6:.0f} us of CPU a "
              "customer; where the time goes (us a customer):")
        for label, seconds in spent.items():
            print(f"  {label:42} {seconds / r['customers'] * 1e6:6.1f}")
        return
    if args.json:
        print(json.dumps(r))
        return
    print(f"queued {r['queued']:,} messages for {r['customers']:,} customers in "
          f"{r['seconds']:.1f} s ({r['per_second']:.0f}/s; target: 100,000 in <= 15 s); "
          f"RSS grew {r['rss_growth_mb']:.1f} MB while queueing (largest render worker: "
          f"{r['worker_peak_rss_mb']:.0f} MB); {r['content_bytes']:.0f} bytes "
          f"of content and {r['row_bytes']:.0f} of values per row, "
          f"{r['db_bytes_per_message']:.0f} bytes of SQLite file per message")


if __name__ == "__main__":
    main()
