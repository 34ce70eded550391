"""`comms auth login|logout|check`: sign in (delegated), sign out, check access to Graph."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import typer

from comms.cli import common
from comms.cli.common import new_app
from comms.services import auth_check

auth_app = new_app("Sign in to Microsoft Graph and check what the app may do.")


@auth_app.command("login")
def login() -> None:
    """Sign in as a user with a device code (only for [graph] auth = "delegated")."""

    def show(flow: dict[str, Any]) -> None:
        typer.echo(str(flow.get("message") or f"Enter code {flow['user_code']}"))

    who, cache = auth_check.login(common.app().settings, show)
    typer.echo(f"Signed in as {who}; token cache {cache} (readable only by you).")


@auth_app.command("logout")
def logout() -> None:
    """Forget the delegated sign-in: delete the token cache file."""
    deleted, path = auth_check.logout(common.app().settings)
    if deleted:
        typer.echo(f"Signed out: deleted the token cache {path}.")
    else:
        typer.echo(f"Not signed in (no token cache at {path}).")


def _print_report(report: auth_check.AccessReport) -> None:
    typer.echo(f"Token OK ({report.auth} auth)")
    typer.echo(f"  tenant:      {report.tenant}")
    typer.echo(f"  app:         {report.app_id}" + (f" ({report.app_name})" if report.app_name
                                                     else ""))
    if report.user:
        typer.echo(f"  user:        {report.user}")
    typer.echo(f"  permissions: {', '.join(report.permissions) or '(none in the token)'}")
    for warning in report.warnings:
        typer.echo(f"  warning:     {warning}")
    typer.echo("Sender mailboxes:")
    for box in report.mailboxes:
        typer.echo(f"  {box.address}: {box.detail}")
        if box.test is not None:
            typer.echo(f"    test message: accepted ({box.test.status})" if box.test_accepted
                       else f"    test message: {box.test.outcome.value}: {box.test.message}")


@auth_app.command("check")
def check(
    send_test: bool = typer.Option(
        False, "--send-test", help="Also send a test message from each sender mailbox to itself."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Get a token; show tenant, app and permissions; check each sender mailbox."""
    report = auth_check.check_access(common.app().settings, send_test=send_test)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(report), indent=2, default=str))
    else:
        _print_report(report)
    report.raise_problems()


def register(app: typer.Typer) -> None:
    app.add_typer(auth_app, name="auth")
