"""Starting a project: the starter config and the database."""

from __future__ import annotations

import shutil
from pathlib import Path

from comms.config import Settings, check_settings, load_settings
from comms.errors import CommsError
from comms.paths import builtin_config_dir
from comms.store.db import Database, open_database


def write_starter_config(target: Path, *, force: bool = False) -> Path:
    """Copy the documented example config to ``target`` (refusing to overwrite unless forced)."""
    if target.exists() and not force:
        raise CommsError(f"{target} already exists; pass --force to overwrite it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(builtin_config_dir() / "comms.example.toml", target)
    return target


def init_project(config_path: Path, *, force: bool = False) -> tuple[Path, Database]:
    path = write_starter_config(config_path, force=force)
    settings = load_settings(path)
    return path, open_database(settings.database_url())


def config_problems(settings: Settings) -> list[str]:
    return check_settings(settings)
