"""Waves (issue 15): proofs reach only the operator, a wave waits for its approval, a template
edit re-holds it. Real CLI, real SQLite/PostgreSQL, real Graph transport to the sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, sandbox_env, seed, statuses
from sqlmodel import select

from comms.paths import builtin_config_dir
from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.models import Contact, Customer, Message
from comms.store.wave_models import WaveEvent

OPERATOR = "ops@fabrikam.example"
NOW = T0.isoformat()


@pytest.fixture
def env(tmp_path: Path, database_url: str, sandbox_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    sb: Sandbox = sandbox_factory(time_scale=0.005)
    campaign = tmp_path / "campaign.toml"
    campaign.write_text("require_approval = true\n" + (
        builtin_config_dir() / "campaign.toml").read_text(encoding="utf-8"), encoding="utf-8")
    folder = tmp_path / "templates"
    folder.mkdir()
    values = sandbox_env(sb, tmp_path, database_url, senders=["transition@fabrikam.example"],
                         time_scale=0.005, COMMS_CAMPAIGN_FILE=str(campaign),
                         COMMS_TEMPLATES_FOLDER=str(folder))
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return {"sandbox": sb, "templates": folder}


def _customer_mail(sb: Sandbox) -> list[dict[str, Any]]:
    return [r for r in sb.sent() if OPERATOR not in r["to"]]


def test_proof_reaches_only_the_operator_and_leaves_no_customer_trace(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    seed(db, tmp_path, 6)  # wave-1: K0001, K0003, K0005 (licences 6, 8, 10: self-service)
    r = cli("wave", "proof", "wave-1", "--to", OPERATOR, "--now", NOW)
    assert r.exit_code == 0, r.output
    sent = env["sandbox"].sent()
    assert len(sent) == 1  # one message x one locale x one licence branch
    assert sent[0]["to"] == [OPERATOR] and sent[0]["cc"] == [] and sent[0]["bcc"] == []
    assert sent[0]["subject"].startswith("[PROOF] ")
    # No customer message was queued and the planner still owes every customer its invitation.
    assert statuses(db) == {"sent": 1}
    with db.session() as s:
        (row,) = s.exec(select(Message)).all()
    assert row.message == "proof:partner_invitation" and row.internal
    status = json.loads(cli("status", "--json", "--now", NOW).stdout)
    assert sum(status["messages"]["total"].values()) == 0
    dry = cli("run", "--dry-run", "--now", NOW)
    assert "held: awaiting approval (6)" in dry.stdout, dry.output
    # A customer's address is refused as a proof recipient.
    bad = cli("wave", "proof", "wave-1", "--to", "admin1@customer1.example", "--now", NOW)
    assert bad.exit_code == 2 and "contact of customer K0001" in bad.output
    # Also spelt another way: an internationalised domain in its ASCII form (it passed).
    with db.session() as s:
        k3 = s.exec(select(Customer.id).where(Customer.key == "K0003")).one()
        s.add(Contact(customer_id=k3, email="anna@müller.example", role="billing"))
    for spelt in ("Anna@xn--mller-kva.example", " ADMIN1@Customer1.example "):
        bad = cli("wave", "proof", "wave-1", "--to", spelt, "--now", NOW)
        assert bad.exit_code == 2 and "contact of customer K000" in bad.output, (spelt, bad.output)
    bad = cli("wave", "proof", "wave-1", "--to", "ops@", "--now", NOW)
    assert bad.exit_code == 2 and "--to: 'ops@' is not a valid email address" in bad.output
    assert len(env["sandbox"].sent()) == 1


def test_held_wave_sends_nothing_until_approved_then_exactly_what_was_proofed(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    seed(db, tmp_path, 4)
    sb = env["sandbox"]
    assert cli("run", "--now", NOW).exit_code == 0
    assert sb.sent() == [] and statuses(db) == {}
    refused = cli("wave", "approve", "wave-1", "--by", "Dana", "--now", NOW)
    assert refused.exit_code != 0 and "wave proof wave-1" in refused.output
    assert cli("wave", "proof", "wave-1", "--to", OPERATOR, "--now", NOW).exit_code == 0
    proof = sb.sent()[0]
    ok = cli("wave", "approve", "wave-1", "--by", "Dana", "--note", "checked", "--now", NOW)
    assert ok.exit_code == 0, ok.output
    listing = json.loads(cli("wave", "list", "--json", "--now", NOW).stdout)
    states = {w["tag"]: w["approval"] for w in listing}
    assert states == {"wave-1": "approved", "wave-2": "awaiting approval"}
    r = cli("run", "--now", NOW)
    assert r.exit_code == 0 and "held: awaiting approval (2)" in r.stdout, r.output
    real = _customer_mail(sb)
    assert sorted(m["to"][0] for m in real) == ["admin1@customer1.example",
                                                "admin3@customer3.example"]
    # The proof was rendered for the wave's first customer: its real email is the proof.
    first = next(m for m in real if m["to"] == ["admin1@customer1.example"])
    assert proof["subject"] == "[PROOF] " + first["subject"]
    assert proof["html"] == first["html"]
    with db.session() as s:
        trail = s.exec(select(WaveEvent).order_by(WaveEvent.id)).all()  # type: ignore[arg-type]
    assert [(e.action, e.by) for e in trail][-1] == ("approve", "Dana")
    assert trail[-1].content_hash == trail[0].content_hash and len(trail[0].content_hash) == 64
    # Hold stops customers not yet started.
    assert cli("wave", "hold", "wave-2").exit_code == 0
    assert json.loads(cli("wave", "list", "--json", "--now", NOW).stdout)[1]["approval"] == "held"


def test_template_edit_after_approval_re_holds_the_wave(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    seed(db, tmp_path, 2)  # K0000 in wave-2, K0001 in wave-1
    for tag in ("wave-1", "wave-2"):
        assert cli("wave", "proof", tag, "--to", OPERATOR, "--now", NOW).exit_code == 0
        assert cli("wave", "approve", tag, "--by", "Dana", "--now", NOW).exit_code == 0
    # Edit the invitation's subject in the user template folder (overrides the built-in one).
    folder = env["templates"] / "partner_invitation"
    folder.mkdir()
    (folder / "subject.txt").write_text("Please accept {{ partner.name }} as your partner\n",
                                        encoding="utf-8")
    listing = json.loads(cli("wave", "list", "--json", "--now", NOW).stdout)
    assert {w["approval"] for w in listing} == {"re-held: content changed"}
    r = cli("run", "--now", NOW)
    assert r.exit_code == 0 and "held: awaiting approval (2)" in r.stdout, r.output
    assert _customer_mail(env["sandbox"]) == []
    assert cli("wave", "proof", "wave-1", "--to", OPERATOR, "--now", NOW).exit_code == 0
    assert cli("wave", "approve", "wave-1", "--by", "Dana", "--now", NOW).exit_code == 0
    assert cli("run", "--now", NOW).exit_code == 0
    (mail,) = _customer_mail(env["sandbox"])
    assert mail["to"] == ["admin1@customer1.example"] and mail["subject"].startswith("Please")


def test_wave_list_next_due_leaves_out_customers_a_run_would_skip(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any
) -> None:
    seed(db, tmp_path, 4)  # wave-1: K0001, K0003; wave-2: K0000, K0002

    def next_due() -> dict[str, str]:
        listing = json.loads(cli("wave", "list", "--json", "--now", NOW).stdout)
        return {w["tag"]: w["next_due_at"] for w in listing}

    before = next_due()
    assert before["wave-1"] and before["wave-2"]
    for key in ("K0001", "K0003"):  # the whole of wave-1: one paused, one opted out
        action = "pause" if key == "K0001" else "opt-out"
        r = cli("customers", action, key, "--note", "asked us to")
        assert r.exit_code == 0, r.output
    after = next_due()
    assert after == {"wave-1": "", "wave-2": before["wave-2"]}
    shown = cli("wave", "list", "--now", NOW)
    assert shown.exit_code == 0 and "…" not in shown.stdout
