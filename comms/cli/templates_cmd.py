"""`comms preview` and `comms templates check`."""

from __future__ import annotations

import json
import tempfile
import webbrowser
from datetime import UTC, datetime
from pathlib import Path

import typer

from comms.cli import common
from comms.cli.common import console, new_app
from comms.errors import RequestRefused, TemplateError
from comms.services import preview as preview_service
from comms.services.context import AppContext
from comms.services.template_check import check_templates

templates_app = new_app("Check and preview the email templates.")


def preview(
    key: str = typer.Argument(None, help="Customer key (from `comms customers list`)."),
    message: str = typer.Option(None, "--message", "-m", help="Message name, e.g. kickoff."),
    fmt: str = typer.Option("html", "--format", "-f", help="html, text or eml."),
    out: Path = typer.Option(None, "--out", "-o", help="Write to this file (--all: folder)."),
    open_: bool = typer.Option(False, "--open", help="Open the result in a web browser."),
    reminder: int = typer.Option(None, "--reminder", help="Reminder number (default 1 for "
                                 "reminder messages, else 0)."),
    all_: bool = typer.Option(False, "--all", help="Every message x branch for the sample "
                              "customers, into the --out folder, with an index.html."),
) -> None:
    """Render one customer's email exactly as it would be sent (or every sample with --all).

    The text part is sent only by the .eml outbox transport: through Graph, Exchange makes the
    plain text from the HTML (docs/templates.md)."""
    app, now = common.app(), datetime.now(UTC)
    if all_:
        if out is None:
            raise RequestRefused("--all needs --out DIR (the folder to write the previews to).")
        files = preview_service.preview_all(app.settings, out, now=now, campaign=app.campaign)
        typer.echo(f"Wrote {len(files)} previews and {out / 'index.html'}")
        if open_:
            webbrowser.open((out / "index.html").resolve().as_uri())
        return
    if not key or not message:
        raise RequestRefused("Give a customer KEY and --message NAME (or --all --out DIR).")
    if fmt not in ("html", "text", "eml"):
        raise RequestRefused(f"Unknown --format {fmt!r}; use html, text or eml.")
    if fmt == "text":
        # One line on stderr, so piped text stays the message itself.
        typer.echo("Note: Graph sends the HTML body only (Exchange writes its own text part); "
                   "this text is sent only by the .eml outbox transport.", err=True)
    customer = preview_service.load_customer(app.database, key)
    data = preview_service.preview_customer(
        app.settings, customer, message, fmt=fmt,  # type: ignore[arg-type]
        now=now, campaign=app.campaign, reminder_number=reminder, renderer=app.renderer,
    )
    _deliver(data, out, open_, prefix=f"comms-{key}-", fmt=fmt, app=app)


def _deliver(data: bytes, out: Path | None, open_: bool, *, prefix: str, fmt: str,
             app: AppContext) -> None:
    """Print the preview, or write it to ``out`` (a temporary file for --open alone)."""
    if out is None and open_:
        suffix = {"html": ".html", "text": ".txt", "eml": ".eml"}[fmt]
        with tempfile.NamedTemporaryFile(prefix=prefix, suffix=suffix, delete=False) as f:
            out = Path(f.name)
    if out is None:
        typer.echo(data.decode("utf-8"), nl=False)
        return
    preview_service.save(out, data, ledger=app.database)
    typer.echo(f"Wrote {out}")
    if open_:
        webbrowser.open(out.resolve().as_uri())


@templates_app.command("check")
def templates_check(
    folder: Path = typer.Option(None, "--folder", help="Template folder to check (default: "
                                "[templates] folder from the config) on top of the built-ins."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Render every message x locale x branch and report every problem with file and line."""
    app = common.app()
    result = check_templates(app.settings, now=datetime.now(UTC), folder=folder,
                             campaign=app.campaign)
    if as_json:
        typer.echo(json.dumps({"ok": not result.problems, "renders": result.renders,
                               "messages": result.messages, "notes": list(result.notes),
                               "problems": list(result.problems)}, indent=2))
        raise typer.Exit(1 if result.problems else 0)
    for note in result.notes:
        console.print(f"Note: {note}", highlight=False, soft_wrap=True)
    if result.problems:
        raise TemplateError(f"{len(result.problems)} template problem(s):",
                            problems=result.problems)
    console.print(f"Templates OK: {result.renders} renders of {result.messages} messages.")


def register(app: typer.Typer) -> None:
    app.command("preview")(preview)
    app.add_typer(templates_app, name="templates")
