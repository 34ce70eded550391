"""`comms send`, `comms run` and `comms worker`: the commands that send email."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from comms.cli import common, inbox_cmd
from comms.cli.common import console, err_console
from comms.errors import CommsError, ConfigError


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _parse_now(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--now {value!r} is not an ISO date/time; use e.g. 2026-12-01T09:30 or "
            "2026-12-01T09:30+01:00 (no zone means UTC)."
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _engine_parts(need_transport: bool = True) -> tuple[Any, Any, Any, Any, Any]:
    from comms.campaign import load_campaign
    from comms.delivery.factory import make_transport
    from comms.render import Renderer

    settings = common.settings()
    campaign = load_campaign(settings.campaign_file or None)
    renderer = Renderer(settings)
    transport = make_transport(settings) if need_transport else None
    return settings, campaign, renderer, transport, common.database()


def send(
    keys: list[str] = typer.Argument(None, help="Customer key(s). Or use --tag.", show_default=False),
    message: str = typer.Option(None, "--message", "-m", help="Send this message instead of what the stage calls for."),
    tag: str = typer.Option(None, "--tag", help="Send to every customer with this tag (a wave)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be sent; send nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    resend: bool = typer.Option(False, "--resend", help="Send a message again that was already sent (needs --note)."),
    note: str = typer.Option("", "--note", help="Why (required with --resend; recorded)."),
    now: str = typer.Option(None, "--now", help="Pretend it is this time (ISO); default: now."),
) -> None:
    """Send one customer (or a tagged group) what its stage calls for now, or a named message.

    Shows a summary and asks before sending. A message already sent is refused unless
    --resend --note WHY is given; the resend is recorded in the customer's audit trail.
    """
    from comms.outbox import Clock
    from comms.services import engine

    if resend and not note.strip():
        raise CommsError("--resend needs --note saying why; it is recorded in the audit trail.")
    if not keys and not tag:
        raise CommsError("Name a customer key, or a group with --tag.")
    settings, campaign, renderer, _, db = _engine_parts(need_transport=False)
    clock = Clock(_parse_now(now))
    at = clock.now()
    targets = list(keys or []) + (engine.tagged_keys(db, tag) if tag else [])
    prepared = []
    for key in targets:
        try:
            prepared += engine.prepare_send(
                db, settings, campaign, renderer, key, now=at, message=message,
                resend_note=note if resend else None,
            )
        except CommsError as exc:
            if not tag:
                raise
            err_console.print(f"skip {key}: {exc}", highlight=False, markup=False)
    if not prepared:
        raise CommsError("Nothing to send.")
    table = Table("customer", "message", "#", "to", "subject", title="About to send")
    for p in prepared:
        table.add_row(p.customer.key, p.planned.message, str(p.planned.sequence),
                      ", ".join(c.email for c in p.planned.to), p.subject)
    console.print(table)
    if dry_run:
        console.print(f"Dry run: {len(prepared)} message(s) would be sent; nothing was sent.")
        return
    common.confirm_or_abort(f"Send {len(prepared)} message(s)?", yes)
    from comms.delivery.factory import make_transport

    ids = engine.queue_prepared(db, prepared, by=common.actor(), now=at)
    report = engine.dispatch_ids(db, settings, make_transport(settings), ids, clock=clock,
                                 worker=_worker_id())
    console.print(f"sent {report.sent}, failed {report.failed}, unknown {report.unknown}, "
                  f"throttled (retried) {report.throttled}")
    for mid, key, msg, why in report.failures:
        err_console.print(f"failed: #{mid} {key} {msg}: {why}", highlight=False, markup=False)
    if report.failed:
        raise typer.Exit(1)
    if report.sent < len(ids):
        console.print("Some messages are still queued or unknown; `comms run` finishes them.")


def run(
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and forecast; queue and send nothing."),
    now: str = typer.Option(None, "--now", help="Simulated time (ISO); default: now."),
    limit: int = typer.Option(None, "--limit", min=0, help="Send at most N messages this run."),
    max_minutes: float = typer.Option(50.0, "--max-minutes", min=0.0, help="Stop dispatching after M minutes (queued mail waits for the next run)."),
    tag: str = typer.Option(None, "--tag", help="Only customers with this tag (a marketing wave)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    inbox: bool = typer.Option(False, "--inbox", help="Read replies and bounces first (`comms inbox sync`); also [inbox] on_run."),
) -> None:
    """The scheduled run (cron / systemd timer): plan what is due, queue it, send it.

    Exit codes: 0 all well; 1 a message failed; 2 configuration error; 3 another run holds the
    database. Re-running never sends anything twice.
    """
    from comms.outbox import Clock
    from comms.services import engine

    settings, campaign, renderer, transport, db = _engine_parts(need_transport=not dry_run)
    clock = Clock(_parse_now(now))
    inbox_cmd.before_run(inbox, dry_run=dry_run, now=clock.now(), quiet=as_json)
    interactive = common.is_tty() and not as_json
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=not interactive)
    plan_task = progress.add_task("planning", total=None)
    send_task = progress.add_task("sending", total=None, visible=False)

    def on_queued(q: engine.QueueReport) -> None:
        progress.update(plan_task, completed=q.customers, total=q.customers)
        progress.update(send_task, total=q.queued or None, visible=not dry_run)
        if not interactive and not as_json:
            typer.echo(f"planned {q.customers} customer(s): {q.queued} queued, "
                       f"{q.deferred} deferred to the send window")

    last_log = [0.0]

    def on_progress(r: Any) -> None:
        progress.update(send_task, completed=r.sent + r.failed)
        if not interactive and not as_json and time.monotonic() - last_log[0] > 10:
            last_log[0] = time.monotonic()
            typer.echo(f"sent {r.sent}, failed {r.failed}, throttled {r.throttled}")

    with progress:
        summary = engine.run(
            db, settings, campaign, renderer, transport, clock=clock, worker=_worker_id(),
            tag=tag, dry_run=dry_run, limit=limit, max_minutes=max_minutes, on_queued=on_queued,
            on_progress=on_progress,
            plan_progress=lambda n: progress.advance(plan_task, n),
        )
    _print_summary(summary, settings, as_json)
    raise typer.Exit(summary.exit_code)


def _print_summary(summary: Any, settings: Any, as_json: bool) -> None:
    q, d = summary.queue, summary.dispatch
    data = {
        "dry_run": summary.dry_run,
        "customers_planned": q.customers,
        "queued": q.queued,
        "deferred_to_window": q.deferred,
        "by_message": dict(q.by_message),
        "sent": d.sent,
        "throttled": d.throttled,
        "failed": d.failed,
        "unknown": d.unknown,
        "withdrawn": d.withdrawn,
        "moved_to_next_window": d.deferred,
        "confirmed_in_sent_items": d.confirmed,
        "resent_after_check": d.requeued,
        "held_for_operator": d.held,
        "failures": [{"id": i, "customer": k, "message": m, "error": e}
                     for i, k, m, e in d.failures],
        "still_pending": dict(summary.pending),
    }
    if summary.dry_run:
        data["forecast_minutes"] = round(summary.forecast_minutes, 1)
        data["daily_cap_reached"] = summary.daily_cap_reached
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    if summary.dry_run:
        total = summary.pending.get("queued", 0)
        per_day = sum(x.recipients_per_day for x in settings.senders)
        cap = "reached: some mail waits for tomorrow" if summary.daily_cap_reached else "not reached"
        typer.echo(
            f"Dry run: {q.queued} message(s) would be queued for {q.customers} customer(s) "
            f"({q.deferred} deferred to the send window). {total:,} message(s), "
            f"{len(settings.senders)} sender mailbox(es): about "
            f"{_human_minutes(summary.forecast_minutes)}; {per_day:,}/day cap {cap}. "
            "Nothing was queued or sent."
        )
        for msg, n in sorted(q.by_message.items()):
            typer.echo(f"  {msg}: {n}")
        return
    typer.echo(
        f"queued {q.queued}, sent {d.sent}, deferred to the send window {q.deferred}, "
        f"throttled {d.throttled} (retried), failed {d.failed}, unknown {d.unknown}"
        + (f", confirmed in Sent Items {d.confirmed}" if d.confirmed else "")
        + (f", re-sent after check {d.requeued}" if d.requeued else "")
        + (f", held for an operator {d.held}" if d.held else "")
        + (f", moved to the next send window {d.deferred}" if d.deferred else "")
    )
    for mid, key, msg, why in d.failures:
        typer.echo(f"  failed #{mid} {key} {msg}: {why}", err=True)
    pend = {k: v for k, v in summary.pending.items() if v}
    if pend:
        typer.echo("still pending: " + ", ".join(f"{k} {v}" for k, v in sorted(pend.items())))


def _human_minutes(minutes: float) -> str:
    if minutes < 1:
        return "less than a minute"
    if minutes < 90:
        return f"{minutes:.0f} minutes"
    return f"{minutes / 60:.1f} hours"


def worker(
    once: bool = typer.Option(False, "--once", help="Drain what is due now, then exit."),
    max_minutes: float = typer.Option(0.0, "--max-minutes", min=0.0, help="Stop after M minutes (0: run until stopped)."),
    now: str = typer.Option(None, "--now", help="Simulated time (ISO), as given to `comms run --now`; default: now."),
) -> None:
    """Dispatch queued messages; run several (on one host or many) against one PostgreSQL
    database. Workers share each sender mailbox's limits through the database."""
    from comms.outbox import Clock, Dispatcher

    settings, campaign, _, transport, db = _engine_parts()
    clock = Clock(_parse_now(now))
    dispatcher = Dispatcher(db, settings, transport, clock=clock, worker=_worker_id(),
                            window=campaign.window)
    end = time.monotonic() + (max_minutes * 60 if max_minutes else 10 * 365 * 86400)
    total_sent = total_failed = 0
    while time.monotonic() < end:
        report = dispatcher.run(deadline=min(end, time.monotonic() + 60))
        total_sent += report.sent
        total_failed += report.failed
        if report.sent or report.failed:
            typer.echo(f"sent {report.sent}, failed {report.failed}, unknown {report.unknown}")
        if once:
            break
        time.sleep(1.0)
    typer.echo(f"worker done: sent {total_sent}, failed {total_failed}")
    raise typer.Exit(1 if total_failed else 0)


def register(app: typer.Typer) -> None:
    app.command("send")(send)
    app.command("run")(run)
    app.command("worker")(worker)


