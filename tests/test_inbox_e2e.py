"""Replies and bounces end to end: `comms run` sends through the sandbox over HTTPS (real msal +
requests), the sandbox's Inbox receives NDRs, replies, auto-replies and opt-outs, and
`comms inbox sync` reads them with Graph delta queries and applies their effects."""

from __future__ import annotations

import csv
import json
import signal
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, popen_comms, run_comms, sandbox_env, settings_from
from sqlmodel import col, select

from comms.campaign import load_campaign
from comms.inbox.service import NOTE_MESSAGE
from comms.sandbox import Sandbox
from comms.sandbox.inbox import InboxAdmin
from comms.services import customers as customer_service
from comms.store.db import Database
from comms.store.inbox_models import InboundMessage, InboxCustomerState, InboxMailbox
from comms.store.models import Customer, Message, Suppression

SENDER = "transition@fabrikam.example"
AM = "am@fabrikam.example"


def _write_csv(path: Path) -> Path:
    rows = [
        # key, stage, locale, primary, billing
        ("BNC", "invited", "en", "admin@bnc.example", "billing@bnc.example"),
        ("RPL", "awaiting_cancellation", "en", "admin@rpl.example", ""),
        ("AUT", "invited", "en", "admin@aut.example", ""),
        ("OPT", "invited", "de", "admin@opt.example", ""),
    ]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "locale", "time_zone", "stage",
                    "account_manager_name", "account_manager_email", "primary_contact_name",
                    "primary_contact_email", "billing_contact_name", "billing_contact_email"])
        for key, stage, locale, primary, billing in rows:
            w.writerow([key, f"{key} GmbH", 10, locale, "Europe/London", stage, "Alex Manager",
                        AM, "Admin", primary, "Billing" if billing else "", billing])
    return path


