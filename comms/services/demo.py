"""The demo: the sample customers walked through the whole transition against the local sandbox,
on a simulated clock, showing what was sent to whom. The README's first command runs it.

It is also the scenario of the end-to-end test, which checks the sandbox's record against what
each customer's history calls for. It is the one service allowed to import ``comms.sandbox`` (the
import-linter contract names this exception); no other service imports this module, only the
`comms demo` command and the tests do.
"""

from __future__ import annotations

import shutil
import sys
from collections import defaultdict
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from comms.campaign import Campaign, load_campaign
from comms.config import Settings, load_settings
from comms.delivery.base import Transport
from comms.delivery.factory import make_transport
from comms.domain import MessageStatus
from comms.errors import UsageError
from comms.outbox import Clock
from comms.paths import examples_dir
from comms.render import Renderer
from comms.sandbox import Sandbox
from comms.services import customers as customer_service
from comms.services import engine
from comms.store.db import Database, open_database

# Monday, 30 November 2026, midnight UTC: day 0 of the simulated transition.
START = datetime(2026, 11, 30, 0, 0, tzinfo=UTC)
# Runs every 4 hours reach every customer's local business hours (Tokyo to New York).
RUN_EVERY = timedelta(hours=4)
DAYS = 30
TIME_SCALE = 0.01  # Exchange's "minute" lasts 0.6 s in the sandbox: the demo takes seconds
CLIENT_ID = "0d3c5a1e-7b6f-4e1a-9c2d-5f8e7a6b4c3d"
SENDERS = ("transition@fabrikam.example", "transition2@fabrikam.example")


@dataclass(frozen=True)
class Step:
    day: float
    action: str  # a stage name, or pause / opt_out
    keys: tuple[str, ...]
    note: str = ""


@dataclass
class DemoResult:
    workdir: Path
    database_url: str
    sandbox_dir: Path
    steps: list[tuple[datetime, str]] = field(default_factory=list)
    ended_at: datetime = START
    runs: int = 0
    sent: int = 0
    failed: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)


