"""One message or one mailbox that cannot be processed blocks nothing else: `comms inbox sync`
against the sandbox over HTTPS (real msal + requests) and the real ledger. A message Graph
refuses a read about is recorded as an ``error`` (listed, counted) and the sync moves on, its
delta link too; a mailbox that cannot be read is reported and the others are read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine_helpers import T0, seed_lettered
from sqlmodel import select

from comms.campaign import load_campaign
from comms.config import Settings, load_settings
from comms.inbox import service
from comms.sandbox import Sandbox
from comms.sandbox.inbox import InboxAdmin
from comms.store.db import Database
from comms.store.inbox_models import InboundMessage, InboxMailbox
from comms.store.models import Suppression

BOX = "transition@fabrikam.example"
GONE = "gone@fabrikam.example"  # configured, but no such mailbox (404)


def _two_senders(tmp_path: Path) -> Settings:
    cfg = tmp_path / "two.toml"
    cfg.write_text(f'[[senders]]\naddress = "{GONE}"\n\n[[senders]]\naddress = "{BOX}"\n')
    return load_settings(cfg, env=dict(os.environ))


def _raw(admin: InboxAdmin, sender: str, subject: str, text: str,
         headers: dict[str, str] | None = None) -> Any:
    return admin.inject(kind="raw", mailbox=BOX, message={
        "subject": subject, "from": {"emailAddress": {"address": sender}},
        "body": {"contentType": "text", "content": text},
        "internetMessageHeaders": [{"name": k, "value": v} for k, v in (headers or {}).items()]})


def test_a_refused_message_and_a_missing_mailbox_block_nothing_else(
    db: Database, tmp_path: Path, sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    seed_lettered(db, tmp_path, ("B",))
    admin = InboxAdmin(sandbox)
    # Its In-Reply-To makes the Sent Items lookup URL too long: the server refuses it (414).
    _raw(admin, "x@evil.example", "hi", "hello", {"In-Reply-To": "<" + "A" * 70_000 + "@e>"})
    _raw(admin, "x@evil.example", "hello\x00world", "hi\x00there")  # PostgreSQL refuses NUL
    _raw(admin, "admin@b.example", "RE: invitation", "Please unsubscribe me.")
    settings = _two_senders(tmp_path)
    report = service.sync(db, settings, load_campaign().inbox, now=T0)
    assert report.kinds == {"error": 1, "unmatched": 1, "optout": 1}
    assert len(report.errors) == 1 and report.errors[0].startswith(f"{GONE}: ")
    assert "NOT SYNCED" in service.summary_line(report)
    with db.session() as s:
        assert s.exec(select(Suppression.email)).all() == ["admin@b.example"]
        stored = s.exec(select(InboundMessage)).all()
        assert s.get(InboxMailbox, BOX) is not None  # the delta link moved on
        counts = service.counts(s, T0)
    errors = service.list_inbound(db, kind="error")
    assert len(errors) == 1 and errors[0]["rule"] == "error: InboxError"
    assert "414" in service.show_inbound(db, errors[0]["id"])["detail"]
    assert counts.errors == 1
    assert all("\x00" not in (m.subject + m.preview + m.detail) for m in stored)
    assert {m.subject for m in stored} >= {"helloworld"}
    again = service.sync(db, settings, load_campaign().inbox, now=T0)
    assert again.new == 0 and len(again.errors) == 1  # nothing is read twice


def test_dry_run_shows_a_rule_quoting_a_header_without_its_escape_sequences(
    sandbox: Sandbox, sandbox_settings: Settings, cli: Any
) -> None:
    """An auto-reply's rule quotes its Auto-Submitted header, which the sender writes: an
    escape sequence in it (OSC 52 writes the clipboard, CSI 2J clears the screen) must reach
    the terminal as visible text."""
    evil = "auto-replied\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J"
    _raw(InboxAdmin(sandbox), "x@evil.example", "hi", "x", {"Auto-Submitted": evil})
    r = cli("inbox", "sync", "--dry-run", "--now", "2026-12-01T10:00")
    assert r.exit_code == 0, r.output
    assert "auto-reply: auto-submitted: auto-replied" in r.stdout
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout


def test_an_html_body_is_read_as_text_in_one_pass_whatever_its_markup() -> None:
    # Pure: the text of an HTML body (when Graph sends HTML). Anyone can send one; the old
    # patterns tried a lazy match from every "<" or "<script" to the end of the body (a 1 MB
    # body of "<" took about twenty minutes inside the sync).
    from comms.inbox.resolver import _html_text

    assert _html_text("<html><head><style>p{}</style></head><body><p>Hello &amp; bye</p><br/>"
                      "x<SCRIPT>evil()</SCRIPT>y</body></html>") == "Hello & bye\n\nxy"
    assert _html_text("<p>a</p><div>b</div><script>1</script><script>2</script>c") == "a\nb\nc"
    assert _html_text("a<script>never closed b <i>c</i>") == "anever closed b c"
    assert _html_text("<" * 1_000_000 + "stop sending") == "<" * 1_000_000 + "stop sending"
    assert _html_text("<script " * 200_000 + "x").endswith("x")
