"""`comms outbox list|show|retry|withdraw|resolve|export`."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer

from comms.cli import common, present
from comms.cli.common import console, new_app, safe, visible
from comms.domain import MessageStatus
from comms.errors import RequestRefused
from comms.services import outbox_admin, report
from comms.wording import plural

_STATUSES_HELP = ", ".join(s.value for s in list(MessageStatus)[:-1]) + \
    f" or {list(MessageStatus)[-1].value}."

outbox_app = new_app("Inspect and act on queued, sent, failed and unknown messages.")


def _when(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M") if dt else ""


@outbox_app.command("list")
def list_(
    status: str = typer.Option(None, "--status", "-s", help=_STATUSES_HELP),
    customer: str = typer.Option(None, "--customer", help="Only this customer key."),
    limit: int = typer.Option(200, "--limit", min=1, help="Newest N rows."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """List outbox messages, newest first."""
    rows = outbox_admin.list_messages(common.app().database, status=status, customer_key=customer,
                                      limit=limit)
    if as_json:
        typer.echo(json.dumps([{
            "id": r.message.id, "customer": r.customer_key, "message": r.message.message,
            "sequence": r.message.sequence, "status": r.message.status,
            "sender": r.message.sender, "sent_at": _when(r.message.sent_at),
            "created_at": _when(r.message.created_at), "last_error": r.message.last_error,
        } for r in rows], indent=2))
        return
    table = present.table("id", "customer", "message", "#", "status", "sender", "queued",
                          "sent", "last error", keys=("id", "customer", "message"),
                          dates=("queued", "sent"))
    for r in rows:
        m = r.message
        table.add_row(str(m.id), safe(r.customer_key), safe(m.message), str(m.sequence),
                      m.status, safe(m.sender or ""), _when(m.created_at), _when(m.sent_at),
                      safe(m.last_error[:60]))
    console.print(present.fit(table))


@outbox_app.command("show")
def show(
    message_id: int = typer.Argument(..., help="Outbox id (see `comms outbox list`)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Show one message: recipients, status history fields, subject and text body."""
    r = outbox_admin.get_message(common.app().database, message_id)
    m = r.message
    if as_json:
        data = m.model_dump(exclude={"html"})
        data["customer"] = r.customer_key
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    for label, value in (
        ("id", m.id), ("send id", m.send_id), ("customer", r.customer_key),
        ("message", f"{m.message} #{m.sequence} (stage {m.stage})"), ("status", m.status),
        ("to", ", ".join(a["address"] for a in json.loads(m.to_json))),
        ("cc", ", ".join(a["address"] for a in json.loads(m.cc_json))),
        ("sender", m.sender or ""), ("attempts", m.attempts), ("queued", _when(m.created_at)),
        ("send after", _when(m.send_after)), ("sent", _when(m.sent_at)),
        ("graph request id", m.request_id), ("last error", m.last_error), ("note", m.note),
        ("evidence", r.evidence or "none observed (wording stays conditional)"),
        ("subject", m.subject),
    ):
        typer.echo(f"{label:>16}: {visible(value)}")
    typer.echo("\n" + "\n".join(visible(line) for line in m.body_text().split("\n")))


@outbox_app.command("retry")
def retry(
    message_id: int = typer.Argument(..., help="Outbox id of a failed message."),
    now: str = present.now_option(),
) -> None:
    """Queue a failed message again (after fixing its cause)."""
    app = common.app()
    m = outbox_admin.retry(app.database, message_id, now=app.at(now), by=common.actor())
    console.print(f"Message {m.id} queued again; the next `comms run` sends it.")


@outbox_app.command("withdraw")
def withdraw(
    message_id: int = typer.Argument(..., help="Outbox id of a queued message."),
    now: str = present.now_option(),
) -> None:
    """Withdraw a queued (or failed) message so it is never sent."""
    app = common.app()
    m = outbox_admin.withdraw(app.database, message_id, now=app.at(now), by=common.actor())
    console.print(f"Message {m.id} withdrawn.")


@outbox_app.command("resolve")
def resolve(
    message_id: int = typer.Argument(..., help="Outbox id of a message whose outcome is unknown."),
    sent: bool = typer.Option(False, "--sent", help="It did reach the customer (e.g. you saw it in Sent Items)."),
    resend: bool = typer.Option(False, "--resend", help="It did not; send it again."),
    now: str = present.now_option(),
) -> None:
    """Decide an unknown outcome by hand (needed when the app has no Mail.Read to check).

    With [graph] reconcile on, --resend is refused until the message is held for you: the
    Sent Items lookup after the grace period decides it without risking a second copy."""
    if sent == resend:
        raise RequestRefused("Say either --sent or --resend.")
    app = common.app()
    m = outbox_admin.resolve(app.database, message_id, sent=sent, now=app.at(now),
                             by=common.actor(), reconciling=app.settings.graph.reconcile)
    console.print(f"Message {m.id} is now {m.status}.")


@outbox_app.command("export")
def export(
    path: Path = typer.Argument(None, help="CSV file to write; or --out FILE."),
    status: str = typer.Option(None, "--status", "-s", help="Only this status."),
    out: Path = present.out_option("CSV file to write (overwritten)."),
) -> None:
    """Export the outbox as CSV for spreadsheets."""
    path = present.out_path(path, out)
    n = report.export_outbox_csv(common.app().database, path, status=status)
    console.print(f"Wrote {plural(n, 'message')} to {safe(path)}.", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(outbox_app, name="outbox")
