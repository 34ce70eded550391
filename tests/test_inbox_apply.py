"""Applying inbox effects against the real ledger (SQLite or PostgreSQL), no Graph needed:
the set-based chunk path equals the one-by-one path, and a message another sync recorded
meanwhile is skipped with none of its effects applied twice."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, seed_lettered
from sqlmodel import select

from comms import outbox
from comms.campaign import load_campaign
from comms.config import load_settings
from comms.inbox import effects, service
from comms.inbox.classify import Attachment, Inbound
from comms.services import outbox_admin
from comms.store.db import Database
from comms.store.inbox_models import InboundMessage, InboxCustomerState
from comms.store.models import Customer, Message, Suppression, new_message_row

BOX = "transition@fabrikam.example"


def _reply(graph_id: str, sender: str, text: str = "done") -> Inbound:
    return Inbound(BOX, graph_id, subject="RE: x", from_address=sender, text=text)


def _run(db: Database, messages: list[Inbound],
         sent: dict[str, str] | None = None) -> service.SyncReport:
    """Apply ``messages``; ``sent``: what Sent Items answers (internetMessageId -> send id)."""
    report = service.SyncReport()
    caches = service._Caches()
    caches.sent.update({(BOX, "internetMessageId", mid): sid for mid, sid in (sent or {}).items()})
    service._process(db, load_settings(env={}), load_campaign().inbox, None,  # type: ignore[arg-type]
                     messages, now=T0, dry_run=False, report=report, caches=caches)
    return report


def _sent(db: Database, key: str, to: str, *, internal: bool = False, cc: str = "",
          sequence: int = 0) -> str:
    """An outbox row sent to ``to`` for customer ``key``; returns its send id."""
    with db.session() as s:
        cid = s.exec(select(Customer.id).where(Customer.key == key)).one()
        row = new_message_row(
            customer_id=cid, message=service.NOTE_MESSAGE if internal else "partner_invitation",
            sequence=sequence, stage="invited", to_json=outbox.addresses_json([(to, "")]),
            cc_json=outbox.addresses_json([(cc, "")] if cc else []), subject="s", text="t",
            html="<p>t</p>", now=T0, status="sent", sent_at=T0, internal=internal)
        outbox.insert_messages(s, [row])
    return str(row["send_id"])


def test_a_message_recorded_meanwhile_is_skipped_with_its_effects(
    db: Database, tmp_path: Path
) -> None:
    seed_lettered(db, tmp_path, ("A", "B", "C"))
    with db.session() as s:
        s.add(InboundMessage(mailbox=BOX, graph_id="g1", kind="reply", processed_at=T0))
    report = _run(db, [_reply("g1", "admin@a.example"), _reply("g2", "admin@b.example"),
                       _reply("g3", "admin@c.example", "Bitte abmelden")])
    assert (report.new, report.skipped) == (2, 1)
    assert report.kinds == {"reply": 1, "optout": 1}
    with db.session() as s:
        held = {c.key: s.get(InboxCustomerState, c.id) for c in s.exec(select(Customer)).all()}
        notes = s.exec(select(Message.customer_id).where(Message.message == service.NOTE_MESSAGE)
                       ).all()
        sup = s.exec(select(Suppression.email)).all()
    assert held["A"] is None  # the other sync's message: no effect applied here
    b = held["B"]
    assert b is not None and b.reminders_held_until == T0 + timedelta(days=7)
    assert len(notes) == 1 and sup == ["admin@c.example"]


def test_chunk_counts_soft_bounces_and_notes_once_per_customer_per_day(
    db: Database, tmp_path: Path
) -> None:
    seed_lettered(db, tmp_path, ("A", "B", "C"))
    replies = [_reply(f"r{i}", "admin@a.example", f"answer {i}") for i in range(5)]
    report = _run(db, replies)
    assert report.new == 5 and report.effects["notes"] == 1 and report.effects["held"] == 5
    again = _run(db, [_reply("r9", "admin@a.example")])
    assert again.effects["notes"] == 0  # same day: the account manager already has a note


def test_questions_about_cancelling_the_subscription_reach_a_human_and_opt_nobody_out(
    db: Database, tmp_path: Path
) -> None:
    from test_inbox_classify import NOT_OPTOUTS

    seed_lettered(db, tmp_path, ("A", "B", "C"))
    report = _run(db, [_reply(f"q{i}", "admin@a.example", text)
                       for i, text in enumerate(NOT_OPTOUTS)]
                  + [_reply("e1", "admin@b.example", "Please remove me from your mailing list."),
                     _reply("d1", "admin@c.example", "Bitte keine E-Mails mehr.")])
    assert report.kinds == {"reply": len(NOT_OPTOUTS), "optout": 2}
    with db.session() as s:
        sup = sorted(s.exec(select(Suppression.email)).all())
        notes = s.exec(select(Message.customer_id).where(Message.message == service.NOTE_MESSAGE)
                       ).all()
        a = s.exec(select(Customer).where(Customer.key == "A")).one()
        held = s.get(InboxCustomerState, a.id)
    assert sup == ["admin@b.example", "admin@c.example"]
    assert notes == [a.id]  # the account manager reads the questions
    assert held is not None and held.reminders_held_until == T0 + timedelta(days=7)


def test_the_account_managers_answer_to_an_internal_note_does_nothing_to_the_customer(
    db: Database, tmp_path: Path
) -> None:
    seed_lettered(db, tmp_path, ("A", "B", "C"))
    note = _sent(db, "A", "am@f.example", internal=True)
    answers = [Inbound(BOX, f"n{i}", subject="RE: [comms] A Ltd (A) replied",
                       from_address="am@f.example", text=text,
                       headers={"in-reply-to": "<note@fabrikam.example>"})
               for i, text in enumerate(["ok, noted", "Thanks. Stop sending me these."])]
    report = _run(db, answers, sent={"<note@fabrikam.example>": note})
    assert report.kinds == {"unmatched": 2} and not report.effects
    with db.session() as s:
        rows = s.exec(select(InboundMessage)).all()
        assert s.exec(select(InboxCustomerState)).all() == []  # no hold
        assert s.exec(select(Suppression.email)).all() == []  # the AM still gets notes
        assert s.exec(select(Message.id).where(Message.status == "queued")).all() == []
    assert {(r.customer_id, r.rule) for r in rows} == {
        (None, "unmatched: answers an internal note (outbox #1), not the customer")}


def test_an_optout_phrase_from_the_account_manager_copied_on_customer_mail_suppresses_nobody(
    db: Database, tmp_path: Path
) -> None:
    seed_lettered(db, tmp_path, ("A", "B", "C"))
    sid = _sent(db, "A", "admin@a.example", cc="am@f.example")
    answer = Inbound(BOX, "r1", subject="RE: invitation", from_address="am@f.example",
                     text="Please unsubscribe me.", headers={"in-reply-to": "<inv@f.example>"})
    report = _run(db, [answer], sent={"<inv@f.example>": sid})
    assert report.kinds == {"reply": 1}
    with db.session() as s:
        assert s.exec(select(Suppression.email)).all() == []
        row = s.exec(select(InboundMessage)).one()
    assert "not a contact" in row.detail


def _ndr(sid: str, failed: str, subject: str, sender: str, text: str) -> Inbound:
    """A hard (5.1.1) delivery-status report on the message with send id ``sid``, naming
    ``failed`` as the final recipient."""
    return Inbound(
        BOX, "b1", subject=subject, from_address=sender, text=text,
        headers={"content-type": "multipart/report; report-type=delivery-status"},
        attachments=(Attachment("message/delivery-status", f"Final-Recipient: rfc822; {failed}"
                                "\nAction: failed\nStatus: 5.1.1\n"),
                     Attachment("message/rfc822", f"x-comms-send-id: {sid}\n")))


def test_a_bounce_for_an_address_we_did_not_mail_suppresses_nobody_and_flags_the_customer(
    db: Database, tmp_path: Path
) -> None:
    """admin@a forwards to a dead address; that hop's NDR names the forward target. The
    single recipient must not be taken for it: it received the message."""
    seed_lettered(db, tmp_path, ("A", "B", "C"))
    sid = _sent(db, "A", "admin@a.example")
    report = _run(db, [_ndr(sid, "old.admin@gm.example", "Undeliverable: invitation",
                            "mailer-daemon@gm.example", "Delivery to old.admin@gm.example "
                            "failed: 550 5.1.1 no such user")])
    assert report.kinds == {"bounce": 1}
    with db.session() as s:
        assert s.exec(select(Suppression.email)).all() == []
        row = s.exec(select(InboundMessage)).one()
        state = s.exec(select(InboxCustomerState)).one()
    assert "old.admin@gm.example, not a recipient" in row.detail and row.address == ""
    assert state.flagged and "does not name" in state.flag_reason


def _soft(graph_id: str, sid: str, received: datetime) -> Inbound:
    """A "mailbox full / delayed" report (4.x.x) on the message with send id ``sid``."""
    return Inbound(
        BOX, graph_id, subject="Delivery Status Notification (Delay)",
        from_address="mailer-daemon@mx.a.example", received_at=received,
        text="This is a warning only; the server will keep trying. 4.2.2 mailbox full",
        headers={"content-type": "multipart/report; report-type=delivery-status"},
        attachments=(Attachment("message/delivery-status", "Final-Recipient: rfc822; "
                                "admin@a.example\nAction: delayed\nStatus: 4.2.2\n"),
                     Attachment("message/rfc822", f"x-comms-send-id: {sid}\n")))


def _suppressed(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.exec(select(Suppression.email)).all())


def test_soft_bounces_count_once_per_message_and_when_they_arrived(
    db: Database, tmp_path: Path
) -> None:
    # A full mailbox is temporary: the address is suppressed only after 3 messages bounced
    # softly within 14 days. A server's daily "still delayed" notices for one message counted
    # as 3, and a first sync reading reports weeks apart counted them as one burst.
    seed_lettered(db, tmp_path, ("A", "B", "C"))
    one = _sent(db, "A", "admin@a.example")
    report = _run(db, [_soft(f"d{day}", one, T0 - timedelta(days=3 - day)) for day in range(3)])
    assert report.kinds == {"bounce": 3} and _suppressed(db) == []
    months = [_sent(db, "A", "admin@a.example", sequence=n) for n in (1, 2)]
    _run(db, [_soft(f"m{i}", sid, T0 - timedelta(days=30 * (i + 1)))
              for i, sid in enumerate(months)])
    assert _suppressed(db) == []  # months apart, read in one sync
    # Three different messages within the window: the address is suppressed.
    recent = [_sent(db, "A", "admin@a.example", sequence=n) for n in (3, 4)]
    _run(db, [_soft(f"r{i}", sid, T0 - timedelta(days=i + 1)) for i, sid in enumerate(recent)])
    assert _suppressed(db) == ["admin@a.example"]


def test_a_bounced_internal_note_suppresses_the_address_and_leaves_the_customer_alone(
    db: Database, tmp_path: Path
) -> None:
    """The account manager's note about A bounces (the manager left): the dead address is
    suppressed (no more Cc or notes to it), but A is not flagged nor its manager told "an
    email to A bounced" (it was never mail to A)."""
    seed_lettered(db, tmp_path, ("A", "B", "C"))
    sid = _sent(db, "A", "gone.am@f.example", internal=True)
    report = _run(db, [_ndr(sid, "gone.am@f.example", "Undeliverable: [comms] A Ltd (A) replied",
                            "postmaster@f.example", "550 5.1.1 no such user")])
    assert report.kinds == {"bounce": 1}
    with db.session() as s:
        assert s.exec(select(Suppression.email)).all() == ["gone.am@f.example"]
        assert s.exec(select(InboxCustomerState)).all() == []  # not flagged
        assert s.exec(select(Message.id).where(Message.status == "queued")).all() == []
        row = s.exec(select(InboundMessage)).one()
        note = s.exec(select(Message).where(Message.send_id == sid)).one()
    assert note.status == "bounced"
    assert "the customer is not flagged" in row.effects


