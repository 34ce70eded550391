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
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from comms.errors import ConfigError, UnknownTimeZone
from comms.paths import home_dir
from comms.timezones import canonical, zone

DEFAULT_INVITATION_URL = (
    "https://admin.microsoft.com/Adminportal/Home?invType=ResellerRelationship"
    "&partnerId={partner_id}&msppId=0&DAP=false#/BillingAccounts/partner-invitation"
)
# Admin center Billing > Your products and Microsoft support (DESIGN §1); the 2018
# portal addresses are outdated and must never come back as defaults.
DEFAULT_SUPPORT_URL = "https://admin.microsoft.com/#/support"
DEFAULT_BILLING_URL = "https://go.microsoft.com/fwlink/p/?linkid=842054"

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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PartnerSettings(_Section):
    name: str = "Fabrikam Cloud Services"
    id: str = "00000000-0000-0000-0000-000000000000"
    invitation_url: str = DEFAULT_INVITATION_URL
    support_url: str = DEFAULT_SUPPORT_URL
    billing_url: str = DEFAULT_BILLING_URL
    licence_threshold: int = Field(default=25, ge=1)
    website: str = "https://fabrikam.example"
    logo_url: str = "https://fabrikam.example/logo.png"
    primary_color: str = "#0f4c81"
    accent_color: str = "#e8a33d"
    signature: str = "The Fabrikam transition team"
    reply_to: str = "transition@fabrikam.example"
    support_phone: str = "+44 20 7946 0000"
    postal_address: str = (
        "Fabrikam Cloud Services, 1 Example Street, London EC1A 1AA, United Kingdom"
    )
    opt_out_text: str = (
        "You receive these emails because your organisation is moving its Microsoft 365 "
        "subscription to Fabrikam. To stop them, reply and tell us."
    )
    price_per_licence_month: float = Field(default=12.5, ge=0)
    currency: str = "GBP"

    @field_validator("invitation_url")
    @classmethod
    def _invitation_has_partner(cls, v: str) -> str:
        if "{partner_id}" not in v:
            raise ValueError("must contain the placeholder {partner_id}")
        return v

    @field_validator("invitation_url", "support_url", "billing_url", "website")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError(f"must be an https:// link, got {v!r}")
        return v

    @property
    def invitation_link(self) -> str:
        return self.invitation_url.replace("{partner_id}", self.id)


class SenderSettings(_Section):
    address: str
    name: str = ""
    messages_per_minute: int = Field(default=30, ge=1)
    max_concurrent: int = Field(default=4, ge=1)
    recipients_per_day: int = Field(default=10_000, ge=1)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if "@" not in v or v.startswith("@") or v.endswith("@"):
            raise ValueError(f"{v!r} is not a mailbox address (name@domain)")
        return v.lower()


class GraphSettings(_Section):
    base_url: str = "https://graph.microsoft.com/v1.0"
    authority_host: str = "https://login.microsoftonline.com"
    tenant_id: str = "00000000-0000-0000-0000-000000000000"
    client_id: str = "00000000-0000-0000-0000-000000000000"
    auth: Literal["certificate", "secret", "delegated"] = "certificate"
    # Public certificate (PEM); not a secret. The private key path comes only from
    # COMMS_GRAPH_PRIVATE_KEY_FILE.
    certificate_file: str = ""
    ca_file: str = ""
    timeout_seconds: float = Field(default=30.0, gt=0)
    # How long Graph/Exchange may keep working on a request after it started. A request we gave
    # up on (client timeout) keeps its mailbox concurrency slot until then, so the limit holds
    # as Exchange counts it, and "not in Sent Items" is trusted only after it (Graph's front
    # door answers 504 after about 100 s; the exact server-side bound is not documented).
    # Unset: four request timeouts (120 s with the default 30 s timeout).
    server_timeout_seconds: float | None = Field(default=None, gt=0)

    @property
    def server_timeout(self) -> float:
        return self.server_timeout_seconds or 4 * self.timeout_seconds
    # With Mail.Read on the sender mailboxes, ambiguous sends are reconciled against Sent Items.
    reconcile: bool = True
    reconcile_grace_seconds: float = Field(default=120.0, ge=0)
    token_cache_file: str = ""
    # Secrets: filled from the environment only; never printed.
    client_secret: str = ""
    private_key_file: str = ""

    @field_validator("base_url", "authority_host")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError(f"must be an https:// URL, got {v!r}")
        return v.rstrip("/")

    @property
    def authority(self) -> str:
        return f"{self.authority_host}/{self.tenant_id}"


class DatabaseSettings(_Section):
    url: str = ""


class TemplateSettings(_Section):
    folder: str = ""
    # `comms templates check` fails on these (docs/templates.md, "What templates check refuses").
    deny_hosts: list[str] = ["portal.office.com"]
    forbidden_phrases: list[str] = []
    # Customer locales to expect: each one without its own template is reported as falling back.
    locales: list[str] = []


class DefaultsSettings(_Section):
    time_zone: str = "Europe/London"
    locale: str = "en"

    @field_validator("time_zone")
    @classmethod
    def _tz(cls, v: str) -> str:
        check_time_zone(v)
        return canonical(v)


