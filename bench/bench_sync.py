"""Benchmark: stage sync of N customers (default 10,000) against the sandbox at its limits.

The sandbox's Partner Center allows ``--pc-per-minute`` requests per (scaled) minute and each
customer tenant's directory ``100`` per (scaled) 10 s; ``--time-scale`` shortens those windows
the way the mail limits are shortened. Every customer has accepted, half have an active CSP
subscription; sync reads Partner Center (pages + one subscriptions call each) and each
customer's tenant (a token per tenant + two directory reads, sent as one JSON batch). Target:
<= 60 s, 0 failures from throttling, memory flat: the RSS growth of the comms process during
the sync (its peak reset at the start, so the setup's import is not counted) and the largest
worker process's peak, for N vs N/5 customers.

The sandbox runs in its own process (``--sandbox-in-process`` puts it back in the benchmark's
process): the emulator's CPU is then not charged to comms, but on a 2-core machine the two
processes still compete for the same cores, so both processes' CPU seconds are reported.

    .venv/bin/python bench/bench_sync.py [--customers 10000] [--time-scale 0.02]
        [--concurrency 16] [--processes 0] [--sizes N,M,...] [--auth secret|certificate]
        [--profile FILE]
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

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


def tenant_of(i: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench:{i}"))


def populate(sb: Sandbox, n: int, cert_pem: bytes) -> None:
    sb.register_app(CLIENT_ID, secret=SECRET, certificate_pem=cert_pem,
                    roles=("Organization.Read.All",))
    for i in range(n):
        tid = tenant_of(i)
        sb.add_customer_tenant(tid, f"c{i}.example", f"C{i}", direct_licences=10 + i % 30)
        sb.tenant_change(tid, "accept_relationship")
        if i % 2:
            sb.tenant_change(tid, "activate_csp", quantity=10)


def _status_mb(pid: int | str, field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak since exec, or since ``_reset_peak``) of a process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> None:
    """Start this process's ``VmHWM`` again from its current RSS (Linux ``clear_refs`` 5), so
    the peak is the sync's, not the setup's (generating and importing the customers)."""
    Path("/proc/self/clear_refs").write_text("5")


class _WorkerPeaks:
    """The largest ``VmHWM`` of this process's children while the sync runs: its worker
    processes (``ru_maxrss`` of children is no measure: Linux keeps it across fork + exec,
    so a spawned worker starts with the parent's peak)."""

    def __init__(self, skip: set[int]) -> None:
        self.skip, self.peak, self._stop = skip, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for child in mp.active_children():
                if child.pid is not None and child.pid not in self.skip:
                    self.peak = max(self.peak, _status_mb(child.pid, "VmHWM"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def _cpu(who: int = resource.RUSAGE_SELF) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def serve(conn: Connection, state_dir: str, n: int, time_scale: float, pc_per_minute: int,
          cert_pem: bytes) -> None:
    """The sandbox's own process: start, populate, answer ``stats`` and ``stop``."""
    sb = Sandbox(Path(state_dir), time_scale=time_scale,
                 pc_requests_per_minute=pc_per_minute).start()
    populate(sb, n, cert_pem)
    conn.send({"base_url": sb.base_url, "graph_url": sb.graph_url,
               "authority_host": sb.authority_host, "tenant_id": sb.tenant_id,
               "ca_file": str(sb.ca_file)})
    while True:
        what = conn.recv()
        if what == "cpu":
            conn.send(_cpu())
        elif what == "stats":
            conn.send({**sb.sync_stats(), "cpu": _cpu(),
                       "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        else:
            sb.stop()
            conn.send("stopped")
            return


class InProcess:
    """The sandbox in the benchmark's own process (the old way, for comparison)."""

    def __init__(self, state_dir: Path, n: int, time_scale: float, pc_per_minute: int,
                 cert_pem: bytes) -> None:
        self.sb = Sandbox(state_dir, time_scale=time_scale,
                          pc_requests_per_minute=pc_per_minute).start()
        populate(self.sb, n, cert_pem)
        self.info = {"base_url": self.sb.base_url, "graph_url": self.sb.graph_url,
                     "authority_host": self.sb.authority_host, "tenant_id": self.sb.tenant_id,
                     "ca_file": str(self.sb.ca_file)}

    def cpu(self) -> float:
        return 0.0  # already in this process's CPU

    def stats(self) -> dict[str, Any]:
        return {**self.sb.sync_stats(), "cpu": 0.0, "rss_mb": 0.0}

    def stop(self) -> None:
        self.sb.stop()


class OwnProcess:
    def __init__(self, state_dir: Path, n: int, time_scale: float, pc_per_minute: int,
                 cert_pem: bytes) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, str(state_dir), n, time_scale,
                                                    pc_per_minute, cert_pem), daemon=True)
        self.proc.start()
        self.info: dict[str, str] = self.conn.recv()

    def cpu(self) -> float:
        self.conn.send("cpu")
        return float(self.conn.recv())

    def stats(self) -> dict[str, Any]:
        self.conn.send("stats")
        return dict(self.conn.recv())

    def stop(self) -> None:
        self.conn.send("stop")
        self.conn.recv()
        self.proc.join(timeout=10)


def _time_phases() -> dict[str, list[float]]:
    """Wall and CPU seconds spent recording (each page once read, while the next are read)."""
    import comms.sync.service as service

    out: dict[str, list[float]] = {}
    for name in ("_record",):
        inner = getattr(service, name)
        out[name] = [0.0, 0.0]

        def timed(*a: Any, _inner: Any = inner, _name: str = name, **k: Any) -> Any:
            wall, cpu = time.perf_counter(), _cpu()
            try:
                return _inner(*a, **k)
            finally:
                out[_name][0] += time.perf_counter() - wall
                out[_name][1] += _cpu() - cpu

        setattr(service, name, timed)
    return out


class _Inline:
    """A ThreadPoolExecutor that runs everything at once in the calling thread."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        pass

    def submit(self, fn: Any, *args: Any) -> Any:
        from concurrent.futures import Future

        done: Future[Any] = Future()
        done.set_result(fn(*args))
        return done

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def map(self, fn: Any, items: Any) -> Any:
        return map(fn, items)


def one(n: int, time_scale: float, pc_per_minute: int, concurrency: int, in_process: bool,
        profile: str | None, auth: str, processes: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cert_pem, key_pem, _ = Sandbox.make_certificate("comms-bench")
        (work / "cert.pem").write_bytes(cert_pem)
        (work / "key.pem").write_bytes(key_pem)
        kind = InProcess if in_process else OwnProcess
        sandbox = kind(work / "sandbox", n, time_scale, pc_per_minute, cert_pem)
        info = sandbox.info
        try:
            path = work / "c.csv"
            with path.open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["key", "name", "tenant_id", "primary_domain", "licences", "stage",
                            "primary_contact_email"])
                for i in range(n):
                    w.writerow([f"K{i:05d}", f"C{i}", tenant_of(i), f"c{i}.example",
                                10 + i % 30, "invited", f"a@c{i}.example"])
            env = {
                "COMMS_HOME": str(work), "COMMS_DATABASE_URL": f"sqlite:///{work / 'c.db'}",
                "COMMS_GRAPH_BASE_URL": info["graph_url"],
                "COMMS_GRAPH_AUTHORITY_HOST": info["authority_host"],
                "COMMS_GRAPH_TENANT_ID": info["tenant_id"], "COMMS_GRAPH_CLIENT_ID": CLIENT_ID,
                "COMMS_GRAPH_CA_FILE": info["ca_file"], "COMMS_GRAPH_AUTH": auth,
                "COMMS_GRAPH_CLIENT_SECRET": SECRET,
                "COMMS_GRAPH_CERTIFICATE_FILE": str(work / "cert.pem"),
                "COMMS_GRAPH_PRIVATE_KEY_FILE": str(work / "key.pem"),
                "COMMS_DELIVERY_TIME_SCALE": str(time_scale),
                "COMMS_SYNC_PARTNER_CENTER": "true", "COMMS_SYNC_CUSTOMER_TENANTS": "true",
                "COMMS_SYNC_PARTNER_CENTER_URL": info["base_url"],
                "COMMS_SYNC_CONCURRENCY": str(concurrency), "COMMS_SYNC_MAX_ATTEMPTS": "50",
                "COMMS_SYNC_PROCESSES": str(processes),
            }
            if os.environ.get("COMMS_BENCH_DATABASE_URL"):
                env["COMMS_DATABASE_URL"] = os.environ["COMMS_BENCH_DATABASE_URL"]
            settings = load_settings(env=env)
            campaign = load_campaign()
            db = open_database(settings.database_url())
            customer_service.import_customers(db, path, settings=settings, campaign=campaign,
                                              now=datetime.now(UTC), by="bench")
            forget_token_providers()
            profiler = None
            if profile:
                import cProfile

                import comms.sync.reading as reading

                # cProfile sees only its own thread: run the reads inline, one at a time, in
                # this process.
                reading.ThreadPoolExecutor = _Inline  # type: ignore[assignment,misc]
                reading.POOL_MIN_CUSTOMERS = n
                profiler = cProfile.Profile()
            phases = _time_phases()
            sandbox_cpu, cpu = sandbox.cpu(), _cpu()
            # Reaped children only: the sync's worker processes (the sandbox runs on).
            workers_cpu = _cpu(resource.RUSAGE_CHILDREN)
            _reset_peak()
            rss_before = _status_mb("self", "VmRSS")
            watcher = _WorkerPeaks({c.pid for c in mp.active_children() if c.pid})
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            # As a scheduled `comms run --sync` does: outcomes kept, not every customer's reads.
            report = run_sync(db, settings, campaign, now=datetime.now(UTC), keep_seen=False)
            if profiler:
                profiler.disable()
                profiler.dump_stats(profile)
            seconds = time.perf_counter() - start
            cpu = _cpu() - cpu
            workers_cpu = _cpu(resource.RUSAGE_CHILDREN) - workers_cpu
            workers_rss = watcher.stop()
            sync_peak = _status_mb("self", "VmHWM")
            stats = sandbox.stats()
            db.dispose()
        finally:
            sandbox.stop()
    return {
        "customers": n, "seconds": round(seconds, 2),
        "ms_per_customer": round(1000 * seconds / n, 2),
        "failed": report.count("failed"), "moved": report.count("moved"),
        "cannot_verify": report.count("cannot verify"),
        "pc_requests": stats["pc_requests"], "pc_throttled": stats["pc_throttled"],
        "directory_throttled": stats["directory_throttled"], "retries": report.retries,
        "read_s": round(seconds - phases["_record"][0], 2),
        "record_s": round(phases["_record"][0], 2),
        "record_cpu_s": round(phases["_record"][1], 1),
        "comms_cpu_s": round(cpu + workers_cpu, 1), "of_which_workers_cpu_s": round(workers_cpu, 1),
        "sandbox_cpu_s": round(stats["cpu"] - sandbox_cpu, 1) if not in_process else "in comms",
        # This process from the start of the sync: RSS before, peak during, the growth.
        "rss_before_mb": round(rss_before, 1), "sync_peak_rss_mb": round(sync_peak, 1),
        "rss_growth_mb": round(sync_peak - rss_before, 1),
        # The largest sync worker process (0 when the sync read in-process).
        "worker_peak_rss_mb": round(workers_rss, 1),
        "sandbox": "in process" if in_process else "own process", "auth": auth,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--sizes", default="", help="comma-separated sizes (default N/5,N)")
    ap.add_argument("--time-scale", type=float, default=0.02)
    ap.add_argument("--pc-per-minute", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--processes", type=int, default=0,
                    help="[sync] processes: 0 = one per CPU up to 4 (default), 1 = this process")
    ap.add_argument("--sandbox-in-process", action="store_true")
    ap.add_argument("--auth", choices=("secret", "certificate"), default="secret")
    ap.add_argument("--profile", default="", help="cProfile the sync into this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(one(args.customers, args.time_scale, args.pc_per_minute, args.concurrency,
                  args.sandbox_in_process, args.profile or None, args.auth, args.processes),
              flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",") if s] or [args.customers // 5, args.customers]
    # Each size in its own process, so peak RSS is that size's own.
    for n in sizes:
        cmd = [sys.executable, __file__, "--child", "--customers", str(n), "--time-scale",
               str(args.time_scale), "--pc-per-minute", str(args.pc_per_minute),
               "--concurrency", str(args.concurrency), "--auth", args.auth,
               "--processes", str(args.processes)]
        if args.sandbox_in_process:
            cmd.append("--sandbox-in-process")
        if args.profile:
            cmd += ["--profile", f"{args.profile}.{n}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env=dict(os.environ))
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
