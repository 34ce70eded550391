"""The sections of the settings (``[partner]``, ``[graph]``, ``[tenant]`` ...): their keys,
defaults and per-key validation. ``comms.config`` assembles them into ``Settings``, loads and
checks them, and re-exports every name here (import them from ``comms.config``)."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator

from comms.errors import UnknownTimeZone
from comms.timezones import canonical, zone

DEFAULT_INVITATION_URL = (
    "https://admin.microsoft.com/Adminportal/Home?invType=ResellerRelationship"
    "&partnerId={partner_id}&msppId=0&DAP=false#/BillingAccounts/partner-invitation"
)
# Admin center Billing > Your products and Microsoft support (the current admin center, see
# docs/templates.md); the 2018 portal addresses are outdated and must never come back as defaults.
DEFAULT_SUPPORT_URL = "https://admin.microsoft.com/#/support"
DEFAULT_BILLING_URL = "https://go.microsoft.com/fwlink/p/?linkid=842054"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# What the customer reads of the partner: left at the starter values, it reads Fabrikam.
STARTER_BRANDING = ("name", "signature", "postal_address", "opt_out_text", "website", "logo_url",
                    "reply_to")


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

    def starter_fields(self) -> list[str]:
        """The texts and links the customer reads that are still the starter config's (they
        speak of Fabrikam, the example partner)."""
        fields = type(self).model_fields
        return [name for name in STARTER_BRANDING if getattr(self, name) == fields[name].default]

    @field_validator("invitation_url")
    @classmethod
    def _invitation_has_partner(cls, v: str) -> str:
        if "{partner_id}" not in v:
            raise ValueError("must contain the placeholder {partner_id}")
        return v

    @field_validator("invitation_url")
    @classmethod
    def _invitation_asks_no_dap(cls, v: str) -> str:
        # The emails say the link asks for no delegated admin permissions: a link that does
        # (DAP=true) would make that a false promise next to a Global Administrator sign-in.
        for value in _DAP_RE.findall(v):
            if value.lower() != "false":
                raise ValueError(
                    f"requests delegated admin permissions (DAP={value}); the emails tell "
                    "customers the link asks for none. Use DAP=false, as the default link "
                    "does, and ask for admin access separately (GDAP) if you need it")
        return v

    @field_validator("invitation_url")
    @classmethod
    def _invitation_opens_the_admin_center(cls, v: str) -> str:
        # The emails tell customers the link opens admin.microsoft.com and to sign in only
        # there (the consent-phishing guard): a tracking or short link would make that false.
        host = (urlsplit(v).hostname or "").lower()
        if v.startswith("https://") and host != "admin.microsoft.com":
            raise ValueError(
                f"opens {host or 'no host'}; the emails tell customers the link opens "
                "admin.microsoft.com and to sign in only there. Use Microsoft's own link "
                "(https://admin.microsoft.com/...), not a tracking or short link")
        return v

    @field_validator("invitation_url", "support_url", "billing_url", "website")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError(f"must be an https:// link, got {v!r}")
        return v

    @field_validator("support_phone")
    @classmethod
    def _phone(cls, v: str) -> str:
        digits = re.sub(r"\D", "", v)
        if not _PHONE_RE.fullmatch(v) or not 6 <= len(digits) <= 17:
            raise ValueError(
                "must be a phone number as people dial it, such as +44 20 7946 0000 (digits, "
                "spaces, + first, - ( ) . /): the emails link it as tel:")
        return v

    @property
    def invitation_link(self) -> str:
        return self.invitation_url.replace("{partner_id}", self.id)

    @property
    def invitation_asks_no_dap(self) -> bool:
        """True when the invitation link says ``DAP=false``: only then may the emails say that
        it asks for no delegated admin permissions."""
        values = _DAP_RE.findall(self.invitation_url)
        return bool(values) and all(v.lower() == "false" for v in values)

    @property
    def phone_link(self) -> str:
        """The tel: link of ``support_phone``: "+49 (0)30 1234567" dials +49301234567 (the
        "(0)" trunk prefix is not dialled after a country code)."""
        number = re.sub(r"\(\s*0\s*\)", "", self.support_phone) if \
            self.support_phone.lstrip().startswith("+") else self.support_phone
        return "tel:" + re.sub(r"[^0-9+]", "", number)


_PHONE_RE = re.compile(r"\s*\+?[0-9 ().\-/]+\s*")
# The DAP parameter of a reseller invitation link, in its query or its fragment, any case.
_DAP_RE = re.compile(r"[?&#/]dap=([^&#]*)", re.IGNORECASE)


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
    # Worker processes that render and compress when a run queues more than 3,000 customers:
    # 0 = one per CPU (up to 4), 1 = render in the run's own process.
    render_processes: int = Field(default=0, ge=0, le=32)


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


# Free, viral and developer products Microsoft adds to tenants (skuPartNumber); a partner
# may extend the list with `[sync] free_skus`.
FREE_SKUS: tuple[str, ...] = (
    "POWER_BI_STANDARD", "FLOW_FREE", "POWERAPPS_VIRAL", "POWERAPPS_DEV", "TEAMS_EXPLORATORY",
    "RIGHTSMANAGEMENT_ADHOC", "CCIBOTS_PRIVPREV_VIRAL", "STREAM", "WINDOWS_STORE",
)


class SyncSettings(_Section):
    """``[sync]``: which sources stage sync reads (each optional) and how hard it may push."""

    partner_center: bool = False
    gdap: bool = False
    customer_tenants: bool = False
    partner_center_url: str = "https://api.partnercenter.microsoft.com"
    on_run: bool = False  # `comms run` syncs before planning
    concurrency: int = Field(default=8, ge=1, le=64)
    # Worker processes that read the customers of a large sync (0: one per CPU, up to 4; 1:
    # always in this process); `concurrency` stays the bound for all of them together.
    processes: int = Field(default=0, ge=0, le=32)
    page_size: int = Field(default=500, ge=1, le=1000)
    max_attempts: int = Field(default=8, ge=1, le=50)
    # An email states what sync saw ("still active, checked on ...") only when the tenant was
    # last checked at most this many days before the email is rendered.
    evidence_max_age_days: float = Field(default=7, gt=0, le=90)
    # Free and self-service products (skuPartNumber) a tenant carries beside the one it pays
    # for: never taken for the old subscription (nor for its licence count).
    free_skus: tuple[str, ...] = FREE_SKUS

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


def check_time_zone(name: str) -> ZoneInfo:
    """The zone for ``name`` under the one policy (``comms.timezones``), as a ValueError for
    the settings validators, which collect every problem of the file."""
    try:
        return zone(name)
    except UnknownTimeZone as exc:
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name such as Europe/London"
        ) from exc
