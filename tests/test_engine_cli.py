"""`comms run`, `comms send`, `comms outbox`, `comms contacts` through the real CLI, sending
through the real Graph transport to the sandbox."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, exported_env, ledger, seed, statuses
from sqlmodel import select

from comms.campaign import load_campaign
from comms.config import load_settings
from comms.paths import builtin_config_dir
from comms.sandbox import Sandbox
from comms.services import customers as customer_service
from comms.store.db import Database
from comms.store.locks import RunLock
from comms.store.models import Customer, Message, StageEvent

NOW = T0.isoformat()


@pytest.fixture
def env(tmp_path: Path, database_url: str, sandbox_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return exported_env(sandbox_factory, tmp_path, database_url, monkeypatch)


def test_run_dry_run_forecasts_and_sends_nothing(env: dict[str, Any], db: Database,
                                                  tmp_path: Path, cli: Any) -> None:
    seed(db, tmp_path, 12)
    r = cli("run", "--dry-run", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert ("Dry run: 12 messages would be queued now for 12 customers (0 more when the send "
            "window opens); 12 messages to send in all, 2 sender mailboxes.") in r.stdout
    assert "Forecast: 12 at 60 a minute: under a minute (mailbox rate binds)." in r.stdout
    assert "This was a dry run: the outbox and the ledger are unchanged." in r.stdout
    assert "Nothing was queued" not in r.stdout
    assert "partner_invitation: 12" in r.stdout
    assert env["sandbox"].sent() == [] and statuses(db) == {}


def test_dry_run_forecast_for_a_big_queue(env: dict[str, Any], db: Database, tmp_path: Path,
                                          cli: Any) -> None:
    seed(db, tmp_path, 1240)
    r = cli("run", "--dry-run", "--now", NOW, "--json")
    data = json.loads(r.stdout)
    # 1,240 messages over 2 mailboxes at 30/min each (3 % slack): about 21 minutes.
    assert data["queued"] == 1240 and round(data["forecast_minutes"]) == 21
    assert data["daily_cap_reached"] is False


def test_dry_run_warns_when_the_backlog_outlasts_the_send_window(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1,240 messages take about 21 minutes at the mailboxes' rate: inside the default 8-hour
    window the dry run says nothing more; with a 10-minute window it warns that they take about
    3 windows (what is not sent when a window closes waits for the next one)."""
    seed(db, tmp_path, 1240)
    r = cli("run", "--dry-run", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert "send windows" not in r.stdout
    campaign = tmp_path / "campaign.toml"
    campaign.write_text((builtin_config_dir() / "campaign.toml").read_text(encoding="utf-8")
                        .replace("end = 17:00:00", "end = 09:10:00", 1), encoding="utf-8")
    monkeypatch.setenv("COMMS_CAMPAIGN_FILE", str(campaign))
    r = cli("run", "--dry-run", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert ("warning: at the mailboxes' rate this takes about 3 send windows of about 10 minutes"
            in " ".join(r.stdout.split())), r.stdout
    data = json.loads(cli("run", "--dry-run", "--now", NOW, "--json").stdout)
    assert data["forecast"]["send_windows"] == 3


def test_run_sends_once_and_a_rerun_sends_nothing(env: dict[str, Any], db: Database,
                                                   tmp_path: Path, cli: Any) -> None:
    seed(db, tmp_path, 10)
    r = cli("run", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert "queued 10, sent 10, deferred to the send window 0, throttled 0 (retried), " \
           "failed 0, unknown 0" in r.stdout
    again = cli("run", "--now", NOW, "--json")
    assert again.exit_code == 0
    data = json.loads(again.stdout)
    assert (data["queued"], data["sent"]) == (0, 0)
    assert len(env["sandbox"].sent()) == 10
    assert statuses(db) == {"sent": 10}


def test_run_outside_the_send_window_defers(env: dict[str, Any], db: Database,
                                            tmp_path: Path, cli: Any) -> None:
    seed(db, tmp_path, 3)
    r = cli("run", "--now", "2026-12-05T10:00:00+00:00")  # a Saturday
    assert r.exit_code == 0
    assert "queued 0, sent 0, deferred to the send window 3" in r.stdout


def test_run_exit_1_names_the_failure(env: dict[str, Any], db: Database, tmp_path: Path,
                                      cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Path(env["env"]["COMMS_CONFIG"])
    cfg.write_text('[[senders]]\naddress = "nobody@fabrikam.example"\n', encoding="utf-8")
    # A directory user without an Exchange mailbox: the run's preflight finds the user (a
    # missing one stops the run with exit 3, tests/test_preflight.py), the send fails.
    env["sandbox"]._core.state.add_user("nobody@fabrikam.example", mailbox=False)
    seed(db, tmp_path, 1)
    r = cli("run", "--now", NOW)
    assert r.exit_code == 1
    assert "failed 1" in r.stdout
    assert "failed #1 K0000 partner_invitation: MailboxNotEnabledForRESTAPI:" in r.stderr
    assert "nobody@fabrikam.example" in r.stderr


def test_run_exit_3_on_configuration_error(env: dict[str, Any], cli: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMS_PARTNER_LICENCE_THRESHOLD", "many")
    r = cli("run")
    assert r.exit_code == 3
    assert "COMMS_PARTNER_LICENCE_THRESHOLD: [partner] licence_threshold" in r.stderr


def test_second_concurrent_run_exits_at_once(env: dict[str, Any], db: Database,
                                             cli: Any) -> None:
    with RunLock(db):
        r = cli("run", "--now", NOW)
    assert r.exit_code == 4
    assert "Another `comms run` is using this database" in r.stderr


def test_send_one_customer_confirm_refuse_repeat_and_resend(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    seed(db, tmp_path, 3)
    dry = cli("send", "K0001", "--dry-run", "--now", NOW)
    assert dry.exit_code == 0 and "Dry run: 1 message would be sent" in dry.stdout
    assert "partner_invitation" in dry.stdout and env["sandbox"].sent() == []
    no = cli("send", "K0001", "--now", NOW, input="n\n")
    assert no.exit_code == 2 and env["sandbox"].sent() == []  # no terminal, no --yes
    ok = cli("send", "K0001", "--yes", "--now", NOW)
    assert ok.exit_code == 0, ok.output
    assert "sent 1, failed 0" in ok.stdout
    nothing = cli("send", "K0001", "--yes", "--now", NOW)
    assert nothing.exit_code == 1
    assert "Nothing is due for K0001 in stage 'invited' now." in nothing.stderr
    repeat = cli("send", "K0001", "--message", "partner_invitation", "--yes", "--now", NOW)
    assert repeat.exit_code == 1
    assert "partner_invitation is already sent for K0001" in repeat.stderr
    assert "add --resend --note" in repeat.stderr
    internal = cli("send", "K0001", "--message", "account_manager_alert", "--yes", "--now", NOW)
    assert internal.exit_code == 2
    assert "account_manager_alert is an internal note to the account manager" in internal.stderr
    no_note = cli("send", "K0001", "--message", "partner_invitation", "--resend", "--yes")
    assert no_note.exit_code == 2 and "--resend needs --note" in no_note.stderr
    again = cli("send", "K0001", "--message", "partner_invitation", "--resend", "--note",
                "customer deleted it by mistake", "--yes", "--now", NOW)
    assert again.exit_code == 0, again.output
    assert len(env["sandbox"].sent()) == 2
    with db.session() as s:
        seqs = sorted(s.exec(select(Message.sequence)).all())
        events = s.exec(select(StageEvent).where(StageEvent.kind == "resend")).all()
    assert seqs == [-1, 0]
    assert len(events) == 1 and "customer deleted it by mistake" in events[0].note
    # The scheduled run never repeats what `send` already sent.
    r = cli("run", "--now", NOW, "--json")
    assert json.loads(r.stdout)["sent"] == 2  # the other two customers only
    assert len(env["sandbox"].sent()) == 4


def test_send_to_a_tagged_group(env: dict[str, Any], db: Database, tmp_path: Path,
                                cli: Any) -> None:
    seed(db, tmp_path, 6)  # odd numbers carry wave-1
    # Tags are stored lower case; a tag typed as the CRM spells it selects the same wave
    # (it planned and sent nothing before, saying only "0 queued").
    r = cli("send", "--tag", "Wave-1", "--yes", "--now", NOW)
    assert r.exit_code == 0, r.output
    got = sorted(rec["to"][0] for rec in env["sandbox"].sent())
    assert got == ["admin1@customer1.example", "admin3@customer3.example",
                   "admin5@customer5.example"]
    run = cli("run", "--tag", " WAVE-2", "--now", NOW, "--json")
    assert json.loads(run.stdout)["sent"] == 3
    assert len(env["sandbox"].sent()) == 6


def test_outbox_commands_and_suppression(env: dict[str, Any], db: Database, tmp_path: Path,
                                         cli: Any) -> None:
    seed(db, tmp_path, 3)
    out = cli("contacts", "opt-out", "Admin2@Customer2.example", "--note", "asked by phone")
    assert out.exit_code == 0
    assert "admin2@customer2.example suppressed (a contact of 1 customer)." in out.stdout
    r = cli("run", "--now", NOW, "--json")
    assert json.loads(r.stdout)["sent"] == 2
    assert all(rec["to"] != ["admin2@customer2.example"] for rec in env["sandbox"].sent())
    listed = cli("outbox", "list", "--status", "sent", "--json")
    rows = json.loads(listed.stdout)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"sent"}
    shown = cli("outbox", "show", str(rows[0]["id"]))
    assert "status: sent" in shown.stdout and "partner_invitation #0" in shown.stdout
    bad = cli("outbox", "list", "--status", "lost")
    assert bad.exit_code == 2 and "Unknown status 'lost'" in bad.stderr
    retry = cli("outbox", "retry", str(rows[0]["id"]))
    assert retry.exit_code == 1
    assert "is sent; only failed messages are retried" in retry.stderr
    missing = cli("outbox", "show", "999")
    assert missing.exit_code == 1 and "No outbox message 999" in missing.stderr
    suppressed = cli("contacts", "suppressed")
    assert "admin2@customer2.example" in suppressed.stdout
    exported = cli("outbox", "export", str(tmp_path / "outbox.csv"), "--status", "sent")
    assert exported.exit_code == 0 and "Wrote 2 messages" in exported.stdout
    with (tmp_path / "outbox.csv").open(encoding="utf-8-sig") as fh:
        rows_csv = list(csv.DictReader(fh))
    assert len(rows_csv) == 2 and {r["status"] for r in rows_csv} == {"sent"}


def test_resolve_unknown_by_hand(env: dict[str, Any], db: Database, tmp_path: Path,
                                 cli: Any) -> None:
    sb: Sandbox = env["sandbox"]
    sb.register_app("5e1f0c2a-9d3b-4c7e-8a6f-1b2c3d4e5f60", secret="sandbox-only-test-secret",
                     roles=("Mail.Send",))
    sb.set_faults(drop_after_accept_rate=1.0)
    seed(db, tmp_path, 1)
    r = cli("run", "--now", NOW, "--max-minutes", "0.05")
    assert "unknown 1" in r.stdout and "held for an operator 1" in r.stdout
    listed = json.loads(cli("outbox", "list", "--status", "unknown", "--json").stdout)
    mid = str(listed[0]["id"])
    assert f"comms outbox resolve {mid} --sent" in listed[0]["last_error"]
    both = cli("outbox", "resolve", mid)
    assert both.exit_code == 2 and "Say either --sent or --resend." in both.stderr
    done = cli("outbox", "resolve", mid, "--sent")
    assert done.exit_code == 0 and f"Message {mid} is now sent." in done.stdout
    assert statuses(db) == {"sent": 1} and len(sb.sent()) == 1


def test_an_address_opted_out_after_queueing_is_dropped_from_the_queued_message(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    """Issue 12: primary + billing, kickoff queued, billing opts out, run: only the primary
    gets it, and the row says who it went to; with every To address suppressed, withdrawn."""
    path = tmp_path / "two.csv"
    path.write_text(
        "key,name,licences,stage,primary_contact_email,billing_contact_email,"
        "technical_contact_email\n"
        "T1,Two Contacts Ltd,5,invited,boss@two.example,bills@two.example,\n"
        "T2,Lone Ltd,5,invited,solo@lone.example,solo-bills@lone.example,\n",
        encoding="utf-8")
    customer_service.import_customers(db, path, settings=load_settings(env={}),
                                      campaign=load_campaign(), now=T0, by="test")
    queued = cli("run", "--now", NOW, "--limit", "0")
    assert queued.exit_code == 0 and "queued 2" in queued.stdout, queued.output
    assert cli("contacts", "opt-out", "BILLS@two.example").exit_code == 0
    assert cli("contacts", "opt-out", "solo@lone.example").exit_code == 0
    assert cli("contacts", "opt-out", "solo-bills@lone.example").exit_code == 0
    r = cli("run", "--now", NOW)
    assert r.exit_code == 0, r.output
    sent = env["sandbox"].sent()
    assert len(sent) == 1
    assert [a.lower() for a in sent[0]["to"] + sent[0].get("cc", [])] == ["boss@two.example"]
    rows = {row["key"]: row for row in ledger(db)}
    assert rows["T2"]["status"] == "withdrawn" and rows["T1"]["status"] == "sent"
    with db.session() as s:
        t1 = s.exec(select(Message).where(Message.send_id == rows["T1"]["send_id"])).one()
    assert "bills@two.example" not in (t1.to_json + t1.cc_json).lower()
    assert "not sent to suppressed bills@two.example" in t1.note.lower()


def test_a_row_queued_for_a_stage_the_customer_left_is_withdrawn_at_claim(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    """The race a stage change can lose: a run planned an invitation reminder for `invited`
    while the move to `approved` committed, so withdraw_stale never saw the row. The claim
    checks the stage and withdraws it; a forced out-of-stage send (negative sequence) still
    goes out."""
    seed(db, tmp_path, 2)
    queued = cli("run", "--now", NOW, "--limit", "0")
    assert queued.exit_code == 0 and "queued 2" in queued.stdout, queued.output
    with db.session() as s:  # the stage moves without the withdraw: what the race leaves
        rows = s.exec(select(Message)).all()
        stale = next(m for m in rows if m.customer_id == rows[0].customer_id)
        customer = s.get(Customer, stale.customer_id)
        assert customer is not None and stale.stage == customer.stage == "invited"
        customer.stage = "approved"
        s.add(customer)
        s.commit()
        stale_id, key = stale.id, customer.key
    r = cli("run", "--now", NOW, "--max-minutes", "0.5")
    assert r.exit_code == 0, r.output
    with db.session() as s:
        row = s.get(Message, stale_id)
        assert row is not None and row.status == "withdrawn"
        assert row.last_error == "stage changed to approved since it was queued"
    assert len(env["sandbox"].sent()) == 1  # the other customer's invitation only
    forced = cli("send", key, "--message", "partner_invitation", "--force", "--note", "asked",
                 "--now", NOW, "--yes")
    assert forced.exit_code == 0, forced.output
    assert len(env["sandbox"].sent()) == 2
