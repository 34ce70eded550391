"""The HTML report's one inline script and the Content-Security-Policy source that allows it."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from markupsafe import Markup

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "report_templates"


def sorting_script() -> tuple[str, str]:
    """The script (table sorting and filtering) and its CSP source (``'sha256-…'``), computed
    from the exact text shipped, so the policy allows this script and no other (no
    'unsafe-inline')."""
    script = (TEMPLATES_DIR / "report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return script, f"sha256-{digest}"


def script_context() -> dict[str, str]:
    """The template variables: the script (Markup: our own file, not data, so autoescaping
    cannot change it and its hash) and the hash for the policy."""
    script, script_hash = sorting_script()
    return {"script": Markup(script), "script_hash": script_hash}
