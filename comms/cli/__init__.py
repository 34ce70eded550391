"""The command line: thin typer commands that parse, call one service and print."""

from __future__ import annotations

import typer

from comms import __version__
from comms.cli import common
from comms.cli.common import new_app

app = new_app(
    "comms: staged, exactly-once customer emails for a Microsoft CSP transition.\n\n"
    "Tracks every customer's transition stage and sends the right email at the right time "
    "through Microsoft Graph."
)


def _print_version(value: bool) -> None:
    # Eager, so it answers before click asks for a command.
    if value:
        typer.echo(f"comms {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    config: str = typer.Option(
        None, "--config", "-c", envvar="COMMS_CONFIG", help="Config file (default: ./comms.toml)."
    ),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
) -> None:
    common.open_context(ctx, config)


def _register() -> None:
    # Each module adds its commands to `app`; importing registers them.
    import importlib

    for name in (
        "comms.cli.setup_cmd",
        "comms.cli.customers",
        "comms.cli.contacts",
        "comms.cli.templates_cmd",
        "comms.cli.auth_cmd",
        "comms.cli.sandbox_cmd",
        "comms.cli.send_cmd",
        "comms.cli.outbox_cmd",
        "comms.cli.status_cmd",
        "comms.cli.demo",
        "comms.cli.sync_cmd",
        "comms.cli.wave_cmd",
        "comms.cli.inbox_cmd",
    ):
        importlib.import_module(name).register(app)


_register()


def main() -> None:
    app(prog_name="comms")
