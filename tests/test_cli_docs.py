"""Every command is documented in docs/cli.md (generated from --help, must be current)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import cli_docs  # noqa: E402


def test_docs_cli_md_is_current() -> None:
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == cli_docs.render(), "run: .venv/bin/python scripts/cli_docs.py"
    for path, _ in cli_docs.commands():
        if len(path) > 1:
            assert f"## `{' '.join(path)}`" in current
