"""How `comms send` and `comms run` show their work: the run's progress bars and summary."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from comms.cli import present
from comms.cli.common import console, err_console, is_tty, visible
from comms.config import Settings
from comms.services import sending
from comms.services.run_preview import PreviewRow
from comms.services.sending import SendPlan
from comms.timezones import zone


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
            verb = "would be queued" if self.dry_run else "queued"
            typer.echo(f"planned {present.plural(q.customers, 'customer')}: {q.queued} "
                       f"{verb}, {q.deferred} deferred to the send window")

    def on_progress(self, r: Any) -> None:
        self.bars.update(self.send_task, completed=r.sent + r.failed)
        if not self.interactive and not self.as_json and time.monotonic() - self._last_log > 10:
            self._last_log = time.monotonic()
            typer.echo(f"sent {r.sent}, failed {r.failed}, unknown {r.unknown}, "
                       f"throttled {r.throttled}")
            for line in limit_lines(r):
                typer.echo("  " + line)


def print_send_plan(plan: SendPlan) -> None:
    for key, why in plan.skipped:
        err_console.print(f"skip {visible(key)}: {visible(why)}", highlight=False, markup=False)
    table = present.table("customer", "message", "#", "to", "subject", title="About to send")
    for p in plan.prepared:
        table.add_row(Text(visible(p.customer.key)), p.planned.message, str(p.planned.sequence),
                      Text(visible(", ".join(c.email for c in p.planned.to))),
                      Text(visible(p.subject)))
    console.print(present.fit(table))
    for t in plan.times:
        window = "inside the send window" if t.in_window else "OUTSIDE the send window"
        line = (f"{visible(t.key)}: local time {t.local_time:%a %Y-%m-%d %H:%M} "
                f"({t.time_zone}), {window}")
        if t.falls_back:
            line += (f"; no {t.wanted_locale!r} template, falls back to {t.used_locale!r}")
        console.print(Text(line), soft_wrap=True)


def print_send_report(report: Any, queued: int) -> None:
    console.print(f"sent {report.sent}, failed {report.failed}, unknown {report.unknown}, "
                  f"throttled (retried) {report.throttled}")
    for mid, key, msg, why in report.failures:
        err_console.print(f"failed: #{mid} {visible(key)} {visible(msg)}: {visible(why)}",
                          highlight=False, markup=False)
    if not report.failed and report.sent < queued:
        console.print("Some messages are still queued or unknown; `comms run` finishes them "
                      "inside each customer's send window.")


def print_run_summary(summary: Any, settings: Settings, as_json: bool,
                      window_minutes: float = 0.0) -> None:
    """``window_minutes``: the campaign's send window a day, for the dry run's forecast."""
    q, d = summary.queue, summary.dispatch
    if as_json:
        typer.echo(json.dumps(_summary_data(summary, settings, window_minutes), indent=2))
        return
    for z in summary.zone_problem_rows():
        typer.echo(f"  skipped {visible(z['customer'])}: {visible(z['error'])} Nothing is planned or "
                   f"sent for it (its queued mail waits): {z['fix']}.", err=True)
    if summary.dry_run:
        _print_forecast(summary, settings, window_minutes)
        return
    typer.echo(
        f"queued {q.queued}, sent {d.sent}, deferred to the send window {q.deferred}, "
        f"throttled {d.throttled} (retried), failed {d.failed}, unknown {d.unknown}"
        + (f", confirmed in Sent Items {d.confirmed}" if d.confirmed else "")
        + (f", re-sent after check {d.requeued}" if d.requeued else "")
        + (f", held for an operator {d.held}" if d.held else "")
        + (f", moved to the next send window {d.deferred}" if d.deferred else "")
        + (f", held: awaiting approval ({q.held})" if q.held else "")
    )
    for mid, key, msg, why in d.failures:
        typer.echo(f"  failed #{mid} {visible(key)} {visible(msg)}: {visible(why)}", err=True)
    for line in limit_lines(d):
        typer.echo(line)
    pend = {k: v for k, v in summary.pending.items() if v}
    if pend:
        typer.echo("still pending: " + ", ".join(f"{k} {v}" for k, v in sorted(pend.items())))


def limit_lines(d: Any) -> list[str]:
    """Why sending stopped or waited: mailboxes the circuit breaker stopped, limits reached."""
    lines = [f"mailbox {box} stopped for this run: {why}" for box, why in sorted(d.tripped.items())]
    lines += [f"{name} reached: waiting until {_clock(until)}"
              for name, until in sorted(d.waiting.items())]
    return lines


def _clock(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _summary_data(summary: Any, settings: Settings, window_minutes: float) -> dict[str, Any]:
    q, d = summary.queue, summary.dispatch
    data: dict[str, Any] = {
        "dry_run": summary.dry_run,
        "customers_planned": q.customers,
        "queued": q.queued,
        "deferred_to_window": q.deferred,
        "held_awaiting_approval": q.held,
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
        "stopped_mailboxes": dict(d.tripped),
        "waiting": {k: v.isoformat() for k, v in d.waiting.items()},
        "still_pending": dict(summary.pending),
        "time_zone_problems": summary.zone_problem_rows(),
    }
    if summary.dry_run:
        f = sending.forecast(summary, settings, window_minutes)
        data["forecast_minutes"] = round(summary.forecast_minutes, 1)
        data["daily_cap_reached"] = summary.daily_cap_reached
        data["forecast"] = {"binding": f.binding.name, "minutes": round(f.binding.minutes, 1),
                            "external_recipients": f.external, "recipients": f.recipients,
                            "limits": {x.name: round(x.minutes, 1) for x in f.limits},
                            "send_windows": f.windows}
        data["messages"] = [_row_data(r) for r in q.preview]
    return data


def _local(r: PreviewRow) -> datetime:
    return r.send_after.astimezone(zone(r.time_zone))


def _row_data(r: PreviewRow) -> dict[str, Any]:
    return {"customer": r.key, "message": r.message, "sequence": r.sequence,
            "locale": r.locale, "send_after_local": _local(r).isoformat(),
            "time_zone": r.time_zone, "recipients": list(r.to)}


def _print_forecast(summary: Any, settings: Settings, window_minutes: float) -> None:
    q = summary.queue
    if q.preview:
        t = present.table("customer", "message", "locale", "send after (local)", "recipients",
                          dates=("send after (local)",))
        for r in q.preview:
            t.add_row(Text(r.key), r.message, r.locale, f"{_local(r):%Y-%m-%d %H:%M %Z}",
                      Text(", ".join(r.to)))
        console.print(present.fit(t))
    f = sending.forecast(summary, settings, window_minutes)
    b = f.binding
    typer.echo(
        f"Dry run: {present.plural(q.queued, 'message')} would be queued now for "
        f"{present.plural(q.customers, 'customer')} "
        f"({q.deferred} more when the send window opens); "
        f"{present.plural(f.messages, 'message')} to send in all, "
        f"{present.plural(len(settings.senders), 'sender mailbox', 'sender mailboxes')}."
    )
    typer.echo(f"Forecast: {b.detail}: {present.human_minutes(b.minutes)} ({b.name} binds).")
    if f.windows > 1:
        typer.echo(
            f"warning: at the mailboxes' rate this takes about {f.windows} send windows of "
            f"{present.human_minutes(window_minutes)}: what is not sent when a customer's "
            "window closes waits for its next one (days later for some). Add sender mailboxes "
            "([[senders]]) or send in waves (`--tag`) to finish sooner.")
    for msg, n in sorted(q.by_message.items()):
        typer.echo(f"  {msg}: {n}")
    if q.held:
        typer.echo(f"held: awaiting approval ({q.held}); see `comms wave list`")
    typer.echo("This was a dry run: the outbox and the ledger are unchanged.")