def test_opt_outs_committed_while_the_inbox_records_keep_its_bounce(
    db: Database, tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's `comms contacts opt-out` commits while the inbox records, each time for
    the first address the inbox is about to suppress. On PostgreSQL the inbox had read the
    suppression list before: its INSERT of the same address failed the chunk, and when it
    happened again in the one-by-one retry the message was taken for one "recorded meanwhile
    by another sync" and skipped: the bounce never marked, the customer never flagged (the
    delta link moved on: never read again). On SQLite no writer can commit meanwhile (shown).
    The test wraps the chunk's write to act exactly then; the databases are real."""
    postgres = database_url.startswith("postgresql")
    seed_lettered(db, tmp_path, ("A", "B"))
    sid = _sent(db, "A", "admin@a.example")
    real, raced = effects._write, []

    def meanwhile(s: Any, chunk: Any) -> None:
        if chunk.new_sup and postgres:  # another connection of the pool, its own transaction
            first = next(iter(chunk.new_sup))
            outbox_admin.suppress(db, first, reason="asked by phone", now=T0, by="operator")
            raced.append(first)
        elif chunk.new_sup:
            other = sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=0)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
            raced.append("refused")
        real(s, chunk)

    monkeypatch.setattr(effects, "_write", meanwhile)
    report = _run(db, [_reply("o1", "admin@b.example", "Please unsubscribe me."),
                       _ndr(sid, "admin@a.example", "Undeliverable: invitation",
                            "postmaster@a.example", "550 5.1.1 no such user")])
    assert raced and report.kinds == {"optout": 1, "bounce": 1}, (raced, report)
    assert report.skipped == 0
    with db.session() as s:
        status = s.exec(select(Message.status).where(Message.send_id == sid)).one()
        kinds = sorted(r.kind for r in s.exec(select(InboundMessage)).all())
        state = s.exec(select(InboxCustomerState)).one()
        sup = {x.email: x.by for x in s.exec(select(Suppression)).all()}
    assert status == "bounced" and kinds == ["bounce", "optout"]
    assert state.flagged
    assert set(sup) == {"admin@a.example", "admin@b.example"}
    if not postgres:
        assert set(sup.values()) == {f"inbox:{BOX}", f"inbox:{BOX} 5.1.1"}
