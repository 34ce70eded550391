"""Customer emails say only what is known (DESIGN §1 and §2): "billed twice for N days" only when
sync saw the old subscription still Enabled; "last reminder" only at the campaign's own ``max``;
transition_complete names the status that was seen; no licence count of 0; the German cancel
steps name the same admin-center section as the English ones.

Every email is rendered through the real Renderer and compared with the reference path
(templates as written, then premailer), so the new branches are covered by both."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from comms.config import Settings
from comms.domain import ContactInfo, CustomerInfo, Observation
from comms.render import RenderedEmail, Renderer, build_context

NOW = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
SEEN_AT = datetime(2026, 3, 9, 8, 0, tzinfo=UTC)
SETTINGS = Settings()
LOCALES = ["en", "de"]


def customer(licences: int = 24, *, locale: str = "en", **kw: object) -> CustomerInfo:
    base = CustomerInfo(
        key="contoso", name="Contoso Ltd", licences=licences, stage="awaiting_cancellation",
        stage_entered_at=NOW - timedelta(days=5), locale=locale, tenant_id="tenant-123",
        primary_domain="contoso.example",
        contacts=(ContactInfo("Ana Admin", "ana@contoso.example"),),
        csp_live_at=NOW - timedelta(days=12, hours=3),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def seen(status: str) -> Observation | None:
    return None if status == "" else Observation(at=SEEN_AT, source="partner_center",
                                                 direct_status=status)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(SETTINGS)


def render(r: Renderer, message: str, c: CustomerInfo, *, reminder: int = 0,
           status: str = "", extra: dict[str, object] | None = None) -> RenderedEmail:
    """The email as ``Renderer.render`` makes it, checked against the reference path."""
    extra = {"escalated": False, **(extra or {})}
    email = r.render(message, c, now=NOW, reminder_number=reminder, extra=extra,
                     observation=seen(status))
    ctx = build_context(SETTINGS, c, message=message, now=NOW, reminder_number=reminder,
                        observation=seen(status))
    ctx.update(extra)
    assert email == r.render_context(message, c.locale, ctx, fast=False), (message, status)
    return email


def parts(email: RenderedEmail) -> tuple[str, str, str]:
    return email.subject, email.html, email.text


# --- 1. "N days billed twice" only when the old subscription was seen Enabled ---------------

BILLED_TWICE_FACT = {
    "en": re.compile(r"\d+ days? billed twice|\d+ days? so far", re.I),
    "de": re.compile(r"\d+ Tage? doppelt abgerechnet|bisher \d+ Tag", re.I),
}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("reminder", [1, 2, 3])
@pytest.mark.parametrize("status", ["", "Suspended", "absent"])  # Warning: see "expired" below
def test_cancel_reminder_states_no_days_billed_twice_unless_seen_enabled(
    renderer: Renderer, locale: str, reminder: int, status: str
) -> None:
    email = render(renderer, "cancel_reminder", customer(locale=locale), reminder=reminder,
                   status=status)
    for where, body in zip(("subject", "html", "text"), parts(email), strict=True):
        found = BILLED_TWICE_FACT[locale].search(body)
        assert found is None, (where, found and found.group(0))
    if reminder == 3:
        assert email.subject == {
            "en": "Urgent: if you have not cancelled your old Microsoft 365 subscription yet, "
                  "please do it today (Contoso Ltd)",
            "de": "Dringend: Falls Sie Ihr altes Microsoft-365-Abonnement noch nicht gekündigt "
                  "haben, kündigen Sie es bitte heute (Contoso Ltd)",
        }[locale]
    conditional = {
        "en": ("The new subscription has been live for 12 days: if you have not cancelled the "
               "old one yet, each of them is billed twice."),
        "de": ("seit 12 Tagen aktiv: Falls Sie das alte noch nicht gekündigt haben, wird jeder "
               "dieser Tage doppelt abgerechnet."),
    }[locale]
    assert conditional in email.html
    assert conditional.lower() in email.text.lower()  # the text heading is upper case


@pytest.mark.parametrize("locale", LOCALES)
def test_cancel_reminder_states_days_billed_twice_when_seen_enabled(
    renderer: Renderer, locale: str
) -> None:
    c = customer(locale=locale)
    third = render(renderer, "cancel_reminder", c, reminder=3, status="Enabled")
    second = render(renderer, "cancel_reminder", c, reminder=2, status="Enabled")
    if locale == "en":
        assert third.subject.startswith("Urgent: 12 days billed twice. Please cancel ")
        assert second.subject == ("You are still paying twice for Microsoft 365: 12 days so far "
                                  "(Contoso Ltd)")
        assert "12 days billed twice so far." in third.html  # the preheader
        stated = "until the old one is cancelled, each of them is billed twice."
    else:
        assert third.subject.startswith("Dringend: 12 Tage doppelt abgerechnet. Bitte ")
        assert second.subject == ("Sie zahlen weiterhin doppelt für Microsoft 365: bisher 12 Tage "
                                  "(Contoso Ltd)")
        assert "Bisher 12 Tage doppelt abgerechnet." in third.html
        stated = "Bis das alte gekündigt ist, wird jeder dieser Tage doppelt abgerechnet."
    for body in (third.html, third.text):
        assert stated in body


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("status", ["", "Suspended", "absent"])  # Warning: see "expired" below
def test_cancel_instructions_state_no_days_billed_twice_unless_seen_enabled(
    renderer: Renderer, locale: str, status: str
) -> None:
    """The stage-entry message printed "(3 days so far)" / "(bisher 3 Tage)" with nothing
    observed, and even when sync saw the old subscription Suspended or gone."""
    email = render(renderer, "cancel_instructions", customer(locale=locale), status=status)
    for where, body in zip(("subject", "html", "text"), parts(email), strict=True):
        found = BILLED_TWICE_FACT[locale].search(body)
        assert found is None, (where, found and found.group(0))
    conditional = {
        "en": "If you have not cancelled it yet, Microsoft keeps billing it while we bill the "
              "new one.",
        "de": "Falls Sie es noch nicht gekündigt haben, rechnet Microsoft es weiter ab, während "
              "wir das neue abrechnen.",
    }[locale]
    assert conditional in email.html and conditional in email.text


@pytest.mark.parametrize("locale", LOCALES)
def test_cancel_instructions_state_days_billed_twice_when_seen_enabled(
    renderer: Renderer, locale: str
) -> None:
    email = render(renderer, "cancel_instructions", customer(locale=locale), status="Enabled")
    stated = {
        "en": "We see that it is still active (checked on 9 March 2026): Microsoft keeps billing "
              "it while we bill the new one (12 days so far).",
        "de": "Wir sehen, dass es noch aktiv ist (geprüft am 9. März 2026): Microsoft rechnet es "
              "weiter ab, während wir das neue abrechnen (bisher 12 Tage).",
    }[locale]
    assert stated in email.html and stated in email.text


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("status,live,expected", [
    ("", 8, {"en": "no cancellation confirmed, CSP live for 8 days, 2 reminders sent",
             "de": "keine Kündigung bestätigt, CSP seit 8 Tagen aktiv, 2 Erinnerungen gesendet"}),
    ("", None, {"en": "no cancellation confirmed, 2 reminders sent",
                "de": "keine Kündigung bestätigt, 2 Erinnerungen gesendet"}),
    ("Enabled", 8, {"en": "old subscription still active, billed twice for 8 days, "
                          "2 reminders sent",
                    "de": "altes Abonnement noch aktiv, 8 Tage doppelt abgerechnet, "
                          "2 Erinnerungen gesendet"}),
    ("Enabled", None, {"en": "old subscription still active, 2 reminders sent",
                       "de": "altes Abonnement noch aktiv, 2 Erinnerungen gesendet"}),
])
def test_account_manager_alert_subject_says_only_what_is_known(
    renderer: Renderer, locale: str, status: str, live: int | None,
    expected: dict[str, str]
) -> None:
    """It said "billed twice for 8 days" with nothing observed, and "for 0 days" when the CSP
    go-live date was unknown."""
    c = customer(26, locale=locale,
                 csp_live_at=None if live is None else NOW - timedelta(days=live, hours=1))
    email = render(renderer, "account_manager_alert", c, reminder=2, status=status,
                   extra={"escalated": True, "reminders_max": 5})
    prefix = {"en": "[Escalation]", "de": "[Eskalation]"}[locale]
    assert email.subject == f"{prefix} Contoso Ltd (contoso): {expected[locale]}"
    if status != "Enabled":
        assert not BILLED_TWICE_FACT[locale].search(email.subject)
        assert "billed twice for" not in email.subject
    assert not re.search(r"\b0 (days?|Tag)", email.subject)


# --- 2. "last reminder" follows the campaign's max -------------------------------------------

LAST = {"en": re.compile(r"last reminder", re.I), "de": re.compile(r"letzte Erinnerung", re.I)}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("reminder,reminders_max,last", [
    (1, 1, True), (2, 2, True), (3, 3, True), (5, 5, True),
    (1, 3, False), (3, 5, False), (4, 5, False), (3, None, False), (5, None, False),
])
def test_invitation_reminder_is_last_only_at_the_campaign_max(
    renderer: Renderer, locale: str, reminder: int, reminders_max: int | None, last: bool
) -> None:
    email = render(renderer, "partner_invitation_reminder", customer(locale=locale),
                   reminder=reminder, extra={"reminders_max": reminders_max})
    for where, body in zip(("subject", "html", "text"), parts(email), strict=True):
        assert bool(LAST[locale].search(body)) is last, (where, reminder, reminders_max)
    prefix = {"en": ("Last reminder: accept", "Reminder: accept"),
              "de": ("Letzte Erinnerung: Fabrikam", "Erinnerung: Fabrikam")}[locale]
    assert email.subject.startswith(prefix[0] if last else prefix[1]), email.subject


def test_reminders_max_is_always_in_the_context() -> None:
    ctx = build_context(SETTINGS, customer(), message="partner_invitation_reminder", now=NOW,
                        reminder_number=3)
    assert ctx["reminders_max"] is None


# --- 3. transition_complete says what sync saw -----------------------------------------------

STATUS_SENTENCE = {
    "en": {
        "Suspended": "We can see that the old Microsoft 365 subscription of Contoso Ltd is "
                     "cancelled (checked on 9 March 2026)",
        "Deleted": "We can see that the old Microsoft 365 subscription of Contoso Ltd is no "
                   "longer active: Microsoft has deleted it (checked on 9 March 2026)",
        "Warning": "We can see that the old Microsoft 365 subscription of Contoso Ltd has expired "
                   "and is in its grace period (checked on 9 March 2026): it is not cancelled yet.",
        "absent": "We no longer see the old Microsoft 365 subscription of Contoso Ltd in your "
                  "tenant (checked on 9 March 2026)",
        "LockedOut": "The move of Contoso Ltd to Fabrikam",
        "": "The move of Contoso Ltd to Fabrikam",
    },
    "de": {
        "Suspended": "Wir sehen, dass das alte Microsoft-365-Abonnement von Contoso Ltd gekündigt "
                     "ist (geprüft am 9. März 2026)",
        "Deleted": "Wir sehen, dass das alte Microsoft-365-Abonnement von Contoso Ltd nicht mehr "
                   "aktiv ist: Microsoft hat es gelöscht (geprüft am 9. März 2026)",
        "Warning": "Wir sehen, dass das alte Microsoft-365-Abonnement von Contoso Ltd abgelaufen "
                   "ist und sich in der Nachfrist befindet (geprüft am 9. März 2026): Gekündigt "
                   "ist es noch nicht.",
        "absent": "Wir sehen das alte Microsoft-365-Abonnement von Contoso Ltd nicht mehr in "
                  "Ihrem Mandanten (geprüft am 9. März 2026)",
        "LockedOut": "Der Wechsel von Contoso Ltd zu Fabrikam",
        "": "Der Wechsel von Contoso Ltd zu Fabrikam",
    },
}
CANCELLED = {"en": "is cancelled", "de": "gekündigt ist ("}
NO_LONGER_TWICE = {"en": "no longer billed twice", "de": "nicht mehr doppelt"}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("status", ["Suspended", "Deleted", "Warning", "absent", "LockedOut", ""])
def test_transition_complete_names_the_status_that_was_seen(
    renderer: Renderer, locale: str, status: str
) -> None:
    c = customer(locale=locale, stage="completed")
    email = render(renderer, "transition_complete", c, status=status)
    for body in (email.html, email.text):
        assert STATUS_SENTENCE[locale][status] in body, (status, body)
        # "cancelled" only for the status a cancelled subscription shows
        assert (CANCELLED[locale] in body) is (status == "Suspended"), status
        # "no longer billed twice" only when it was seen no longer running
        assert (NO_LONGER_TWICE[locale] in body) is (status in ("Suspended", "Deleted")), status


DONE = {
    "en": re.compile(r"\bdone\b|is complete\.|no longer billed twice|from now on, only", re.I),
    "de": re.compile(r"erledigt|ist abgeschlossen\.|nicht mehr doppelt|ab jetzt nur", re.I),
}
ONE_STEP_LEFT = {
    "en": ("One step left: please cancel the old Microsoft 365 subscription of Contoso Ltd",
           "One step left: please cancel the old subscription"),
    "de": ("Ein Schritt fehlt noch: Bitte kündigen Sie das alte Microsoft-365-Abonnement von "
           "Contoso Ltd", "Ein Schritt fehlt noch: Bitte kündigen Sie das alte Abonnement"),
}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("status", ["Warning", "warning", "Enabled"])
def test_transition_complete_says_not_done_when_seen_still_running(
    renderer: Renderer, locale: str, status: str
) -> None:
    """Seen in Warning (expired, grace period) or Enabled, the old subscription is not
    cancelled: subject, preheader, heading and body ask for the cancellation; nothing says
    "done" (the email said "Done… ALL DONE. THANK YOU", then "it is not cancelled yet")."""
    email = render(renderer, "transition_complete", customer(locale=locale, stage="completed"),
                   status=status)
    for where, body in zip(("subject", "html", "text"), parts(email), strict=True):
        found = DONE[locale].search(body)
        assert found is None, (where, found and found.group(0))
    subject, heading = ONE_STEP_LEFT[locale]
    assert email.subject == subject
    assert f">{heading}</h1>" in email.html
    assert heading.upper() in email.text.splitlines()
    not_yet = {"en": "it is not cancelled yet", "de": "Gekündigt ist es noch nicht"}[locale]
    assert not_yet in email.html and not_yet in email.text


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("status", ["absent", "LockedOut"])
def test_transition_complete_claims_nothing_for_an_unclear_status(
    renderer: Renderer, locale: str, status: str
) -> None:
    """Seen, but in no state that means cancelled or running: no "done" in the subject or the
    heading, nor "billed twice" either way."""
    email = render(renderer, "transition_complete", customer(locale=locale, stage="completed"),
                   status=status)
    assert not DONE[locale].search(email.subject)
    heading = {"en": "Your Microsoft 365 now runs through Fabrikam Cloud Services",
               "de": "Ihr Microsoft 365 läuft jetzt über Fabrikam Cloud Services"}[locale]
    assert f">{heading}</h1>" in email.html and heading.upper() in email.text
    for body in (email.html, email.text):
        assert NO_LONGER_TWICE[locale] not in body


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("status", ["Suspended", "Disabled", "Deleted", ""])
def test_transition_complete_says_done_when_seen_cancelled_or_set_by_hand(
    renderer: Renderer, locale: str, status: str
) -> None:
    email = render(renderer, "transition_complete", customer(locale=locale, stage="completed"),
                   status=status)
    done, heading = {"en": ("Done: ", "All done. Thank you"),
                     "de": ("Erledigt: ", "Alles erledigt. Vielen Dank")}[locale]
    assert email.subject.startswith(done)
    assert f">{heading}</h1>" in email.html and heading.upper() in email.text


LICENCE_CHECK = {"en": ("Billing > Licenses", "Billing › Licenses"),
                 "de": ("Abrechnung > Lizenzen", "Abrechnung › Lizenzen")}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("status,asks", [("", True), ("Enabled", True), ("Warning", True),
                                         ("LockedOut", True), ("Suspended", False),
                                         ("Disabled", False), ("Deleted", False),
                                         ("absent", False)])
def test_transition_complete_asks_for_the_licence_check_whenever_it_asks_to_cancel(
    renderer: Renderer, locale: str, status: str, asks: bool
) -> None:
    """Whenever the last email asks to cancel the old subscription (seen running, or nothing
    seen), it says first to check the new one's licences and assignments (DESIGN: before
    cancelling); not once the old one was seen cancelled or gone."""
    for licences, count in ((26, "26"), (1, "1")):
        email = render(renderer, "transition_complete",
                       customer(licences, locale=locale, stage="completed"), status=status)
        text, html = LICENCE_CHECK[locale]
        assert (text in email.text) is asks, email.text
        assert (html in email.html) is asks, email.html
        if asks:
            assert f"mindestens {count} Lizenz" in email.text if locale == "de" \
                else f"at least {count} licence" in email.text


# --- 4. no licence count of 0 ----------------------------------------------------------------

EXPIRED = {"en": ("Your old Microsoft 365 subscription has expired: please cancel it",
                   "has expired and is in its grace period (checked on 9 March 2026)",
                   re.compile(r"twice|does not end by itself", re.I)),
           "de": ("Ihr altes Microsoft-365-Abonnement ist abgelaufen: Bitte kündigen Sie es",
                  "abgelaufen ist und sich in der Nachfrist befindet (geprüft am 9. März 2026)",
                  re.compile(r"doppelt|endet nicht von selbst", re.I))}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("reminder", [1, 2, 3])
def test_a_reminder_for_an_expired_old_subscription_claims_no_double_billing(
    renderer: Renderer, locale: str, reminder: int
) -> None:
    """Seen in Warning (expired at the end of its term, in its grace period; sync keeps the
    customer in awaiting_cancellation), the old subscription is not billed for a new term:
    the reminder said "you pay twice" and "it does not end by itself"."""
    email = render(renderer, "cancel_reminder", customer(30, locale=locale), reminder=reminder,
                   status="Warning", extra={"reminders_max": 5})
    subject, seen_text, wrong = EXPIRED[locale]
    assert email.subject == f"{subject} (Contoso Ltd)"
    for body in (email.html, email.text):
        assert seen_text in body
        assert not wrong.search(body), wrong.search(body)


@pytest.mark.parametrize("locale", LOCALES)
def test_cancel_instructions_for_an_expired_old_subscription_claim_no_double_billing(
    renderer: Renderer, locale: str
) -> None:
    """The same for the stage's first message: it said "until you cancel the old subscription,
    you are paying twice" and "it does not end by itself" for one seen expired."""
    email = render(renderer, "cancel_instructions", customer(30, locale=locale),
                   status="Warning")
    wrong = EXPIRED[locale][2]
    assert {"en": "which has expired", "de": "abgelaufenes"}[locale] in email.subject
    for body in (email.subject, email.html, email.text):
        assert not wrong.search(body), wrong.search(body)
    said = {"en": "in its grace period (checked on 9 March 2026): it is not cancelled yet",
            "de": "in der Nachfrist befindet (geprüft am 9. März 2026): Gekündigt ist es noch "
                  "nicht"}[locale]
    for body in (email.html, email.text):
        assert said in body
    # An expired subscription does not renew by itself: no "so that it is not renewed".
    why = {"en": "So that it cannot be reactivated and billed again",
           "de": "Damit es nicht reaktiviert und erneut abgerechnet werden kann"}[locale]
    for message in ("cancel_instructions", "cancel_reminder"):
        mail = render(renderer, message, customer(30, locale=locale), status="Warning",
                      reminder=1 if message == "cancel_reminder" else 0)
        for body in (mail.html, mail.text):
            assert why in body and "renewed" not in body and "verlängert" not in body


