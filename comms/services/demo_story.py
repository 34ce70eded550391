"""What `comms demo` prints: a line per thing that happened (a step, a bounce or reply read from
the Inbox, a stage moved by sync, what a run sent), then per customer what it received and the
commands to explore the ledger. Reads the ledger only; the sandbox stays in ``services.demo``."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from comms.campaign import Campaign
from comms.config import Settings
from comms.domain import MessageStatus
from comms.store.db import Database, open_database

# Monday, 30 November 2026, midnight UTC: day 0 of the simulated transition.
START = datetime(2026, 11, 30, 0, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Cast:
    """The customers with a part of their own in the story (None: too few customers)."""

    recount: str | None  # its tenant shows more assigned licences than the CSV says
    bounce: str | None  # one of its addresses is dead: the first email to it bounces
    unverified: str | None  # its admin never consented: sync cannot see its tenant


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
    cast: Cast = Cast(None, None, None)
    dead: str = ""  # the address that bounces
    sync_moves: list[tuple[datetime, str, str]] = field(default_factory=list)  # at, key, move
    cannot_verify: dict[str, str] = field(default_factory=dict)  # key -> why
    licence_changes: dict[str, tuple[int, int]] = field(default_factory=dict)
    inbound: list[tuple[datetime, str, str]] = field(default_factory=list)  # at, kind, key


def sent_counts(db: Database) -> dict[str, int]:
    """Messages accepted so far (sent, or bounced later), by message name."""
    from sqlalchemy import func
    from sqlmodel import col, select

    from comms.store.models import Message

    with db.session() as s:
        rows = s.exec(
            select(Message.message, func.count())
            .where(col(Message.status).in_([MessageStatus.SENT, MessageStatus.BOUNCED]))
            .group_by(col(Message.message))
        ).all()
    return {str(m): int(n) for m, n in rows}


def inbox_step(db: Database, settings: Settings, campaign: Campaign, t: datetime,
           result: DemoResult, echo: Callable[[str], None]) -> None:
    from sqlmodel import col, select

    from comms.inbox import service as inbox_service
    from comms.store.inbox_models import InboundMessage
    from comms.store.models import Customer

    got = inbox_service.sync(db, settings, campaign.inbox, now=t)
    if not got.new:
        return
    with db.session() as s:
        rows = s.exec(
            select(InboundMessage, Customer.key)
            .join(Customer, col(Customer.id) == col(InboundMessage.customer_id), isouter=True)
            .where(col(InboundMessage.processed_at) == t).order_by(col(InboundMessage.id))
        ).all()
    for m, key in rows:
        result.inbound.append((t, m.kind, key or ""))
        what = (f"bounce {m.status_code} for {m.address}" if m.kind == "bounce"
                else f"{m.kind} from {m.from_address}")
        echo(f"{t:%a %d %b %H:%M} UTC  inbox: {what} ({key or 'unmatched'}): "
             f"{m.effects or 'recorded'}")


def sync_step(db: Database, settings: Settings, campaign: Campaign, t: datetime,
          result: DemoResult, echo: Callable[[str], None]) -> None:
    from comms.sync.service import run_sync

    report = run_sync(db, settings, campaign, now=t)
    moves: dict[str, list[str]] = defaultdict(list)
    for c in report.customers:
        for move in c.moved:
            result.sync_moves.append((t, c.key, move))
            moves[move].append(c.key)
        if c.licences and c.key not in result.licence_changes:
            result.licence_changes[c.key] = c.licences
            echo(f"{t:%a %d %b %H:%M} UTC  sync: {c.key} licences {c.licences[0]} -> "
                 f"{c.licences[1]} (assigned in its tenant)")
        for source, problem in c.problems.items():
            if c.key not in result.cannot_verify:
                result.cannot_verify[c.key] = f"{source}: {problem}"
                # The problem names the HTTP answer in brackets; the story needs what and the fix.
                what = problem.split(" (", 1)[0]
                fix = problem.rsplit("); ", 1)[-1] if "); " in problem else ""
                fix = f"; {fix}" if fix else ""
                echo(f"{t:%a %d %b %H:%M} UTC  sync: {c.key} {what} ({source}){fix}")
    for move, keys in moves.items():
        echo(f"{t:%a %d %b %H:%M} UTC  sync: {few(keys)} {move}")
    if report.count("failed"):
        echo(f"{t:%a %d %b %H:%M} UTC  sync: {report.summary()}")


def few(keys: list[str]) -> str:
    if len(keys) <= 3:
        return ", ".join(keys)
    return f"{len(keys)} customers ({keys[0]} ... {keys[-1]})"


def story_lines(result: DemoResult) -> list[str]:
    """What sync and the inbox did, in a few lines."""
    moved = defaultdict(set)
    for _, key, move in result.sync_moves:
        moved[move.split(" (")[0].split(" -> ")[-1]].add(key)
    lines = []
    if moved:
        counts = "; ".join(f"{len(keys)} to {stage}" for stage, keys in moved.items())
        lines.append(f"Moved by stage sync (what Partner Center and the tenants showed): {counts}.")
    for key, (old, new) in sorted(result.licence_changes.items()):
        lines.append(f"Licences from the tenant: {key} has {new} assigned (the CSV said {old}).")
    for key, why in sorted(result.cannot_verify.items()):
        source, problem = why.split(": ", 1)
        reason = problem.split(" (", 1)[0].removeprefix("cannot verify: ")
        lines.append(f"Cannot verify in its tenant: {key} ({reason}; source {source}).")
    kinds = defaultdict(list)
    for _, kind, key in result.inbound:
        kinds[kind].append(key or "unmatched")
    if kinds:
        lines.append("Inbox: " + "; ".join(f"{kind} {', '.join(keys)}"
                                            for kind, keys in sorted(kinds.items())) + ".")
    return lines


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
                .where(col(Message.status).in_([MessageStatus.SENT, MessageStatus.BOUNCED]))
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
            bounced = (f"  [bounced {m.error_code}]" if m.status == MessageStatus.BOUNCED
                       else "")
            lines.append(f"  {when}  {m.message}{seq} -> {to}{cc}{bounced}")
    send_ids = [r.get("send_id") for r in result.received]
    dupes = len(send_ids) - len(set(send_ids))
    lines.append("")
    lines.append(
        f"{len(result.received)} messages accepted by the sandbox Graph in {result.runs} "
        f"scheduled runs; duplicates: {dupes}; failed: {result.failed}."
    )
    lines.extend(story_lines(result))
    lines.append(f"Every message as .eml: {result.sandbox_dir / 'eml'}")
    exe = sys.argv[0] if Path(sys.argv[0]).name == "comms" else "comms"
    when = result.ended_at.strftime("%Y-%m-%dT%H:%M")
    lines.append(f"Explore the ledger (the demo's clock ended at {when} UTC):")
    lines.append(f"  export COMMS_HOME={result.workdir}")
    lines.append(f"  {exe} customers list; {exe} outbox list --status sent; {exe} inbox list")
    who = result.cast
    for shown, why in ((who.recount, "licences from its tenant"), (who.bounce, "the bounce"),
                       (who.unverified, "cannot verify, its reply, completed by hand")):
        if shown:
            lines.append(f"  {exe} customers show {shown}   # {why}")
    lines.append(f"  {exe} status --now {when}; {exe} report --out report.html --now {when}")
    return lines
