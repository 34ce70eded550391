"""Who may still be mailed once a message is queued: pausing, withdrawals and coming back, a
bounced message asked for again, an account manager on the suppression list, and a block lifted
by a new contact or an opt-in. Every test goes through the CLI, the real ledger and the local
Graph sandbox."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import factories
import pytest
import sqlalchemy as sa
from alembic import command
from engine_helpers import T0, exported_env
from sqlmodel import select

from comms import outbox, planner
from comms.campaign import load_campaign
from comms.config import load_settings
from comms.domain import SentMessage
from comms.services import customers as customer_service
from comms.store import repo
from comms.store.db import Database, alembic_config, open_database
from comms.store.inbox_models import InboxCustomerState
from comms.store.models import Contact, Customer, Message, StageEvent, Suppression

NOW = T0.isoformat()
LATER = (T0 + timedelta(hours=1)).isoformat()  # Tue 2026-12-01 11:00 UTC, in the send window
HEADER = ("key,name,licences,stage,account_manager_name,account_manager_email,"
          "primary_contact_email,billing_contact_email\n")


@pytest.fixture
def env(tmp_path: Path, database_url: str, sandbox_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return exported_env(sandbox_factory, tmp_path, database_url, monkeypatch)


def _import(tmp_path: Path, rows: str, name: str = "c.csv") -> None:
    db = open_database(os.environ["COMMS_DATABASE_URL"])
    try:
        _import_into(db, tmp_path, rows, name)
    finally:
        db.dispose()


def _import_into(db: Database, tmp_path: Path, rows: str, name: str = "c.csv") -> int:
    """Import ``rows`` (after HEADER); the id of the first customer."""
    path = tmp_path / name
    path.write_text(HEADER + rows, encoding="utf-8")
    customer_service.import_customers(db, path, settings=load_settings(env={}),
                                      campaign=load_campaign(), now=T0, by="test")
    with db.session() as s:
        return int(s.exec(select(Customer.id).order_by(Customer.id)).first() or 0)


def _rows(db: Database) -> list[tuple[str, int, str, str]]:
    with db.session() as s:
        return [(m.message, m.sequence, m.status, m.last_error)
                for m in s.exec(select(Message).order_by(Message.id)).all()]


def _message(db: Database) -> Message:
    with db.session() as s:
        return s.exec(select(Message)).one()


def _sent_to(env: dict[str, Any]) -> list[list[str]]:
    return [sorted(m["to"]) for m in env["sandbox"].sent()]


def test_a_pause_withdraws_what_was_queued_and_resume_sends_it_once(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(tmp_path, "P1,Paused Ltd,5,invited,,,boss@p1.example,\n")
    assert "queued 1" in cli("run", "--now", NOW, "--limit", "0").stdout
    queued = _message(db)
    assert cli("customers", "pause", "P1", "--note", "CEO asked us to wait",
               "--now", NOW).exit_code == 0
    assert [(m.status, m.last_error) for m in [_message(db)]] == [("withdrawn",
                                                                   "customer paused")]
    assert cli("run", "--now", NOW).exit_code == 0
    assert env["sandbox"].sent() == []

    assert cli("customers", "resume", "P1", "--note", "go ahead", "--now", LATER).exit_code == 0
    r = cli("run", "--now", LATER)
    assert r.exit_code == 0, r.output
    assert _sent_to(env) == [["boss@p1.example"]]
    again = _message(db)  # the same row, queued again: one decision, one row, one send id
    assert (again.id, again.send_id, again.status) == (queued.id, queued.send_id, "sent")
    assert "Queued again after its withdrawal (customer paused)." in again.note
    assert cli("run", "--now", LATER).exit_code == 0
    assert len(env["sandbox"].sent()) == 1


def test_a_row_queued_before_a_pause_that_a_worker_reaches_is_withdrawn_not_sent(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    # `comms send` plans, then the pause commits before its dispatch (or a worker is behind):
    # the row is still queued when it is claimed.
    _import(tmp_path, "P2,Paused Ltd,5,invited,,,boss@p2.example,\n")
    assert "queued 1" in cli("run", "--now", NOW, "--limit", "0").stdout
    with db.session() as s:
        s.execute(sa.update(Customer).values(paused=True))
    assert cli("run", "--now", NOW).exit_code == 0
    assert env["sandbox"].sent() == []
    assert _rows(db) == [("partner_invitation", 0, "withdrawn", "customer paused")]


def test_a_message_withdrawn_by_a_stage_change_goes_out_when_the_customer_comes_back(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    """docs/campaign.md: "A message withdrawn from the outbox before it went out (the customer
    moved on first) is planned again if the customer comes back." It was planned, and then
    silently never queued: the withdrawn row held its (customer, message, sequence)."""
    _import(tmp_path, "B1,Back Ltd,5,invited,,,boss@b1.example,\n")
    assert "queued 1" in cli("run", "--now", NOW, "--limit", "0").stdout
    assert cli("customers", "set-stage", "B1", "approved", "--note", "x", "--yes",
               "--now", NOW).exit_code == 0
    assert _rows(db) == [("partner_invitation", 0, "withdrawn", "stage changed to approved")]
    back = cli("customers", "set-stage", "B1", "invited", "--note", "approved by mistake",
               "--yes", "--force", "--now", LATER)
    assert back.exit_code == 0, back.output
    r = cli("run", "--now", LATER)
    assert "queued 1" in r.stdout, r.output
    assert _sent_to(env) == [["boss@b1.example"]]
    assert [(m, s, st) for m, s, st, _ in _rows(db)] == [("partner_invitation", 0, "sent")]


def test_an_operator_withdrawal_is_final(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(tmp_path, "W1,Withdrawn Ltd,5,invited,,,boss@w1.example,\n")
    assert "queued 1" in cli("run", "--now", NOW, "--limit", "0").stdout
    mid = _message(db).id
    assert cli("outbox", "withdraw", str(mid), "--now", NOW).exit_code == 0
    for when in (LATER, (T0 + timedelta(days=1)).isoformat()):
        assert cli("run", "--now", when).exit_code == 0
    assert env["sandbox"].sent() == []
    m = _message(db)
    assert (m.status, m.error_code) == ("withdrawn", "withdrawn_by_operator")


def test_withdrawing_one_reminder_passes_it_over_and_the_next_ones_follow(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    # An operator withdraws reminder 1 (a typo, a customer on the phone). It planned that
    # reminder again at every run, the outbox refused it, and reminders 2 and 3 waited for it
    # for ever: the stage's later, escalating reminders were lost without a word.
    _import(tmp_path, "W1,Withdrawn Ltd,5,invited,,,boss@w1.example,\n")
    assert cli("run", "--now", NOW).exit_code == 0  # the invitation goes out
    day3 = (T0 + timedelta(days=3, hours=1)).isoformat()
    assert "queued 1" in cli("run", "--now", day3, "--limit", "0").stdout
    reminder = max(_rows_with_ids(db))
    assert reminder[1:3] == ("partner_invitation_reminder", 1)
    assert cli("outbox", "withdraw", str(reminder[0])).exit_code == 0
    for day in range(4, 22):
        assert cli("run", "--now", (T0 + timedelta(days=day)).isoformat()).exit_code == 0
    sent = [(m, n) for m, n, status, _ in _rows(db) if status == "sent"]
    assert sent == [("partner_invitation", 0), ("partner_invitation_reminder", 2),
                    ("partner_invitation_reminder", 3)]
    assert ("partner_invitation_reminder", 1, "withdrawn") in [r[:3] for r in _rows(db)]
    assert len(env["sandbox"].sent()) == 3


def test_a_reminder_sent_by_hand_is_the_next_reminder_never_one_more(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    # `comms send KEY --message partner_invitation_reminder` before the first planned reminder
    # took sequence 0 (a "reminder 0" the planner does not count): the customer got max + 1.
    _import(tmp_path, "W1,Withdrawn Ltd,5,invited,,,boss@w1.example,\n")
    assert cli("run", "--now", NOW).exit_code == 0  # the invitation goes out
    by_hand = cli("send", "W1", "--message", "partner_invitation_reminder", "--yes", "--now",
                  (T0 + timedelta(days=1)).isoformat())
    assert by_hand.exit_code == 0, by_hand.output
    for day in range(2, 22):
        assert cli("run", "--now", (T0 + timedelta(days=day)).isoformat()).exit_code == 0
    sent = [(m, n) for m, n, status, _ in _rows(db) if status == "sent"]
    assert sent == [("partner_invitation", 0), ("partner_invitation_reminder", 1),
                    ("partner_invitation_reminder", 2), ("partner_invitation_reminder", 3)]
    assert len(env["sandbox"].sent()) == 4


def _rows_with_ids(db: Database) -> list[tuple[int, str, int]]:
    with db.session() as s:
        return [(m.id or 0, m.message, m.sequence) for m in s.exec(select(Message)).all()]


def test_a_customer_named_twice_is_sent_to_once(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(tmp_path, "T1,Twice Ltd,5,invited,,,boss@t1.example,\n")
    path = tmp_path / "tags.csv"
    path.write_text("key,name,licences,stage,tags,primary_contact_email\n"
                    "T1,Twice Ltd,5,invited,wave1,boss@t1.example\n", encoding="utf-8")
    assert cli("customers", "import", str(path)).exit_code == 0
    r = cli("send", "T1", "t1", "--tag", "wave1", "--yes", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert _sent_to(env) == [["boss@t1.example"]]


def test_a_bounced_message_is_not_sent_again_without_resend(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(tmp_path, "N1,Bounce Ltd,5,invited,,,boss@n1.example,bills@n1.example\n")
    assert cli("run", "--now", NOW).exit_code == 0
    assert _sent_to(env) == [["bills@n1.example", "boss@n1.example"]]
    with db.session() as s:  # what `comms inbox sync` records for boss@'s hard bounce
        s.execute(sa.update(Message).values(status="bounced", error_code="5.1.1"))
    assert cli("contacts", "opt-out", "boss@n1.example", "--note", "5.1.1").exit_code == 0
    again = cli("send", "N1", "--message", "partner_invitation", "--yes", "--now", NOW)
    assert again.exit_code != 0
    assert ("partner_invitation is already sent (a bounce came back for a recipient)"
            in " ".join(again.stderr.split())), again.stderr
    assert "--resend" in again.stderr
    assert len(env["sandbox"].sent()) == 1


def test_an_account_manager_on_the_suppression_list_gets_no_note_and_no_cc(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(tmp_path, "A1,AM Ltd,5,invited,Alex,Alex.Manager@fabrikam.example,"
                      "boss@a1.example,\n")
    assert cli("contacts", "opt-out", "alex.manager@fabrikam.example",
               "--note", "left; mailbox bounces").exit_code == 0
    with db.session() as s:
        cid = s.exec(select(Customer.id)).one()
        info = repo.load_customers(s, [cid])[cid]
    assert info.account_manager_suppressed
    # Far enough on that the escalated reminder (account manager copied and alerted) is due.
    history = [SentMessage("partner_invitation", 0, "sent", "invited", T0, T0),
               SentMessage("partner_invitation_reminder", 1, "sent", "invited",
                           T0 + timedelta(days=3), T0 + timedelta(days=3))]
    due = planner.plan(info, history, T0 + timedelta(days=30), load_campaign()).due
    assert due and all(not d.internal for d in due)
    assert all(c.email.lower() != "alex.manager@fabrikam.example"
               for d in due for c in (*d.to, *d.cc))

    # An internal note queued before the opt-out (or by the inbox) is withdrawn at dispatch.
    factories.queued(db, cid, "account_manager_alert", 2, to="alex.manager@fabrikam.example",
                     stage="invited", internal=True)
    assert cli("run", "--now", NOW, "--limit", "0").exit_code == 0
    assert cli("run", "--now", NOW).exit_code == 0
    internal = [r for r in _rows(db) if r[0] == "account_manager_alert"]
    assert internal == [("account_manager_alert", 2, "withdrawn",
                         "every recipient is on the suppression list")]
    assert all("alex.manager@fabrikam.example" not in [a.lower() for a in m["to"]]
               for m in env["sandbox"].sent())


def test_a_new_contact_or_an_opt_in_lifts_the_block_at_the_next_run(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _import(tmp_path, "C1,New Contact Ltd,5,invited,,,dead@c1.example,\n"
                      "C2,Opt In Ltd,5,invited,,,back@c2.example,\n")
    for address, note in (("dead@c1.example", "5.1.1"), ("back@c2.example", "by mistake")):
        r = cli("contacts", "opt-out", address, "--note", note, "--now", NOW)
        assert r.exit_code == 0, r.output
    assert cli("run", "--now", NOW).exit_code == 0
    assert env["sandbox"].sent() == []
    # What the bounce note asks for: a working address by import; and an opt-in.
    _import(tmp_path, "C1,New Contact Ltd,5,invited,,,alive@c1.example,\n", "c2.csv")
    assert cli("contacts", "opt-in", "back@c2.example", "--now", LATER).exit_code == 0
    r = cli("run", "--now", LATER)
    assert r.exit_code == 0, r.output
    assert sorted(_sent_to(env)) == [["alive@c1.example"], ["back@c2.example"]]


def _suppressed_by_inbox(db: Database) -> tuple[int, int]:
    """Two customers sharing a hard-bounced address (one as its account manager) and one
    customer whose contact opted out by reply, as `comms inbox sync` records them."""
    c1 = factories.customer(db, "B1")
    c2 = factories.customer(db, "B2", account_manager_email="IT@contoso.example")
    with db.session() as s:
        s.add(Contact(customer_id=c1, name="IT", email="It@Contoso.example", role="primary"))
        s.add(Contact(customer_id=c2, name="CEO", email="ceo@contoso.example", role="primary"))
        s.add(Suppression(email="it@contoso.example", reason="bounce",
                          at=datetime(2026, 11, 30, 9, tzinfo=UTC),
                          by="inbox:transition@fabrikam.example 5.1.1"))
        s.add(Suppression(email="ceo@contoso.example",
                          reason="opt-out reply: Re: your move | please stop emailing me",
                          at=datetime(2026, 11, 29, 9, tzinfo=UTC),
                          by="inbox:transition@fabrikam.example"))
    return c1, c2


def _lifted_events(db: Database) -> list[tuple[int, str, str, str]]:
    with db.session() as s:
        return [(e.customer_id, e.kind, e.by, e.note) for e in s.exec(
            select(StageEvent).where(StageEvent.kind == "suppression_lifted")
            .order_by(StageEvent.id)).all()]


def test_opt_in_of_a_bounced_or_opted_out_address_needs_a_note_and_is_recorded(
    db: Database, cli: Any
) -> None:
    c1, c2 = _suppressed_by_inbox(db)
    for address, lifted in (("IT@contoso.example", "hard bounce 5.1.1 on 2026-11-30"),
                            ("ceo@contoso.example", "opted out by reply on 2026-11-29")):
        r = cli("contacts", "opt-in", address)
        assert r.exit_code == 2, r.output
        assert lifted in r.stderr and "--note" in r.stderr and "Nothing changed" in r.stderr
    with db.session() as s:
        assert len(s.exec(select(Suppression)).all()) == 2
        assert {c.next_due_at for c in s.exec(select(Customer)).all()} == {None}
    assert _lifted_events(db) == []

    r = cli("contacts", "opt-in", "IT@contoso.example", "--note", "new mailbox, checked by phone")
    assert r.exit_code == 0, r.output
    assert "it@contoso.example removed from the suppression list (was: hard bounce 5.1.1 on " \
           "2026-11-30); 2 customers planned again" in " ".join(r.stdout.split())
    r = cli("contacts", "opt-in", "ceo@contoso.example", "--note", "asked to be mailed again")
    assert r.exit_code == 0, r.output
    assert "(was: opted out by reply on 2026-11-29 (Re: your move | please stop emailing me))" \
        in " ".join(r.stdout.split())
    events = _lifted_events(db)
    assert [(cid, by) for cid, _, by, _ in events] == [(c1, "tester"), (c2, "tester"),
                                                       (c2, "tester")]
    assert events[0][3] == ("it@contoso.example taken off the suppression list (was: hard "
                            "bounce 5.1.1 on 2026-11-30); note: new mailbox, checked by phone")
    assert "opted out by reply on 2026-11-29" in events[2][3]
    assert "asked to be mailed again" in events[2][3]
    with db.session() as s:
        assert s.exec(select(Suppression)).all() == []
    shown = cli("customers", "show", "B1").stdout
    assert "suppression_lifted" in shown and "new mailbox, checked by phone" in " ".join(
        shown.split())


def test_opt_in_of_an_operators_suppression_says_what_it_lifts(db: Database, cli: Any) -> None:
    cid = factories.customer(db, "M1")
    with db.session() as s:
        s.add(Contact(customer_id=cid, name="IT", email="it@m1.example", role="primary"))
    assert cli("contacts", "opt-out", "it@m1.example", "--note", "by mistake").exit_code == 0
    r = cli("contacts", "opt-in", "it@m1.example")  # no note needed: an operator's own block
    assert r.exit_code == 0, r.output
    assert "(was: suppressed by tester on " in r.stdout and "(by mistake)" in r.stdout
    assert [(c, k) for c, k, _, _ in _lifted_events(db)] == [(cid, "suppression_lifted")]


def test_queueing_again_keeps_the_unique_key(db: Database, tmp_path: Path) -> None:
    """A re-queued withdrawn row is the same row; any other existing row is left alone."""
    cid = _import_into(db, tmp_path, "K1,Key Ltd,5,invited,,,k@k1.example,\n")
    first = factories.queued(db, cid, "partner_invitation", 0, to="k@k1.example")
    with db.session() as s:
        assert outbox.insert_messages(s, [factories.message_row(
            cid, "partner_invitation", 0, to="k@k1.example")]) == []  # queued: skipped
        s.execute(sa.update(Message).values(status="sent"))
        assert outbox.insert_messages(s, [factories.message_row(
            cid, "partner_invitation", 0, to="k@k1.example")]) == []  # sent: skipped
        s.execute(sa.update(Message).values(status="withdrawn", last_error="stage changed"))
        assert outbox.insert_messages(s, [factories.message_row(
            cid, "partner_invitation", 0, to="k@k1.example")]) == [first]
        # The same key twice in one call (PostgreSQL refuses an upsert that touches a row
        # twice in one command): one row, the first.
        twice = outbox.insert_messages(s, [
            factories.message_row(cid, "partner_invitation_reminder", 1, to="first@k1.example"),
            factories.message_row(cid, "partner_invitation_reminder", 1, to="second@k1.example"),
        ])
        assert len(twice) == 1
        assert "first@k1.example" in (s.get(Message, twice[0]) or Message()).to_json


def test_migration_0010_marks_the_rows_an_operator_withdrew(db: Database, tmp_path: Path) -> None:
    """Before 0010 an operator's withdrawal left only its note; the upgrade marks those rows
    so the planner never queues them again, and leaves every other row as it was."""
    cid = _import_into(db, tmp_path, "M1,Mig Ltd,5,invited,,,m@m1.example,\n")
    by_hand = factories.queued(db, cid, "partner_invitation", 0, status="withdrawn",
                               note="withdrawn by alice.")
    by_run = factories.queued(db, cid, "partner_invitation_reminder", 1, status="withdrawn",
                              last_error="stage changed to approved")
    _migrate(db, "0009", down=True)
    _migrate(db, "head", down=False)
    codes = _codes(db)
    assert codes == {by_hand: "withdrawn_by_operator", by_run: ""}
    _migrate(db, "0009", down=True)
    assert _codes(db) == {by_hand: "", by_run: ""}
    _migrate(db, "head", down=False)


def _codes(db: Database) -> dict[int, str]:
    with db.engine.connect() as conn:
        return {int(r[0]): str(r[1]) for r in conn.execute(
            sa.text("SELECT id, error_code FROM messages"))}


def _migrate(db: Database, revision: str, *, down: bool) -> None:
    cfg = alembic_config(db.url)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
    db.engine.dispose()


def test_an_import_that_changes_a_customer_renders_its_queued_mail_again(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    """Queued (a backlog), not yet sent: the import corrects the billing contact and the
    licence count. What goes out is what is true now: the new contact (never the removed
    one), and the route for the new count."""
    _import(tmp_path, "I1,Import Ltd,24,awaiting_cancellation,,,boss@i1.example,"
                      "old-bills@i1.example\n")
    assert "queued 1" in cli("run", "--now", NOW, "--limit", "0").stdout
    _import(tmp_path, "I1,Import Ltd,30,awaiting_cancellation,,,boss@i1.example,"
                      "new-bills@i1.example\n", "c2.csv")
    assert _rows(db)[0][2:] == ("withdrawn", "customer changed by import of c2.csv")
    r = cli("run", "--now", LATER)
    assert r.exit_code == 0, r.output
    assert _sent_to(env) == [["boss@i1.example", "new-bills@i1.example"]]
    html = env["sandbox"].sent()[0]["html"]
    assert "with 30 licences" in html and "admin.microsoft.com/#/support" in html
    assert [(m, s, st) for m, s, st, _ in _rows(db)] == [("cancel_instructions", 0, "sent")]


def test_a_reminder_queued_before_the_customer_replied_waits_for_the_hold(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    cid = _import_into(db, tmp_path, "H1,Hold Ltd,5,invited,,,boss@h1.example,\n")
    reminder = factories.queued(db, cid, "partner_invitation_reminder", 1, to="boss@h1.example")
    hold = T0 + timedelta(days=5)
    with db.session() as s:  # what `comms inbox sync` records for a human reply
        s.add(InboxCustomerState(customer_id=cid, reminders_held_until=hold, updated_at=T0))
    assert cli("run", "--now", NOW).exit_code == 0
    with db.session() as s:
        row = s.get(Message, reminder)
        assert row is not None
        # The invitation (sequence 0) may go; the reminder may not.
        assert row.send_id not in [m["send_id"] for m in env["sandbox"].sent()]
        assert (row.status, row.last_error) == (
            "withdrawn", "reminders held until 2026-12-06 10:00 UTC (the customer replied)")