SUPPORT_ROUTE = {"en": "through Microsoft support", "de": "über den Microsoft-Support"}
PORTAL_ROUTE = {"en": re.compile(r"cancel (it|the old subscription) under Billing"),
                "de": re.compile(r"kündigen Sie (es bitte|das alte Abonnement) unter .?Abrechnung")}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("status", ["Warning", "Enabled", ""])
def test_transition_complete_asks_a_large_customer_to_cancel_through_support(
    renderer: Renderer, locale: str, status: str
) -> None:
    """With 25 or more licences the old subscription is cancelled by Microsoft support, not in
    the admin center: the paragraph asking to cancel it said "under Billing › Your products"
    whatever the count."""
    big = render(renderer, "transition_complete",
                 customer(30, locale=locale, stage="completed"), status=status)
    small = render(renderer, "transition_complete",
                   customer(3, locale=locale, stage="completed"), status=status)
    support = SETTINGS.partner.support_url
    for body in (big.html, big.text):
        assert SUPPORT_ROUTE[locale] in body and support in body
        assert not PORTAL_ROUTE[locale].search(body)
    for body in (small.html, small.text):
        assert SUPPORT_ROUTE[locale] not in body
    if status:
        assert PORTAL_ROUTE[locale].search(re.sub(r"<[^>]+>", "", small.html))
        assert PORTAL_ROUTE[locale].search(small.text)


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("status", ["", "Warning"])
def test_account_manager_alert_body_says_only_what_is_known(
    renderer: Renderer, locale: str, status: str
) -> None:
    """The internal note's table said "Days billed twice: 12" with nothing observed (and 0 with
    no go-live date), and "comms has not observed the subscription" when sync had seen it."""
    extra: dict[str, object] = {"escalated": True, "reminders_max": 5}
    email = render(renderer, "account_manager_alert", customer(26, locale=locale), reminder=2,
                   status=status, extra=extra)
    unsure = {"en": "12 (if the old subscription is still active)",
              "de": "12 (falls das alte Abonnement noch aktiv ist)"}[locale]
    assert unsure in email.text and unsure in email.html
    not_seen = {"en": "comms has not observed", "de": "nicht beobachtet)"}[locale]
    assert (not_seen in email.text) == (status == "")
    if status:
        assert {"en": "last seen by comms as Warning on 9 March 2026",
                "de": "zuletzt am 9. März 2026 als Warning gesehen"}[locale] in email.text
    unknown = render(renderer, "account_manager_alert", customer(26, locale=locale,
                     csp_live_at=None), reminder=2, status=status, extra=extra)
    for body in (unknown.text, unknown.html):
        # Both the days and the cost: the cost said "GBP 0.00" without a go-live date.
        assert body.count({"en": "unknown (CSP go-live date not known)",
                           "de": "unbekannt (Datum des CSP-Starts nicht bekannt)"}[locale]) == 2
        assert " 0.00" not in body and " 0,00" not in body
    cost_unsure = {"en": "per licence and month, if the old subscription is still active)",
                   "de": "pro Lizenz und Monat, falls das alte Abonnement noch aktiv ist)"}[locale]
    for body in (email.text, email.html):
        assert cost_unsure in body
    enabled = render(renderer, "account_manager_alert", customer(26, locale=locale), reminder=2,
                     status="Enabled", extra=extra)
    for body in (enabled.text, enabled.html):
        assert "per licence and month)" in body or "pro Lizenz und Monat)" in body
        assert cost_unsure not in body


