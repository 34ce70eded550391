"""One validated settings object.

Where values come from, later wins:
  1. built-in defaults (the values documented in ``config/comms.example.toml``);
  2. the TOML file: ``--config``, else ``$COMMS_CONFIG``, else ``./comms.toml``, else
     ``$COMMS_HOME/comms.toml``;
  3. ``COMMS_<SECTION>_<KEY>`` environment variables (``COMMS_DATABASE_URL``,
     ``COMMS_PARTNER_LICENCE_THRESHOLD``, ``COMMS_GRAPH_BASE_URL`` ...).

Secrets never come from the TOML file: ``COMMS_GRAPH_CLIENT_SECRET`` (or
``COMMS_GRAPH_CLIENT_SECRET_FILE``) and ``COMMS_GRAPH_PRIVATE_KEY_FILE`` only. A typo'd key or a
wrong type is an error naming the key and the file; every problem is reported at once.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationError, field_validator

from comms.config_sections import (
    DEFAULT_BILLING_URL,
    DEFAULT_INVITATION_URL,
    DEFAULT_SUPPORT_URL,
    DatabaseSettings,
    DefaultsSettings,
    DeliverySettings,
    GraphSettings,
    PartnerSettings,
    SenderSettings,
    SyncSettings,
    TemplateSettings,
    TenantSettings,
    _Section,
    check_time_zone,
)
from comms.errors import ConfigError
from comms.paths import home_dir
from comms.wording import plural

# The section models live in comms.config_sections; every public name stays importable here.
__all__ = [
    "DEFAULT_BILLING_URL", "DEFAULT_INVITATION_URL", "DEFAULT_SUPPORT_URL", "MASK",
    "RESERVED_ENV", "DatabaseSettings", "DefaultsSettings", "DeliverySettings",
    "GraphSettings", "PartnerSettings", "SenderSettings", "Settings", "SyncSettings",
    "TemplateSettings", "TenantSettings", "check_settings", "check_time_zone",
    "find_config_file", "is_zero_id", "load_settings", "mask_secrets", "mask_url",
    "partner_problem",
]

# Environment variables that are not config keys (so they are not reported as unknown).
RESERVED_ENV = {
    "COMMS_HOME",
    "COMMS_CONFIG",
    "COMMS_GRAPH_CLIENT_SECRET",
    "COMMS_GRAPH_CLIENT_SECRET_FILE",
    "COMMS_GRAPH_PRIVATE_KEY_FILE",
    "COMMS_TEST_POSTGRES_URL",
    "COMMS_CAMPAIGN",
    # Who acts, for the audit trail (comms.cli.common.actor), and the CI switch for tests.
    "COMMS_ACTOR",
    "COMMS_REQUIRE_ALL",
}

MASK = "********"


class Settings(_Section):
    partner: PartnerSettings = PartnerSettings()
    senders: list[SenderSettings] = Field(
        default_factory=lambda: [SenderSettings(address="transition@fabrikam.example")]
    )
    graph: GraphSettings = GraphSettings()
    database: DatabaseSettings = DatabaseSettings()
    templates: TemplateSettings = TemplateSettings()
    defaults: DefaultsSettings = DefaultsSettings()
    delivery: DeliverySettings = DeliverySettings()
    sync: SyncSettings = SyncSettings()
    tenant: TenantSettings = TenantSettings()
    campaign_file: str = ""
    # Where the settings came from, for messages; not a config key.
    source: str = Field(default="built-in defaults", exclude=True)

    @property
    def accepted_domains(self) -> frozenset[str]:
        """The partner tenant's accepted domains: configured ones and the senders' own."""
        return frozenset(self.tenant.accepted_domains) | {
            s.address.rsplit("@", 1)[1] for s in self.senders}

    @field_validator("senders")
    @classmethod
    def _senders(cls, v: list[SenderSettings]) -> list[SenderSettings]:
        if not v:
            raise ValueError("at least one [[senders]] mailbox is required")
        seen: set[str] = set()
        for s in v:
            if s.address in seen:
                raise ValueError(f"sender {s.address} is listed twice")
            seen.add(s.address)
        return v

    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{home_dir() / 'comms.db'}"

    def masked(self) -> dict[str, Any]:
        """The effective settings as a dict, secrets replaced by a mask and credentials inside
        any URL (``postgresql://u:secret@h/db``, ``?password=``) masked."""
        data = self.model_dump()
        for key in ("client_secret", "private_key_file"):
            if data["graph"][key]:
                data["graph"][key] = MASK
        data["database"]["url"] = self.database_url()
        masked = mask_secrets(data)
        assert isinstance(masked, dict)
        return masked


_SECRET_PARAMS = re.compile(
    r"(?i)([?&;](?:password|passwd|pwd|secret|client_secret|token|access_token|sig|key)=)"
    r"[^&;#]*"
)


def _credentials_end(rest: str) -> int:
    """Where the user name and password of a URL (``rest``: what follows ``://``) end: at the
    last "@" before the query, or, when there is none before a "?", at the URL's last "@" (a
    password that is not percent-encoded may hold "@", "/", "?" or "#"; masking too much is
    better than showing part of one); -1 when there are none: no "@", or a path right away
    (``sqlite:////home/a@b/comms.db``). An "@" in the query (``sslcert=/a@b.pem``) is not one."""
    if rest.startswith("/") or "@" not in rest:
        return -1
    before_query = rest.split("?", 1)[0]
    return before_query.rindex("@") if "@" in before_query else rest.rindex("@")


def url_password(url: str) -> str:
    """The password part of ``url`` as ``mask_url`` reads it ("" when none): everything
    between the user's ":" and the last "@" of the URL."""
    rest = url.partition("://")[2]
    end = _credentials_end(rest)
    creds = rest[:end] if end >= 0 else ""
    return creds.partition(":")[2]


def unencoded_credentials(url: str) -> bool:
    """Whether the user name or password of ``url`` holds an un-encoded "@", "?", "#" or "/":
    database drivers then read part of the password as the host (and print it in their
    errors) or as the database name."""
    rest = url.partition("://")[2]
    end = _credentials_end(rest)
    return end >= 0 and any(c in rest[:end] for c in "@?#/")


def mask_url(url: str) -> str:
    """Hide a password in a URL (``postgresql://u:secret@h/db``: everything between the
    user's ":" and the last "@") and in secret-looking query parameters (``?password=...``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = _credentials_end(rest)
    if end >= 0 and ":" in rest[:end]:
        rest = rest[:end].split(":", 1)[0] + ":" + MASK + rest[end:]
    rest = _SECRET_PARAMS.sub(lambda m: m.group(1) + MASK, rest)
    return f"{scheme}://{rest}"


def mask_secrets(value: Any) -> Any:
    """``value`` (a string, or dicts and lists of them) with every URL's credentials masked."""
    if isinstance(value, str):
        return mask_url(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def find_config_file(explicit: str | Path | None = None) -> Path | None:
    if explicit:
        p = Path(explicit)
        if not p.exists():
            raise ConfigError(f"Config file {p} does not exist. Create one with `comms init`.")
        return p
    env = os.environ.get("COMMS_CONFIG")
    if env:
        p = Path(env)
        if not p.exists():
            raise ConfigError(f"COMMS_CONFIG points to {p}, which does not exist.")
        return p
    for candidate in (Path.cwd() / "comms.toml", home_dir() / "comms.toml"):
        if candidate.exists():
            return candidate
    return None


_SECTIONS = ("partner", "graph", "database", "templates", "defaults", "delivery", "sync",
             "tenant")


def _env_overrides(
    env: Mapping[str, str], problems: list[str], origins: dict[tuple[str, ...], str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in sorted(env.items()):
        if not name.startswith("COMMS_") or name in RESERVED_ENV:
            continue
        rest = name[len("COMMS_") :].lower()
        if rest == "campaign_file":
            out["campaign_file"] = value
            origins[("campaign_file",)] = f"environment variable {name}"
            continue
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                fields = Settings.model_fields[section].annotation
                assert isinstance(fields, type) and issubclass(fields, BaseModel)
                if key in ("client_secret", "private_key_file") or key not in fields.model_fields:
                    problems.append(
                        f"environment variable {name}: {section} has no setting {key!r}"
                    )
                else:
                    out.setdefault(section, {})[key] = value
                    origins[(section, key)] = f"environment variable {name}"
                break
        else:
            problems.append(
                f"environment variable {name} is not a comms setting "
                f"(expected COMMS_<SECTION>_<KEY>, sections: {', '.join(_SECTIONS)})"
            )
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


class _NotUtf8(ValueError):
    """A text file comms reads is not UTF-8 (the message says how to fix it)."""


def _read_utf8(path: Path) -> str:
    """A UTF-8 text file (a BOM is allowed); UTF-16 and legacy code pages are refused with the
    fix, never decoded by guesswork. The error never quotes the file's content (it may be a
    secret)."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise _NotUtf8("is UTF-16 (or has NUL bytes); save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _NotUtf8(
            f"is not UTF-8 (an invalid byte on line {line}); save it as UTF-8"
        ) from None


def _read_secret_file(path: str, what: str, problems: list[str]) -> str:
    try:
        return _read_utf8(Path(path)).strip()
    except _NotUtf8 as exc:
        problems.append(f"{what}: {path} {exc}")
        return ""
    except OSError as exc:
        problems.append(f"{what}: cannot read {path}: {exc.strerror}")
        return ""


def load_settings(
    config_file: str | Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Load, merge and validate the settings; raise ``ConfigError`` listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    path = find_config_file(config_file)
    data: dict[str, Any] = {}
    where = "built-in defaults"
    if path is not None:
        where = str(path)
        try:
            data = tomllib.loads(_read_utf8(path))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        except (_NotUtf8, OSError) as exc:
            why = str(exc) if isinstance(exc, _NotUtf8) else f"cannot be read: {exc.strerror}"
            raise ConfigError(f"Config file {path} {why}.") from None
        graph = data.get("graph")
        if isinstance(graph, dict):
            for secret in ("client_secret", "private_key_file"):
                if secret in graph:
                    problems.append(
                        f"{path}: [graph] {secret} must not be in a config file; set "
                        f"COMMS_GRAPH_{secret.upper()} in the environment instead"
                    )
                    del graph[secret]
    origins: dict[tuple[str, ...], str] = {}
    data = _merge(data, _env_overrides(env, problems, origins))
    graph_secrets: dict[str, str] = {}
    if env.get("COMMS_GRAPH_CLIENT_SECRET"):
        graph_secrets["client_secret"] = env["COMMS_GRAPH_CLIENT_SECRET"]
    elif env.get("COMMS_GRAPH_CLIENT_SECRET_FILE"):
        graph_secrets["client_secret"] = _read_secret_file(
            env["COMMS_GRAPH_CLIENT_SECRET_FILE"], "COMMS_GRAPH_CLIENT_SECRET_FILE", problems
        )
    if env.get("COMMS_GRAPH_PRIVATE_KEY_FILE"):
        graph_secrets["private_key_file"] = env["COMMS_GRAPH_PRIVATE_KEY_FILE"]
    if graph_secrets:
        data = _merge(data, {"graph": graph_secrets})
    settings = _validate(data, origins, where, problems)
    if problems or settings is None:
        raise ConfigError(
            f"The configuration has {plural(len(problems), 'problem')}; fix them and run "
            "`comms config check`:",
            problems=problems,
        )
    settings.source = where
    return settings


def _validate(data: dict[str, Any], origins: dict[tuple[str, ...], str], where: str,
              problems: list[str]) -> Settings | None:
    """The settings from merged ``data``; every problem appended to ``problems``, each named
    by where its value came from."""
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _format_loc(err["loc"])
            got = err.get("input")
            # A misspelled key may hold a secret: its value is never echoed (URLs masked).
            hide = isinstance(got, dict | list) or err["type"] == "extra_forbidden"
            shown = "" if hide else f" (got {mask_secrets(got)!r})"
            origin = origins.get(tuple(str(x) for x in err["loc"]), where)
            problems.append(f"{origin}: {loc}: {_clean_msg(err['msg'])}{shown}")
    if settings is not None and unencoded_credentials(settings.database.url):
        # Neither the URL nor the password is echoed: the message names the fix only.
        problems.append(
            f"{origins.get(('database', 'url'), where)}: [database] url: the user name or "
            "password holds an un-encoded '@', '?', '#' or '/'; percent-encode them ('@' as "
            "%40, '?' as %3F, '#' as %23, '/' as %2F)")
    return settings


def _format_loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
    if len(parts) >= 2:
        return f"[{'.'.join(parts[:-1])}] {parts[-1]}"
    return parts[0] if parts else "(root)"


def _clean_msg(msg: str) -> str:
    msg = msg.replace("Extra inputs are not permitted", "unknown key (check its spelling)")
    # Validators quote the bad value: mask any URL credentials in it.
    msg = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+", lambda m: mask_url(m.group()), msg)
    return msg.removeprefix("Value error, ")


def is_zero_id(value: str) -> bool:
    """True for an unset id: only zeros (and dashes), like the default 00000000-0000-...."""
    return bool(value.strip()) and set(value.strip()) <= {"0", "-"}


def partner_problem(settings: Settings, *, branding: bool = True) -> str | None:
    """What is wrong with ``[partner]``, or None: the starter config's all-zero id would put
    a link to no partner in every partner invitation; its branding, sent through Microsoft's
    Graph, would name Fabrikam, the example partner, in every email (footer, signature, postal
    address; ``branding=False``: not asked). One wording for `config check`, `templates check`
    (the id only) and the refusal of `run`/`send`."""
    if is_zero_id(settings.partner.id):
        return (f"[partner] id is all zeros ({settings.partner.id}): every partner invitation "
                "would carry a link that invites the customer to no partner. Set it to your "
                "Partner Center id (Account settings > Identifiers) in comms.toml or "
                "COMMS_PARTNER_ID")
    host = (urlsplit(settings.graph.base_url).hostname or "").lower()
    real = settings.delivery.transport == "graph" and host not in _LOOPBACK
    if branding and real and (left := settings.partner.starter_fields()):
        return (f"[partner] {', '.join(left)} {'is' if len(left) == 1 else 'are'} still the "
                "starter config's, written for Fabrikam, the example partner: every email "
                "would name another company. Set your own in comms.toml")
    return None


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def check_settings(settings: Settings) -> list[str]:
    """Problems that a valid-shaped config can still have (files missing, auth incomplete)."""
    problems: list[str] = []
    if problem := partner_problem(settings):
        problems.append(problem)
    g = settings.graph
    if settings.delivery.transport == "graph":
        if g.auth == "certificate":
            if not g.certificate_file:
                problems.append("[graph] certificate_file is empty; set it to the public PEM")
            elif not Path(g.certificate_file).exists():
                problems.append(f"[graph] certificate_file {g.certificate_file} does not exist")
            if not g.private_key_file:
                problems.append(
                    "COMMS_GRAPH_PRIVATE_KEY_FILE is not set (path of the certificate's key)"
                )
            elif not Path(g.private_key_file).exists():
                problems.append("COMMS_GRAPH_PRIVATE_KEY_FILE points to a file that is missing")
        elif g.auth == "secret" and not g.client_secret:
            problems.append(
                "graph auth is 'secret' but COMMS_GRAPH_CLIENT_SECRET (or _FILE) is not set"
            )
        if g.ca_file and not Path(g.ca_file).exists():
            problems.append(f"[graph] ca_file {g.ca_file} does not exist")
    if settings.templates.folder and not Path(settings.templates.folder).is_dir():
        problems.append(f"[templates] folder {settings.templates.folder} is not a directory")
    if settings.campaign_file and not Path(settings.campaign_file).exists():
        problems.append(f"campaign_file {settings.campaign_file} does not exist")
    return problems


MAX_WORKER_PROCESSES = 4


def worker_processes(setting: int) -> int:
    """Worker processes for a setting such as ``[templates] render_processes`` or ``[sync]
    processes``: the setting, or with 0 (automatic) one per usable CPU up to
    ``MAX_WORKER_PROCESSES``; 1 means this process only."""
    if setting:
        return setting
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(cpus, MAX_WORKER_PROCESSES)
