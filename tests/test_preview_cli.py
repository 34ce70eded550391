"""`comms preview`: one ledger customer's email as html, text or .eml; every sample with --all."""

from __future__ import annotations

import email
import email.policy
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from comms.store.db import Database
from comms.store.models import Contact, Customer

SUPPORT = "https://admin.microsoft.com/#/support"
BILLING = "https://go.microsoft.com/fwlink/p/?linkid=842054"


def add_customer(db: Database, key: str, licences: int, *, name: str = "Contoso Ltd",
                 locale: str = "en", am_email: str = "sam@fabrikam.example") -> None:
    now = datetime.now(UTC)
    with db.session() as s:
        row = Customer(key=key, name=name, licences=licences, locale=locale,
                       stage="awaiting_cancellation", stage_entered_at=now - timedelta(days=4),
                       csp_live_at=now - timedelta(days=4, hours=1), tenant_id="tenant-42",
                       account_manager_name="Sam Manager",
                       account_manager_email=am_email,
                       created_at=now, updated_at=now)
        s.add(row)
        s.flush()
        assert row.id is not None
        s.add(Contact(customer_id=row.id, name="Ana Admin", email=f"ana@{key}.example",
                      role="primary"))
        s.add(Contact(customer_id=row.id, name="Bill Payer", email=f"bill@{key}.example",
                      role="billing"))
        s.add(Contact(customer_id=row.id, name="Tech Person", email=f"tech@{key}.example",
                      role="technical"))


@pytest.mark.parametrize(("licences", "link", "absent"), [(24, BILLING, SUPPORT),
                                                          (25, SUPPORT, BILLING)])
def test_preview_text_follows_the_customer(
    cli: Any, db: Database, licences: int, link: str, absent: str
) -> None:
    add_customer(db, "contoso", licences, name="<b>Contoso & Sons</b>")
    result = cli("preview", "contoso", "--message", "cancel_instructions", "--format", "text")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Hello Ana Admin,\n")
    assert f"of <b>Contoso & Sons</b> through Fabrikam Cloud Services is now active, with " \
           f"{licences} licences" in result.stdout
    assert link in result.stdout and absent not in result.stdout
    # The preview's customer was not observed by sync: no "(4 days so far)" (DESIGN §1).
    assert "days so far" not in result.stdout
    assert "If you have not cancelled it yet, Microsoft keeps billing it" in result.stdout


