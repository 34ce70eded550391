"""What the customer reads must be true (issue 11, DESIGN §1): every message x locale x licence
branch, rendered by the real renderer, contains the current cancellation facts and omits the
2018 ones, and evidence-bound sentences appear only when ``observed`` says so."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from lxml import etree

from comms.config import Settings
from comms.domain import ContactInfo, CustomerInfo
from comms.render import RenderedEmail, Renderer

NOW = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
SETTINGS = Settings()
BILLING = "https://go.microsoft.com/fwlink/p/?linkid=842054"
SUPPORT = "https://admin.microsoft.com/#/support"
MESSAGES = [
    "kickoff", "partner_invitation", "partner_invitation_reminder", "lose_access_warning",
    "cancel_instructions", "cancel_reminder", "transition_complete", "account_manager_alert",
]
REMINDERS = {"partner_invitation_reminder", "cancel_reminder", "account_manager_alert"}
CANCEL = ["cancel_instructions", "cancel_reminder"]
BILLING_CRITICAL = ["lose_access_warning", "cancel_instructions", "cancel_reminder"]
LOCALES = ["en", "de"]
LICENCES = [24, 25, 26]  # below, at and above the default threshold of 25

# Per locale: the phrases the rules are about (compared case-insensitively: text headings are
# upper case).
PHRASES = {
    "en": {
        "threshold": "fewer than {t} licences assigned to users",
        "licenses_check": "Billing {sep} Licenses",
        "keep_domain": "do not remove your domain",
        "keep_users": "do not delete any users",
        "only_old": "cancel only the old subscription, never the one from",
        "disabled": "disabled",
        "expired": "expired",
        "refund": "do not count on a refund or credit for the days billed twice",
        "not_by_itself": "the old subscription keeps running, and microsoft keeps billing it, "
                         "until you cancel it",
        "password": "never asks for your password",
        "evidence": ("we see that", "still active", "we can see", "can confirm",
                     "no longer billed twice"),
        "optout_note": "opting out stops our emails, not microsoft's billing",
    },
    "de": {
        "threshold": "weniger als {t} Lizenzen für Benutzer zugewiesen",
        "licenses_check": "Abrechnung {sep} Lizenzen",
        "keep_domain": "Entfernen Sie Ihre Domäne nicht",
        "keep_users": "löschen Sie keine Benutzer",
        "only_old": "Kündigen Sie nur das alte Abonnement, niemals das von",
        "disabled": "deaktiviert",
        "expired": "abgelaufen",
        "refund": "nicht mit einer Erstattung oder Gutschrift für die doppelt abgerechneten Tage",
        "not_by_itself": "das alte abonnement läuft weiter, und microsoft rechnet es weiter ab, "
                         "bis sie es kündigen",
        "password": "nie nach Ihrem Kennwort",
        "evidence": ("wir sehen", "noch aktiv", "nicht mehr doppelt"),
        "optout_note": "eine abmeldung beendet unsere e-mails, nicht microsofts abrechnung",
    },
}


def nothing_observed() -> SimpleNamespace:
    return SimpleNamespace(at=None, source="", direct_active=False, direct_cancelled=False,
                           direct_status="", assigned_licences=None)


def observed(**kw: object) -> SimpleNamespace:
    ns = nothing_observed()
    ns.at = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    ns.source = "partner_center"
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def customer(licences: int, locale: str, **kw: object) -> CustomerInfo:
    base = CustomerInfo(
        key="contoso", name="Contoso Ltd", licences=licences, stage="awaiting_cancellation",
        stage_entered_at=NOW - timedelta(days=5), locale=locale, tenant_id="tenant-123",
        primary_domain="contoso.example",
        contacts=(ContactInfo("Ana Admin", "ana@contoso.example", "primary"),),
        csp_live_at=NOW - timedelta(days=5, hours=3),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(SETTINGS)


def render(r: Renderer, message: str, licences: int, locale: str, *, reminder: int = 1,
           seen: SimpleNamespace | None = None, **kw: object) -> RenderedEmail:
    return r.render(message, customer(licences, locale, **kw), now=NOW,
                    reminder_number=reminder if message in REMINDERS else 0,
                    extra={"observed": seen or nothing_observed(), "escalated": True})


def bodies(email: RenderedEmail) -> tuple[tuple[str, str], ...]:
    """(body, separator used in admin center paths) for the HTML and the text body."""
    return ((email.html, "›"), (email.text, ">"))


def low(s: str) -> str:
    return s.lower()


# --- every message x locale x branch ---------------------------------------------------------


@pytest.mark.parametrize("licences", LICENCES)
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message", MESSAGES)
def test_no_outdated_facts_anywhere(
    renderer: Renderer, message: str, locale: str, licences: int
) -> None:
    for reminder in ((1, 2, 3) if message in REMINDERS else (0,)):
        email = render(renderer, message, licences, locale, reminder=reminder)
        assert email.locale == locale  # every message ships in English and German
        p = PHRASES[locale]
        for body in (email.subject, email.html, email.text):
            assert "portal.office.com" not in body
            # Cancelling goes straight to Disabled: the Expired stage is for running out.
            assert p["expired"] not in low(body), (message, locale, body)
            for wrong in ("does not refund", "will not refund", "no refunds",
                          "erstattet diese überschneidung nicht"):
                assert wrong not in low(body), (message, locale)
            assert "unsubscribe" not in low(body)  # the default opt-out is a plain reply


@pytest.mark.parametrize("licences", LICENCES)
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize(
    "message", ["kickoff", "lose_access_warning", "cancel_instructions", "cancel_reminder",
                "account_manager_alert"])
def test_threshold_wording_and_refund_wording(
    renderer: Renderer, message: str, locale: str, licences: int
) -> None:
    email = render(renderer, message, licences, locale)
    p = PHRASES[locale]
    for body, _ in bodies(email):
        assert low(p["refund"]) in low(body)
        if message != "account_manager_alert" or licences < 25:
            assert p["threshold"].format(t=25) in body
        if licences >= 25 and locale == "en":
            assert "25 or more" in body


@pytest.mark.parametrize("licences", LICENCES)
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message", CANCEL)
def test_cancellation_steps(renderer: Renderer, message: str, locale: str,
                            licences: int) -> None:
    email = render(renderer, message, licences, locale)
    p = PHRASES[locale]
    self_service = licences < 25
    link, other = (BILLING, SUPPORT) if self_service else (SUPPORT, BILLING)
    for body, sep in bodies(email):
        assert link in body and other not in body
        check = p["licenses_check"].format(sep=sep)
        assert check in body
        # The licence check comes before the way to cancel.
        assert body.index(check) < body.index(link)
        for phrase in ("keep_domain", "keep_users", "only_old"):
            assert low(p[phrase]) in low(body), (phrase, body)
        assert p["disabled"] in low(body)
    assert f'class="button cta" href="{link}"' in email.html


def test_threshold_number_comes_from_config() -> None:
    r = Renderer(Settings.model_validate({"partner": {"licence_threshold": 10}}))
    for locale in LOCALES:
        below = render(r, "cancel_instructions", 9, locale)
        at = render(r, "cancel_instructions", 10, locale)
        phrase = PHRASES[locale]["threshold"].format(t=10)
        assert phrase in below.text and BILLING in below.text
        assert phrase in at.text and SUPPORT in at.text and BILLING not in at.text
        assert "25" not in below.text.replace("2026", "")


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("licences", LICENCES)
def test_lose_access_warning_says_the_old_subscription_must_still_be_cancelled(
    renderer: Renderer, locale: str, licences: int
) -> None:
    email = render(renderer, "lose_access_warning", licences, locale)
    for body, _ in bodies(email):
        text = " ".join(low(body).split())
        assert PHRASES[locale]["not_by_itself"] in text
        # No cause asserted that nobody verified.
        assert "sends this email automatically when" not in text
        assert "verschickt sie automatisch" not in text
        assert PHRASES[locale]["disabled"] in text


# --- evidence-bound sentences ----------------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message,reminder", [
    ("cancel_reminder", 1), ("cancel_reminder", 2), ("cancel_reminder", 3),
    ("transition_complete", 0), ("cancel_instructions", 0),
])
def test_nothing_observed_means_no_claim(
    renderer: Renderer, locale: str, message: str, reminder: int
) -> None:
    email = render(renderer, message, 24, locale, reminder=reminder)
    for body in (email.subject, email.html, email.text):
        for claim in PHRASES[locale]["evidence"]:
            assert claim not in low(body), (claim, message, reminder)


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("reminder", [1, 2, 3])
def test_observed_active_subscription_is_stated_with_its_date(
    renderer: Renderer, locale: str, reminder: int
) -> None:
    email = render(renderer, "cancel_reminder", 24, locale, reminder=reminder,
                   seen=observed(direct_active=True, direct_status="active"))
    see, date = (("We see that", "checked on 1 March 2026") if locale == "en"
                 else ("Wir sehen, dass", "geprüft am 1. März 2026"))
    for body in (email.html, email.text):
        assert see in body and date in body
    if reminder == 1:
        assert ("still active" if locale == "en" else "noch aktiv") in email.subject


@pytest.mark.parametrize("locale", LOCALES)
def test_transition_complete_confirms_only_an_observed_cancellation(
    renderer: Renderer, locale: str
) -> None:
    seen = render(renderer, "transition_complete", 24, locale,
                  seen=observed(direct_cancelled=True, direct_status="disabled"))
    unseen = render(renderer, "transition_complete", 24, locale)
    confirm = ("We can see that the old Microsoft 365 subscription of Contoso Ltd is cancelled"
               if locale == "en" else
               "Wir sehen, dass das alte Microsoft-365-Abonnement von Contoso Ltd gekündigt ist")
    for body in (seen.html, seen.text):
        assert confirm in body
    for body in (unseen.html, unseen.text):
        assert confirm not in body
        assert ("please cancel it" if locale == "en" else "Bitte kündigen Sie es") in body


@pytest.mark.parametrize("locale", LOCALES)
def test_account_manager_note_says_what_was_observed(renderer: Renderer, locale: str) -> None:
    unseen = render(renderer, "account_manager_alert", 30, locale, reminder=2)
    seen = render(renderer, "account_manager_alert", 30, locale, reminder=2,
                  seen=observed(direct_active=True, direct_status="active",
                                assigned_licences=28))
    not_observed = "not observed" if locale == "en" else "nicht beobachtet"
    assert not_observed in unseen.text and not_observed not in seen.text
    assert "was still active" not in unseen.text  # only "(if ... is still active)"
    assert "(if the old subscription is still active)" in unseen.text or locale != "en"
    assert "28" in seen.text and "partner_center" in seen.text


# --- the invitation is not consent phishing --------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message", ["partner_invitation", "partner_invitation_reminder"])
def test_invitation_says_how_to_verify_it(renderer: Renderer, locale: str, message: str) -> None:
    managed = render(renderer, message, 24, locale, account_manager_name="Sam Manager",
                     account_manager_email="sam@fabrikam.example")
    unmanaged = render(renderer, message, 24, locale)
    call_am = ("call your account manager Sam Manager on the number you know" if locale == "en"
               else "rufen Sie Ihren Ansprechpartner Sam Manager unter der Nummer an, "
                    "die Sie kennen")
    for body, _ in bodies(managed):
        assert "admin.microsoft.com" in body
        assert PHRASES[locale]["password"] in body
        assert call_am in body
    for body, _ in bodies(unmanaged):
        assert PHRASES[locale]["password"] in body
        assert "Sam Manager" not in body
        assert ("on a number you already know" if locale == "en"
                else "unter einer Nummer an, die Sie bereits kennen") in body
    # The link really opens the admin center.
    assert 'href="https://admin.microsoft.com/Adminportal/Home?' in managed.html


# --- footers, opt-out and the header ---------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
def test_internal_note_has_no_customer_footer(renderer: Renderer, locale: str) -> None:
    email = render(renderer, "account_manager_alert", 30, locale, reminder=2)
    p = SETTINGS.partner
    for body in (email.html, email.text):
        assert p.postal_address not in body
        assert p.opt_out_text not in body
        assert p.support_phone not in body
        assert "Questions?" not in body and "Fragen?" not in body
        assert ("Internal note" if locale == "en" else "Interne Notiz") in body


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message", BILLING_CRITICAL)
def test_opting_out_is_not_the_main_next_step(renderer: Renderer, locale: str,
                                              message: str) -> None:
    s = Settings.model_validate({"partner": {
        "opt_out_text": "Reply with 'unsubscribe' and we will stop these emails."}})
    email = render(Renderer(s), message, 24, locale)
    for body in (email.html, email.text):
        flat = " ".join(low(body).split())
        # The opt-out still works, but says it does not stop the billing ...
        assert "unsubscribe" in flat
        assert PHRASES[locale]["optout_note"] in flat
        # ... and it comes only after the body's own next step.
        assert flat.index("unsubscribe") > flat.index(low(PHRASES[locale]["refund"]))
    if message in CANCEL:
        assert f'class="button cta" href="{BILLING}"' in email.html


def header(email: RenderedEmail) -> etree._Element:
    doc = etree.fromstring(email.html, etree.HTMLParser())
    (td,) = doc.xpath("//td[contains(@class, 'header')]")
    return td  # type: ignore[no-any-return]


def test_header_shows_a_styled_name_when_images_are_blocked(renderer: Renderer) -> None:
    td = header(render(renderer, "kickoff", 24, "en"))
    assert td.xpath(".//a") == []  # no link: the alt text is not an underlined blue link
    (img,) = td.xpath(".//img")
    assert img.get("alt") == SETTINGS.partner.name
    style = img.get("style")
    assert "font-family" in style and SETTINGS.partner.primary_color in style
    assert "font-weight: bold" in style or "font-weight:bold" in style
    no_logo = Renderer(Settings.model_validate({"partner": {"logo_url": ""}}))
    td = header(render(no_logo, "kickoff", 24, "en"))
    assert td.xpath(".//img") == [] and td.xpath(".//a") == []
    (span,) = td.xpath(".//span")
    assert span.text == SETTINGS.partner.name and "font-family" in span.get("style")
