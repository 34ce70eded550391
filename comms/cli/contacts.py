"""`comms contacts opt-out|opt-in|suppressed`: the suppression list."""

from __future__ import annotations

import json

import typer
from rich.text import Text

from comms.cli import common, present
from comms.cli.common import console, new_app, visible
from comms.services import outbox_admin

contacts_app = new_app("Contact addresses that must never be mailed (suppression list).")


@contacts_app.command("opt-out")
def opt_out(
    email: str = typer.Argument(..., help="The address to suppress."),
    note: str = typer.Option("", "--note", help="Why; recorded."),
    reason: str = typer.Option("", "--reason", hidden=True, help="Old name of --note."),
    now: str = present.now_option(),
) -> None:
    """Never mail this address again (the planner and the dispatcher both honour it)."""
    app = common.app()
    address, customers = outbox_admin.suppress(
        app.database, email, reason=note or reason, now=app.at(now),
        by=common.actor(),
    )
    console.print(Text(f"{visible(address)} suppressed (a contact of "
                       f"{present.plural(customers, 'customer')})."), soft_wrap=True)


@contacts_app.command("opt-in")
def opt_in(
    email: str = typer.Argument(..., help="The address to mail again."),
    note: str = typer.Option(
        "", "--note",
        help="Why; recorded. Required when the address bounced or its owner opted out by reply."),
    now: str = present.now_option(),
) -> None:
    """Remove an address from the suppression list: says what is lifted (e.g. "hard bounce
    5.1.1 on 2026-11-30"), records it in the audit trail of every customer the address is a
    contact or account manager of, and those customers are planned again at the next run."""
    app = common.app()
    done = outbox_admin.unsuppress(app.database, email, now=app.at(now), by=common.actor(),
                                   note=note)
    console.print(Text(f"{visible(done.address)} removed from the suppression list "
                       f"(was: {visible(done.lifted)}); "
                       f"{present.plural(done.customers, 'customer')} planned again at the "
                       "next run."), soft_wrap=True)


@contacts_app.command("suppressed")
def suppressed(as_json: bool = present.json_option()) -> None:
    """List suppressed addresses."""
    rows = outbox_admin.suppressions(common.app().database)
    if as_json:
        typer.echo(json.dumps([{"email": r.email, "since": r.at.isoformat(), "by": r.by,
                                "note": r.reason} for r in rows], indent=2))
        return
    table = present.table("email", "since", "by", "note", keys=("email",), dates=("since",))
    for row in rows:
        table.add_row(Text(visible(row.email)), row.at.strftime("%Y-%m-%d"),
                      Text(visible(row.by)), Text(visible(row.reason)))
    console.print(present.fit(table))


def register(app: typer.Typer) -> None:
    app.add_typer(contacts_app, name="contacts")
