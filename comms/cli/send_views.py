"""How `comms send` and `comms run` show their work: the run's progress bars and summary."""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from comms.cli.common import console, err_console, is_tty, safe, visible
from comms.config import Settings
from comms.services.sending import SendPlan


class RunProgress:
    """Progress bars on a terminal; one line every 10 s otherwise; nothing with --json."""

    def __init__(self, *, dry_run: bool, as_json: bool) -> None:
        self.dry_run, self.as_json = dry_run, as_json
        self.interactive = is_tty() and not as_json
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, disable=not self.interactive)
        self.plan_task = self.bars.add_task("planning", total=None)
        self.send_task = self.bars.add_task("sending", total=None, visible=False)
        self._last_log = 0.0

    def __enter__(self) -> RunProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(None, None, None)

    def planned(self, n: int) -> None:
        self.bars.advance(self.plan_task, n)

    def on_queued(self, q: Any) -> None:
        self.bars.update(self.plan_task, completed=q.customers, total=q.customers)
        self.bars.update(self.send_task, total=q.queued or None, visible=not self.dry_run)
        if not self.interactive and not self.as_json:
            typer.echo(f"planned {q.customers} customer(s): {q.queued} queued, "
                       f"{q.deferred} deferred to the send window")

    def on_progress(self, r: Any) -> None:
        self.bars.update(self.send_task, completed=r.sent + r.failed)
        if not self.interactive and not self.as_json and time.monotonic() - self._last_log > 10:
            self._last_log = time.monotonic()
            typer.echo(f"sent {r.sent}, failed {r.failed}, throttled {r.throttled}")


def print_send_plan(plan: SendPlan) -> None:
    for key, why in plan.skipped:
        err_console.print(f"skip {visible(key)}: {visible(why)}", highlight=False, markup=False)
    table = Table("customer", "message", "#", "to", "subject", title="About to send")
    for p in plan.prepared:
        table.add_row(safe(p.customer.key), safe(p.planned.message), str(p.planned.sequence),
                      safe(", ".join(c.email for c in p.planned.to)), safe(p.subject))
    console.print(table)


def print_send_report(report: Any, queued: int) -> None:
    console.print(f"sent {report.sent}, failed {report.failed}, unknown {report.unknown}, "
                  f"throttled (retried) {report.throttled}")
    for mid, key, msg, why in report.failures:
        err_console.print(f"failed: #{mid} {visible(key)} {visible(msg)}: {visible(why)}",
                          highlight=False, markup=False)
    if not report.failed and report.sent < queued:
        console.print("Some messages are still queued or unknown; `comms run` finishes them.")


def print_run_summary(summary: Any, settings: Settings, as_json: bool) -> None:
    q, d = summary.queue, summary.dispatch
    if as_json:
        typer.echo(json.dumps(_summary_data(summary), indent=2))
        return
    if summary.dry_run:
        _print_forecast(summary, settings)
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
        typer.echo(f"  failed #{mid} {visible(key)} {visible(msg)}: {visible(why)}", err=True)
    pend = {k: v for k, v in summary.pending.items() if v}
    if pend:
        typer.echo("still pending: " + ", ".join(f"{k} {v}" for k, v in sorted(pend.items())))


def _summary_data(summary: Any) -> dict[str, Any]:
    q, d = summary.queue, summary.dispatch
    data: dict[str, Any] = {
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
    return data


def _print_forecast(summary: Any, settings: Settings) -> None:
    q = summary.queue
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


def _human_minutes(minutes: float) -> str:
    if minutes < 1:
        return "less than a minute"
    if minutes < 90:
        return f"{minutes:.0f} minutes"
    return f"{minutes / 60:.1f} hours"
