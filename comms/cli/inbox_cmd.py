"""`comms inbox sync|list|show`: replies and bounces read from the sender mailboxes."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from comms.cli import common, present
from comms.cli.common import console, new_app, safe, visible
from comms.errors import UsageError

inbox_app = new_app(
    "Read replies and bounces from the sender mailboxes (Graph delta queries) and act on them."
)
KINDS = ("bounce", "reply", "auto", "optout", "unmatched", "error")


def _campaign() -> Any:
    return common.app().campaign


def _summary(report: Any) -> str:
    from comms.inbox.service import summary_line

    return summary_line(report)


def run_sync(*, now: datetime, dry_run: bool = False, mailbox: str | None = None,
             restart: bool = False, show_progress: bool = True) -> Any:
    """One sync with a progress bar (shared by `inbox sync` and `comms run --inbox`)."""
    from comms.inbox import service

    settings = common.app().settings
    progress = Progress(TextColumn("reading inbox"), BarColumn(), TextColumn("{task.completed}"),
                        TimeElapsedColumn(), console=console,
                        disable=not (show_progress and common.is_tty()))
    with progress:
        task = progress.add_task("inbox", total=None)
        return service.sync(common.app().database, settings, _campaign().inbox, now=now,
                            mailbox=mailbox, dry_run=dry_run, restart=restart,
                            progress=lambda n: progress.advance(task, n))


@inbox_app.command("sync")
def sync(
    dry_run: bool = typer.Option(False, "--dry-run", help="Classify and show what would happen; change nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    mailbox: str = typer.Option(None, "--mailbox", "-m", help="Only this sender mailbox."),
    restart: bool = typer.Option(False, "--restart", help="Read the Inbox from the start (a lost delta link); processed messages are skipped."),
    now: str = present.now_option(f"Simulated time for holds and notes ({present.NOW_READ}); default: now."),
) -> None:
    """Read new Inbox messages of every sender mailbox, classify them, apply their effects.

    Bounces suppress the address and mark the outbox row bounced; replies hold reminders and
    notify the account manager; opt-out replies suppress the address. Each message is processed
    once, even after a crash; one that cannot be is recorded as an error (`inbox list --kind
    error`) and the sync goes on. A mailbox that cannot be read is reported and the others are
    read. Exit codes: 0 done; 1 a mailbox was not synced; 2 or 3 configuration or permission
    problem (no mailbox could be read).
    """
    report = run_sync(now=common.app().at(now), dry_run=dry_run, mailbox=mailbox, restart=restart,
                      show_progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2, default=str))
        return
    typer.echo(_summary(report))
    for line in report.errors:
        typer.echo(f"error: {visible(line)}", err=True)
    for item in report.items:  # sender and subject are anyone's: shown, never acted on
        typer.echo(f"  {item['kind']:<9} {visible(item['from']):<32} "
                   f"{present.clip(visible(item['subject']), 40):<40} "
                   f"{visible(item['rule'])} -> "
                   f"{visible('; '.join(item['effects'])) or 'no action'}")
    if report.errors:
        raise typer.Exit(1)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if isinstance(value, datetime) else ""


@inbox_app.command("list")
def list_(
    kind: str = typer.Option(None, "--kind", "-k", help="bounce, reply, auto, optout, unmatched or error."),
    limit: int = typer.Option(200, "--limit", min=1, help="Newest N messages."),
    as_json: bool = typer.Option(False, "--json", help="JSON for machines."),
) -> None:
    """List inbound messages read so far, newest first, with what each was taken for."""
    from comms.inbox import service

    if kind is not None and kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    rows = service.list_inbound(common.app().database, kind=kind, limit=limit)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = present.table("id", "received", "kind", "from", "customer", "subject", "rule",
                          keys=("id", "customer"), dates=("received",))
    for r in rows:  # sender and subject are anyone's: shown, never acted on
        table.add_row(str(r["id"]), _when(r["received_at"]).replace(" ", "\n"), r["kind"],
                      safe(r["from"]), safe(r["customer"] or ""),
                      safe(present.clip(r["subject"], 40)), safe(present.clip(r["rule"], 50)))
    console.print(present.fit(table))


@inbox_app.command("show")
def show(
    inbound_id: int = typer.Argument(..., help="Inbound message id (see `comms inbox list`)."),
    as_json: bool = typer.Option(False, "--json", help="JSON for machines."),
) -> None:
    """Show one inbound message: classification, the rule that decided, effects, text."""
    from comms.inbox import service

    row = service.show_inbound(common.app().database, inbound_id)
    if as_json:
        typer.echo(json.dumps(row, indent=2, default=str))
        return
    for key in ("id", "mailbox", "received_at", "kind", "rule", "detail", "from", "subject",
                "customer", "address", "status_code", "outbox_id", "effects", "graph_id",
                "internet_message_id"):
        value = _when(row[key]) if key == "received_at" else row[key]
        typer.echo(f"{key.replace('_', ' '):>19}: {'' if value is None else visible(value)}")
    # The text is anyone's: its lines as written, every control character shown, not acted on.
    typer.echo("\n" + "\n".join(visible(line) for line in (row["preview"] or "").split("\n")))


def sandbox_inject(
    kind: str = typer.Argument(..., help="reply, auto_reply, ndr or dead (addresses that bounce by themselves)."),
    mailbox: str = typer.Option(None, "--mailbox", "-m", help="Sender mailbox (default: the first [[senders]])."),
    send_id: str = typer.Option(None, "--send-id", help="The message answered or bounced (see `comms outbox show`)."),
    sender: str = typer.Option(None, "--from", help="Who replies (reply, auto_reply)."),
    body: str = typer.Option("", "--body", help="Text of the reply."),
    recipient: str = typer.Option(None, "--recipient", help="The address that bounced (ndr), or the dead address."),
    status: str = typer.Option("5.1.1", "--status", help="NDR status code: 5.x.x hard, 4.x.x soft."),
    attach: str = typer.Option("item", "--attach", help="How the NDR carries the original: item, file, headers, none."),
) -> None:
    """Put a reply, auto-reply or NDR into a running `comms sandbox`'s Inbox (testing only).

    Talks to the sandbox's admin endpoint at [graph] base_url, trusting [graph] ca_file.
    """
    import requests

    settings = common.app().settings
    base = settings.graph.base_url.rsplit("/v1.0", 1)[0]
    box = mailbox or (settings.senders[0].address if settings.senders else "")
    payload: dict[str, Any]
    if kind == "dead":
        url, payload = f"{base}/_sandbox/inbox/dead", {"addresses": [recipient]}
    elif kind in ("reply", "auto_reply", "ndr"):
        url = f"{base}/_sandbox/inbox/inject"
        payload = {"kind": kind, "mailbox": box, "send_id": send_id, "from": sender,
                   "body": body, "recipient": recipient, "status": status, "attach": attach}
    else:
        raise UsageError(f"KIND must be reply, auto_reply, ndr or dead, got {kind!r}.")
    try:
        response = requests.post(url, json=payload, timeout=10,
                                 verify=settings.graph.ca_file or True)
    except requests.exceptions.RequestException as exc:
        raise UsageError(f"No sandbox answers at {base} ({type(exc).__name__}); start "
                         "`comms sandbox` and export the variables it prints.") from exc
    if response.status_code != 200:
        raise UsageError(f"The sandbox refused: {response.status_code} {response.text[:300]}")
    typer.echo(json.dumps(response.json(), indent=2)[:2000])


def register(app: typer.Typer) -> None:
    app.add_typer(inbox_app, name="inbox")
    app.command("sandbox-inject")(sandbox_inject)