ZERO_COUNT = re.compile(
    r"(?<![\d.,])0 (licen|Lizenz)|\(0\)"
    r"|\b(has|with|hat|mit|same|dieselben|denselben|your|Ihre) 0\b",
    re.I,
)
CUSTOMER_CASES = [
    ("kickoff", 0, ""), ("partner_invitation", 0, ""), ("partner_invitation_reminder", 1, ""),
    ("lose_access_warning", 0, ""), ("cancel_instructions", 0, ""),
    ("cancel_reminder", 1, ""), ("cancel_reminder", 2, "Enabled"), ("cancel_reminder", 3, ""),
    ("cancel_reminder", 3, "Enabled"), ("transition_complete", 0, ""),
    ("transition_complete", 0, "Suspended"), ("transition_complete", 0, "Warning"),
    ("transition_complete", 0, "absent"),
]


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message,reminder,status", CUSTOMER_CASES)
def test_zero_licences_prints_no_count(
    renderer: Renderer, locale: str, message: str, reminder: int, status: str
) -> None:
    email = render(renderer, message, customer(0, locale=locale), reminder=reminder,
                   status=status)
    for where, body in zip(("subject", "html", "text"), parts(email), strict=True):
        found = ZERO_COUNT.search(body)
        assert found is None, (where, found and found.group(0))