class DeliverySettings(_Section):
    transport: Literal["graph", "outbox_dir"] = "graph"
    outbox_dir: str = ""
    lease_seconds: float = Field(default=120.0, gt=0)
    # Circuit breaker: after this many ambiguous outcomes in a row on one sender mailbox
    # (timeouts, 5xx, dropped connections), stop sending from it for the rest of the run.
    # Graph that stops answering must not turn a whole run into unknown outcomes.
    max_consecutive_unknown: int = Field(default=5, ge=1)
    # Scales Exchange's time windows (a "minute" of 60 * time_scale seconds); 1.0 in production.
    time_scale: float = Field(default=1.0, gt=0)


class SyncSettings(_Section):
    """``[sync]``: which sources stage sync reads (each optional) and how hard it may push."""

    partner_center: bool = False
    gdap: bool = False
    customer_tenants: bool = False
    partner_center_url: str = "https://api.partnercenter.microsoft.com"
    on_run: bool = False  # `comms run` syncs before planning
    concurrency: int = Field(default=8, ge=1, le=64)
    page_size: int = Field(default=500, ge=1, le=1000)
    max_attempts: int = Field(default=8, ge=1, le=50)

    @field_validator("partner_center_url")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError(f"must be an https:// URL, got {v!r}")
        return v.rstrip("/")

    @property
    def sources(self) -> tuple[str, ...]:
        names = (("partner_center", self.partner_center), ("gdap", self.gdap),
                 ("tenant", self.customer_tenants))
        return tuple(n for n, on in names if on)


class TenantSettings(_Section):
    """The partner tenant's external-recipient budget (Exchange Online's TERRL).

    Exchange counts, per rolling 24 hours and for the whole tenant, every message x recipient
    whose domain is not one of the tenant's accepted domains: about 500 x licences^0.7 + 9,500.
    Past it the tenant's external mail is blocked, for everyone in the partner's company.
    comms uses only ``share`` of it, so the partner's own people keep their headroom."""

    # The partner tenant's licence count (0: unknown, the formula's floor of 9,500 applies).
    licences: int = Field(default=0, ge=0)
    # An explicit daily cap instead of the formula (0: use the formula).
    external_recipients_per_day: int = Field(default=0, ge=0)
    share: float = Field(default=0.5, gt=0, le=1)
    # Internal recipients (e.g. the account manager's copy) do not count. The sender
    # mailboxes' own domains are always accepted domains.
    accepted_domains: list[str] = Field(default_factory=list)

    @field_validator("accepted_domains", mode="before")
    @classmethod
    def _domains(cls, v: object) -> object:
        if isinstance(v, str):  # COMMS_TENANT_ACCEPTED_DOMAINS="a.example,b.example"
            v = [part for part in v.split(",") if part.strip()]
        if isinstance(v, list):
            return [str(d).strip().lower().lstrip("@") for d in v]
        return v

    @property
    def cap(self) -> int:
        """Exchange's limit for this tenant, external recipients per rolling 24 hours."""
        if self.external_recipients_per_day:
            return self.external_recipients_per_day
        return int(500 * self.licences ** 0.7 + 9_500)

    @property
    def budget(self) -> int:
        """The part of the cap comms may use."""
        return max(1, int(self.cap * self.share))


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


def mask_url(url: str) -> str:
    """Hide a password in a URL (``postgresql://u:secret@h/db``) and in secret-looking query
    parameters (``?password=...``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = _SECRET_PARAMS.sub(lambda m: m.group(1) + MASK, rest)
    # The last "@" before any query: a password may hold "/" or "@" when not percent-encoded;
    # masking too much is better than showing part of a password.
    head, query = re.match(r"([^?#]*)(.*)", rest, re.S).groups()  # type: ignore[union-attr]
    if "@" in head:
        creds, _, host = head.rpartition("@")
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":" + MASK
        head = f"{creds}@{host}"
    return f"{scheme}://{head}{query}"


def mask_secrets(value: Any) -> Any:
    """``value`` (a string, or dicts and lists of them) with every URL's credentials masked."""
    if isinstance(value, str):
        return mask_url(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def check_time_zone(name: str) -> ZoneInfo:
    """The zone for ``name`` under the one policy (``comms.timezones``), as a ValueError for
    the settings validators, which collect every problem of the file."""
    try:
        return zone(name)
    except UnknownTimeZone as exc:
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name such as Europe/London"
        ) from exc


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
    if problems or settings is None:
        raise ConfigError(
            f"The configuration has {len(problems)} problem(s); fix them and run "
            "`comms config check`:",
            problems=problems,
        )
    settings.source = where
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


def check_settings(settings: Settings) -> list[str]:
    """Problems that a valid-shaped config can still have (files missing, auth incomplete)."""
    problems: list[str] = []
    if is_zero_id(settings.partner.id):
        problems.append(
            f"[partner] id is all zeros ({settings.partner.id}); set it to your Partner Center "
            "partner id: the invitation link carries it, and an all-zero id invites the "
            "customer to no partner"
        )
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

