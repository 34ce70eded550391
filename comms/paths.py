"""Where comms keeps its state, found by one function each.

``home_dir()`` is ``$COMMS_HOME`` when set, else ``$XDG_DATA_HOME/comms``
(``~/.local/share/comms``); tests point ``COMMS_HOME`` at a temporary folder so each has its
own database.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def home_dir(create: bool = True) -> Path:
    env = os.environ.get("COMMS_HOME")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        path = Path(base) / "comms"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _builtin(name: str) -> Path:
    # Installed wheel: files are copied under comms/_builtin; source checkout: the repo root.
    packaged = _PACKAGE / "_builtin" / name
    if packaged.exists():
        return packaged
    return _PACKAGE.parent / name


def builtin_templates_dir() -> Path:
    return _builtin("templates") / "emails"


def builtin_config_dir() -> Path:
    return _builtin("config")


def examples_dir() -> Path:
    return _builtin("examples")
