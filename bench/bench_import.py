"""Benchmark: import 100,000 customers from a CSV into a fresh SQLite ledger.

    .venv/bin/python bench/bench_import.py [ROWS]

Generates the CSV in a temporary folder (three contacts, tags, mixed locales and time zones per
row), imports it through the service (the same code path as `comms customers import`), then
re-imports it (nothing changes). Prints rows/s for both and the process's peak RSS; the result
goes in docs/benchmarks.md under "Import 100,000 customers".
"""

from __future__ import annotations

import csv
import resource
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from comms.campaign import load_campaign
from comms.config import Settings
from comms.services.importer import COLUMNS, import_customers
from comms.store.db import open_database

ZONES = ("Europe/London", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney")
LOCALES = ("en", "de", "fr", "en", "ja")


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def write_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i in range(rows):
            d = f"customer{i}.example"
            w.writerow([
                f"BENCH-{i:07d}", f"Customer {i} Ltd", str(uuid.UUID(int=i + 1)), d,
                str(i % 400), LOCALES[i % 5], ZONES[i % 5], "imported", "Priya Patel",
                "priya.patel@fabrikam.example", f"wave-{i % 4 + 1}|region-{i % 3}",
                f"Primary {i}", f"owner@{d}", "Accounts", f"billing@{d}", "IT", f"it@{d}",
            ])


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "customers.csv"
        write_csv(csv_path, rows)
        print(f"generated {rows:,} rows ({csv_path.stat().st_size / 1e6:.1f} MB); "
              f"peak RSS so far {peak_rss_mib():.0f} MiB")
        db = open_database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        settings, campaign = Settings(), load_campaign()
        for label in ("first import", "re-import (unchanged)"):
            started = time.perf_counter()
            result = import_customers(db, csv_path, settings=settings, campaign=campaign,
                                      now=datetime.now(UTC), by="bench")
            took = time.perf_counter() - started
            print(f"{label}: {result.rows:,} rows in {took:.1f} s = {result.rows / took:,.0f} "
                  f"rows/s (new {result.created:,}, unchanged {result.unchanged:,}); "
                  f"peak RSS {peak_rss_mib():.0f} MiB")
        db.dispose()


if __name__ == "__main__":
    main()