def test_preview_html_to_file_escapes_and_localises(cli: Any, db: Database,
                                                    tmp_path: Path) -> None:
    add_customer(db, "mueller", 10, name="<b>Müller & Söhne</b>", locale="de-AT")
    out = tmp_path / "p.html"
    result = cli("preview", "mueller", "-m", "lose_access_warning", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Wrote {out}"
    html = out.read_text(encoding="utf-8")
    assert '<html lang="de">' in html
    assert "&lt;b&gt;Müller &amp; Söhne&lt;/b&gt;" in html and "<b>Müller" not in html
    assert "Guten Tag Ana Admin," in html


def test_preview_eml_is_the_message_as_sent(cli: Any, db: Database, tmp_path: Path) -> None:
    add_customer(db, "contoso", 30)
    out = tmp_path / "m.eml"
    result = cli("preview", "contoso", "--message", "cancel_reminder", "--format", "eml",
                 "--out", str(out), "--reminder", "3")
    assert result.exit_code == 0, result.output
    msg = email.message_from_bytes(out.read_bytes(), policy=email.policy.default)
    # Sync has observed nothing for this customer: no "4 days billed twice" as a fact.
    assert msg["Subject"] == ("Urgent: if you have not cancelled your old Microsoft 365 "
                              "subscription yet, please do it today (Contoso Ltd)")
    # The campaign sends customer messages to primary and billing contacts, not technical.
    assert msg["To"] == "Ana Admin <ana@contoso.example>, Bill Payer <bill@contoso.example>"
    assert msg["From"] == "Fabrikam Transition Team <transition@fabrikam.example>" or \
        msg["From"].addresses[0].addr_spec == "transition@fabrikam.example"
    assert msg["Reply-To"].addresses[0].addr_spec == "transition@fabrikam.example"
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "URGENT" in text and SUPPORT in text
    assert "We have copied your account manager, Sam Manager" in text  # 3rd >= escalate_after 2
    assert SUPPORT in html


@pytest.mark.parametrize("case", ["no address", "suppressed"])
def test_preview_copies_the_account_manager_only_when_the_send_would(
    cli: Any, db: Database, case: str
) -> None:
    """The planner copies an account manager only when there is one who may be mailed; the
    preview said "We have copied your account manager" (and showed a Cc) regardless."""
    add_customer(db, "contoso", 30, am_email="" if case == "no address" else "sam@fabrikam.example")
    if case == "suppressed":
        assert cli("contacts", "opt-out", "sam@fabrikam.example").exit_code == 0
    result = cli("preview", "contoso", "-m", "cancel_reminder", "-f", "eml", "--reminder", "3")
    assert result.exit_code == 0, result.output
    msg = email.message_from_string(result.stdout, policy=email.policy.default)
    assert msg["Cc"] is None
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "URGENT" in text and "account manager" not in text


def test_preview_account_manager_alert_goes_to_the_manager(cli: Any, db: Database) -> None:
    add_customer(db, "contoso", 30)
    result = cli("preview", "contoso", "-m", "account_manager_alert", "-f", "eml",
                 "--reminder", "2")
    assert result.exit_code == 0, result.output
    msg = email.message_from_string(result.stdout, policy=email.policy.default)
    assert msg["To"] == "Sam Manager <sam@fabrikam.example>"
    assert str(msg["Subject"]).strip().startswith(
        "[Escalation] Contoso Ltd (contoso): no cancellation confirmed, CSP live for 4 days")


def test_preview_errors_are_one_clear_line(cli: Any, db: Database) -> None:
    add_customer(db, "contoso", 10)
    missing = cli("preview", "contosa", "--message", "kickoff")
    assert missing.exit_code == 1
    assert missing.stderr.startswith(
        "Error: No customer with key 'contosa'. Did you mean contoso?")
    unknown = cli("preview", "contoso", "--message", "kickof")
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("Error: No message named 'kickof'. Messages: "
                                     "account_manager_alert, cancel_instructions")
    bad_format = cli("preview", "contoso", "--message", "kickoff", "--format", "pdf")
    assert bad_format.exit_code == 2
    assert bad_format.stderr.strip() == "Error: Unknown --format 'pdf'; use html, text or eml."
    no_args = cli("preview")
    assert no_args.exit_code == 2
    assert "Give a customer KEY and --message NAME" in no_args.stderr


def test_preview_open_hands_the_file_to_the_browser(
    cli: Any, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import webbrowser

    add_customer(db, "contoso", 10)
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.py"
    browser.write_text(f"import sys; open({str(opened)!r}, 'w').write(sys.argv[1])\n")
    # A real command as the browser (webbrowser runs $BROWSER), recording what it was given.
    monkeypatch.setenv("BROWSER", f"{sys.executable} {browser} %s")
    monkeypatch.setattr(webbrowser, "_tryorder", None)
    monkeypatch.setattr(webbrowser, "_browsers", {})
    result = cli("preview", "contoso", "--message", "kickoff", "--open")
    assert result.exit_code == 0, result.output
    import time

    for _ in range(100):  # the browser command runs in the background
        if opened.exists() and opened.read_text():
            break
        time.sleep(0.05)
    uri = opened.read_text()
    assert uri.startswith("file://") and uri.endswith(".html")
    assert "Your Microsoft 365 subscription is moving" in Path(uri[len("file://"):]).read_text()


def test_preview_all_writes_every_branch_and_an_index(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "previews"
    result = cli("preview", "--all", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Wrote 96 previews and {out / 'index.html'}"
    index = (out / "index.html").read_text(encoding="utf-8")
    assert index.count('.html">') == 96 and index.count('.txt">text</a>') == 96
    for branch in ("24 licences", "25 licences", "26 licences", "reminder 3", "escalated",
                   "reminder 5, the last"):
        assert branch in index
    # The campaign's last reminder (max = 3 for invitations) says so; the ones before do not.
    last = out / "partner-invitation-reminder-en-24-licences-reminder-3-the-last.txt"
    assert "LAST REMINDER:" in last.read_text(encoding="utf-8")
    second = out / "partner-invitation-reminder-en-24-licences-reminder-2.txt"
    assert "LAST REMINDER" not in second.read_text(encoding="utf-8").upper()
    small = (out / "cancel-instructions-en-24-licences.html").read_text(encoding="utf-8")
    big = (out / "cancel-instructions-de-26-licences.txt").read_text(encoding="utf-8")
    assert BILLING in small and SUPPORT not in small
    assert "Microsoft-Support" in big and SUPPORT in big
    assert "&lt;b&gt;Contoso &amp; Sons&lt;/b&gt;" in small
    needs_out = cli("preview", "--all")
    assert needs_out.exit_code == 2
    assert needs_out.stderr.strip() == \
        "Error: --all needs --out DIR (the folder to write the previews to)."
