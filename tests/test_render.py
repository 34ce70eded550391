"""Rendering: both cancellation branches, escaping, strict variables, locales, user overrides,
and the fast inlining path producing exactly what render-then-premailer produces."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from lxml import etree

from comms.campaign import load_campaign
from comms.config import Settings
from comms.domain import ContactInfo, CustomerInfo, Observation
from comms.errors import TemplateError
from comms.render import (
    Renderer,
    _lxml_text,
    _normalise_text,
    build_context,
    inline_css,
    locale_chain,
)
from comms.services.preview import branches, sample_customers

NOW = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
SETTINGS = Settings()
BILLING = SETTINGS.partner.billing_url
SUPPORT = SETTINGS.partner.support_url
CUSTOMER_MESSAGES = [
    "kickoff", "partner_invitation", "partner_invitation_reminder", "lose_access_warning",
    "cancel_instructions", "cancel_reminder", "transition_complete",
]


def customer(licences: int = 24, *, name: str = "Contoso Ltd", locale: str = "en",
             **kw: object) -> CustomerInfo:
    base = CustomerInfo(
        key="contoso", name=name, licences=licences, stage="awaiting_cancellation",
        stage_entered_at=NOW - timedelta(days=5), locale=locale, tenant_id="tenant-123",
        primary_domain="contoso.example",
        contacts=(ContactInfo("Ana Admin", "ana@contoso.example"),),
        csp_live_at=NOW - timedelta(days=5, hours=3),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(SETTINGS)


# --- the two cancellation routes -------------------------------------------------------------


@pytest.mark.parametrize("message", ["cancel_instructions", "cancel_reminder"])
@pytest.mark.parametrize("licences", [24, 25, 26])
def test_cancellation_route_follows_threshold(
    renderer: Renderer, message: str, licences: int
) -> None:
    email = renderer.render(message, customer(licences), now=NOW, reminder_number=1)
    for body in (email.html, email.text):
        if licences < 25:  # fewer than 25: self-service in the admin portal, Billing
            assert BILLING in body
            assert "Your products" in body
            assert "Cancel subscription" in body
            assert SUPPORT not in body
        else:  # 25 exactly and above: Microsoft support, with what to have at hand
            assert SUPPORT in body
            assert BILLING not in body
            assert "Your products" not in body
            assert "tenant-123" in body  # tenant id to have at hand
        assert f"{licences} licences" in body
    assert f'href="{BILLING if licences < 25 else SUPPORT}"' in email.html


def test_threshold_comes_from_config() -> None:
    s = Settings.model_validate({"partner": {"licence_threshold": 10}})
    r = Renderer(s)
    below = r.render("cancel_instructions", customer(9), now=NOW)
    at = r.render("cancel_instructions", customer(10), now=NOW)
    assert BILLING in below.text and "fewer than 10" in below.text
    assert SUPPORT in at.text and "10 or more" in at.text


def test_days_billed_twice_and_escalating_reminders(renderer: Renderer) -> None:
    c = customer(30, csp_live_at=NOW - timedelta(days=12, hours=5))
    first = renderer.render("cancel_reminder", c, now=NOW, reminder_number=1)
    third = renderer.render("cancel_reminder", c, now=NOW, reminder_number=3,
                            extra={"escalated": True})
    assert first.subject.startswith("Reminder:")
    assert "LIVE FOR 12 DAYS" in first.text
    assert "The new subscription has been live for 12 days" in first.html
    # Nothing observed: no "billed twice" as a fact (DESIGN §1); observed Enabled: the count.
    assert third.subject.startswith("Urgent: if you have not cancelled your old Microsoft 365 ")
    active = Observation(at=NOW - timedelta(days=1), source="partner_center",
                         direct_status="Enabled")
    seen = renderer.render("cancel_reminder", c, now=NOW, reminder_number=3,
                           extra={"escalated": True}, observation=active)
    assert seen.subject.startswith("Urgent: 12 days billed twice. ")
    assert "URGENT" in third.text and "reminded you 2 times" in third.text
    assert "do not count on a refund or credit" in third.text
    no_am = renderer.render("cancel_reminder", c, now=NOW, reminder_number=3,
                            extra={"escalated": True})
    assert "account manager" not in no_am.text  # the sample has no account manager
    managed = replace(c, account_manager_name="Sam", account_manager_email="s@f.example")
    with_am = renderer.render("cancel_reminder", managed, now=NOW, reminder_number=3,
                              extra={"escalated": True})
    assert "We have copied your account manager, Sam" in with_am.text


def test_build_context_is_pure_and_complete() -> None:
    c = customer(24, csp_live_at=None)
    ctx = build_context(SETTINGS, c, message="cancel_instructions", now=NOW)
    assert ctx["self_service"] is True and ctx["threshold"] == 25
    assert ctx["days_billed_twice"] == 0
    links = ctx["links"]
    assert links.invitation == SETTINGS.partner.invitation_link  # type: ignore[attr-defined]
    assert "{partner_id}" not in links.invitation  # type: ignore[attr-defined]
    assert links.billing == BILLING and links.support == SUPPORT  # type: ignore[attr-defined]
    ctx2 = build_context(SETTINGS, customer(25), message="x", now=NOW + timedelta(days=3))
    assert ctx2["self_service"] is False and ctx2["days_billed_twice"] == 8
    assert ctx2["recipient"].email == "ana@contoso.example"  # type: ignore[attr-defined]


def test_account_manager_alert_lists_the_facts(renderer: Renderer) -> None:
    c = customer(40, name="Fourth Coffee", account_manager_name="Sam Manager",
                 account_manager_email="sam@fabrikam.example",
                 contacts=(ContactInfo("Ana Admin", "ana@contoso.example", "primary"),
                           ContactInfo("Bill Payer", "bill@contoso.example", "billing")))
    email = renderer.render("account_manager_alert", c, now=NOW, reminder_number=2)
    # Nothing observed: no "billed twice" in the subject, only the days since the CSP go-live.
    assert email.subject == ("[Escalation] Fourth Coffee (contoso): no cancellation confirmed, "
                             "CSP live for 5 days, 2 reminders sent")
    for fact in ("Hi Sam Manager,", "Licences:             40", "Days billed twice:    5",
                 "Reminders sent:       2", "Ana Admin (primary): ana@contoso.example",
                 "Bill Payer (billing): bill@contoso.example", "call to Microsoft support"):
        assert fact in email.text
    assert "the customer does not receive it" in email.text
    # One fact a line, the go-live date known or not (the unknown case ran two lines together).
    for locale, label in (("en", "\nOverlap cost so far: "), ("de", "\nMehrkosten bisher: ")):
        for live in (c.csp_live_at, None):
            other = replace(c, locale=locale, csp_live_at=live)
            text = renderer.render("account_manager_alert", other, now=NOW,
                                   reminder_number=2).text
            assert label in text, text


# --- escaping and strictness -----------------------------------------------------------------


def test_hostile_customer_name_is_shown_literally(renderer: Renderer) -> None:
    email = renderer.render("kickoff", customer(name="<b>Contoso & Sons</b>"), now=NOW)
    assert "&lt;b&gt;Contoso &amp; Sons&lt;/b&gt;" in email.html
    assert "<b>Contoso" not in email.html
    # Parsed as a browser would, the name is text, not markup.
    doc = etree.fromstring(email.html, etree.HTMLParser())
    assert doc.xpath("//b") == []
    assert any("<b>Contoso & Sons</b>" in t for t in doc.xpath("//p/text()"))
    # Subject and text body are not HTML: the name appears as written.
    assert email.subject.startswith("<b>Contoso & Sons</b>: ")
    assert "<b>Contoso & Sons</b>" in email.text


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_variable_fails_loudly_naming_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "kickoff/body.txt",
                 "{% extends layout %}\n{% block content %}\nHello\n{{ customer.nmae }}\n"
                 "{% endblock %}\n")
    r = Renderer(SETTINGS, template_dir=tmp_path)
    with pytest.raises(TemplateError) as info:
        r.render("kickoff", customer(), now=NOW)
    assert f"{path}:4:" in str(info.value)
    assert "nmae" in str(info.value)


def test_undefined_top_level_variable_in_condition_fails(tmp_path: Path) -> None:
    path = write(tmp_path, "kickoff/subject.txt", "{% if vip %}VIP {% endif %}Hello\n")
    r = Renderer(SETTINGS, template_dir=tmp_path)
    with pytest.raises(TemplateError, match=re.escape(f"{path}:1: 'vip' is undefined")):
        r.render("kickoff", customer(), now=NOW)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "kickoff/body.html",
                 "{% extends layout %}\n{% block content %}\n<p>{% if x %}</p>\n{% endblock %}\n")
    r = Renderer(SETTINGS, template_dir=tmp_path)
    with pytest.raises(TemplateError, match=re.escape(f"{path}:")) as info:
        r.render("kickoff", customer(), now=NOW)
    assert "syntax error" in str(info.value)


def test_sandbox_blocks_unsafe_attribute_access(tmp_path: Path) -> None:
    write(tmp_path, "kickoff/subject.txt", "{{ customer.__class__.__mro__ }}\n")
    r = Renderer(SETTINGS, template_dir=tmp_path)
    with pytest.raises(TemplateError):
        r.render("kickoff", customer(), now=NOW)


def test_unknown_message_names_the_known_ones(renderer: Renderer) -> None:
    with pytest.raises(TemplateError, match="Known messages: account_manager_alert, "):
        renderer.render("no_such_message", customer(), now=NOW)


# --- locales and overrides -------------------------------------------------------------------


def test_locale_chain() -> None:
    assert locale_chain("de-AT") == ["de-AT", "de", "en"]
    assert locale_chain("de_at") == ["de-at", "de", "en"]
    assert locale_chain("fr") == ["fr", "en"]
    assert locale_chain("") == ["en"]


@pytest.mark.parametrize(
    ("message", "locale", "expected"),
    [
        ("lose_access_warning", "fr", "en"),
        ("cancel_instructions", "fr-CA", "en"),
        ("lose_access_warning", "de", "de"),
        ("cancel_instructions", "de", "de"),
        ("cancel_instructions", "de-AT", "de"),
        ("kickoff", "de", "de"),
        ("cancel_reminder", "de-CH", "de"),
        ("kickoff", "fr", "en"),
    ],
)
def test_locale_fallback(renderer: Renderer, message: str, locale: str, expected: str) -> None:
    email = renderer.render(message, customer(locale=locale), now=NOW, reminder_number=1)
    assert email.locale == expected
    assert f'<html lang="{expected}">' in email.html
    if expected == "de":
        assert "Guten Tag Ana Admin," in email.text and "Mit freundlichen Grüßen" in email.text
    else:
        assert "Hello Ana Admin," in email.text and "Kind regards," in email.text


def test_german_cancel_instructions_both_routes(renderer: Renderer) -> None:
    small = renderer.render("cancel_instructions", customer(24, locale="de"), now=NOW)
    big = renderer.render("cancel_instructions", customer(25, locale="de"), now=NOW)
    assert small.subject.startswith("Schritt 2: Kündigen Sie")
    assert "Abrechnung > Ihre Produkte" in small.text and BILLING in small.text
    assert SUPPORT not in small.text
    assert "Microsoft-Support" in big.text and SUPPORT in big.text and BILLING not in big.text
    # Nothing observed: no "N days billed twice" (DESIGN §1), the conditional wording instead.
    assert "bisher 5 Tage" not in small.text and "Tage" not in small.subject
    assert "Falls Sie es noch nicht gekündigt haben, rechnet Microsoft es weiter ab" in small.text


def test_user_folder_overrides_builtin_by_file_name(tmp_path: Path) -> None:
    write(tmp_path, "kickoff/subject.txt", "Big news for {{ customer.name }}\n")
    write(tmp_path, "lose_access_warning/body.fr.html",
          '{% extends layout %}{% block content %}<p>Bonjour {{ customer.name }}</p>'
          '{% endblock %}')
    write(tmp_path, "lose_access_warning/body.fr.txt",
          "{% extends layout %}{% block content %}Bonjour {{ customer.name }}{% endblock %}")
    write(tmp_path, "lose_access_warning/subject.fr.txt", "Attention {{ customer.name }}")
    s = Settings.model_validate({"templates": {"folder": str(tmp_path)}})
    r = Renderer(s)
    kickoff = r.render("kickoff", customer(), now=NOW)
    assert kickoff.subject == "Big news for Contoso Ltd"
    assert "TWO THINGS WE WILL ASK YOU TO DO" in kickoff.text  # built-in body still used
    fr = r.render("lose_access_warning", customer(locale="fr"), now=NOW)
    assert fr.locale == "fr" and fr.subject == "Attention Contoso Ltd"
    assert "Bonjour Contoso Ltd" in fr.html and "Bonjour Contoso Ltd" in fr.text
    # The template_dir argument takes precedence over the configured folder.
    other = tmp_path / "other"
    write(other, "kickoff/subject.txt", "From the other folder")
    assert Renderer(s, template_dir=other).render(
        "kickoff", customer(), now=NOW).subject == "From the other folder"


def test_missing_text_body_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "notice/subject.txt", "Notice")
    path = write(tmp_path, "notice/body.html", "{% extends layout %}")
    r = Renderer(SETTINGS, template_dir=tmp_path)
    assert r.has_message("notice") and "notice" in r.messages()
    with pytest.raises(TemplateError, match=re.escape(f"{path}: HTML body without a text body")):
        r.render("notice", customer(), now=NOW)


# --- email-safe HTML -------------------------------------------------------------------------


@pytest.mark.parametrize("message", [*CUSTOMER_MESSAGES, "account_manager_alert"])
def test_html_is_email_client_safe(renderer: Renderer, message: str) -> None:
    email = renderer.render(message, customer(), now=NOW, reminder_number=1)
    html = email.html
    doc = etree.fromstring(html, etree.HTMLParser())
    assert doc.get("lang") == "en"
    assert "<script" not in html.lower() and "<link" not in html.lower()
    tables = doc.xpath("//table")
    assert tables and all(t.get("role") == "presentation" for t in tables)
    assert all(img.get("alt") for img in doc.xpath("//img"))
    assert doc.xpath("//div[@class='preheader']/text()")
    container = doc.xpath("//table[contains(@class, 'container')]")[0]
    assert container.get("width") == "600" and "max-width:600px" in container.get("style")
    style = "".join(doc.xpath("//style/text()"))
    assert "@media only screen and (max-width: 620px)" in style
    assert "!important" in style  # media rules must beat the inlined styles
    # Every other rule was inlined into style attributes.
    assert "padding: 32px" not in style and "font-family" not in style
    assert "padding:32px" in doc.xpath("//td[contains(@class,'content')]")[0].get("style")
    assert email.subject and "\n" not in email.subject
    assert email.text.endswith("\n") and "<p>" not in email.text
    assert len(html.encode()) < 100 * 1024


# --- fast path == render-then-premailer ------------------------------------------------------

EXOTIC_NAMES = [
    "<b>Contoso & Sons</b>", "Müller & Söhne GmbH", "O'Brien \"Quoted\" Ltd",
    "Tab\there\u00a0nbsp", "AT&amp;T literal", "Emoji 🚀 Ltd", "x" * 300, "  padded  ",
]


def _all_cases(r: Renderer) -> list[tuple[str, str, object]]:
    campaign = load_campaign()
    cases: list[tuple[str, str, object]] = []
    for message in r.messages():
        for locale in r.locales(message):
            for branch in branches(message, r.settings, campaign):
                cases.append((message, locale, branch))
    return cases


def test_fast_path_equals_render_then_premailer_everywhere(renderer: Renderer) -> None:
    cases = _all_cases(renderer)
    assert len(cases) >= 48  # every message x locale x branch
    checked = 0
    for message, locale, branch in cases:
        for c in sample_customers(SETTINGS, NOW, locale):
            if c.licences != branch.licences:  # type: ignore[attr-defined]
                continue
            for name in [c.name, *EXOTIC_NAMES[: 2 if checked > 40 else len(EXOTIC_NAMES)]]:
                ctx = build_context(SETTINGS, replace(c, name=name), message=message, now=NOW,
                                    reminder_number=branch.reminder_number)  # type: ignore[attr-defined]
                ctx["escalated"] = branch.escalated  # type: ignore[attr-defined]
                fast = renderer.render_context(message, locale, ctx, fast=True)
                slow = renderer.render_context(message, locale, ctx, fast=False)
                assert fast == slow, (message, locale, branch, name)
                checked += 1
    assert checked > 100


def test_fast_path_really_caches_per_skeleton() -> None:
    r = Renderer(SETTINGS)
    for i in range(30):
        r.render("cancel_instructions", customer(20 + i % 10, name=f"Customer {i}"), now=NOW)
    # Two branches (self-service / support), a handful of day counts: a few skeletons only.
    assert 1 <= len(r._skeletons) <= 4


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40))
def test_fast_path_equals_premailer_for_any_name(name: str) -> None:
    r = _HYPO_RENDERER
    ctx = build_context(SETTINGS, customer(24, name=name), message="cancel_instructions", now=NOW)
    fast = r.render_context("cancel_instructions", "en", ctx, fast=True)
    assert fast.html == inline_css(_plain_html(r, ctx))


_HYPO_RENDERER = Renderer(SETTINGS)


def _plain_html(r: Renderer, ctx: dict[str, object]) -> str:
    ts = r.resolve("cancel_instructions", "en")
    c = dict(ctx, locale="en", layout=ts.layout_html)
    c["subject"] = " ".join(r._render(ts.subject, dict(c, layout=ts.layout_text)).split())
    return r._render(ts.html, c)


@hsettings(max_examples=500)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30))
def test_plain_text_shortcut_matches_lxml(value: str) -> None:
    from markupsafe import escape

    escaped = str(escape(value))
    assert _normalise_text(escaped) == _lxml_text(escaped)
