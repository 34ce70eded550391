"""`comms demo`: the whole transition of the sample customers against the local sandbox."""

from __future__ import annotations

from pathlib import Path

import typer

from comms.cli.common import console


def demo(
    workdir: Path = typer.Option(Path("demo"), "--dir", help="Working folder: new, empty, or an earlier demo's (wiped); any other is refused."),
    csv: Path = typer.Option(None, "--csv", help="Customer CSV (default: the bundled sample)."),
    days: int = typer.Option(30, "--days", min=1, max=120, help="Simulated days."),
) -> None:
    """Walk the sample customers through the whole transition on a simulated clock, sending
    through the local Graph sandbox (nothing leaves this machine), and show what was sent to
    whom."""
    from comms.services.demo import run_demo
    from comms.services.demo_story import report_lines

    console.print(f"Demo in {workdir.resolve()} (local sandbox: Graph, Partner Center, customer "
                  "tenants; SQLite; simulated clock)", highlight=False, markup=False, soft_wrap=True)
    result = run_demo(workdir.resolve(), csv_path=csv, days=days,
                      echo=lambda line: console.print(line, highlight=False, markup=False,
                                                     soft_wrap=True))
    console.print()
    for line in report_lines(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1 if result.failed else 0)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
