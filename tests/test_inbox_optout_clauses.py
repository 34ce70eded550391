"""Opt-outs the classifier once threw away (review of 2026-12-02):

- a negation anywhere earlier in the sentence cancelled the phrase, so "No thanks, please
  unsubscribe me." was an ordinary reply and the writer kept getting reminders; a negation now
  cancels only in the phrase's clause (, ; : and dashes end one) and shortly before it;
- an opt-out from a contact of several customers, with no thread to tell which, was recorded
  as unmatched and the address never suppressed; suppression is per address, so it is now.

The classifier is checked with the dict-backed resolver of test_inbox_classify; the effects
against the real ledger (SQLite, then PostgreSQL) and, end to end, through the sandbox's Inbox
with `comms inbox sync` and `comms run`."""

from __future__ import annotations

import csv
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, sandbox_env, settings_from
from sqlmodel import col, select
from test_inbox_apply import _run, _sent
from test_inbox_classify import CMD, KW, FakeResolver, resolver

from comms.campaign import load_campaign
from comms.config import load_settings
from comms.inbox.classify import Inbound, classify
from comms.render import Renderer
from comms.sandbox import Sandbox
from comms.sandbox.inbox import InboxAdmin
from comms.services import customers as customer_service
from comms.services import engine
from comms.store.db import Database
from comms.store.inbox_models import InboundMessage, InboxCustomerState
from comms.store.models import Message, Suppression

BOX = "transition@fabrikam.example"
SHARED = "it@msp.example"  # the IT consultant looking after two customers

# A decline or a negation in an earlier clause, then a clear request to stop our emails.
DECLINED_THEN_OPTED_OUT = [
    "No thanks, please unsubscribe me.",
    "Not interested - stop emailing me",
    "We don't need this, remove me from your list",
    "No thanks please unsubscribe me",
    "Not interested \u2013 please take me off your mailing list.",
    "We are not moving; please remove us from your mailing list.",
    "Nein danke, bitte abmelden",
    "Nein danke, bitte mich abmelden.",
    "Kein Interesse, bitte aus dem Verteiler austragen.",
    "Wir brauchen das nicht \u2014 keine E-Mails mehr, bitte.",
    "Non merci, d\u00e9sabonnez-moi.",
    "Nee bedankt, meld mij af.",
    "No, unsubscribe me.",
    "We do not need this anymore, please unsubscribe me.",
    "Dont know who you are, unsubscribe me",
]
# The negation is about the phrase itself: a human reads these, nobody is suppressed.
NEGATED = [
    "Please don't unsubscribe me.",
    "Please don\u2019t unsubscribe me.",
    "I do not want to unsubscribe us.",
    "I do not want you to unsubscribe me, we still need these.",
    "No, do not unsubscribe me.",
    "No thanks, but please don't remove me from your list.",
    "Never remove me from your mailing list!",
    "Bitte nicht aus dem Verteiler austragen.",
    "Bitte mich nicht abmelden, danke.",
    "Merci de ne pas me d\u00e9sabonner.",
    # The negation's verb comes after a parenthesis (these opted out: the comma ended the
    # clause that held "not").
    "Do not, under any circumstances, unsubscribe me.",
    "Please don't, whatever happens, remove me from your list",
    "Never, ever unsubscribe me.",
    "No thanks, but please do not, for now, unsubscribe me.",
]


def _msg(text: str, sender: str = "a@x.example", graph_id: str = "g") -> Inbound:
    return Inbound(BOX, graph_id, subject="RE: Cancel your old subscription",
                   from_address=sender, text=text)


@pytest.mark.parametrize("text", DECLINED_THEN_OPTED_OUT)
def test_optout_after_a_decline_in_an_earlier_clause_counts(text: str) -> None:
    v = classify(_msg(text), resolver(), KW, CMD)
    assert (v.kind, v.customer_id) == ("optout", 7), (text, v)
    assert v.keyword


@pytest.mark.parametrize("text", NEGATED)
def test_optout_phrase_negated_just_before_it_is_still_a_reply(text: str) -> None:
    v = classify(_msg(text), resolver(), KW, CMD)
    assert (v.kind, v.keyword) == ("reply", ""), (text, v)


def test_optout_from_a_contact_of_several_customers_without_a_thread() -> None:
    r = FakeResolver(contacts={SHARED: [1, 2]})
    for text in ("No thanks, please remove me from your mailing list.", "Unsubscribe"):
        v = classify(_msg(text, SHARED), r, KW, CMD)
        assert (v.kind, v.customer_id, v.address) == ("optout", None, SHARED), v
        assert "2 customers (ambiguous)" in v.rule and v.keyword
    # No opt-out phrase, or a negated one: unmatched as before, for an operator.
    for text in ("done", "Please don't unsubscribe me."):
        v = classify(_msg(text, SHARED), r, KW, CMD)
        assert (v.kind, v.customer_id) == ("unmatched", None) and "ambiguous" in v.rule
    # A stranger's opt-out names nobody we mail: nothing to suppress.
    assert classify(_msg("Please unsubscribe me.", "who@else.example"), r, KW,
                    CMD).kind == "unmatched"


