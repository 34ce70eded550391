"""`comms auth login|logout|check`: sign in (delegated), sign out, check access to Graph."""

from __future__ import annotations

from typing import Any

import typer

from comms.cli import common
from comms.cli.common import new_app
from comms.delivery.auth import (
    DelegatedTokenProvider,
    forget_token_providers,
    token_cache_path,
    token_provider_for,
)
from comms.delivery.base import Outcome
from comms.delivery.graph import GraphTransport
from comms.errors import AuthError, DeliveryError

auth_app = new_app("Sign in to Microsoft Graph and check what the app may do.")


@auth_app.command("login")
def login() -> None:
    """Sign in as a user with a device code (only for [graph] auth = "delegated")."""
    settings = common.settings()
    if settings.graph.auth != "delegated":
        raise AuthError(
            f"`comms auth login` is for delegated sign-in, but [graph] auth is "
            f"{settings.graph.auth!r} (app-only, no sign-in needed): run `comms auth check`, "
            'or set [graph] auth = "delegated"'
        )
    provider = token_provider_for(settings)
    assert isinstance(provider, DelegatedTokenProvider)

    def show(flow: dict[str, Any]) -> None:
        typer.echo(str(flow.get("message") or f"Enter code {flow['user_code']}"))

    claims = provider.login(show)
    who = claims.get("upn") or claims.get("preferred_username") or claims.get("oid") or "?"
    typer.echo(f"Signed in as {who}; token cache {provider.cache_path} (readable only by you).")


@auth_app.command("logout")
def logout() -> None:
    """Forget the delegated sign-in: delete the token cache file."""
    path = token_cache_path(common.settings().graph)
    forget_token_providers()
    if path.exists():
        path.unlink()
        typer.echo(f"Signed out: deleted the token cache {path}.")
    else:
        typer.echo(f"Not signed in (no token cache at {path}).")


@auth_app.command("check")
def check(
    send_test: bool = typer.Option(
        False, "--send-test", help="Also send a test message from each sender mailbox to itself."
    ),
) -> None:
    """Get a token; show tenant, app and permissions; check each sender mailbox."""
    settings = common.settings()
    transport = GraphTransport(settings)
    try:
        report = transport.check_access(send_test=send_test)
    finally:
        transport.close()
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
            if box.test.outcome is Outcome.SENT:
                typer.echo(f"    test message: accepted ({box.test.status})")
            else:
                typer.echo(f"    test message: {box.test.outcome.value}: {box.test.message}")
    problems = report.problems
    if problems:
        raise DeliveryError(
            f"{len(problems)} problem(s) found by `comms auth check`:", problems=problems
        )


def register(app: typer.Typer) -> None:
    app.add_typer(auth_app, name="auth")
