"""Addresses with an internationalised domain (review of 2026-12-02). The importer stores
``anna@müller.example`` (email-validator's form: the domain in Unicode); Graph and bounce reports
may give ``anna@xn--mller-kva.example``. Compared as given, Anna's opt-out was "from a
non-contact: not acted on" and her bounce named "someone we did not mail": she kept getting
reminders. Every address the inbox reads is now compared in the ledger's spelling
(``comms.domain.canonical_address``)."""

from __future__ import annotations

import csv
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, sandbox_env, settings_from
from sqlmodel import col, select
from test_inbox_classify import ndr as make_ndr

from comms.campaign import load_campaign
from comms.domain import canonical_address
from comms.inbox.classify import Inbound, SentRow, classify
from comms.sandbox import Sandbox
from comms.sandbox.inbox import InboxAdmin
from comms.services import customers as customer_service
from comms.store.db import Database
from comms.store.models import Message, Suppression

BOX = "transition@fabrikam.example"
ANNA, ANNA_ASCII = "anna@müller.example", "anna@xn--mller-kva.example"


@pytest.mark.parametrize(("given", "canonical"), [
    ("Anna@XN--MLLER-KVA.example", ANNA),
    ("anna@MÜLLER.example", ANNA),
    (" Bob@Example.COM ", "bob@example.com"),
    ("a@xn--zz.example", "a@xn--zz.example"),  # not valid IDNA: kept as given
    ("no-at-sign", "no-at-sign"),
])
def test_canonical_address(given: str, canonical: str) -> None:
    assert canonical_address(given) == canonical


def test_a_bounce_naming_the_ascii_form_is_matched_to_the_recipient() -> None:
    class Resolver:
        def row_by_send_id(self, send_id: str) -> SentRow | None:
            return SentRow(11, 7, (ANNA, "bob@x.example")) if send_id == "sid1" else None

        def send_id_by_internet_message_id(self, mailbox: str, mid: str) -> str | None:
            return None

        def customer_by_conversation(self, mailbox: str, conversation_id: str) -> int | None:
            return None

        def customers_by_contact(self, address: str) -> list[int]:
            return [7] if address == ANNA else []

    v = classify(make_ndr(recipient=ANNA_ASCII), Resolver(), [], [])
    assert (v.kind, v.address, v.hard) == ("bounce", ANNA, True), v
    reply = Inbound(BOX, "g2", subject="RE: Your invitation", from_address=ANNA_ASCII.upper(),
                    text="Please unsubscribe me.")
    v = classify(reply, Resolver(), ["unsubscribe"], [])
    assert (v.kind, v.customer_id, v.address) == ("optout", 7, ANNA), v


def _import(db: Database, tmp_path: Path, settings: Any) -> None:
    path = tmp_path / "idn.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "stage", "primary_contact_email",
                    "billing_contact_email"])
        w.writerow(["M", "Müller GmbH", 5, "invited", "Anna@MÜLLER.example", "bob@m.example"])
        w.writerow(["N", "Nord AG", 5, "invited", "nora@xn--nrd-sna.example", ""])
    customer_service.import_customers(db, path, settings=settings, campaign=load_campaign(),
                                      now=T0, by="test")


def test_an_optout_and_a_bounce_from_the_ascii_form_through_the_sandbox_inbox(
    tmp_path: Path, database_url: str, sandbox_factory: Any, monkeypatch: pytest.MonkeyPatch,
    db: Database, cli: Any,
) -> None:
    """End to end over HTTPS: Anna answers "unsubscribe" from the ASCII form of her address;
    Nora's mail (her address imported in ASCII form, stored in Unicode) bounces with a report
    naming the ASCII form; the next run mails neither."""
    sb: Sandbox = sandbox_factory(time_scale=0.005)
    values = sandbox_env(sb, tmp_path, database_url, senders=[BOX], time_scale=0.005)
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    _import(db, tmp_path, settings_from(values))
    r = cli("run", "--now", T0.isoformat())
    assert r.exit_code == 0, r.output
    with db.session() as s:
        sends = {m.to_json: m.send_id for m in s.exec(select(Message)).all()}
    m_send = next(sid for to, sid in sends.items() if "müller" in to)
    n_send = next(sid for to, sid in sends.items() if "nörd" in to)
    admin = InboxAdmin(sb)
    admin.inject(kind="reply", mailbox=BOX, send_id=m_send, **{"from": ANNA_ASCII},
                 body="Please unsubscribe me.")
    admin.inject(kind="ndr", mailbox=BOX, send_id=n_send, recipient="nora@xn--nrd-sna.example")
    r = cli("inbox", "sync", "--now", T0.isoformat(), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kinds"] == {"optout": 1, "bounce": 1}, r.stdout
    with db.session() as s:
        suppressed = {x.email for x in s.exec(select(Suppression)).all()}
        bounced = s.exec(select(Message.status).where(col(Message.send_id) == n_send)).one()
    assert suppressed == {ANNA, "nora@nörd.example"}
    assert bounced == "bounced"

    first = len(sb.sent())
    r = cli("run", "--now", (T0 + timedelta(days=3, hours=1)).isoformat())
    assert r.exit_code == 0, r.output
    later = [canonical_address(a) for rec in sb.sent()[first:]
             for a in rec["to"] + rec.get("cc", [])]
    assert "bob@m.example" in later, later
    assert ANNA not in later and "nora@nörd.example" not in later