@pytest.mark.parametrize("locale", LOCALES)
def test_zero_licences_sentences_read_well_and_positive_counts_stay(
    renderer: Renderer, locale: str
) -> None:
    zero = render(renderer, "cancel_instructions", customer(0, locale=locale))
    some = render(renderer, "cancel_instructions", customer(24, locale=locale))
    if locale == "en":
        expect_zero = [
            "through Fabrikam Cloud Services is now active.",
            "has at least as many licences as the old one and that your users are assigned",
            "licences assigned to users. So you can do it in the admin center:",
        ]
        expect_some = [
            "is now active, with 24 licences.",
            "has at least 24 licences and that your users are assigned",
            "Yours has 24, so you can do it in the admin center:",
        ]
    else:
        expect_zero = [
            "über Fabrikam Cloud Services ist jetzt aktiv.",
            "mindestens so viele Lizenzen wie das alte hat",
            "zugewiesen sind. Sie können also im Admin Center selbst kündigen:",
        ]
        expect_some = [
            "ist jetzt aktiv, mit 24 Lizenzen.",
            "mindestens 24 Lizenzen hat",
            "Ihres hat 24, also können Sie im Admin Center selbst kündigen:",
        ]
    for body in (zero.html, zero.text):
        for sentence in expect_zero:
            assert sentence in body, sentence
    for body in (some.html, some.text):
        for sentence in expect_some:
            assert sentence in body, sentence