def _import_shared(db: Database, tmp_path: Path, settings: Any = None) -> None:
    """Customers A and B, each with its own admin and the shared IT consultant as billing
    contact; C without it."""
    path = tmp_path / "shared.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "stage", "account_manager_name",
                    "account_manager_email", "primary_contact_email", "billing_contact_email"])
        for key, billing in (("A", SHARED), ("B", SHARED), ("C", "")):
            w.writerow([key, f"{key} Ltd", 5, "invited", "Alex", "am@f.example",
                        f"admin@{key.lower()}.example", billing])
    customer_service.import_customers(db, path, settings=settings or load_settings(env={}),
                                      campaign=load_campaign(), now=T0, by="test")


def _recipients(db: Database, status: str) -> list[str]:
    with db.session() as s:
        rows = s.exec(select(Message.to_json, Message.cc_json).where(
            col(Message.status) == status, col(Message.internal).is_(False))).all()
    return sorted(a["address"] for to, cc in rows for a in json.loads(to) + json.loads(cc))


def test_optout_from_a_contact_of_several_customers_suppresses_the_address(
    db: Database, tmp_path: Path
) -> None:
    settings, campaign = load_settings(env={}), load_campaign()
    _import_shared(db, tmp_path)
    engine.plan_and_queue(db, settings, campaign, Renderer(settings), now=T0)
    assert _recipients(db, "queued").count(SHARED) == 2  # both invitations copy the consultant
    with db.session() as s:  # the invitations went out
        for m in s.exec(select(Message)).all():
            m.status, m.sent_at = "sent", T0
            s.add(m)

    report = _run(db, [_msg("Please don't unsubscribe me.", SHARED, "n1"),
                       _msg("done", SHARED, "d1"),
                       _msg("No thanks, please remove me from your mailing list.", SHARED, "o1")])
    assert report.kinds == {"unmatched": 2, "optout": 1}
    with db.session() as s:
        (sup,) = s.exec(select(Suppression)).all()
        rows = {r.graph_id: r for r in s.exec(select(InboundMessage)).all()}
        assert s.exec(select(InboxCustomerState)).all() == []  # no customer's reminders held
    assert sup.email == SHARED and sup.by == f"inbox:{BOX}"
    assert sup.reason.startswith("opt-out reply matched to several customers: RE: Cancel")
    assert "remove me from your mailing list" in sup.reason
    o1 = rows["o1"]
    assert (o1.kind, o1.customer_id, o1.address) == ("optout", None, SHARED)
    assert "suppressed (opt-out reply matched to several customers)" in o1.effects
    assert (rows["n1"].kind, rows["d1"].kind) == ("unmatched", "unmatched")

    # The reminders three days on go to both admins, never to the consultant.
    engine.plan_and_queue(db, settings, campaign, Renderer(settings),
                          now=T0 + timedelta(days=3))
    queued = _recipients(db, "queued")
    assert "admin@a.example" in queued and "admin@b.example" in queued
    assert SHARED not in queued
    again = _run(db, [_msg("Unsubscribe", SHARED, "o2")])  # already suppressed: no second row
    assert again.kinds == {"optout": 1} and not again.effects


