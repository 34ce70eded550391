#!/usr/bin/env python3
"""Set everything up and run one job. Needs only Python >= 3.11.

    python3 scripts/run.py demo    # venv + install, then the main job on embedded defaults
    python3 scripts/run.py test    # venv + install, then layer contracts, lint, types, sizes and
                                   # the whole test suite

`test` runs the suite on SQLite, then again on a throwaway PostgreSQL cluster on a loopback port
when PostgreSQL's server binaries are installed (required when CI=1 or COMMS_REQUIRE_ALL=1).
Extra arguments after `test` go to pytest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def sh(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, env=env)


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 (this script may be run by an old python3)
        sys.exit("comms needs Python 3.11 or newer")
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    # The tested versions (constraints.txt) on every machine; installed again whenever the
    # dependencies (pyproject.toml) or the pins (constraints.txt) change.
    stamp = VENV / ".installed"
    wanted = _install_key()
    if not stamp.exists() or stamp.read_text(encoding="utf-8") != wanted:
        sh(PY, "-m", "pip", "install", "--quiet", "-c", "constraints.txt", "-e", ".[dev]")
        stamp.write_text(wanted, encoding="utf-8")


def _install_key() -> str:
    """A digest of what decides the installed packages."""
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return candidates[0].parent if candidates else None


class Postgres:
    """A throwaway PostgreSQL cluster in a temp dir, listening on loopback only."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="comms-pg-"))
        self.port = _free_port()
        self.user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *cmd: str) -> None:
        full = [str(self.bindir / cmd[0]), *cmd[1:]]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            shutil.chown(self.dir, "postgres")
            full = ["runuser", "-u", "postgres", "--", *full]
        subprocess.run(full, check=True, stdout=subprocess.DEVNULL)

    def __enter__(self) -> str:
        data = self.dir / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(self.dir / "log"), "-w", "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            "start",
        )
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def __exit__(self, *exc: object) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def test(args: list[str]) -> int:
    setup()
    # The whole suite: plain `pytest` leaves out the `slow` marker (the full crash trials).
    if not any(a == "-m" or a.startswith("-m") for a in args):
        args = ["-m", "slow or not slow", *args]
    # The layer contracts first (pyproject [tool.importlinter]): an upward import fails the build.
    sh(BIN / "lint-imports")
    sh(BIN / "ruff", "check", "comms", "tests", "bench", "scripts")
    sh(BIN / "mypy", "comms")
    sh(PY, ROOT / "scripts" / "check_sizes.py")
    env = dict(os.environ)
    env.pop("COMMS_TEST_POSTGRES_URL", None)
    print("== test suite on SQLite ==", flush=True)
    sh(PY, "-m", "pytest", "-p", "no:cacheprovider", *args, env=env)
    bindir = _pg_bin()
    require_all = bool(os.environ.get("CI") or os.environ.get("COMMS_REQUIRE_ALL"))
    if bindir is None:
        if require_all:
            print("PostgreSQL server binaries not found; CI requires them", file=sys.stderr)
            return 1
        print("PostgreSQL not installed: skipping the PostgreSQL pass (CI runs it)")
        return 0
    with Postgres(bindir) as url:
        print(f"== test suite on PostgreSQL ({url}) ==", flush=True)
        env["COMMS_TEST_POSTGRES_URL"] = url
        sh(PY, "-m", "pytest", "-p", "no:cacheprovider", *args, env=env)
    return 0


def demo(args: list[str]) -> int:
    setup()
    sh(BIN / "comms", "demo", *args)
    return 0


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    job, args = sys.argv[1], sys.argv[2:]
    started = time.monotonic()
    try:
        if job == "setup":
            setup()
            return 0
        return demo(args) if job == "demo" else test(args)
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    finally:
        print(f"({job} took {time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
