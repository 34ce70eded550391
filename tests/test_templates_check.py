"""`comms templates check`: passes on the built-in templates, and names file and line for every
kind of problem a template editor can introduce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from comms.paths import builtin_templates_dir

PARTNER_ID = "4f8c2a51-1d3e-4b7a-9c6f-2e5d8a7b1c30"
# DESIGN.md §1: the current admin-center links (the seed's portal.office.com ones are outdated).
CURRENT_LINKS = {
    "COMMS_PARTNER_ID": PARTNER_ID,
    "COMMS_PARTNER_BILLING_URL": "https://go.microsoft.com/fwlink/p/?linkid=842054",
    "COMMS_PARTNER_SUPPORT_URL": "https://admin.microsoft.com/#/support",
}


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """A partner that set its id and the current links, as `comms templates check` expects."""
    for name, value in CURRENT_LINKS.items():
        monkeypatch.setenv(name, value)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_templates_pass(cli: Any, configured: None) -> None:
    result = cli("templates", "check")
    assert result.exit_code == 0, result.output
    # 8 messages; 3 threshold branches each, x3 reminder numbers for the two reminder messages
    # and the escalation note; in English and German.
    assert result.stdout.strip() == "Templates OK: 96 renders of 8 messages."


def test_every_problem_is_listed_with_file_and_line(
    cli: Any, tmp_path: Path, configured: None
) -> None:
    folder = tmp_path / "mine"
    undefined = write(folder, "kickoff/body.txt",
                      "{% extends layout %}\n{% block content %}\n\n{{ customer.nickname }}\n"
                      "{% endblock %}\n")
    syntax = write(folder, "partner_invitation/body.html",
                   "{% extends layout %}\n{% block content %}\n<p>{% for x in %}</p>\n"
                   "{% endblock %}\n")
    html_only = write(folder, "promo/body.html",
                      "{% extends layout %}{% block content %}<p>Hi</p>{% endblock %}")
    write(folder, "promo/subject.txt", "Promo")
    links = write(folder, "transition_complete/body.html",
                  "{% extends layout %}\n{% block content %}\n<p>Done</p>\n"
                  '<p><a href="#">Read more</a></p>\n'
                  '<p><a href="https://example.com/{partner_id}/x">Portal</a></p>\n'
                  '<p><a href="{{ customer.primary_domain if false else \'\' }}">Empty</a></p>\n'
                  '<img src="https://fabrikam.example/banner.png" width="600">\n'
                  "{% endblock %}\n")
    big = write(folder, "partner_invitation_reminder/body.html",
                "{% extends layout %}\n{% block content %}\n"
                + "<p>" + "Lorem ipsum dolor sit amet. " * 4000 + "</p>\n{% endblock %}\n")
    empty_subject = write(folder, "cancel_reminder/subject.txt", "{# nothing #}\n")

    result = cli("templates", "check", "--folder", str(folder))
    assert result.exit_code == 1
    out = result.stderr
    assert "template problem(s):" in out
    assert f"{undefined}:4: 'types.SimpleNamespace object' has no attribute 'nickname'" in out
    assert f"{syntax}:3: template syntax error" in out
    assert f"{html_only}:1: HTML body without a text body; create promo/body.txt" in out
    assert f"{links}:4: link '#' is empty or a placeholder" in out
    assert f"{links}:5: link 'https://example.com/{{partner_id}}/x' is empty or a placeholder" \
        in out
    assert f"{links}:6: link '' is empty or a placeholder" in out
    assert f"{links}:7: <img src='https://fabrikam.example/banner.png'> has no alt text" in out
    assert f"{big}: rendered HTML is" in out and "keep it under 100 KB" in out
    assert f"{empty_subject}:1: the subject rendered empty" in out
    # Built-ins untouched by the folder still render: no problem names them.
    assert str(builtin_templates_dir() / "lose_access_warning") not in out


def test_folder_from_config_is_checked(cli: Any, tmp_path: Path, monkeypatch: Any) -> None:
    folder = tmp_path / "tpl"
    bad = write(folder, "kickoff/subject.txt", "Hello {{ customer.nmae }}\n")
    monkeypatch.setenv("COMMS_TEMPLATES_FOLDER", str(folder))
    result = cli("templates", "check")
    assert result.exit_code == 1
    assert f"{bad}:1: 'types.SimpleNamespace object' has no attribute 'nmae'" in result.stderr


def test_campaign_message_without_template(cli: Any, tmp_path: Path, monkeypatch: Any) -> None:
    campaign = (builtin_templates_dir().parent.parent / "config" / "campaign.toml").read_text()
    custom = tmp_path / "campaign.toml"
    custom.write_text(campaign.replace('on_enter = "kickoff"', 'on_enter = "hello_there"'))
    monkeypatch.setenv("COMMS_CAMPAIGN_FILE", str(custom))
    result = cli("templates", "check")
    assert result.exit_code == 1
    assert ("campaign message 'hello_there' has no template: create hello_there/subject.txt, "
            "body.html and body.txt") in result.stderr


def config_file(tmp_path: Path, templates: str) -> Path:
    path = tmp_path / "comms.toml"
    path.write_text(f'[partner]\nid = "{PARTNER_ID}"\n[templates]\n{templates}', encoding="utf-8")
    return path


def test_unset_partner_id_and_denied_config_link_fail(
    cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMS_PARTNER_BILLING_URL",
                       "https://portal.office.com/admin/default.aspx#Billing")
    monkeypatch.setenv("COMMS_PARTNER_SUPPORT_URL", CURRENT_LINKS["COMMS_PARTNER_SUPPORT_URL"])
    result = cli("templates", "check")
    assert result.exit_code == 1
    assert ("[partner] id is all zeros (00000000-0000-0000-0000-000000000000): every partner "
            "invitation would carry a link that invites the customer to no partner. Set it to "
            "your Partner Center id (Account settings > Identifiers) in comms.toml or "
            "COMMS_PARTNER_ID") in " ".join(result.stderr.split())
    assert ("[partner] billing_url (https://portal.office.com/admin/default.aspx#Billing): "
            "mentions portal.office.com, a denied host ([templates] deny_hosts)") in result.stderr


def test_denied_hosts_phrases_zero_ids_and_undefined_are_found(
    cli: Any, tmp_path: Path, configured: None
) -> None:
    folder = tmp_path / "mine"
    cfg = config_file(tmp_path, f'folder = "{folder}"\n'
                                'deny_hosts = ["portal.office.com", "evil.example"]\n'
                                'forbidden_phrases = ["we guarantee a refund"]\n')
    html = write(folder, "transition_complete/body.html",
                 "{% extends layout %}\n{% block content %}\n<p>Done</p>\n"
                 '<p><a href="https://login.evil.example/x">Sign in</a></p>\n'
                 '<p><a href="https://admin.microsoft.com/?partnerId=00000000-0000-0000-0000-'
                 '000000000000">Accept</a></p>\n{% endblock %}\n')
    text = write(folder, "transition_complete/body.txt",
                 "{% extends layout %}\n{% block content %}\nDone.\n"
                 "Remember: we\n  GUARANTEE a   refund.\nSee https://portal.office.com\n"
                 "{% endblock %}\n")
    subject = write(folder, "kickoff/subject.txt", "Hello {{ [customer.nmae] }}\n")
    result = cli("--config", str(cfg), "templates", "check")
    assert result.exit_code == 1
    out = result.stderr
    assert f"{html}:4: mentions evil.example, a denied host ([templates] deny_hosts)" in out
    assert f"{text}:6: mentions portal.office.com, a denied host" in out
    assert (f"{text}:4: says 'we guarantee a refund', a forbidden phrase "
            "([templates] forbidden_phrases); reword it") in out
    assert (f"{html}:5: link 'https://admin.microsoft.com/?partnerId=00000000-0000-0000-0000-"
            "000000000000' holds an all-zero partner id") in out
    assert f"{subject}:1: 'types.SimpleNamespace object' has no attribute 'nmae'" in out
    assert "[partner] id" not in out  # the configured id is fine
    assert out.count("a forbidden phrase") == 1  # the built-in templates do not say it


def test_symlink_out_of_the_folder_is_reported(
    cli: Any, tmp_path: Path, configured: None
) -> None:
    secret = tmp_path / "key.pem"
    secret.write_text("SECRET-KEY-MATERIAL\n", encoding="utf-8")
    folder = tmp_path / "mine"
    write(folder, "kickoff/body.txt", "{% extends layout %}\n{% block content %}\n"
                                     "{% include '_footer.txt' %}\n{% endblock %}\n")
    (folder / "_footer.txt").symlink_to(secret)
    result = cli("templates", "check", "--folder", str(folder))
    assert result.exit_code == 1
    assert "SECRET-KEY-MATERIAL" not in result.output
    assert (f"{folder / '_footer.txt'}: leads to {secret.resolve()}, outside the template "
            "folders; comms refuses to read it") in result.stderr
    assert f"{folder / 'kickoff' / 'body.txt'}:3: template '_footer.txt' resolves to" \
        in result.stderr


def test_expected_locales_without_templates_are_noted_not_failed(
    cli: Any, tmp_path: Path, configured: None
) -> None:
    cfg = config_file(tmp_path, 'locales = ["fr", "de-AT"]\n')
    result = cli("--config", str(cfg), "templates", "check")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert ("Note: locale 'fr' falls back to 'en' for 8 message(s): account_manager_alert, "
            "cancel_instructions, cancel_reminder, kickoff, lose_access_warning, "
            "partner_invitation, partner_invitation_reminder, transition_complete") in lines
    # Every built-in message has German: de-AT falls back to de, never to en.
    assert not any(line.startswith("Note: locale 'de-AT' falls back to 'en'") for line in lines)
    assert any(line.startswith("Note: locale 'de-AT' falls back to 'de' for 8 message(s): ")
               for line in lines), lines
    assert lines[-1] == "Templates OK: 96 renders of 8 messages."


def test_config_check_refuses_an_all_zero_partner_id(
    cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMS_DELIVERY_TRANSPORT", "outbox_dir")
    result = cli("config", "check")
    assert result.exit_code == 3
    assert ("- [partner] id is all zeros (00000000-0000-0000-0000-000000000000): every partner "
            "invitation would carry a link that invites the customer to no partner. Set it to "
            "your Partner Center id (Account settings > Identifiers) in comms.toml or "
            "COMMS_PARTNER_ID") in " ".join(result.stderr.split())
    monkeypatch.setenv("COMMS_PARTNER_ID", PARTNER_ID)
    ok = cli("config", "check")
    assert ok.exit_code == 0, ok.output
