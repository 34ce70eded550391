#!/usr/bin/env python3
"""Fail when the product grows shapes that are hard to read: a module in comms/ (the sandbox
aside) over MAX_MODULE lines, a function over MAX_FUNCTION lines, or a CLI command body (after
its docstring) over MAX_COMMAND lines. `scripts/run.py test` runs it before the suite.

Usage: python3 scripts/check_sizes.py   (prints every finding; exit 1 if any)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "comms"
MAX_MODULE = 450
MAX_FUNCTION = 60
MAX_COMMAND = 25

# The emulator of Microsoft's services: test equipment, not product code.
SKIP = ("sandbox/", "store/migrations/")

# Nothing may be added here: split a module instead.
ALLOWED: set[str] = set()


def _is_command(node: ast.FunctionDef) -> bool:
    """A typer command: a public function in comms/cli whose parameters are typer options."""
    for default in node.args.defaults + node.args.kw_defaults:
        if (isinstance(default, ast.Call) and isinstance(default.func, ast.Attribute)
                and isinstance(default.func.value, ast.Name) and default.func.value.id == "typer"):
            return True
    return False


def _body_lines(node: ast.FunctionDef) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring is help text, not logic
    if not body:
        return 0
    end = body[-1].end_lineno or body[-1].lineno
    return end - body[0].lineno + 1


def check(path: Path) -> list[str]:
    rel = path.relative_to(PACKAGE).as_posix()
    if rel.startswith(SKIP) or rel in ALLOWED:
        return []
    text = path.read_text(encoding="utf-8")
    problems = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE:
        problems.append(f"comms/{rel}: {lines} lines (max {MAX_MODULE}): split it")
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        command = rel.startswith("cli/") and isinstance(node, ast.FunctionDef) and _is_command(node)
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        # A command's signature is its option declarations; its body has its own, lower limit.
        if length > MAX_FUNCTION and not command:
            problems.append(f"comms/{rel}:{node.lineno}: function {node.name} has {length} "
                            f"lines (max {MAX_FUNCTION})")
        if command:
            assert isinstance(node, ast.FunctionDef)
            body = _body_lines(node)
            if body > MAX_COMMAND:
                problems.append(
                    f"comms/{rel}:{node.lineno}: command {node.name} has a {body}-line body "
                    f"(max {MAX_COMMAND}): move the work into a service"
                )
    return problems


def main() -> int:
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in check(path)]
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} size problem(s)", file=sys.stderr)
        return 1
    print("sizes OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
