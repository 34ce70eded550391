"""A customer changed by someone else while comms is about to mail it (an operator's set-stage,
an import, stage sync): the mail is planned and rendered on what is committed, never on a read
the change made stale. On the real databases: SQLite serialises writers; PostgreSQL runs them
side by side, which is where these changes used to be lost."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from engine_helpers import T0, TEST_PARTNER_ID, seed
from sqlmodel import col, select

from comms.campaign import load_campaign
from comms.config import load_settings
from comms.delivery.outbox_dir import OutboxDirTransport
from comms.errors import StateConflict
from comms.outbox import Clock
from comms.render import Renderer
from comms.services import customers as svc
from comms.services import engine, sending
from comms.store.db import Database
from comms.store.models import Customer, Message

HEADER = "key,name,licences,stage,primary_contact_email\n"


def _queued(db: Database) -> list[tuple[str, str]]:
    with db.session() as s:
        return [(key, message) for key, message in s.exec(
            select(Customer.key, Message.message)
            .join(Customer, col(Customer.id) == col(Message.customer_id))
            .where(col(Message.status) == "queued").order_by(col(Message.id))).all()]


def _move_while_held(db: Database, key: str, locked: threading.Event,
                     release: threading.Event) -> None:
    """Another writer: holds the customer's row while it moves it to awaiting_cancellation
    (the CSP subscription went live), commits when released (or after 5 s)."""
    with db.session() as s:
        s.execute(sa.select(Customer.id).where(col(Customer.key) == key).with_for_update())
        locked.set()
        release.wait(timeout=5)
        s.execute(sa.update(Customer).where(col(Customer.key) == key).values(
            stage="awaiting_cancellation", stage_entered_at=T0, csp_live_at=T0,
            next_due_at=T0))
        s.commit()


def test_a_customer_being_moved_while_the_run_plans_is_planned_on_its_new_stage(
    db: Database, tmp_path: Path
) -> None:
    settings, campaign = load_settings(env={}), load_campaign()
    moving, other = seed(db, tmp_path, 2, stage="approved")
    if db.is_sqlite:
        # One writer at a time: the move commits before the run may write, and the run
        # reads it. (PostgreSQL below is the case that can interleave.)
        svc.set_stage(db, campaign, [moving], "awaiting_cancellation", now=T0, by="operator")
        engine.plan_and_queue(db, settings, campaign, Renderer(settings), now=T0)
    else:
        locked, release = threading.Event(), threading.Event()
        mover = threading.Thread(target=_move_while_held, args=(db, moving, locked, release))
        mover.start()
        assert locked.wait(timeout=10)
        # The run does not wait for the move, and does not plan the customer on the stage
        # being left: that plan's next_due_at (none: approved has no reminders) would
        # overwrite the move's, and the customer would never be planned again.
        report = engine.plan_and_queue(db, settings, campaign, Renderer(settings), now=T0)
        release.set()
        mover.join(timeout=10)
        assert report.customers == 1
        assert _queued(db) == [(other, "lose_access_warning")]
        engine.plan_and_queue(db, settings, campaign, Renderer(settings),
                              now=T0 + timedelta(hours=1))
    assert (moving, "cancel_instructions") in _queued(db)
    with db.session() as s:
        assert s.exec(select(Customer.stage).where(col(Customer.key) == moving)).one() == (
            "awaiting_cancellation")


def test_a_customer_changed_after_the_send_was_prepared_is_not_sent_the_old_rendering(
    db: Database, tmp_path: Path
) -> None:
    # `comms send` renders, shows and asks; a colleague's import corrects the licence count
    # (10 -> 300: Microsoft support, not self-service) while the operator reads the question.
    settings = load_settings(env={"COMMS_PARTNER_ID": TEST_PARTNER_ID,
                                  "COMMS_DELIVERY_TRANSPORT": "outbox_dir",
                                  "COMMS_DELIVERY_OUTBOX_DIR": str(tmp_path / "out")})
    campaign = load_campaign()
    csv_file = tmp_path / "c.csv"
    csv_file.write_text(HEADER + "K1,Big Co,10,awaiting_cancellation,it@big.example\n")
    svc.import_customers(db, csv_file, settings=settings, campaign=campaign, now=T0, by="t")
    clock = Clock(T0)
    plan = sending.prepare_send(db, settings, campaign, Renderer(settings), keys=["K1"],
                                tag=None, clock=clock)
    csv_file.write_text(HEADER + "K1,Big Co,300,awaiting_cancellation,it@big.example\n")
    svc.import_customers(db, csv_file, settings=settings, campaign=campaign, now=clock.now(),
                         by="colleague")
    with pytest.raises(StateConflict) as refused:
        sending.send_now(db, settings, OutboxDirTransport(settings), plan, by="operator",
                         clock=clock)
    assert str(refused.value) == (
        "1 customer changed since the messages were prepared: K1 (licences). Nothing was "
        "queued or sent (the messages were rendered from the old values). Run the command "
        "again to see them as they are now.")
    with db.session() as s:
        assert s.exec(select(Message)).all() == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.eml"))
    # Prepared again, the message carries the route for 300 licences.
    plan = sending.prepare_send(db, settings, campaign, Renderer(settings), keys=["K1"],
                                tag=None, clock=clock)
    sending.send_now(db, settings, OutboxDirTransport(settings), plan, by="operator",
                     clock=clock)
    with db.session() as s:
        sent = s.exec(select(Message).where(col(Message.status) == "sent")).one()
    assert "ASK MICROSOFT SUPPORT" in sent.body_text()


def test_a_bulk_move_confirmed_on_a_plan_that_changed_meanwhile_moves_nobody(
    db: Database, tmp_path: Path
) -> None:
    # `set-stage --where-stage approved ... --force` shows its plan and asks; stage sync moves
    # one of the customers on meanwhile. The move used to be planned again from the new rows
    # and forced: that customer was dragged back to where the operator meant the others to go.
    campaign = load_campaign()
    first, second = seed(db, tmp_path, 2, stage="approved")

    def meanwhile(plan: list[svc.StageChange]) -> None:
        assert [c.key for c in plan] == [first, second]
        svc.set_stage(db, campaign, [second], "awaiting_cancellation", now=T0,
                      by="sync:partner_center", source="sync")

    with pytest.raises(StateConflict) as refused:
        svc.move_customers(db, campaign, [], "invited", where_stage="approved", now=T0,
                           by="operator", note="re-invite", force=True, review=meanwhile)
    assert f"{second} (shown in approved, now in awaiting_cancellation)" in str(refused.value)
    with db.session() as s:
        stages = dict(s.exec(select(Customer.key, Customer.stage)).all())
    assert stages == {first: "approved", second: "awaiting_cancellation"}
