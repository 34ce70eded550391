"""`comms sync`: read what Partner Center, GDAP and each customer's tenant show; move stages."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text

from comms.cli import common, present
from comms.cli.common import console, visible


def sync(
    dry_run: bool = typer.Option(False, "--dry-run", help="Read and show what would move; record nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
    customer: list[str] = typer.Option(None, "--customer", help="Only this customer key (repeatable)."),
    tag: str = typer.Option(None, "--tag", callback=common.tag_value, help="Only customers with this tag."),
    source: str = typer.Option(None, "--source", help="Only this source: partner_center, gdap or tenant."),
    now: str = present.now_option(f"Simulated time of the observation ({present.NOW_READ}); default: now."),
) -> None:
    """Sync stages from what Microsoft sees: per customer, what was seen and what moved.

    Exit codes: 0 synced (customers that cannot be verified are listed, not failures); 1 some
    customers failed to sync (try again later); 3 configuration or sign-in error.
    """
    from comms.sync.service import run_sync

    app = common.app()
    progress = Progress(TextColumn("syncing"), BarColumn(), MofNCompleteColumn(),
                        console=console, disable=not common.is_tty() or as_json)
    task = progress.add_task("sync", total=None)
    with progress:
        report = run_sync(
            app.database, app.settings, app.campaign, now=app.simulate(now).now(),
            keys=customer or None, tag=tag, source=source, dry_run=dry_run,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    _print_report(report, as_json=as_json, dry_run=dry_run)
    raise typer.Exit(report.exit_code)


def _print_report(report: Any, *, as_json: bool, dry_run: bool) -> None:
    if as_json:
        typer.echo(json.dumps({
            "at": report.at.isoformat(), "sources": list(report.sources), "dry_run": dry_run,
            "moved": report.count("moved"), "cannot_verify": report.count("cannot verify"),
            "failed": report.count("failed"), "held": report.count("held"),
            "needs_attention": report.count("needs attention"),
            "unmatched": report.unmatched, "ambiguous": report.ambiguous,
            "customers": [{"key": c.key, "status": c.status, "seen": c.seen, "moved": c.moved,
                           "held": c.held, "problem": "; ".join(c.problems.values()),
                           "licences": list(c.licences) if c.licences else None}
                          for c in report.customers],
        }, indent=2, default=str))
        return
    table = present.table("customer", "seen", "moved", "status")
    for c in report.customers:
        seen = "; ".join(f"{k}: {_short(v)}" for k, v in c.seen.items())
        moved = ", ".join(c.moved) + (f" (licences {c.licences[0]} -> {c.licences[1]})"
                                      if c.licences else "")
        note = c.held or "; ".join(c.problems.values())
        table.add_row(Text(visible(c.key)), Text(visible(seen)), Text(visible(moved)),
                      Text(visible(c.status + (f": {note}" if note else ""))))
    console.print(present.fit(table))
    for line in report.unmatched:  # names as Partner Center has them: shown, never acted on
        typer.echo(f"unmatched in Partner Center: {visible(line)}")
    for line in report.ambiguous:
        typer.echo(f"ambiguous: {visible(line)}")
    typer.echo(report.summary())
    if attention := report.count("needs attention"):
        typer.echo(f"{attention} need attention: no stage mail goes to them until it is "
                   "resolved (see their status above)")


def _short(seen: dict[str, Any]) -> str:
    if "listed" in seen:
        subs: list[Any] = seen.get("subscriptions") or []
        active = [s for s in subs if isinstance(s, dict) and s.get("status") == "active"]
        return ("customer" if seen["listed"] else "not listed") + (
            f", CSP active x{sum(int(s.get('quantity') or 0) for s in active)}" if active else "")
    if "status" in seen and "total" in seen:
        return f"direct {seen['status']} {seen.get('assigned')}/{seen.get('total')} assigned"
    return ", ".join(f"{k}={v}" for k, v in seen.items())


def register(app: typer.Typer) -> None:
    app.command("sync")(sync)
