"""`comms init`, `comms config show|check`, `comms db upgrade|backup`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from comms.cli import common, present
from comms.cli.common import console, err_console, new_app, safe
from comms.config import mask_url
from comms.errors import ConfigError
from comms.services import backup, setup
from comms.wording import plural

config_app = new_app("Show and check the effective configuration.")
db_app = new_app("Database maintenance: migrations and backups.")


def init(
    path: Path = typer.Argument(Path("comms.toml"), help="Where to write the starter config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a starter config (documented line by line) and create the database."""
    written, db = setup.init_project(path, force=force)
    console.print(f"Wrote {safe(written)}; database ready at {safe(mask_url(db.url))}",
                  highlight=False, soft_wrap=True)
    console.print("Next: edit the config, then `comms config check` and "
                  "`comms customers import FILE.csv`.")


@config_app.command("show")
def config_show(
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Print the effective configuration (file + COMMS_* environment), secrets masked."""
    s = common.app().settings
    data = s.masked()
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    typer.echo(f"# from {s.source}")
    for section, values in data.items():
        if isinstance(values, dict):
            typer.echo(f"\n[{section}]")
            for k, v in values.items():
                typer.echo(f"{k} = {json.dumps(v, default=str)}")
        elif isinstance(values, list):
            for item in values:
                typer.echo(f"\n[[{section}]]")
                for k, v in item.items():
                    typer.echo(f"{k} = {json.dumps(v, default=str)}")
        else:
            typer.echo(f"{section} = {json.dumps(values, default=str)}")


@config_app.command("check")
def config_check(
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Validate the configuration and the campaign; report every problem at once."""
    settings, problems = setup.check_config(common.app().config_file)
    warnings, budget = setup.config_notes(settings)
    if as_json:
        typer.echo(json.dumps({"ok": not problems, "source": str(settings.source),
                               "problems": list(problems), "warnings": list(warnings),
                               "tenant_budget": budget}, indent=2))
        raise typer.Exit(ConfigError.exit_code if problems else 0)
    for warning in warnings:
        err_console.print(f"[yellow]Warning:[/] {safe(warning)}", highlight=False,
                          soft_wrap=True)
    console.print(safe(budget), highlight=False, soft_wrap=True)
    if problems:
        raise ConfigError(f"{plural(len(problems), 'problem')} in {settings.source}:", problems=problems)
    console.print(f"Configuration OK ({safe(settings.source)}).", highlight=False,
                  soft_wrap=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply any pending schema migrations."""
    db = common.app().database
    db.upgrade()
    console.print(f"Database at revision {db.current_revision()}.")


@db_app.command("backup")
def db_backup(
    file: Path = typer.Argument(None, help="Where to write the copy (a SQLite file); or --out FILE."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    out: Path = present.out_option("Where to write the copy (a SQLite file)."),
) -> None:
    """Copy the SQLite ledger to FILE while it is in use (PostgreSQL: use pg_dump)."""
    target = backup.backup_database(common.app().database, present.out_path(file, out),
                                    force=force)
    console.print(f"Backed up the ledger to {target}. Restore: see docs/operations.md.",
                  highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.add_typer(config_app, name="config")
    app.add_typer(db_app, name="db")


__all__ = ["register"]