@pytest.fixture
def env(tmp_path: Path, database_url: str, sandbox_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    sb: Sandbox = sandbox_factory(time_scale=0.005)
    values = sandbox_env(sb, tmp_path, database_url, senders=[SENDER], time_scale=0.005)
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return {"sandbox": sb, "env": values, "admin": InboxAdmin(sb)}


def _send_ids(db: Database) -> dict[str, str]:
    with db.session() as s:
        rows = s.exec(select(Customer.key, Message.send_id)
                      .join(Customer, col(Customer.id) == col(Message.customer_id))
                      .where(col(Message.internal).is_(False))).all()
    return dict(rows)


def _more_sent(db: Database, cli: Any, key: str, messages: tuple[str, ...]) -> list[str]:
    """Send ``messages`` to customer ``key`` now (through the sandbox); their send ids."""
    for message in messages:
        r = cli("send", key, "--message", message, "--force", "--note", "test", "--yes",
                "--now", T0.isoformat())
        assert r.exit_code == 0, r.output
    with db.session() as s:
        return list(s.exec(select(Message.send_id).where(
            col(Message.message).in_(messages), col(Message.status) == "sent")).all())


def _counts(db: Database) -> tuple[int, int, int, int]:
    with db.session() as s:
        return (len(s.exec(select(Message.id)).all()), len(s.exec(select(Suppression.email)).all()),
                len(s.exec(select(InboundMessage.id)).all()),
                len(s.exec(select(InboxCustomerState.customer_id)).all()))


def _seed_and_send(env: dict[str, Any], db: Database, tmp_path: Path, cli: Any) -> None:
    customer_service.import_customers(db, _write_csv(tmp_path / "c.csv"),
                                      settings=settings_from(env["env"]),
                                      campaign=load_campaign(), now=T0, by="test")
    r = cli("run", "--now", T0.isoformat())
    assert r.exit_code == 0, r.output
    assert len(env["sandbox"].sent()) == 4


def test_bounce_reply_auto_and_german_optout(env: dict[str, Any], db: Database, tmp_path: Path,
                                             cli: Any) -> None:
    _seed_and_send(env, db, tmp_path, cli)
    ids = _send_ids(db)
    admin: InboxAdmin = env["admin"]
    admin.inject(kind="ndr", mailbox=SENDER, send_id=ids["BNC"], recipient="admin@bnc.example",
                 status="5.1.1")
    admin.inject(kind="reply", mailbox=SENDER, send_id=ids["RPL"], **{"from": "admin@rpl.example"},
                 body="done, case 123\nThanks, Admin\n\n> Please cancel the old subscription")
    admin.inject(kind="auto_reply", mailbox=SENDER, send_id=ids["AUT"],
                 **{"from": "admin@aut.example"}, body="I am out of the office until Monday.")
    admin.inject(kind="reply", mailbox=SENDER, send_id=ids["OPT"], **{"from": "admin@opt.example"},
                 body="Bitte keine E-Mails mehr an diese Adresse.\n\nVon: transition@fabrikam")
    admin.inject(kind="reply", mailbox=SENDER, **{"from": "stranger@else.example"},
                 subject="Hello", body="Who are you?")

    r = cli("inbox", "sync", "--now", T0.isoformat(), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["new"] == 5 and report["skipped"] == 0
    assert report["kinds"] == {"bounce": 1, "reply": 1, "auto": 1, "optout": 1, "unmatched": 1}

    with db.session() as s:
        bnc = s.exec(select(Customer).where(Customer.key == "BNC")).one()
        row = s.exec(select(Message).where(Message.send_id == ids["BNC"])).one()
        assert (row.status, row.error_code) == ("bounced", "5.1.1")
        sup = {x.email: x for x in s.exec(select(Suppression)).all()}
        assert sup["admin@bnc.example"].reason == "bounce"
        assert "billing@bnc.example" not in sup
        assert s.get(InboxCustomerState, bnc.id).flagged  # type: ignore[union-attr]
        notes = s.exec(select(Message).where(Message.message == NOTE_MESSAGE,
                                             Message.customer_id == bnc.id)).all()
        assert len(notes) == 1 and notes[0].internal and AM in notes[0].to_json
        rpl = s.exec(select(Customer).where(Customer.key == "RPL")).one()
        held = s.get(InboxCustomerState, rpl.id)
        assert held is not None and held.reminders_held_until == T0 + timedelta(days=7)
        # German opt-out: the address suppressed with the reply as the reason.
        assert "keine E-Mails mehr" in sup["admin@opt.example"].reason
        # Auto-reply: recorded, nothing done.
        aut = s.exec(select(Customer).where(Customer.key == "AUT")).one()
        assert s.get(InboxCustomerState, aut.id) is None
        assert "admin@aut.example" not in sup
        kinds = Counter(s.exec(select(InboundMessage.kind)).all())
        assert kinds["unmatched"] == 1
        assert s.get(InboxMailbox, SENDER) is not None

    shown = cli("customers", "show", "RPL")
    assert "inbound reply" in shown.stdout and "done, case 123" in shown.stdout
    assert "reminders held until" in shown.stdout

    # A second sync: nothing new, no new effects.
    before = _counts(db)
    again = cli("inbox", "sync", "--now", T0.isoformat(), "--json")
    assert json.loads(again.stdout)["new"] == 0
    assert _counts(db) == before

    listed = cli("inbox", "list", "--kind", "bounce", "--json")
    items = json.loads(listed.stdout)
    assert len(items) == 1 and items[0]["customer"] == "BNC"
    shown_in = cli("inbox", "show", str(items[0]["id"]))
    assert "5.1.1" in shown_in.stdout and "send id in the attached original" in shown_in.stdout

    # Three days on: BNC's reminder goes to the remaining address only; RPL's reminder
    # (due on day 2) is held; the account manager's note went out once.
    sb: Sandbox = env["sandbox"]
    admin.inject(kind="auto_reply", mailbox=SENDER, send_id=ids["BNC"],
                 **{"from": "billing@bnc.example"}, body="Out of office")
    r = cli("run", "--inbox", "--now", (T0 + timedelta(days=3, hours=1)).isoformat())
    assert r.exit_code == 0, r.output
    assert "Inbox: read 1 message(s) from 1 mailbox(es), 1 new (bounce 0, reply 0, auto 1" \
        in r.stdout
    later = sb.sent()[4:]
    by_subject = [(rec["to"], rec["subject"]) for rec in later]
    bnc_sends = [to for to, _ in by_subject if any("bnc.example" in a for a in to)]
    assert bnc_sends == [["billing@bnc.example"]], by_subject
    assert not any("rpl.example" in a for to, _ in by_subject for a in to)
    assert sum(1 for to, subject in by_subject if to == [AM] and "BNC" in subject) == 1
    status = cli("status", "--json")
    assert status.exit_code == 0


def test_a_now_without_an_offset_is_read_in_the_default_time_zone_like_run(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `inbox sync --now 2026-12-01T19:00` was 19:00 UTC while every other command reads it in
    # [defaults] time_zone, and a moment out of range was not refused.
    _seed_and_send(env, db, tmp_path, cli)
    env["admin"].inject(kind="reply", mailbox=SENDER, send_id=_send_ids(db)["RPL"],
                        **{"from": "admin@rpl.example"}, body="done, case 123")
    monkeypatch.setenv("COMMS_DEFAULTS_TIME_ZONE", "Asia/Tokyo")
    r = cli("inbox", "sync", "--now", "2026-12-01T19:00")  # T0 in Tokyo
    assert r.exit_code == 0, r.output
    with db.session() as s:
        rpl = s.exec(select(Customer).where(Customer.key == "RPL")).one()
        held = s.get(InboxCustomerState, rpl.id)
        assert held is not None and held.reminders_held_until == T0 + timedelta(days=7)
    bad = cli("inbox", "sync", "--now", "0001-01-01T00:00")
    assert bad.exit_code == 2 and "out of range" in bad.stderr, bad.output


def test_dead_address_ndr_and_item_vs_file_attachments(env: dict[str, Any], db: Database,
                                                       tmp_path: Path, cli: Any) -> None:
    admin: InboxAdmin = env["admin"]
    admin.set_dead("admin@aut.example")
    _seed_and_send(env, db, tmp_path, cli)
    ids = _send_ids(db)
    # Exchange attaches the original either as an item or as a message/rfc822 file, or only
    # its headers; each carries x-comms-send-id.
    admin.inject(kind="ndr", mailbox=SENDER, send_id=ids["OPT"], recipient="admin@opt.example",
                 status="5.2.2", attach="file", system_sender=True)
    admin.inject(kind="ndr", mailbox=SENDER, send_id=ids["RPL"], recipient="admin@rpl.example",
                 status="4.4.7", attach="headers")
    admin.inject(kind="ndr", mailbox=SENDER, send_id=ids["BNC"],
                 recipient="billing@bnc.example", status="5.1.1", attach="none")
    r = cli("inbox", "sync", "--now", T0.isoformat(), "--json")
    assert r.exit_code == 0, r.output
    with db.session() as s:
        rows = {m.address: m for m in s.exec(select(InboundMessage)).all()}
        statuses = {m.send_id: m.status for m in s.exec(select(Message)).all()}
        sup = set(s.exec(select(Suppression.email)).all())
    assert rows["admin@aut.example"].kind == "bounce"  # produced by the sandbox itself
    assert statuses[ids["AUT"]] == "bounced" and statuses[ids["OPT"]] == "bounced"
    assert rows["admin@opt.example"].rule.startswith("bounce:send id in the attached")
    # Soft bounce: counted, not suppressed, the row stays sent.
    assert rows["admin@rpl.example"].hard is False and statuses[ids["RPL"]] == "sent"
    assert "admin@rpl.example" not in sup
    # No attachment: matched through the NDR's In-Reply-To and Sent Items.
    assert "Sent Items" in rows["billing@bnc.example"].rule
    assert sup == {"admin@aut.example", "admin@opt.example", "billing@bnc.example"}
    status = cli("status")
    assert "unreachable" in status.stdout.lower()
    stats = env["sandbox"].stats()
    assert stats["throttled_concurrency"] == 0
    assert stats["max_in_flight_per_mailbox"][SENDER] <= 4


def test_many_ndrs_are_read_in_chained_batches_within_the_mailbox_limit(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    """45 NDRs (a page of them, item and file attachments): their attachments are read in
    chained JSON batches, so the mailbox never sees more than its 4 requests in flight and no
    read is refused for MailboxConcurrency; one read throttled mid-chain is read again."""
    _seed_and_send(env, db, tmp_path, cli)
    ids = _send_ids(db)
    admin: InboxAdmin = env["admin"]
    for i in range(45):
        admin.inject(kind="ndr", mailbox=SENDER, send_id=ids["BNC"],
                     recipient="billing@bnc.example", status="5.1.1",
                     attach="item" if i % 2 else "file")
    admin.set_faults(read_throttle_at=(5,))
    before = admin.stats()
    r = cli("inbox", "sync", "--now", T0.isoformat(), "--json")
    assert r.exit_code == 0, r.output
    after = admin.stats()
    assert after["read_throttled"] - before["read_throttled"] == 1
    with db.session() as s:
        rows = s.exec(select(InboundMessage)).all()
    assert len(rows) == 45 and {m.kind for m in rows} == {"bounce"}
    assert all(m.rule.startswith("bounce:send id in the attached") for m in rows)
    stats = env["sandbox"].stats()
    assert stats["throttled_concurrency"] == 0
    assert stats["max_in_flight_per_mailbox"][SENDER] <= 4


def test_paging_throttling_and_sigkill_mid_sync_processes_each_message_once(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    _seed_and_send(env, db, tmp_path, cli)
    ids = _send_ids(db)
    admin: InboxAdmin = env["admin"]
    for i in range(300):
        admin.inject(kind="reply", mailbox=SENDER, send_id=ids["RPL"],
                     **{"from": "admin@rpl.example"}, body=f"answer {i}")
    admin.set_faults(read_throttle_rate=0.2, read_error_rate=0.1)
    # Small pages, so the kill lands mid-round with some pages applied and some not.
    campaign = tmp_path / "campaign.toml"
    from comms.paths import builtin_config_dir

    text = (builtin_config_dir() / "campaign.toml").read_text(encoding="utf-8")
    campaign.write_text(text + "\n[inbox]\npage_size = 7\n", encoding="utf-8")
    proc_env = {**env["env"], "COMMS_CAMPAIGN_FILE": str(campaign)}
    proc = popen_comms(proc_env, "inbox", "sync", "--now", T0.isoformat())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with db.session() as s:
            done = len(s.exec(select(InboundMessage.id)).all())
        if done >= 40:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    with db.session() as s:
        partial = len(s.exec(select(InboundMessage.id)).all())
    assert 0 < partial < 300
    done_run = run_comms(proc_env, "inbox", "sync", "--now", T0.isoformat(), "--json")
    assert done_run.returncode == 0, done_run.stderr
    report = json.loads(done_run.stdout)
    assert report["retries"] > 0  # throttled and 503 reads were retried
    with db.session() as s:
        graph_ids = s.exec(select(InboundMessage.graph_id)).all()
        notes = s.exec(select(Message).where(Message.message == NOTE_MESSAGE)).all()
    assert len(graph_ids) == 300 == len(set(graph_ids))
    assert len(notes) == 1  # one account-manager note a day, however many replies
    assert report["new"] == 300 - partial


def test_soft_bounces_suppress_only_after_the_limit(env: dict[str, Any], db: Database,
                                                    tmp_path: Path, cli: Any) -> None:
    _seed_and_send(env, db, tmp_path, cli)
    ids = _send_ids(db)
    admin: InboxAdmin = env["admin"]
    # The reports arrive at the simulated time of each sync (not at the real clock).
    admin.set_clock(lambda: T0)
    # A server's repeated "still delayed" reports on one message count once.
    for _ in range(3):
        admin.inject(kind="ndr", mailbox=SENDER, send_id=ids["RPL"],
                     recipient="admin@rpl.example", status="4.2.2")
    assert cli("inbox", "sync", "--now", T0.isoformat()).exit_code == 0
    with db.session() as s:
        assert s.get(Suppression, "admin@rpl.example") is None
    # Two more messages to the same address bounce softly: three within the window.
    admin.set_clock(lambda: T0 + timedelta(days=1))
    for sid in _more_sent(db, cli, "RPL", ("kickoff", "lose_access_warning")):
        admin.inject(kind="ndr", mailbox=SENDER, send_id=sid, recipient="admin@rpl.example",
                     status="4.2.2")
    r = cli("inbox", "sync", "--now", (T0 + timedelta(days=1)).isoformat())
    assert "suppressed 1" in r.stdout, r.stdout
    with db.session() as s:
        sup = s.get(Suppression, "admin@rpl.example")
        row = s.exec(select(Message).where(Message.send_id == ids["RPL"])).one()
        assert sup is not None and sup.reason == "bounce"
        assert row.status == "sent"  # a soft bounce never marks the row bounced
    # A dry run shows and changes nothing.
    admin.inject(kind="ndr", mailbox=SENDER, send_id=ids["OPT"], recipient="admin@opt.example")
    before = _counts(db)
    dry = cli("inbox", "sync", "--dry-run")
    assert "bounce" in dry.stdout and "would apply" in dry.stdout
    assert _counts(db) == before


def test_threaded_replies_matched_through_one_sent_items_listing(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from comms.inbox import service as inbox_service
    from comms.inbox.reader import InboxReader

    _seed_and_send(env, db, tmp_path, cli)
    ids = _send_ids(db)
    index = InboxReader(settings_from(env["env"])).sent_index(SENDER, T0 - timedelta(days=1))
    assert sorted(index.values()) == sorted(ids.values())
    monkeypatch.setattr(inbox_service, "SENT_INDEX_THRESHOLD", 2)
    admin: InboxAdmin = env["admin"]
    for key in ("RPL", "AUT", "OPT"):
        admin.inject(kind="reply", mailbox=SENDER, send_id=ids[key],
                     **{"from": "someone@forwarded.example"}, body="done")
    r = cli("inbox", "sync", "--now", T0.isoformat(), "--json")
    report = json.loads(r.stdout)
    assert report["kinds"] == {"reply": 3}
    assert report["requests"] == 2  # the delta page and the Sent Items listing
    with db.session() as s:
        rules = set(s.exec(select(InboundMessage.rule)).all())
    assert rules == {"reply:In-Reply-To/References"}


def test_a_hostile_inbound_message_is_shown_as_written_never_acted_on(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    """Sender, subject and text of an inbound message are anyone's: rich markup in them is
    printed as written (a stray "[/]" must not crash the listing) and control characters
    (ESC starts a terminal's escape sequences, e.g. a hidden link) are shown, not sent."""
    _seed_and_send(env, db, tmp_path, cli)
    link = "\x1b]8;;https://evil.example/\x07click\x1b]8;;\x07"
    env["admin"].inject(kind="reply", mailbox=SENDER, **{"from": "stranger@else.example"},
                        subject=f"[/] [bold]loud[/bold] {link}",
                        body=f"line one {link}\nline two [red]x[/red]")
    dry = cli("inbox", "sync", "--dry-run", "--now", T0.isoformat())  # a line per message
    done = cli("inbox", "sync", "--now", T0.isoformat())
    listed = cli("inbox", "list")
    for r in (dry, done, listed):
        assert r.exit_code == 0, r.output
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "unmatched 1" in done.stdout
    assert "[/] [bold]loud[/bold] \\x1b]8;;https" in dry.stdout, dry.stdout
    # The table folds the subject over several lines of its column (the 6th).
    subject = "".join(line.split("│")[6].strip() for line in listed.stdout.splitlines()
                      if line.startswith("│"))
    assert subject.startswith("[/][bold]loud[/bold]\\x1b]8;;https"), listed.stdout
    (row,) = json.loads(cli("inbox", "list", "--json").stdout)
    shown = cli("inbox", "show", str(row["id"]))
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "subject: [/] [bold]loud[/bold] \\x1b]8;;https://evil.example/\\x07click" \
        in shown.stdout
    # The text keeps its lines; only the control characters are escaped.
    assert "\nline one \\x1b]8;;https://evil.example/\\x07click\\x1b]8;;\\x07\n" \
        "line two [red]x[/red]" in shown.stdout


def test_a_message_moved_out_of_the_inbox_and_back_is_not_acted_on_twice(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    # Filed in a folder and dragged back (or restored from Deleted Items), a message gets a
    # new Graph id and the Inbox's delta lists it again. Keyed on the Graph id only, a reply
    # was processed again (a second note to the account manager, the hold extended), and an
    # opt-out an operator had reversed was applied again.
    _seed_and_send(env, db, tmp_path, cli)
    ids = _send_ids(db)
    admin: InboxAdmin = env["admin"]
    reply = admin.inject(kind="reply", mailbox=SENDER, send_id=ids["RPL"],
                         **{"from": "admin@rpl.example"}, body="Which subscription do you mean?")
    optout = admin.inject(kind="reply", mailbox=SENDER, send_id=ids["OPT"],
                          **{"from": "admin@opt.example"}, body="Unsubscribe me, please.")
    assert cli("inbox", "sync", "--now", T0.isoformat()).exit_code == 0
    assert cli("contacts", "opt-in", "admin@opt.example", "--note",
               "called: it was meant for the old plan").exit_code == 0
    for message in (reply, optout):
        moved = admin.refile(SENDER, message["id"])
        assert moved["id"] != message["id"]
    r = cli("inbox", "sync", "--now", (T0 + timedelta(days=1)).isoformat(), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert (report["read"], report["new"], report["skipped"]) == (2, 0, 2)
    with db.session() as s:
        notes = s.exec(select(Message).where(Message.message == NOTE_MESSAGE)).all()
        assert s.get(Suppression, "admin@opt.example") is None  # the operator's decision holds
    assert len(notes) == 1  # RPL's account manager was told once (OPT: opted out, no note)


def test_an_expired_delta_link_reads_the_inbox_again_without_acting_twice(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    # Graph forgets a delta link after a long pause (SyncStateNotFound). The sync stopped there
    # until someone ran `--restart`, and `comms run --inbox` with it: no mail for anyone.
    _seed_and_send(env, db, tmp_path, cli)
    ids = _send_ids(db)
    admin: InboxAdmin = env["admin"]
    admin.inject(kind="reply", mailbox=SENDER, send_id=ids["RPL"],
                 **{"from": "admin@rpl.example"}, body="Which subscription do you mean?")
    assert cli("inbox", "sync", "--now", T0.isoformat()).exit_code == 0
    with db.session() as s:
        box = s.get(InboxMailbox, SENDER)
        assert box is not None and "$deltatoken=" in box.delta_link
        box.delta_link = box.delta_link.split("$deltatoken=")[0] + "$deltatoken=forgotten"
        s.add(box)
    admin.inject(kind="reply", mailbox=SENDER, send_id=ids["OPT"],
                 **{"from": "admin@opt.example"}, body="Done, cancelled today.")
    r = cli("inbox", "sync", "--now", (T0 + timedelta(days=1)).isoformat(), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert (report["new"], report["skipped"], report["restarted"]) == (1, 1, [SENDER])
    with db.session() as s:
        notes = s.exec(select(Message).where(Message.message == NOTE_MESSAGE)).all()
        box = s.get(InboxMailbox, SENDER)
        assert box is not None and "forgotten" not in box.delta_link
    assert len(notes) == 2  # one per reply, the first not repeated
