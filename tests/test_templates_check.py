"""`comms templates check`: passes on the built-in templates, and names file and line for every
kind of problem a template editor can introduce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comms.paths import builtin_templates_dir


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_templates_pass(cli: Any) -> None:
    result = cli("templates", "check")
    assert result.exit_code == 0, result.output
    # 8 messages; 3 threshold branches each, x3 reminder numbers for the two reminder messages
    # and the escalation note; in English and German.
    assert result.stdout.strip() == "Templates OK: 84 renders of 8 messages."


def test_every_problem_is_listed_with_file_and_line(cli: Any, tmp_path: Path) -> None:
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
