"""Compact outbox bodies (issue 16): the codec gives back exactly what it was given, migration 0009
converts a queued ledger both ways, and everything a user sees of a queued message (outbox show,
export, the email the dispatcher would send, the report) is byte-identical before and after."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from engine_helpers import T0, seed
from sqlmodel import col, select

from comms.campaign import load_campaign
from comms.config import load_settings
from comms.delivery.base import Address, OutgoingEmail
from comms.delivery.eml import build_eml
from comms.errors import DatabaseError
from comms.render import Renderer
from comms.services import engine, queue_render, report
from comms.store import bodies, repo
from comms.store.db import Database, alembic_config
from comms.store.models import Customer, Message

Cli = Callable[..., Any]
PREVIOUS_HEAD = "0006"
TRICKY = ("<p>Müller &amp; Söhne — 日本 😀</p>\r\n" * 40, "")


def test_codec_round_trips_exactly() -> None:
    for html, text in [("", ""), TRICKY, ("<p>x</p>", "line\n\x00after a NUL\r\n"),
                       ("a" * 200_000, "b" * 70_000)]:
        blob = bodies.encode(html, text)
        assert blob[0] == bodies.FORMAT
        assert bodies.decode(blob) == (html, text)
        assert bodies.decode(memoryview(blob)) == (html, text)  # what psycopg returns


def test_format_1_dictionary_never_changes() -> None:
    # Rows written with format 1 decode only with these exact bytes; a better dictionary is a
    # new format byte and a new file, never an edit of this one.
    data = (Path(bodies.__file__).parent / "body_dict_1.bin").read_bytes()
    assert hashlib.sha256(data).hexdigest() == (
        "2b0e959b964e253f4e9721020e4b8895c958c7ad20a23a80f0dae922b06fe780")


# Written by comms before format 2 (bodies.encode at d217344): rows like it stay in ledgers.
FORMAT_1_ROW = bytes.fromhex(
    "01783fad395c42636060d0b629b0f33dbc075c40a801dd67ad107c785b06307b3c6a98a2f06cfad26773d6"
    "287c983fa301348b00570755c3050037d91acf")


def test_rows_written_in_format_1_still_read_exactly() -> None:
    expected = ("<p>Müller &amp; Söhne — 日本 😀</p>", "Müller & Söhne\n")
    assert bodies.decode(FORMAT_1_ROW) == expected
    assert bodies.encode_format_1(*expected) == FORMAT_1_ROW
    for html, text in [TRICKY, ("", ""), ("a" * 200_000, "b" * 70_000)]:
        assert bodies.decode(bodies.encode_format_1(html, text)) == (html, text)


def test_new_rows_are_format_2_and_smaller_than_format_1() -> None:
    html, text = TRICKY[0] * 3, "Müller & Söhne\n" * 50
    new, old = bodies.encode(html, text), bodies.encode_format_1(html, text)
    assert new[0] == 2 and old[0] == 1
    assert bodies.decode(new) == bodies.decode(old) == (html, text)


def test_unknown_or_damaged_bodies_are_refused_clearly() -> None:
    blob = bodies.encode("<p>hi</p>", "hi")
    with pytest.raises(DatabaseError, match=r"unknown format .*Upgrade comms"):
        bodies.decode(b"\x09" + blob[1:])
    with pytest.raises(DatabaseError, match="unknown format"):
        bodies.decode(b"")
    for damaged in (blob[:1] + b"garbage" + blob[1:], blob[:-3] + bytes(3),
                    FORMAT_1_ROW[:10] + b"garbage" + FORMAT_1_ROW[10:]):
        with pytest.raises(DatabaseError, match=r"damaged .*backup"):
            bodies.decode(damaged)


def test_queued_bodies_are_what_was_rendered_and_small(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bodies are compressed on a helper thread in chunks; small chunks make this batch span
    # several, so a body landing on the wrong row would show.
    monkeypatch.setattr(queue_render, "CHUNK", 7)
    seed(db, tmp_path, 20)
    settings = load_settings(env={})
    renderer = Renderer(settings)
    engine.plan_and_queue(db, settings, load_campaign(), renderer, now=T0)
    with db.session() as s:
        msgs = s.exec(select(Message).order_by(col(Message.id))).all()
        for m in msgs:
            row = s.get(Customer, m.customer_id)
            assert row is not None
            customer = repo.customer_info(s, row)
            fresh = renderer.render(m.message, customer, now=T0, recipient=customer.contacts[0])
            assert m.bodies() == (fresh.html, fresh.text), customer.key
            assert m.subject == fresh.subject
    assert len(msgs) == 20
    # Send ids come from one urandom call per batch, and are still distinct version-4 UUIDs.
    assert len({m.send_id for m in msgs}) == 20
    assert all(uuid.UUID(hex=m.send_id).version == 4 and len(m.send_id) == 32 for m in msgs)
    raw = sum(len(m.body_html().encode()) + len(m.body_text().encode()) for m in msgs)
    stored = sum(len(m.body) for m in msgs)
    assert stored * 4 < raw  # the dictionary holds the markup every message repeats


def _visible(db: Database, cli: Cli, tmp_path: Path, tag: str) -> dict[str, Any]:
    """Everything a user or the dispatcher sees of the queued messages, as bytes."""
    settings = load_settings(env={})
    out: dict[str, Any] = {}
    with db.session() as s:
        msgs = s.exec(select(Message).order_by(col(Message.id))).all()
    for m in msgs:
        shown = cli("outbox", "show", str(m.id))
        assert shown.exit_code == 0, shown.output
        out[f"show {m.id}"] = shown.stdout
        # The email the dispatcher builds from the row (comms.outbox.claim), as a .eml.
        email = OutgoingEmail(send_id=m.send_id, sender="s@fabrikam.example",
                              to=(Address("a@b.example"),), subject=m.subject,
                              html=m.body_html(), text=m.body_text())
        # Message-ID and MIME boundary are random per build; the rest must match byte for byte.
        eml = build_eml(email, date=T0, sender_name="S")
        out[f"eml {m.id}"] = re.sub(rb"={15}\d+==|Message-ID: <[^>]+>", b"RANDOM", eml)
    export = tmp_path / f"outbox-{tag}.csv"
    assert cli("outbox", "export", str(export)).exit_code == 0
    out["export"] = export.read_bytes()
    out["report"] = report.build_report(db, settings, load_campaign(), T0,
                                        generated_at=datetime(2026, 12, 1, 12, tzinfo=UTC))
    return out


def _migrate(db: Database, revision: str, *, down: bool) -> None:
    cfg = alembic_config(db.url)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
    db.engine.dispose()  # SQLite caches table shapes per connection


def test_migration_keeps_every_view_of_a_queued_ledger(
    db: Database, cli: Cli, tmp_path: Path
) -> None:
    seed(db, tmp_path, 30)
    settings = load_settings(env={})
    renderer = Renderer(settings)
    engine.plan_and_queue(db, settings, load_campaign(), renderer, now=T0)
    with db.session() as s:
        frozen = {m.id: (m.subject, m.body_html(), m.body_text())
                  for m in s.exec(select(Message)).all()}
        first = repo.customer_info(s, repo.get_customer(s, "K0000"))
    assert len(frozen) == 30
    # What is frozen is exactly what the renderer gives (nothing lost in compression).
    again = renderer.render("partner_invitation", first, now=T0, recipient=first.contacts[0])
    assert (again.subject, again.html, again.text) in frozen.values()
    before = _visible(db, cli, tmp_path, "before")

    _migrate(db, PREVIOUS_HEAD, down=True)
    assert db.current_revision() == PREVIOUS_HEAD
    with db.engine.connect() as conn:
        old = {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
            sa.text("SELECT id, subject, html, text FROM messages"))}
        columns = {c["name"] for c in sa.inspect(conn).get_columns("messages")}
    assert old == frozen  # the previous schema's text columns, exactly as rendered
    assert "body" not in columns

    _migrate(db, "head", down=False)
    assert db.current_revision() == db.head_revision()
    with db.engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("messages")}
    assert {"html", "text"}.isdisjoint(columns) and "body" in columns
    after = _visible(db, cli, tmp_path, "after")
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] == before[name], name


def test_upgrade_converts_rows_written_by_the_previous_head(db: Database, tmp_path: Path) -> None:
    seed(db, tmp_path, 3)
    settings = load_settings(env={})
    engine.plan_and_queue(db, settings, load_campaign(), Renderer(settings), now=T0)
    _migrate(db, PREVIOUS_HEAD, down=True)
    with db.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM messages ORDER BY id"))]
        conn.execute(sa.text("UPDATE messages SET html = :h, text = :t WHERE id = :i"),
                     {"h": TRICKY[0], "t": TRICKY[1], "i": ids[0]})
        conn.execute(sa.text("UPDATE messages SET html = '', text = :t WHERE id = :i"),
                     {"t": "only text\n", "i": ids[1]})
    _migrate(db, "head", down=False)
    with db.session() as s:
        got = {m.id: m.bodies() for m in s.exec(select(Message)).all()}
    assert got[ids[0]] == TRICKY
    assert got[ids[1]] == ("", "only text\n")
    assert got[ids[2]].html.startswith("<!DOCTYPE html>") or "<html" in got[ids[2]].html