ONE_LICENCE_PLURAL = re.compile(
    r"\b1 (licences|Lizenzen)\b|\b(the same|dieselben|denselben) (licences|Lizenzen)\b"
    r"|\blicence now run\b|\bLizenz laufen\b",
    re.I,
)


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message,reminder,status", [
    *CUSTOMER_CASES, ("transition_complete", 0, "Enabled"), ("transition_complete", 0, "Deleted"),
])
def test_one_licence_is_singular(
    renderer: Renderer, locale: str, message: str, reminder: int, status: str
) -> None:
    """"at least 1 licences", "with 1 licences", "mindestens 1 Lizenzen", "your 1 licences
    now run" in five messages."""
    email = render(renderer, message, customer(1, locale=locale), reminder=reminder,
                   status=status)
    for where, body in zip(("subject", "html", "text"), parts(email), strict=True):
        found = ONE_LICENCE_PLURAL.search(body)
        assert found is None, (where, found and found.group(0))


@pytest.mark.parametrize("locale", LOCALES)
def test_one_licence_sentences_read_well(renderer: Renderer, locale: str) -> None:
    one = customer(1, locale=locale)
    expect = {
        "en": {"cancel_instructions": ["is now active, with 1 licence.",
                                       "has at least 1 licence and that your users"],
               "partner_invitation": ["we set up your new subscription with the same licence."],
               "lose_access_warning": ["with the same offer and the same licence."],
               "cancel_reminder": ["you pay for the same licence twice"],
               "transition_complete": ["and your licence now runs through Fabrikam"]},
        "de": {"cancel_instructions": ["ist jetzt aktiv, mit 1 Lizenz.",
                                       "mindestens 1 Lizenz hat und Ihre Benutzer"],
               "partner_invitation": ["richten wir Ihr neues Abonnement mit derselben Lizenz ein."],
               "lose_access_warning": ["mit demselben Angebot und derselben Lizenz."],
               "cancel_reminder": ["zahlen Sie dieselbe Lizenz doppelt"],
               "transition_complete": ["und Ihre Lizenz läuft jetzt über Fabrikam"]},
    }[locale]
    for message, sentences in expect.items():
        email = render(renderer, message, one, reminder=3 if message == "cancel_reminder" else 0)
        for body in (email.html, email.text):
            for sentence in sentences:
                assert sentence in body, (message, sentence)


