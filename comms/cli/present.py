"""Presentation helpers every command shares: plurals, durations, tables that stay readable at
80 columns, and the one wording of the shared options (--json, --note, --now, --out, --yes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from comms.wording import plural as plural

JSON_HELP = "Print JSON (for scripts)."
YES_HELP = "Do not ask for confirmation."
# Every --now is read by AppContext.at / simulate (services.calendar.parse_now): its help says so.
NOW_READ = "ISO 8601; without an offset it is read in [defaults] time_zone"
NOW_HELP = f"Act at this simulated time ({NOW_READ}), to match `comms run --now`; default: now."

# Words whose plural is not word + "s".
def human_minutes(minutes: float) -> str:
    """A duration for people: ``under a minute``, ``about 1 minute``, ``about 21 minutes``,
    ``about 2.5 hours``, ``about 1.7 days``."""
    if minutes != minutes or minutes == float("inf"):
        return "never (no sender mailbox can send)"
    if minutes < 1:
        return "under a minute"
    if minutes < 90:
        return "about " + plural(round(minutes), "minute")
    if minutes < 24 * 60:
        return f"about {minutes / 60:.1f} hours"
    return f"about {minutes / 1440:.1f} days"


def json_option() -> Any:
    return typer.Option(False, "--json", help=JSON_HELP)


def now_option(help_text: str = NOW_HELP) -> Any:
    """``--now TIME``: the simulated moment a command acts at (``app.at(now)`` or
    ``app.simulate(now)``); every command that reads or records a time takes it."""
    return typer.Option(None, "--now", help=help_text)


def yes_option() -> Any:
    return typer.Option(False, "--yes", "-y", help=YES_HELP)


def table(*columns: str, title: str | None = None, keys: tuple[str, ...] = ("key", "customer", "message"),
          dates: tuple[str, ...] = (), numbers: tuple[str, ...] = ()) -> Table:
    """A table whose key, date and number columns never wrap or get cut (``CUST-0…``,
    ``1,38…``): those are no_wrap with room reserved (see ``fit``), numbers right-aligned;
    other columns fold instead of truncating. A header may hold a line break
    (``"days in\\nstage"``) to keep a number column narrow."""
    t = Table(title=title, title_justify="left")
    for name in columns:
        if name in numbers:
            t.add_column(name, justify="right", no_wrap=True, overflow="fold")
        elif name in keys or name in dates:
            t.add_column(name, no_wrap=True, overflow="fold")
        else:
            t.add_column(name, overflow="fold")
    return t


def words(name: str) -> str:
    """A stage or message name in a narrow column: "awaiting cancellation" wraps between its
    words where ``awaiting_cancellation`` would be cut mid-word."""
    return name.replace("_", " ")


def whole_words(t: Table, header: str, most: int = 16) -> Table:
    """Room for the longest word (up to ``most``) of the column ``header``, so a narrow
    terminal wraps between words, never inside one."""
    for column in t.columns:
        if column.header == header:
            lengths = [len(w) for cell in column.cells for w in str(cell).split()]
            column.min_width = min(max(lengths, default=0), most) or None
    return t


def clip(text: str, most: int) -> str:
    """``text`` cut to ``most`` characters, the cut shown with "…"."""
    return text if len(text) <= most else text[: most - 1] + "…"


def fit(t: Table) -> Table:
    """Reserve the full width of every no_wrap (key, date) column before printing, so a narrow
    terminal shrinks the other columns instead of cutting keys to ``CUST-0…``."""
    for column in t.columns:
        if column.no_wrap:
            widest = max(len(line) for text in [*map(str, column.cells), str(column.header)]
                         for line in text.splitlines() or [""])
            column.min_width = widest
    return t


def out_option(help_text: str) -> Any:
    """``--out FILE``: every command that writes a file takes it (the positional FILE of older
    releases still works)."""
    return typer.Option(None, "--out", "-o", help=help_text)


def out_path(positional: Path | None, out: Path | None) -> Path:
    """The file to write, from ``--out FILE`` or the positional FILE; exactly one of them."""
    from comms.errors import UsageError

    if positional is not None and out is not None and positional != out:
        raise UsageError(f"Give the file once: --out {out} or {positional}, not both.")
    chosen = out or positional
    if chosen is None:
        raise UsageError("Give the file to write with --out FILE.")
    return chosen
