"""`comms contacts opt-out|opt-in|suppressed`: the suppression list."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Table

from comms.cli import common
from comms.cli.common import console, new_app, safe
from comms.services import outbox_admin

contacts_app = new_app("Contact addresses that must never be mailed (suppression list).")


@contacts_app.command("opt-out")
def opt_out(
    email: str = typer.Argument(..., help="The address to suppress."),
    reason: str = typer.Option("", "--reason", help="Why (recorded)."),
) -> None:
    """Never mail this address again (the planner and the dispatcher both honour it)."""
    address, customers = outbox_admin.suppress(
        common.app().database, email, reason=reason, now=datetime.now(UTC), by=common.actor()
    )
    console.print(f"{safe(address)} suppressed (a contact of {customers} customer(s)).")


@contacts_app.command("opt-in")
def opt_in(email: str = typer.Argument(..., help="The address to mail again.")) -> None:
    """Remove an address from the suppression list."""
    address = outbox_admin.unsuppress(common.app().database, email)
    console.print(f"{safe(address)} removed from the suppression list.")


@contacts_app.command("suppressed")
def suppressed() -> None:
    """List suppressed addresses."""
    table = Table("email", "since", "by", "reason")
    for row in outbox_admin.suppressions(common.app().database):
        table.add_row(safe(row.email), row.at.strftime("%Y-%m-%d"), safe(row.by), safe(row.reason))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(contacts_app, name="contacts")
