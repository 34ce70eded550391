"""Loading and validating campaign files: the shipped one, and broken ones with the exact messages
a user sees (each names the file, where, what is wrong and, where it helps, the fix)."""

from __future__ import annotations

from datetime import date, time
from pathlib import Path

import pytest

from comms.campaign import Campaign, Reminders, SendWindow, default_campaign_path, load_campaign
from comms.errors import CampaignError

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
[[stages]]
name = "imported"
next = ["invited"]

[[stages]]
name = "invited"
on_enter = "partner_invitation"
"""


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "campaign.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    assert info.value.exit_code == 3
    assert info.value.message == (
        f"The campaign definition has {len(info.value.problems)} problem(s); fix them and run "
        "`comms config check`:"
    )
    prefix = f"{path}: "
    assert all(p.startswith(prefix) for p in info.value.problems)
    return [p.removeprefix(prefix) for p in info.value.problems]


# --- the shipped campaign --------------------------------------------------------------------


def test_shipped_campaign_is_the_default_and_matches_the_design() -> None:
    assert default_campaign_path() == REPO / "config" / "campaign.toml"
    c = load_campaign()
    assert c == load_campaign(REPO / "config" / "campaign.toml")
    assert c.stage_names == (
        "imported", "announced", "invited", "approved", "awaiting_cancellation", "completed",
    )
    assert c.initial_stage == "imported"
    assert c.recipients == ("primary", "billing")
    assert [s.on_enter for s in c.stages] == [
        None, "kickoff", "partner_invitation", "lose_access_warning", "cancel_instructions",
        "transition_complete",
    ]
    assert c.stage("invited").reminders == Reminders(
        message="partner_invitation_reminder", first_after_days=3, every_days=4, max=3
    )
    assert c.stage("awaiting_cancellation").reminders == Reminders(
        message="cancel_reminder", first_after_days=2, every_days=3, max=5, escalate_after=2,
        escalation_message="account_manager_alert",
    )
    assert [s.name for s in c.stages if s.final] == ["completed"]
    assert c.window == SendWindow(
        days=("mon", "tue", "wed", "thu", "fri"), start=time(9), end=time(17),
        holidays=(date(2026, 12, 25), date(2026, 12, 28), date(2027, 1, 1), date(2027, 3, 26),
                  date(2027, 3, 29), date(2027, 5, 3), date(2027, 5, 31), date(2027, 8, 30),
                  date(2027, 12, 27), date(2027, 12, 28)),
    )
    assert c.messages() == [
        "kickoff", "partner_invitation", "partner_invitation_reminder", "lose_access_warning",
        "cancel_instructions", "cancel_reminder", "account_manager_alert", "transition_complete",
    ]


def test_every_shipped_message_has_a_template_folder_name() -> None:
    # Message names double as template folder names and outbox keys: lower_snake_case.
    for name in load_campaign().messages():
        assert name.replace("_", "").isalnum() and name == name.lower()


def test_minimal_campaign_takes_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    c = load_campaign(path)
    assert isinstance(c, Campaign)
    assert c.window == SendWindow() and c.window.weekday_numbers == frozenset(range(5))
    assert c.name == "csp-transition" and c.recipients == ("primary", "billing")
    assert c.stage("invited").reminders is None
    assert not c.has_stage("approved")
    with pytest.raises(KeyError):
        c.stage("approved")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_campaign(path).stage_names == ("imported", "invited")


# --- files that cannot be read ---------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    assert str(info.value) == (
        f"Campaign file {path} does not exist; fix campaign_file (or COMMS_CAMPAIGN_FILE) or "
        "copy config/campaign.toml there."
    )


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[[stages]\nname = 1\n", encoding="utf-8")
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    assert str(info.value) == (
        f"{path} is not valid TOML: Expected ']]' at the end of an array declaration "
        "(at line 1, column 9)"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    assert str(info.value) == f"{path} is not UTF-8 text; save it as UTF-8."


def test_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CampaignError) as info:
        load_campaign(tmp_path)
    assert str(info.value) == f"Cannot read campaign file {tmp_path}: Is a directory"


# --- broken definitions: every problem at once, exactly worded -------------------------------


def test_typos_and_wrong_types_are_all_reported(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
recipients = ["primary", "boss"]
colour = "red"
[window]
days = ["mon", "sunday"]
[[stages]]
name = "imported"
next = ["invited"]
[[stages]]
name = "invited"
on_enter = "Partner-Invitation"
reminder = "oops"
  [stages.reminders]
  message = "partner_invitation_reminder"
  first_after_days = "3"
  every_days = 0
  max = true
""") == [
        "window.days: unknown weekday(s) ['sunday']; use mon, tue, wed, thu, fri, sat, sun",
        "recipients: unknown role(s) ['boss']; use primary, billing, technical",
        "stages[1] 'invited': on_enter: message name 'Partner-Invitation' must be "
        "lower_snake_case (the name of its template folder)",
        "stages[1] 'invited': reminders.first_after_days: Input should be a valid number "
        "(got '3')",
        "stages[1] 'invited': reminders.every_days: Input should be greater than 0 (got 0)",
        "stages[1] 'invited': reminders.max: Input should be a valid integer (got True)",
        "stages[1] 'invited': reminder: unknown key (got 'oops')",
        "colour: unknown key (got 'red')",
    ]