def scenario(keys: list[str]) -> list[Step]:
    """Who moves when: most customers complete, some stall, one pauses, one opts out."""
    keys = sorted(keys)
    n = len(keys)
    a = tuple(keys[: n // 2])  # fast movers
    b = tuple(keys[n // 2 : n // 2 + n // 3])  # slower; the first opts out, the last stalls
    c = tuple(keys[n // 2 + n // 3 :])  # never approve during the demo; the first pauses
    return [
        Step(0, "announced", tuple(keys)),
        Step(2, "invited", tuple(keys)),
        Step(3, "pause", c[:1], "customer asked us to wait until January"),
        Step(4, "approved", a),
        Step(5, "awaiting_cancellation", a),
        Step(6, "opt_out", b[:1], "asked to receive no more email"),
        Step(9, "approved", b[1:]),
        Step(10, "awaiting_cancellation", b[1:]),
        Step(12, "completed", a),
        Step(20, "completed", b[1:-1]),
    ]


def demo_settings(sandbox: Sandbox, workdir: Path, secret_file: Path) -> Settings:
    env = {
        "COMMS_HOME": str(workdir),
        "COMMS_DATABASE_URL": f"sqlite:///{workdir / 'comms.db'}",
        "COMMS_GRAPH_BASE_URL": sandbox.graph_url,
        "COMMS_GRAPH_AUTHORITY_HOST": sandbox.authority_host,
        "COMMS_GRAPH_TENANT_ID": sandbox.tenant_id,
        "COMMS_GRAPH_CLIENT_ID": CLIENT_ID,
        "COMMS_GRAPH_CA_FILE": str(sandbox.ca_file),
        "COMMS_GRAPH_AUTH": "secret",
        "COMMS_GRAPH_CLIENT_SECRET_FILE": str(secret_file),
        "COMMS_GRAPH_RECONCILE_GRACE_SECONDS": "1",
        "COMMS_GRAPH_TIMEOUT_SECONDS": "10",
        "COMMS_DELIVERY_TIME_SCALE": str(TIME_SCALE),
    }
    settings = load_settings(workdir / "demo.toml", env=env)
    return settings


def _write_config(workdir: Path) -> Path:
    path = workdir / "demo.toml"
    lines = ["# Written by `comms demo`: two sender mailboxes, everything else default.\n"]
    for address in SENDERS:
        lines.append(f'[[senders]]\naddress = "{address}"\nname = "Fabrikam Transition Team"\n')
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


MARKER = ".comms-demo"  # written into every folder the demo creates; only those are ever wiped


def prepare_workdir(workdir: Path) -> None:
    """Make ``workdir`` empty for a fresh demo without ever deleting someone's files: a missing
    or empty folder is used, a folder with the demo's marker (an earlier demo) is wiped, any
    other folder is refused."""
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--dir {workdir} is a file, not a folder; choose a new folder.")
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise UsageError(
                f"--dir {workdir} is not empty and was not created by `comms demo` (it has no "
                f"{MARKER} marker); nothing was deleted. Choose a new or empty folder."
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("created by `comms demo`; the demo may wipe this folder\n",
                                  encoding="utf-8")


def run_demo(
    workdir: Path,
    *,
    csv_path: Path | None = None,
    echo: Callable[[str], None] = print,
    days: int = DAYS,
) -> DemoResult:
    """Run the whole simulated transition in ``workdir`` (wiped first, only if the demo made
    it: see ``prepare_workdir``)."""
    prepare_workdir(workdir)
    sandbox_dir = workdir / "sandbox"
    csv_path = csv_path or examples_dir() / "customers.csv"
    _write_config(workdir)
    secret = "demo-secret-" + workdir.name  # sandbox-only secret; never a real credential
    secret_file = workdir / "client_secret.txt"
    secret_file.write_text(secret, encoding="utf-8")
    secret_file.chmod(0o600)

    with Sandbox(sandbox_dir, time_scale=TIME_SCALE) as sandbox:
        for address in SENDERS:
            sandbox.add_mailbox(address)
        sandbox.register_app(CLIENT_ID, secret=secret)
        settings = demo_settings(sandbox, workdir, secret_file)
        campaign = load_campaign(settings.campaign_file or None)
        db = open_database(settings.database_url())
        result = DemoResult(workdir, settings.database_url(), sandbox_dir)
        try:
            _simulate(db, settings, campaign, csv_path, result, echo, days)
        finally:
            db.dispose()
        result.received = sandbox.sent()
    return result


def _simulate(
    db: Database, settings: Settings, campaign: Campaign, csv_path: Path,
    result: DemoResult, echo: Callable[[str], None], days: int,
) -> None:
    imported = customer_service.import_customers(
        db, csv_path, settings=settings, campaign=campaign, now=START, by="demo"
    )
    echo(f"Imported {imported.created} customers from {csv_path.name}.")
    keys = [c.key for c in customer_service.list_customers(db)]
    steps = sorted(scenario(keys), key=lambda s: s.day)
    renderer = Renderer(settings)
    with closing(make_transport(settings)) as transport:
        _run_days(db, settings, campaign, renderer, transport, steps, result, echo, days)


def _run_days(
    db: Database, settings: Settings, campaign: Campaign, renderer: Renderer,
    transport: Transport, steps: list[Step], result: DemoResult, echo: Callable[[str], None],
    days: int,
) -> None:
    t = START
    end = START + timedelta(days=days)
    pending = list(steps)
    while t <= end:
        while pending and START + timedelta(days=pending[0].day) <= t:
            step = pending.pop(0)
            _apply(db, campaign, step, t)
            what = f"{step.action} for {len(step.keys)} customer(s)"
            result.steps.append((t, what))
            echo(f"{t:%a %d %b %H:%M} UTC  {what}")
        summary = engine.run(db, settings, campaign, renderer, transport, clock=Clock(t),
                             worker="demo", max_minutes=2)
        result.runs += 1
        result.sent += summary.dispatch.sent
        result.failed += summary.dispatch.failed
        if summary.dispatch.sent:
            by_msg = ", ".join(f"{m} {n}" for m, n in sorted(summary.queue.by_message.items()))
            echo(f"{t:%a %d %b %H:%M} UTC  sent {summary.dispatch.sent}: {by_msg}")
        result.ended_at = t
        t += RUN_EVERY


def _apply(db: Database, campaign: Campaign, step: Step, at: datetime) -> None:
    if step.action in ("pause", "opt_out"):
        for key in step.keys:
            customer_service.side_action(db, key, step.action,  # type: ignore[arg-type]
                                         now=at, by="demo", note=step.note, source="demo")
        return
    customer_service.set_stage(db, campaign, list(step.keys), step.action, now=at, by="demo",
                               note=step.note or "demo scenario", source="demo")


def report_lines(result: DemoResult) -> list[str]:
    """Per customer: its recipients and every message it received, on the simulated clock."""
    from sqlmodel import col, select

    from comms.store.models import Customer, Message

    accepted = {r.get("send_id"): r for r in result.received}
    db = open_database(result.database_url)
    try:
        with db.session() as s:
            rows = s.exec(
                select(Message, Customer)
                .join(Customer, col(Customer.id) == col(Message.customer_id))
                .where(Message.status == MessageStatus.SENT)
                .order_by(col(Customer.key), col(Message.created_at), col(Message.id))
            ).all()
    finally:
        db.dispose()
    grouped: dict[str, list[tuple[Message, Customer]]] = defaultdict(list)
    for m, c in rows:
        grouped[c.key].append((m, c))
    lines = []
    for key, items in grouped.items():
        c = items[0][1]
        flags = [f for f in ("paused", "opted_out") if getattr(c, f)]
        state = c.stage + (f" ({', '.join(flags)})" if flags else "")
        lines.append(f"{key} {c.name} [{c.licences} licences, {state}]")
        for m, _ in items:
            rec = accepted.get(m.send_id, {})
            to = ", ".join(rec.get("to", []))
            cc = f" cc {', '.join(rec['cc'])}" if rec.get("cc") else ""
            seq = f" #{m.sequence}" if m.sequence else ""
            when = m.created_at.strftime("%a %d %b %H:%M")
            lines.append(f"  {when}  {m.message}{seq} -> {to}{cc}")
    send_ids = [r.get("send_id") for r in result.received]
    dupes = len(send_ids) - len(set(send_ids))
    lines.append("")
    lines.append(
        f"{len(result.received)} messages accepted by the sandbox Graph in {result.runs} "
        f"scheduled runs; duplicates: {dupes}; failed: {result.failed}."
    )
    lines.append(f"Every message as .eml: {result.sandbox_dir / 'eml'}")
    exe = sys.argv[0] if Path(sys.argv[0]).name == "comms" else "comms"
    when = result.ended_at.strftime("%Y-%m-%dT%H:%M")
    lines.append(f"Explore the ledger (the demo's clock ended at {when} UTC):")
    lines.append(f"  export COMMS_HOME={result.workdir}")
    lines.append(f"  {exe} customers list; {exe} customers show CUST-0020; "
                 f"{exe} outbox list --status sent")
    lines.append(f"  {exe} status --now {when}; {exe} report --out report.html --now {when}")
    return lines
