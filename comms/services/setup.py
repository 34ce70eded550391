"""Starting a project: the starter config and the database."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from comms.campaign import load_campaign
from comms.config import Settings, check_settings, load_settings
from comms.errors import ConfigError, OutputError
from comms.paths import builtin_config_dir
from comms.store.db import Database, open_database
from comms.wording import plural


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


def _exposed(path: str) -> bool:
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return False  # a missing file is reported by check_settings
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def permission_warnings(settings: Settings, env: Mapping[str, str] | None = None) -> list[str]:
    """Credential files that other users on this machine can read (or write): the certificate's
    private key, the client secret file and the token cache should be owner-only (chmod 600)."""
    env = os.environ if env is None else env
    files = [
        ("COMMS_GRAPH_PRIVATE_KEY_FILE", settings.graph.private_key_file),
        ("COMMS_GRAPH_CLIENT_SECRET_FILE", env.get("COMMS_GRAPH_CLIENT_SECRET_FILE", "")),
        ("[graph] token_cache_file", settings.graph.token_cache_file),
    ]
    out: list[str] = []
    for what, path in files:
        if path and _exposed(path):
            mode = stat.S_IMODE(Path(path).stat().st_mode)
            out.append(
                f"{what} {path} is readable by other users (mode {mode:04o}); it holds a "
                f"credential: run `chmod 600 {path}`"
            )
    return out


def tenant_budget_line(settings: Settings) -> str:
    """The partner tenant's external-recipient budget in one line (for `config check`)."""
    t = settings.tenant
    source = (f"explicit {t.external_recipients_per_day:,}/day"
              if t.external_recipients_per_day
              else f"formula for {plural(t.licences, 'licence')}" if t.licences
              else "formula floor, [tenant] licences not set")
    domains = ", ".join(sorted(settings.accepted_domains)) or "-"
    return (f"Tenant external recipients: cap {t.cap:,} per rolling 24 h ({source}); comms uses "
            f"{t.share:.0%} = {t.budget:,}; accepted (internal) domains: {domains}.")
