"""The stage machine (pure): allowed moves, refusals naming the allowed ones, forced moves with a
note, side states. No database, no clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from comms import stages
from comms.campaign import Campaign, load_campaign
from comms.domain import CustomerInfo
from comms.errors import StageMoveRefused

AT = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def campaign() -> Campaign:
    return load_campaign()


def customer(stage: str = "imported", **kw: object) -> CustomerInfo:
    return CustomerInfo(key="CUST-1", name="Contoso Dental Ltd", licences=24, stage=stage,
                        stage_entered_at=AT, **kw)  # type: ignore[arg-type]


def test_default_campaign_stages_and_moves(campaign: Campaign) -> None:
    assert campaign.stage_names == ("imported", "announced", "invited", "approved",
                                    "awaiting_cancellation", "completed")
    assert stages.allowed_moves(campaign, "imported") == ("announced", "invited")
    assert stages.allowed_moves(campaign, "invited") == ("approved",)
    assert stages.allowed_moves(campaign, "completed") == ()
    assert stages.allowed_moves(campaign, "no_such_stage") == ()


@pytest.mark.parametrize(
    ("start", "to"),
    [("imported", "announced"), ("imported", "invited"), ("announced", "invited"),
     ("invited", "approved"), ("approved", "awaiting_cancellation"),
     ("awaiting_cancellation", "completed")],
)
def test_allowed_move_records_an_event(campaign: Campaign, start: str, to: str) -> None:
    event = stages.move(campaign, customer(start), to, at=AT, by="ann", source="cli",
                        note="call")
    assert event == stages.Event(kind="stage", at=AT, by="ann", source="cli",
                                 from_stage=start, to_stage=to, note="call", forced=False)


def test_disallowed_move_lists_allowed_ones(campaign: Campaign) -> None:
    with pytest.raises(StageMoveRefused) as exc:
        stages.move(campaign, customer("imported"), "completed", at=AT, by="ann", source="cli")
    assert str(exc.value) == (
        "Customer CUST-1 cannot move from 'imported' to 'completed'. Allowed: announced, "
        "invited. To move anyway, add --force with a --note saying why.")


def test_move_out_of_final_stage_says_none(campaign: Campaign) -> None:
    with pytest.raises(StageMoveRefused) as exc:
        stages.move(campaign, customer("completed"), "invited", at=AT, by="ann", source="cli")
    assert str(exc.value) == (
        "Customer CUST-1 cannot move from 'completed' to 'invited'. Allowed: none (final "
        "stage). To move anyway, add --force with a --note saying why.")


def test_forced_move_needs_a_note(campaign: Campaign) -> None:
    with pytest.raises(StageMoveRefused) as exc:
        stages.move(campaign, customer("imported"), "completed", at=AT, by="ann", source="cli",
                    force=True, note="  ")
    assert str(exc.value) == (
        "Forcing CUST-1 from 'imported' to 'completed' needs a --note saying why; it is "
        "recorded in the audit trail.")


def test_forced_move_with_note_is_marked_forced(campaign: Campaign) -> None:
    event = stages.move(campaign, customer("invited"), "imported", at=AT, by="ann",
                        source="cli", force=True, note="wrong customer invited")
    assert (event.from_stage, event.to_stage, event.forced, event.note) == (
        "invited", "imported", True, "wrong customer invited")


def test_force_on_an_allowed_move_is_not_marked_forced(campaign: Campaign) -> None:
    event = stages.move(campaign, customer("invited"), "approved", at=AT, by="ann",
                        source="cli", force=True)
    assert event.forced is False


def test_unknown_and_same_stage_are_refused(campaign: Campaign) -> None:
    with pytest.raises(StageMoveRefused) as exc:
        stages.move(campaign, customer(), "shipped", at=AT, by="ann", source="cli", force=True,
                    note="x")
    assert str(exc.value) == (
        "Unknown stage 'shipped'. Stages: imported, announced, invited, approved, "
        "awaiting_cancellation, completed.")
    with pytest.raises(StageMoveRefused) as exc:
        stages.move(campaign, customer("invited"), "invited", at=AT, by="ann", source="cli")
    assert str(exc.value) == "Customer CUST-1 is already in stage 'invited'."


@pytest.mark.parametrize(
    ("action", "flag", "before", "after"),
    [("pause", "paused", False, True), ("resume", "paused", True, False),
     ("opt_out", "opted_out", False, True), ("opt_in", "opted_out", True, False),
     ("lost", "lost", False, True), ("found", "lost", True, False)],
)
def test_side_events(action: stages.SideAction, flag: str, before: bool, after: bool) -> None:
    assert stages.side_flag(action) == (flag, after)
    c = customer("invited", **{flag: before})
    event = stages.side_event(c, action, at=AT, by="ann", source="cli", note="why")
    assert event == stages.Event(kind=action, at=AT, by="ann", source="cli",
                                 from_stage="invited", to_stage="invited", note="why")
    # Already in that state: no event, nothing to record.
    done = customer("invited", **{flag: after})
    assert stages.side_event(done, action, at=AT, by="ann", source="cli") is None


def test_is_sendable() -> None:
    assert stages.is_sendable(customer())
    for flag in ("paused", "opted_out", "lost"):
        assert not stages.is_sendable(customer(**{flag: True}))


def test_moves_follow_a_custom_campaign() -> None:
    custom = Campaign.model_validate({
        "initial_stage": "new",
        "stages": [{"name": "new", "next": ["done"]}, {"name": "done", "final": True}],
    })
    event = stages.move(custom, customer("new"), "done", at=AT, by="ann", source="cli")
    assert event.to_stage == "done"
    with pytest.raises(StageMoveRefused):
        stages.move(custom, customer("done"), "new", at=AT, by="ann", source="cli")
