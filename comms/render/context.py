"""The variables every template sees (documented in docs/templates.md). Pure: no clock, no I/O."""

from __future__ import annotations

from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Final

from comms.config import Settings
from comms.domain import ContactInfo, CustomerInfo, Observation
from comms.errors import UnknownTimeZone
from comms.timezones import zone

DEFAULT_LOCALE: Final = "en"
# Subscription lifecycle after the old subscription expires (days, approximate; docs/templates.md).
LIFECYCLE: Final = {"expired_days": 30, "disabled_days": 90, "deleted_days": 180}
NOTHING_OBSERVED: Final = Observation()

Branding = tuple[SimpleNamespace, SimpleNamespace]


def _ns(**values: object) -> SimpleNamespace:
    # Namespaces, not dicts: Jinja tries attribute access first, and a dict's failed getattr
    # costs an exception on every ``customer.name`` in every message.
    return SimpleNamespace(**values)


def _contact_dict(c: ContactInfo) -> SimpleNamespace:
    return _ns(name=c.name, email=c.email, role=c.role)


def default_recipient(customer: CustomerInfo) -> ContactInfo | None:
    """Whom a customer email greets when the caller names nobody: the first primary contact,
    else the first contact that is not suppressed, else nobody."""
    usable = [c for c in customer.contacts if not c.suppressed] or list(customer.contacts)
    for c in usable:
        if c.role == "primary":
            return c
    return usable[0] if usable else None


def days_billed_twice(customer: CustomerInfo, now: datetime) -> int:
    """Whole days since the CSP subscription went live (0 before that or when unknown)."""
    if customer.csp_live_at is None:
        return 0
    return max(0, (now - customer.csp_live_at).days)


def make_branding(settings: Settings) -> Branding:
    """The ``partner`` and ``links`` template variables (the same for every message)."""
    p = settings.partner
    partner = _ns(
        name=p.name,
        id=p.id,
        website=p.website,
        logo_url=p.logo_url,
        primary_color=p.primary_color,
        accent_color=p.accent_color,
        signature=p.signature,
        reply_to=p.reply_to,
        support_phone=p.support_phone,
        postal_address=p.postal_address,
        opt_out_text=p.opt_out_text,
        sender_name=settings.senders[0].name or p.name,
    )
    links = _ns(
        invitation=p.invitation_link,
        # True when the link says DAP=false: the invitation then says it asks for no
        # delegated admin permissions (a bool: never folded into the source as a constant).
        invitation_asks_no_dap=p.invitation_asks_no_dap,
        billing=p.billing_url,
        support=p.support_url,
        website=p.website,
        reply=f"mailto:{p.reply_to}",
        phone=p.phone_link,
    )
    return partner, links


def current(observation: Observation | None, now: datetime,
            max_age_days: float) -> Observation | None:
    """The observation when it is recent enough to be stated as today's state: checked at
    most ``max_age_days`` before ``now``; None otherwise (the wording stays conditional)."""
    if observation is None or observation.at is None:
        return None
    return observation if now - observation.at <= timedelta(days=max_age_days) else None


def observed(observation: Observation | None) -> SimpleNamespace:
    """The ``observed`` variable: evidence for wording that states a fact about the customer's
    subscriptions. Always present; empty (None/False/"") when nothing was observed."""
    o = observation or NOTHING_OBSERVED
    return _ns(at=o.at, source=o.source, direct_active=o.direct_active,
               direct_cancelled=o.direct_cancelled, direct_status=o.direct_status,
               assigned_licences=o.assigned_licences)


def local_now(customer: CustomerInfo, now: datetime) -> datetime:
    """``now`` in the customer's time zone. A zone the ledger holds but nobody knows is an
    error naming the customer: a silent UTC would date the email wrongly."""
    try:
        return now.astimezone(zone(customer.time_zone))
    except UnknownTimeZone as exc:
        raise UnknownTimeZone(
            f"Customer {customer.key!r} has time zone {customer.time_zone!r} in the ledger: "
            f"{exc.message} Re-import the customer with a valid time_zone."
        ) from exc


def _customer_ns(customer: CustomerInfo) -> SimpleNamespace:
    return _ns(
        key=customer.key,
        name=customer.name,
        licences=customer.licences,
        tenant_id=customer.tenant_id,
        primary_domain=customer.primary_domain,
        locale=customer.locale,
        time_zone=customer.time_zone,
        stage=customer.stage,
        csp_live_at=customer.csp_live_at,
        contacts=[_contact_dict(c) for c in customer.contacts],
    )


def build_context(
    settings: Settings,
    customer: CustomerInfo,
    *,
    message: str,
    now: datetime,
    reminder_number: int = 0,
    recipient: ContactInfo | None = None,
    branding: Branding | None = None,
    observation: Observation | None = None,
) -> dict[str, object]:
    """The variables every template sees (documented in docs/templates.md). Pure: no clock.

    ``branding`` is ``make_branding(settings)`` computed once by a caller rendering many
    messages; ``observation`` is what stage sync saw (None: nothing observed)."""
    p = settings.partner
    partner, links = branding or make_branding(settings)
    billed = days_billed_twice(customer, now)
    who = recipient or default_recipient(customer)
    am: SimpleNamespace | None = None
    if customer.account_manager_email or customer.account_manager_name:
        # ``name`` falls back to the address (a greeting needs something); ``named`` says
        # whether a real name is known ("call your account manager <email>" reads wrong).
        am = _ns(name=customer.account_manager_name or customer.account_manager_email,
                 email=customer.account_manager_email,
                 named=bool(customer.account_manager_name.strip()))
    cost = customer.licences * p.price_per_licence_month * billed / 30
    return {
        "message": message,
        "now": now,
        "today": local_now(customer, now).date(),
        "locale": customer.locale or DEFAULT_LOCALE,
        "partner": partner,
        "links": links,
        "threshold": p.licence_threshold,
        "self_service": customer.licences < p.licence_threshold,
        "customer": _customer_ns(customer),
        "account_manager": am,
        "recipient": _contact_dict(who) if who else None,
        "days_billed_twice": billed,
        "overlap_cost": f"{p.currency} {cost:,.2f}",
        "price_per_licence_month": f"{p.currency} {p.price_per_licence_month:,.2f}",
        "reminder_number": reminder_number,
        "is_reminder": reminder_number > 0,
        # The campaign's reminder ``max`` for this message; the planner sets it through ``extra``.
        # None (a preview, a stage-entry message): no template may call a reminder the last.
        "reminders_max": None,
        # The planner sets this through ``extra`` when the account manager is copied.
        "escalated": False,
        "lifecycle": _ns(**LIFECYCLE),
        "observed": observed(current(observation, now, settings.sync.evidence_max_age_days)),
    }


def locale_chain(locale: str) -> list[str]:
    """Locales to try, most specific first, English last: ``de-AT`` -> de-AT, de, en."""
    loc = (locale or "").replace("_", "-").strip()
    out: list[str] = []
    if loc:
        lang, _, region = loc.partition("-")
        if region:
            out.append(f"{lang.lower()}-{region}")
        out.append(lang.lower())
    if DEFAULT_LOCALE not in out:
        out.append(DEFAULT_LOCALE)
    return out