# --- 4b. "the link asks for no delegated admin permissions" only when it says DAP=false ------

NO_DAP = {"en": "the link asks for no delegated admin permissions",
          "de": "der Link fordert keine delegierten Administratorrechte an"}
NO_ADMIN_ACCESS = {"en": "not give us administrator access", "de": "keinen Administratorzugriff"}
NOTHING_CHANGED = {"en": "not change or cancel anything by itself",
                   "de": "nichts geändert oder gekündigt"}


@pytest.mark.parametrize("locale", LOCALES)
def test_invitation_says_no_delegated_admin_only_when_the_link_says_so(locale: str) -> None:
    """The invitation and its reminders claim no admin access only for a DAP=false link."""
    without_param = ("https://admin.microsoft.com/Adminportal/Home?invType=ResellerRelationship"
                     "&partnerId={partner_id}&msppId=0#/BillingAccounts/partner-invitation")
    quiet = Renderer(Settings.model_validate({"partner": {"invitation_url": without_param}}))
    email = quiet.render("partner_invitation", customer(locale=locale), now=NOW)
    for body in (email.html, email.text):
        assert NO_DAP[locale] not in body
        assert "msppId=0#/BillingAccounts" in body  # the configured link is the one printed
    default = Renderer(SETTINGS).render("partner_invitation", customer(locale=locale), now=NOW)
    for body in (default.html, default.text):
        assert NO_DAP[locale] in body and "DAP=false" in body
    # Nor that accepting gives no administrator access (it used to say so whatever the link):
    # the invitation and every reminder, the rest of the reassurance unchanged.
    for renderer, claimed in ((Renderer(SETTINGS), True), (quiet, False)):
        for message, n in (("partner_invitation", 0), ("partner_invitation_reminder", 1),
                           ("partner_invitation_reminder", 2),
                           ("partner_invitation_reminder", 5)):
            email = renderer.render(message, customer(locale=locale), now=NOW,
                                    reminder_number=n, extra={"reminders_max": 5})
            for body in (email.html, email.text):
                assert (NO_ADMIN_ACCESS[locale] in body) is claimed, (message, n, body)
                assert NOTHING_CHANGED[locale] in body, (message, n, body)