def test_missing_required_keys(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
[[stages]]
description = "no name"
  [stages.reminders]
  message = "nudge"
""") == [
        "stages[0]: name: Field required",
        "stages[0]: reminders.first_after_days: Field required",
        "stages[0]: reminders.every_days: Field required",
        "stages[0]: reminders.max: Field required",
    ]
    assert problems_of(tmp_path, 'name = "empty"\n') == ["stages: Field required"]


def test_window_must_open_before_it_closes(tmp_path: Path) -> None:
    assert problems_of(tmp_path, MINIMAL + "[window]\nstart = 18:00:00\nend = 08:00:00\n") == [
        "window: start 18:00:00 must be before end 08:00:00 (a window cannot cross midnight)",
    ]


def test_window_needs_a_weekday_and_real_dates(tmp_path: Path) -> None:
    assert problems_of(tmp_path, MINIMAL + '[window]\ndays = []\nholidays = ["25 Dec"]\n') == [
        "window.days: at least one weekday is required",
        "window.holidays[0]: Input should be a valid date or datetime, input is too short "
        "(got '25 Dec')",
    ]


def test_stage_names_and_moves(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
initial_stage = "new"
[[stages]]
name = "Imported"
""") == [
        "stages[0] 'Imported': name: stage name 'Imported' must be lower_snake_case",
    ]
    assert problems_of(tmp_path, 'initial_stage = "new"\n' + MINIMAL) == [
        "campaign: initial_stage 'new' is not a stage (['imported', 'invited'])",
    ]
    assert problems_of(tmp_path, MINIMAL.replace('["invited"]', '["invitd"]')) == [
        "campaign: stage 'imported': next names unknown stage(s) ['invitd']",
    ]
    assert problems_of(tmp_path, MINIMAL + '[[stages]]\nname = "imported"\n') == [
        "campaign: stage names repeat: ['imported', 'invited', 'imported']",
    ]
    assert problems_of(tmp_path, MINIMAL.replace('["invited"]', '["imported", "invited"]')) == [
        "stages[0] 'imported': stage 'imported' lists itself in next; remove it",
    ]


def test_a_sync_rule_written_in_the_campaign_names_one_of_its_stages(tmp_path: Path) -> None:
    # A typo made sync observe the cancellation and never move anyone (no transition_complete).
    assert problems_of(tmp_path, MINIMAL + '[sync]\ndirect_inactive = "invitd"\n') == [
        "campaign: [sync] direct_inactive = 'invitd' is not a stage (['imported', 'invited']); "
        'name one of them, or "" to turn the rule off',
    ]
    path = tmp_path / "ok.toml"
    path.write_text(MINIMAL + '[sync]\ncsp_active = "invited"\ndirect_inactive = ""\n',
                    encoding="utf-8")
    assert load_campaign(path).sync.stage_for("csp_active") == "invited"


def test_final_stages_have_no_next_and_no_reminders(tmp_path: Path) -> None:
    assert problems_of(tmp_path, MINIMAL + 'final = true\nnext = ["imported"]\n') == [
        "stages[1] 'invited': stage 'invited' is final but lists next = ['imported']; "
        "remove next or set final = false",
    ]
    assert problems_of(tmp_path, MINIMAL + """final = true
  [stages.reminders]
  message = "nudge"
  first_after_days = 1
  every_days = 1
  max = 1
""") == [
        "stages[1] 'invited': stage 'invited' is final, and final stages send no reminders; "
        "remove [stages.reminders] or set final = false",
    ]


