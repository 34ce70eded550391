"""Starting a project: the starter config and the database."""

from __future__ import annotations

import shutil
from pathlib import Path

from comms.campaign import load_campaign
from comms.config import (
    Settings,
    check_settings,
    load_settings,
    permission_warnings,
    tenant_budget_line,
)
from comms.errors import ConfigError, OutputError
from comms.paths import builtin_config_dir
from comms.store.db import Database, open_database


def write_starter_config(target: Path, *, force: bool = False) -> Path:
    """Copy the documented example config to ``target`` (refusing to overwrite unless forced)."""
    if target.exists() and not force:
        raise OutputError(f"{target} already exists; pass --force to overwrite it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(builtin_config_dir() / "comms.example.toml", target)
    return target


def init_project(config_path: Path, *, force: bool = False) -> tuple[Path, Database]:
    path = write_starter_config(config_path, force=force)
    settings = load_settings(path)
    return path, open_database(settings.database_url())


def config_problems(settings: Settings) -> list[str]:
    return check_settings(settings)


def check_config(config_file: str | None) -> tuple[Settings, list[str]]:
    """Every problem of the configuration and the campaign it names, at once."""
    settings = load_settings(config_file)
    problems = config_problems(settings)
    try:
        load_campaign(settings.campaign_file or None)
    except ConfigError as exc:
        problems.extend(exc.problems or [exc.message])
    return settings, problems


def config_notes(settings: Settings) -> tuple[list[str], str]:
    """What `config check` shows besides problems: warnings about credential files others can
    read, and the tenant's external-recipient budget line."""
    return permission_warnings(settings), tenant_budget_line(settings)