# --- 5. the German cancel steps name the admin-center section --------------------------------


@pytest.mark.parametrize("message,reminder", [("cancel_instructions", 0), ("cancel_reminder", 1)])
def test_german_cancel_steps_name_subscription_and_payment_settings(
    renderer: Renderer, message: str, reminder: int
) -> None:
    de = render(renderer, message, customer(24, locale="de"), reminder=reminder)
    en = render(renderer, message, customer(24, locale="en"), reminder=reminder)
    assert "auf der Detailseite des Abonnements unter <strong>Abonnement- und " \
           "Zahlungseinstellungen</strong> (Subscription and payment settings)" in de.html
    assert 'auf der Detailseite des Abonnements unter "Abonnement- und ' \
           'Zahlungseinstellungen" (Subscription and payment settings)' in de.text
    assert "under <strong>Subscription and payment settings</strong>" in en.html
    assert 'under "Subscription and payment settings"' in en.text


INVITATIONS = [("partner_invitation", 0), ("partner_invitation_reminder", 1),
               ("partner_invitation_reminder", 2), ("partner_invitation_reminder", 3)]


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message,reminder", INVITATIONS)
def test_verify_by_phone_without_a_manager_name(
    renderer: Renderer, locale: str, message: str, reminder: int
) -> None:
    """An account manager known only by email: "call your account manager max@… on the number
    you know" became "call Fabrikam Cloud Services on a number you already know" (and the last
    reminder no longer says "your account manager max@… is ready to help")."""
    c = customer(24, locale=locale, account_manager_name="",
                 account_manager_email="max@fabrikam.example")
    email = render(renderer, message, c, reminder=reminder, extra={"reminders_max": 3})
    call = {"en": "call Fabrikam Cloud Services on a number you already know",
            "de": "rufen Sie Fabrikam Cloud Services unter einer Nummer an, die Sie bereits "
                  "kennen"}[locale]
    for body in (email.html, email.text):
        assert call in body
        assert "max@fabrikam.example" not in body
    named = render(renderer, message, replace(c, account_manager_name="Max Manager"),
                   reminder=reminder, extra={"reminders_max": 3})
    for body in (named.html, named.text):
        assert {"en": "call your account manager Max Manager on the number you know",
                "de": "rufen Sie Ihren Ansprechpartner Max Manager unter der Nummer an"}[
                    locale] in body


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message,reminder", INVITATIONS)
def test_an_invitation_prints_no_phone_number_to_call(
    renderer: Renderer, locale: str, message: str, reminder: int
) -> None:
    """The invitations tell the administrator to verify them on a number they already know, "not
    on a number taken from this email": so none prints one, in the body (the last reminder said
    "call us on +44 …") or in the footer. Every other customer email keeps the number."""
    phone = SETTINGS.partner.support_phone
    email = render(renderer, message, customer(locale=locale), reminder=reminder,
                   extra={"reminders_max": 3})
    known = {"en": "call us on a number you already know",
             "de": "rufen Sie uns unter einer Nummer an, die Sie bereits kennen"}[locale]
    for body in (email.html, email.text):
        assert phone not in body and "tel:" not in body, (message, reminder)
        assert known in body, (message, reminder)
    others = render(renderer, "cancel_reminder", customer(locale=locale), reminder=1)
    for body in (others.html, others.text):
        assert phone in body