def test_optouts_after_a_decline_and_from_a_shared_contact_through_the_sandbox_inbox(
    tmp_path: Path, database_url: str, sandbox_factory: Any, monkeypatch: pytest.MonkeyPatch,
    db: Database, cli: Any,
) -> None:
    """End to end: `comms run` sends, the consultant and a customer's admin answer through the
    sandbox's Inbox (the consultant without a thread), `comms inbox sync` reads them, and the
    next `comms run` mails neither."""
    sb: Sandbox = sandbox_factory(time_scale=0.005)
    values = sandbox_env(sb, tmp_path, database_url, senders=[BOX], time_scale=0.005)
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    _import_shared(db, tmp_path, settings_from(values))
    r = cli("run", "--now", T0.isoformat())
    assert r.exit_code == 0, r.output
    assert sum(SHARED in rec["to"] + rec.get("cc", []) for rec in sb.sent()) == 2, sb.sent()
    with db.session() as s:
        c_send = s.exec(select(Message.send_id).where(
            col(Message.to_json).contains("admin@c.example"))).one()
    admin = InboxAdmin(sb)
    admin.inject(kind="reply", mailbox=BOX, **{"from": SHARED}, subject="Your invitation",
                 body="Not interested - stop emailing me\n\nVon: transition@fabrikam.example")
    admin.inject(kind="reply", mailbox=BOX, send_id=c_send, **{"from": "admin@c.example"},
                 body="No thanks, please unsubscribe me.")
    r = cli("inbox", "sync", "--now", T0.isoformat(), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kinds"] == {"optout": 2}
    with db.session() as s:
        reasons = {x.email: x.reason for x in s.exec(select(Suppression)).all()}
    assert set(reasons) == {SHARED, "admin@c.example"}
    assert reasons[SHARED].startswith("opt-out reply matched to several customers")
    assert reasons["admin@c.example"].startswith("opt-out reply: ")

    first = len(sb.sent())
    r = cli("run", "--now", (T0 + timedelta(days=3, hours=1)).isoformat())
    assert r.exit_code == 0, r.output
    later = [a for rec in sb.sent()[first:] for a in rec["to"] + rec.get("cc", [])]
    assert "admin@a.example" in later and "admin@b.example" in later, later
    assert SHARED not in later and "admin@c.example" not in later


@pytest.mark.parametrize("text,company", [("Please stop emailing us.", True),
                                          ("Bitte uns abmelden.", True),
                                          ("Please unsubscribe me.", False)])
def test_an_optout_for_the_company_holds_its_reminders_and_asks_the_account_manager(
    db: Database, tmp_path: Path, text: str, company: bool
) -> None:
    """"Stop emailing us" from A's admin: the admin is suppressed, and since the other contact
    (billing) would still be mailed, A's reminders are held and the account manager is asked to
    decide, with the command that opts the whole customer out. "Unsubscribe me" only
    suppresses the writer."""
    settings, campaign = load_settings(env={}), load_campaign()
    _import_shared(db, tmp_path)
    engine.plan_and_queue(db, settings, campaign, Renderer(settings), now=T0)
    with db.session() as s:
        for m in s.exec(select(Message)).all():
            m.status, m.sent_at = "sent", T0
            s.add(m)
    report = _run(db, [_msg(text, "admin@c.example", "o1")])
    assert report.kinds == {"optout": 1}
    with db.session() as s:
        assert [x.email for x in s.exec(select(Suppression)).all()] == ["admin@c.example"]
        held = s.exec(select(InboxCustomerState)).all()
        notes = s.exec(select(Message).where(col(Message.internal).is_(True),
                                             col(Message.status) == "queued")).all()
        effects = s.exec(select(InboundMessage.effects)).one()
    assert bool(held) is company and bool(notes) is company, effects
    if company:
        assert "reminders held until" in effects and "account manager note queued" in effects
        (note,) = notes
        assert note.subject == "[comms] C Ltd (C) asked to stop all emails"
        assert "comms customers opt-out C" in note.body_text()
        assert json.loads(note.to_json)[0]["address"] == "am@f.example"


def test_optout_from_another_customers_contact_in_a_thread_suppresses_the_address() -> None:
    """Customer 8's contact replying "unsubscribe me" in customer 7's thread (an IT consultant
    copied by one customer, a contact of another) was a reply to 7, "not a contact of the
    customer: not acted on", and 8's mail kept going to the address that asked to stop."""
    r = resolver()
    r.contacts["b@y.example"] = [8]
    threaded = {"in-reply-to": "<orig@fabrikam.example>"}
    msg = Inbound(BOX, "g", subject="RE: Your invitation", from_address="b@y.example",
                  text="Please unsubscribe me.", headers=threaded)
    v = classify(msg, r, KW, CMD)
    assert (v.kind, v.customer_id, v.address) == ("optout", None, "b@y.example"), v
    assert v.unscoped == "from another customer's contact"
    assert "in a thread of customer #7" in v.detail and v.keyword
    # Anyone who is nobody's contact (the account manager, copied) is still read by a human.
    am = Inbound(BOX, "g2", subject="RE: Your invitation", from_address="am@fabrikam.example",
                 text="Please unsubscribe me.", headers=threaded)
    assert (classify(am, r, KW, CMD).kind, classify(am, r, KW, CMD).customer_id) == ("reply", 7)
    # Without an opt-out phrase it stays a reply to the thread's customer.
    plain = Inbound(BOX, "g3", subject="RE: Your invitation", from_address="b@y.example",
                    text="Thanks, forwarded to the admin.", headers=threaded)
    assert (classify(plain, r, KW, CMD).kind, classify(plain, r, KW, CMD).customer_id) == (
        "reply", 7)


def test_optout_from_another_customers_contact_in_a_thread_reaches_the_ledger(
    db: Database, tmp_path: Path
) -> None:
    _import_shared(db, tmp_path)
    send_id = _sent(db, "C", "admin@c.example")
    msg = Inbound(BOX, "x1", subject="RE: Your invitation", from_address="admin@b.example",
                  text="Stop emailing me, I am not at C.",
                  headers={"in-reply-to": "<c1@fabrikam.example>"})
    report = _run(db, [msg], sent={"<c1@fabrikam.example>": send_id})
    assert report.kinds == {"optout": 1}
    with db.session() as s:
        (sup,) = s.exec(select(Suppression)).all()
        (row,) = s.exec(select(InboundMessage)).all()
        assert s.exec(select(InboxCustomerState)).all() == []  # C's reminders are not held
    assert sup.email == "admin@b.example"
    assert sup.reason.startswith("opt-out reply from another customer's contact: RE: Your")
    assert (row.kind, row.customer_id) == ("optout", None)
    assert "suppressed (opt-out reply from another customer's contact)" in row.effects
