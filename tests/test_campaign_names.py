"""The campaign names its internal messages, the stage each message belongs to, and the stage in
which the CSP subscription is live (a setting, so stages can be renamed)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import factories
import pytest

from comms.campaign import load_campaign
from comms.errors import CampaignError
from comms.services import customers as svc
from comms.store import repo
from comms.store.db import Database

RENAMED = """
initial_stage = "new"
csp_live_stage = "live"

[[stages]]
name = "new"
next = ["live"]

[[stages]]
name = "live"
on_enter = "cancel_instructions"
  [stages.reminders]
  message = "cancel_reminder"
  first_after_days = 2
  every_days = 3
  max = 3
  escalate_after = 2
  escalation_message = "am_note"
"""


def test_default_campaign_knows_internal_messages_and_stages() -> None:
    c = load_campaign()
    assert c.internal_messages() == frozenset({"account_manager_alert"})
    assert c.stage_of("cancel_reminder") == "awaiting_cancellation"
    assert c.stage_of("account_manager_alert") == "awaiting_cancellation"
    assert c.stage_of("kickoff") == "announced"
    assert c.stage_of("no_such_message") is None
    assert c.csp_live_stage == "awaiting_cancellation"


def test_renamed_stages_carry_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(RENAMED, encoding="utf-8")
    c = load_campaign(path)
    assert c.internal_messages() == frozenset({"am_note"})
    assert c.csp_live_stage == "live"


def test_csp_live_stage_must_be_a_stage(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(RENAMED.replace('csp_live_stage = "live"', 'csp_live_stage = "gone"'),
                    encoding="utf-8")
    with pytest.raises(CampaignError, match="csp_live_stage 'gone' is not a stage"):
        load_campaign(path)


def test_entering_the_renamed_csp_live_stage_starts_the_clock(db: Database,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(RENAMED, encoding="utf-8")
    campaign = load_campaign(path)
    factories.customer(db, "K1", stage="new")
    at = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    svc.set_stage(db, campaign, ["K1"], "live", now=at, by="tester")
    with db.session() as s:
        assert repo.get_customer(s, "K1").csp_live_at == at
