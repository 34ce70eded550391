"""`comms send`, `comms run` and `comms worker`: the commands that send email."""

from __future__ import annotations

import typer

from comms.cli import common, present
from comms.cli.common import console
from comms.cli.send_views import RunProgress, print_run_summary, print_send_plan, print_send_report
from comms.services import preflight, sending
from comms.services import worker as worker_service
from comms.services.shutdown import graceful_stop

_NOW_HELP = f"Simulated time ({present.NOW_READ}); default: now."


def send(
    keys: list[str] = typer.Argument(None, help="Customer key(s). Or use --tag.", show_default=False),
    message: str = typer.Option(None, "--message", "-m", help="Send this message instead of what the stage calls for."),
    tag: str = typer.Option(None, "--tag", callback=common.tag_value, help="Send to every customer with this tag (a wave)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be sent; send nothing."),
    yes: bool = present.yes_option(),
    resend: bool = typer.Option(False, "--resend", help="Send a message again that was already sent (needs --note)."),
    force: bool = typer.Option(False, "--force", help="Send a message of another stage than the customer's (needs --note)."),
    note: str = typer.Option("", "--note", help="Why (required with --resend and --force; recorded)."),
    now: str = present.now_option(_NOW_HELP),
) -> None:
    """Send one customer (or a tagged group) what its stage calls for now, or a named message.

    Shows each customer's local time (inside the send window or not) and the template locale,
    then asks before sending. A message already sent is refused unless --resend --note WHY; a
    message of another stage is refused unless --force --note WHY (the staged message still
    goes out when the customer reaches that stage). Both are recorded in the audit trail.
    """
    app = common.app()
    clock = app.simulate(now)
    plan = sending.prepare_send(app.database, app.settings, app.campaign, app.renderer,
                                keys=keys or [], tag=tag, clock=clock, message=message,
                                resend=resend, note=note, force=force)
    print_send_plan(plan)
    count = present.plural(len(plan.prepared), "message")
    if dry_run:
        if plan.refusal:
            typer.echo(f"warning: a real send would stop here. {plan.refusal}")
        console.print(f"Dry run: {count} would be sent; nothing was sent.")
        return
    preflight.require_partner(app.settings)  # exit 3 before the question
    common.confirm_or_abort(f"Send {count}?", yes)
    report, queued = sending.send_now(app.database, app.settings, app.transport(), plan,
                                      by=common.actor(), clock=clock)
    print_send_report(report, queued)
    raise typer.Exit(1 if report.failed else 0)


def run(
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and forecast; queue and send nothing."),
    now: str = present.now_option(_NOW_HELP),
    limit: int = typer.Option(None, "--limit", min=0, help="Send at most N messages this run."),
    max_minutes: float = typer.Option(50.0, "--max-minutes", min=0.0, help="Stop dispatching after M minutes (queued mail waits for the next run)."),
    tag: str = typer.Option(None, "--tag", callback=common.tag_value, help="Only customers with this tag (a marketing wave)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
    sync: bool = typer.Option(False, "--sync", help="Sync stages from Partner Center / Graph first (also [sync] on_run)."),
    inbox: bool = typer.Option(False, "--inbox", help="Read replies and bounces first (`comms inbox sync`); also [inbox] on_run."),
) -> None:
    """The scheduled run (cron / systemd timer): plan what is due, queue it, send it.

    Exit codes: 0 all well; 1 a message failed or a mailbox stopped answering; 2 bad usage;
    3 configuration or sign-in error; 4 another run holds the database. Re-running never sends
    anything twice.
    """
    app = common.app()
    clock = app.simulate(now)
    transport = None if dry_run else app.transport()
    with RunProgress(dry_run=dry_run, as_json=as_json) as progress, graceful_stop() as stop:
        summary = sending.run_scheduled(
            app.database, app.settings, app.campaign, app.renderer, transport, clock=clock,
            tag=tag, dry_run=dry_run, limit=limit, max_minutes=max_minutes,
            on_queued=progress.on_queued, on_progress=progress.on_progress,
            plan_progress=progress.planned, stop=stop, sync=sync, inbox=inbox,
            echo=None if as_json else typer.echo,
        )
    if stop.is_set() and not as_json:
        typer.echo("stopped on request: messages in flight were sent and recorded")
    print_run_summary(summary, app.settings, as_json, app.campaign.window.minutes)
    raise typer.Exit(summary.exit_code)


def worker(
    once: bool = typer.Option(False, "--once", help="Drain what is due now, then exit."),
    max_minutes: float = typer.Option(0.0, "--max-minutes", min=0.0, help="Stop after M minutes (0: run until stopped)."),
    now: str = present.now_option(_NOW_HELP),
) -> None:
    """Dispatch queued messages; run several (on one host or many) against one PostgreSQL
    database. Workers share each sender mailbox's limits through the database."""
    app = common.app()

    def on_round(report: worker_service.DispatchReport) -> None:
        if report.sent or report.failed or report.confirmed:
            typer.echo(f"sent {report.sent}, found in Sent Items {report.confirmed}, "
                       f"failed {report.failed}, unknown {report.unknown}")

    with graceful_stop() as stop:
        totals = worker_service.run(app.database, app.settings, app.campaign, app.transport(),
                                    clock=app.simulate(now), once=once,
                                    max_minutes=max_minutes, on_round=on_round, stop=stop)
    if stop.is_set():
        typer.echo("worker stopped on request: messages in flight were sent and recorded")
    typer.echo(f"worker done: sent {totals.sent}, found in Sent Items {totals.confirmed}, "
               f"failed {totals.failed}")
    raise typer.Exit(totals.exit_code)


def register(app: typer.Typer) -> None:
    app.command("send")(send)
    app.command("run")(run)
    app.command("worker")(worker)
