#!/usr/bin/env python3
"""Write docs/cli.md from the commands' own --help (tests/test_cli_docs.py checks it is current).

    .venv/bin/python scripts/cli_docs.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from comms.cli import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _walk(cmd: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    out = [(path, cmd)]
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        out.extend(_walk(sub, [*path, name]))
    return out


def commands() -> list[tuple[list[str], Any]]:
    return _walk(typer.main.get_command(app), ["comms"])


def render() -> str:
    lines = [
        "# Command reference",
        "",
        "Generated from each command's `--help` by `scripts/cli_docs.py`; `comms COMMAND --help`",
        "shows the same text with every option.",
        "",
    ]
    for path, cmd in commands():
        if len(path) == 1:
            continue
        title = " ".join(path)
        args = [(p.name or "").upper() for p in cmd.params
                if p.param_type_name == "argument"]
        usage = " ".join(["[OPTIONS]", *args])
        lines.append(f"## `{title}`")
        lines.append("")
        lines.append(f"`{title} {usage}`".rstrip())
        lines.append("")
        text = (cmd.help or "").strip()
        if text:
            lines.append(text)
            lines.append("")
        opts = [p for p in cmd.params if p.param_type_name == "option" and p.help
                and not getattr(p, "hidden", False)]
        for p in opts:
            lines.append(f"- `{', '.join(p.opts)}`: {p.help}")
        if opts:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC}")