@pytest.mark.parametrize("locale", LOCALES)
def test_an_escalated_reminder_names_no_manager_known_only_by_email(
    renderer: Renderer, locale: str
) -> None:
    """"We have copied your account manager, max@…, who …" became "… your account manager, who
    …"; a named manager is still named."""
    c = customer(24, locale=locale, account_manager_name="",
                 account_manager_email="max@fabrikam.example")
    email = render(renderer, "cancel_reminder", c, reminder=3, extra={"escalated": True})
    copied = {"en": "We have copied your account manager, who can walk you",
              "de": "Wir haben Ihren Ansprechpartner in Kopie gesetzt"}[locale]
    for body in (email.html, email.text):
        assert copied in body and "max@fabrikam.example" not in body
    named = render(renderer, "cancel_reminder", replace(c, account_manager_name="Max Manager"),
                   reminder=3, extra={"escalated": True})
    for body in (named.html, named.text):
        assert {"en": "We have copied your account manager, Max Manager, who",
                "de": "Wir haben Ihren Ansprechpartner Max Manager in Kopie"}[locale] in body


RECURRING_BILLING = {
    "en": ("If your admin center offers only to turn off recurring billing, that is not a "
           "cancellation: the subscription keeps running, and Microsoft keeps billing it, until "
           "the end of its term. Contact us or Microsoft support instead to have it cancelled."),
    "de": ("Bietet Ihr Admin Center nur an, die wiederkehrende Abrechnung zu deaktivieren, ist "
           "das keine Kündigung: Das Abonnement läuft weiter, und Microsoft rechnet es weiter ab, "
           "bis zum Ende seiner Laufzeit. Wenden Sie sich stattdessen an uns oder an den "
           "Microsoft-Support, um es kündigen zu lassen."),
}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("message,reminder", [("cancel_instructions", 0), ("cancel_reminder", 1)])
def test_turning_off_recurring_billing_is_not_offered_as_cancelling(
    renderer: Renderer, locale: str, message: str, reminder: int
) -> None:
    """It keeps the subscription running and billed to the end of its term (then Expired,
    Disabled, Deleted): the steps said "do that and tell us", then "Disabled straight away"."""
    email = render(renderer, message, customer(24, locale=locale), reminder=reminder)
    for body in (email.html, email.text):
        assert RECURRING_BILLING[locale] in body
        assert "do that and tell us" not in body and "tun Sie das" not in body


@pytest.mark.parametrize(("zone_name", "day"), [("Australia/Sydney", "10 March 2026"),
                                                ("Europe/London", "9 March 2026"),
                                                ("America/Los_Angeles", "9 March 2026")])
def test_a_date_is_the_day_in_the_customers_time_zone(renderer: Renderer, zone_name: str,
                                                      day: str) -> None:
    """Sync checked at 21:00 UTC on 9 March: in Sydney that is the morning of 10 March."""
    late = Observation(at=datetime(2026, 3, 9, 21, 0, tzinfo=UTC), source="sync:tenant",
                       direct_status="Enabled")
    c = customer(time_zone=zone_name)
    email = renderer.render("cancel_reminder", c, now=NOW, reminder_number=2,
                            extra={"escalated": False}, observation=late)
    ctx = build_context(SETTINGS, c, message="cancel_reminder", now=NOW, reminder_number=2,
                        observation=late)
    ctx.update(escalated=False)
    assert email == renderer.render_context("cancel_reminder", "en", ctx, fast=False)
    assert f"(checked on {day})" in email.text and f"(checked on {day})" in email.html