def test_escalation_must_be_reachable(tmp_path: Path) -> None:
    assert problems_of(tmp_path, MINIMAL + """  [stages.reminders]
  message = "nudge"
  first_after_days = 1.5
  every_days = 2
  max = 3
  escalate_after = 4
""") == [
        "stages[1] 'invited': reminders: escalate_after = 4 is more than max = 3, so the "
        "account manager would never be told; lower escalate_after or raise max",
    ]
    assert problems_of(tmp_path, MINIMAL + """  [stages.reminders]
  message = "nudge"
  first_after_days = 1
  every_days = 2
  max = 3
  escalate_after = 0
""") == [
        "stages[1] 'invited': reminders.escalate_after: Input should be greater than or equal "
        "to 1 (got 0)",
    ]


def test_a_message_name_is_used_once(tmp_path: Path) -> None:
    text = MINIMAL.replace('next = ["invited"]',
                           'on_enter = "partner_invitation"\nnext = ["invited"]')
    assert problems_of(tmp_path, text) == [
        "campaign: message 'partner_invitation' is used twice (stage 'imported' on_enter and "
        "stage 'invited' on_enter); each message is sent once per customer, so give each use "
        "its own name",
    ]
    # Two escalating stages cannot share the default escalation message either.
    two = MINIMAL + """next = ["waiting"]
  [stages.reminders]
  message = "nudge"
  first_after_days = 1
  every_days = 1
  max = 2
  escalate_after = 1
[[stages]]
name = "waiting"
  [stages.reminders]
  message = "waiting_nudge"
  first_after_days = 1
  every_days = 1
  max = 2
  escalate_after = 2
"""
    assert problems_of(tmp_path, two) == [
        "campaign: message 'account_manager_alert' is used twice (stage 'invited' "
        "reminders.escalation_message and stage 'waiting' reminders.escalation_message); each "
        "message is sent once per customer, so give each use its own name",
    ]
    fixed = two.replace("escalate_after = 2\n",
                        'escalate_after = 2\n  escalation_message = "w_alert"\n')
    path = tmp_path / "fixed.toml"
    path.write_text(fixed, encoding="utf-8")
    assert load_campaign(path).messages() == [
        "partner_invitation", "nudge", "account_manager_alert", "waiting_nudge", "w_alert",
    ]


def test_config_check_reports_campaign_problems(
    tmp_path: Path, cli: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(MINIMAL + "[window]\nstart = 18:00:00\nend = 08:00:00\n", encoding="utf-8")
    monkeypatch.setenv("COMMS_CAMPAIGN_FILE", str(path))
    monkeypatch.setenv("COMMS_DELIVERY_TRANSPORT", "outbox_dir")
    monkeypatch.setenv("COMMS_PARTNER_ID", "4f8c2a51-1d3e-4b7a-9c6f-2e5d8a7b1c30")
    result = cli("config", "check")  # type: ignore[operator]
    assert result.exit_code == 3
    assert result.stderr == (
        "Error: 1 problem in built-in defaults:\n"
        f"  - {path}: window: start 18:00:00 must be before end 08:00:00 (a window cannot "
        "cross midnight)\n"
    )
    path.write_text(MINIMAL, encoding="utf-8")
    ok = cli("config", "check")  # type: ignore[operator]
    assert ok.exit_code == 0 and ok.stdout.endswith("\nConfiguration OK (built-in defaults).\n")


def test_the_shipped_holidays_include_substitute_days_and_warn_when_they_run_out() -> None:
    window = load_campaign().window
    # Boxing Day 2026 is a Saturday: the bank holiday is Monday 28 December.
    assert date(2026, 12, 28) in window.holidays
    assert window.holidays_run_out(date(2027, 6, 1)) is None
    late = window.holidays_run_out(date(2027, 12, 28))
    assert late is not None and "no date after 2027-12-28" in late
    assert SendWindow().holidays_run_out(date(2030, 1, 1)) is None  # none configured: no noise
