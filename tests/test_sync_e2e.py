"""Stage sync end to end: the real `comms` commands, msal and requests over HTTPS against the
sandbox's Partner Center and Graph directory; the ledger follows what "Microsoft" shows."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import CLIENT_ID, SECRET, sandbox_env
from factories import queued
from sqlmodel import col, select

from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.models import Customer, Message, StageEvent
from comms.store.sync_models import SyncEvidence
from comms.sync.observation import observation_for

SENDER = "transition@fabrikam.example"
TENANT_A = "aaaaaaaa-0000-4000-8000-00000000000a"
TENANT_B = "bbbbbbbb-0000-4000-8000-00000000000b"
TENANT_C = "cccccccc-0000-4000-8000-00000000000c"
ROLES = ("Mail.Send", "Mail.Read", "Organization.Read.All", "DelegatedAdminRelationship.Read.All")


def _csv(path: Path) -> Path:
    rows = [
        # A: CSV says 24 licences (self-service); the tenant shows 26 assigned.
        ("A", "Alpha Ltd", TENANT_A, "alpha.example", 24),
        # B: its admin never consented the app: cannot be verified.
        ("B", "Beta Ltd", TENANT_B, "beta.example", 10),
        # C: no tenant id in the CSV; Partner Center finds it by its unique domain.
        ("C", "Gamma Ltd", "", "gamma.example", 5),
    ]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "tenant_id", "primary_domain", "licences", "locale",
                    "time_zone", "stage", "primary_contact_name", "primary_contact_email"])
        for key, name, tid, domain, lic in rows:
            w.writerow([key, name, tid, domain, lic, "en", "Europe/London", "invited",
                        f"Admin {key}", f"admin@{domain}"])
    return path


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch, cli: Any) -> Sandbox:
    sb: Sandbox = sandbox_factory(time_scale=0.005, pc_requests_per_minute=40)
    env = sandbox_env(sb, tmp_path, database_url, senders=[SENDER], time_scale=0.005,
                      timeout=5.0)
    sb.register_app(CLIENT_ID, secret=SECRET, roles=ROLES)
    env.update({
        "COMMS_SYNC_PARTNER_CENTER": "true", "COMMS_SYNC_GDAP": "true",
        "COMMS_SYNC_CUSTOMER_TENANTS": "true", "COMMS_SYNC_PARTNER_CENTER_URL": sb.base_url,
        "COMMS_SYNC_PAGE_SIZE": "2", "COMMS_SYNC_CONCURRENCY": "4",
        "COMMS_SYNC_MAX_ATTEMPTS": "30",
    })
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    sb.add_customer_tenant(TENANT_A, "alpha.example", "Alpha Ltd", direct_licences=30,
                           assigned=26)
    sb.add_customer_tenant(TENANT_B, "beta.example", "Beta Ltd", direct_licences=10,
                           consented=False)
    sb.add_customer_tenant(TENANT_C, "gamma.example", "Gamma Ltd", direct_licences=5)
    r = cli("customers", "import", str(_csv(tmp_path / "c.csv")), "--now", BASE.isoformat())
    assert r.exit_code == 0, r.output
    return sb


# Import and every run are on the simulated clock (weekday offsets only: 0 is a Tuesday, 7 a
# week later, so every run is inside the send window whatever the real time of day).
BASE = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)  # a Tuesday, inside the send window


def _at(days: float) -> str:
    return (BASE + timedelta(days=days)).isoformat()


def _sent(db: Database, key: str) -> list[str]:
    with db.session() as s:
        rows = s.exec(select(Message.message).join(Customer, col(Customer.id) ==
                                                   col(Message.customer_id))
                      .where(col(Customer.key) == key, col(Message.status) == "sent")
                      .order_by(col(Message.id))).all()
    return list(rows)


def _stage(db: Database, key: str) -> Customer:
    with db.session() as s:
        row = s.exec(select(Customer).where(col(Customer.key) == key)).one()
        s.expunge(row)
        return row


def _counts(db: Database) -> tuple[int, int]:
    with db.session() as s:
        events = len(s.exec(select(StageEvent.id)).all())
        return events, len(s.exec(select(SyncEvidence.id)).all())


def test_the_ledger_follows_partner_center_and_the_tenant(
    world: Sandbox, db: Database, cli: Any
) -> None:
    r = cli("run", "--sync", "--now", _at(0))
    assert r.exit_code == 0, r.output
    assert _sent(db, "A") == ["partner_invitation"], r.output
    assert "2 cannot be verified" in r.output  # B: no consent; C: no tenant id yet

    # A accepts; C accepts too (matched by domain, its tenant id filled in).
    world.tenant_change(TENANT_A, "accept_relationship")
    world.tenant_change(TENANT_C, "accept_relationship")
    r = cli("run", "--sync", "--now", _at(1))
    assert r.exit_code == 0, r.output
    assert _stage(db, "A").stage == "approved"
    assert _sent(db, "A") == ["partner_invitation", "lose_access_warning"]
    assert _stage(db, "C").tenant_id == TENANT_C
    with db.session() as s:
        c_id = _stage(db, "C").id
        moves = s.exec(select(StageEvent).where(col(StageEvent.customer_id) == c_id)).all()
        assert any("tenant id" in e.note and e.by == "sync:partner_center" for e in moves)
    # Invitation reminders stop: days later, still nothing but the warning for A.
    r = cli("run", "--sync", "--now", _at(7))
    assert r.exit_code == 0, r.output
    assert "partner_invitation_reminder" not in _sent(db, "A")
    assert "partner_invitation_reminder" in _sent(db, "B")  # B never accepted

    # The CSP subscription goes live, under a 429 storm and 5xx from Partner Center.
    world.tenant_change(TENANT_A, "activate_csp", quantity=30)
    world.set_sync_faults(pc_throttle_rate=0.4, pc_error_rate=0.3, directory_error_rate=0.2,
                          seed=224)  # dice whose first rolls are all faults: a storm every run
    r = cli("run", "--sync", "--now", _at(8))
    assert r.exit_code == 0, r.output
    world.set_sync_faults(pc_throttle_rate=0.0, pc_error_rate=0.0, directory_error_rate=0.0)
    a = _stage(db, "A")
    assert a.stage == "awaiting_cancellation" and a.licences == 26
    assert world.sync_stats()["pc_throttled"] + world.sync_stats()["pc_errors"] > 0
    # ... and 503s inside the tenant's JSON batch, asked again in a later batch.
    assert world.sync_stats()["directory_errors"] > 0
    sent = [m for m in world.sent() if m["subject"] and "admin@alpha.example" in m["to"]]
    cancel = [m for m in sent if "cancel" in (m["html"] or "").lower()][-1]
    assert "26" in cancel["html"] and "support" in cancel["html"].lower()
    with db.session() as s:
        ev = s.exec(select(StageEvent).where(col(StageEvent.customer_id) == a.id,
                                             col(StageEvent.to_stage) == "awaiting_cancellation")
                    ).one()
        assert ev.by == "sync:partner_center" and "evidence #" in ev.note
        obs = observation_for(s, a.id or 0)
        assert obs is not None and obs.direct_active and obs.assigned_licences == 26

    # The customer cancels the direct subscription: Suspended -> completed, mailed once.
    world.tenant_change(TENANT_A, "direct_status", status="Suspended")
    r = cli("run", "--sync", "--now", _at(9))
    assert r.exit_code == 0, r.output
    assert _stage(db, "A").stage == "completed"
    r = cli("run", "--sync", "--now", _at(10))
    assert _sent(db, "A").count("transition_complete") == 1
    # Its wording rests on what sync saw: "we can see it is cancelled", with the check's date.
    done = [m for m in world.sent() if "admin@alpha.example" in m["to"]
            and "We can see that the old Microsoft 365 subscription" in (m["html"] or "")]
    assert len(done) == 1
    # The evidence is on the customer's timeline and beside the message it worded.
    shown = cli("customers", "show", "A")
    assert "observed by sync:tenant" in shown.stdout and "Suspended" in shown.stdout
    listed = json.loads(cli("outbox", "list", "--json").stdout)
    final = next(m for m in listed if m["message"] == "transition_complete")
    detail = cli("outbox", "show", str(final["id"])).stdout
    assert "evidence: direct subscription Suspended" in detail

    # Nothing new: a second sync records nothing and moves nothing.
    before = _counts(db)
    r = cli("sync", "--now", _at(10), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["moved"] == 0 and data["cannot_verify"] == 1
    assert _counts(db) == before
    # B was never moved and is listed as not verifiable.
    assert _stage(db, "B").stage == "invited"
    assert any(c["key"] == "B" and "consent" in c["problem"] for c in data["customers"])
    status = cli("status", "--now", _at(10))
    assert "Stage sync: last checked" in status.output
    assert "Cannot verify 1 customer" in status.output and "B (tenant)" in status.output


def test_a_tenants_two_directory_reads_travel_in_one_json_batch(
    world: Sandbox, cli: Any
) -> None:
    r = cli("sync", "--now", _at(0), "--json")
    assert r.exit_code == 0, r.output
    problems = {c["key"]: c["problem"] for c in json.loads(r.stdout)["customers"]}
    # A is read; B's reads are answered 403 inside its batch (no consent) and it cannot be
    # verified, as when they were sent one by one; C has no tenant id yet.
    assert not problems["A"] and "consent" in problems["B"] and problems["C"]
    assert world.stats()["batches"] == 2
    # Two reads in each batch, and the partner tenant's GDAP list on its own.
    assert world.sync_stats()["directory_requests"] == 2 * 2 + 1


def test_completion_set_by_hand_does_not_claim_an_observation(
    world: Sandbox, db: Database, cli: Any
) -> None:
    """Issue 11/13: without sync evidence the completion email stays conditional."""
    r = cli("customers", "set-stage", "B", "completed", "--force", "--note", "phoned",
            "--yes", "--now", _at(1))
    if r.exit_code != 0:  # the stage machine may refuse a jump: walk it there step by step
        for stage in ("announced", "approved", "awaiting_cancellation", "completed"):
            cli("customers", "set-stage", "B", stage, "--note", "by hand", "--yes",
                "--now", _at(1))
    assert _stage(db, "B").stage == "completed"
    r = cli("run", "--now", _at(30))
    assert r.exit_code == 0, r.output
    done = [m for m in world.sent() if "admin@beta.example" in m["to"]
            and (m.get("subject") or "").startswith("Done:")]
    assert len(done) == 1, [m["subject"] for m in world.sent()]
    assert not any("We can see that the old Microsoft 365 subscription" in (m["html"] or "")
                   for m in done)


def test_a_stage_set_by_hand_stands_until_a_new_observation(
    world: Sandbox, db: Database, cli: Any
) -> None:
    # `customers set-stage` records the real time, so sync runs around it.
    now = datetime.now(UTC)
    world.tenant_change(TENANT_A, "accept_relationship")
    assert cli("sync", "--now", (now - timedelta(hours=1)).isoformat()).exit_code == 0
    assert _stage(db, "A").stage == "approved"
    r = cli("customers", "set-stage", "A", "invited", "--force", "--note", "accepted by mistake",
            "--yes")
    assert r.exit_code == 0, r.output
    r = cli("sync", "--now", (now + timedelta(hours=1)).isoformat())
    assert _stage(db, "A").stage == "invited" and "set by hand" in r.output
    # New Partner Center evidence while the relationship stays listed does not undo it.
    world.tenant_change(TENANT_A, "activate_csp", quantity=5)
    r = cli("sync", "--now", (now + timedelta(hours=2)).isoformat())
    assert _stage(db, "A").stage == "invited" and "set by hand" in r.output
    # The relationship removed, then accepted again: a new observation of it moves it on, one
    # stage per sync (approved's lose_access_warning goes out before the customer moves on to
    # awaiting_cancellation).
    world._core.tenants.customers[TENANT_A].relationship = False
    assert cli("sync", "--now", (now + timedelta(hours=3)).isoformat()).exit_code == 0
    assert _stage(db, "A").stage == "invited"
    world.tenant_change(TENANT_A, "accept_relationship")
    assert cli("sync", "--now", (now + timedelta(hours=4)).isoformat()).exit_code == 0
    assert _stage(db, "A").stage == "approved"


def test_dry_run_writes_nothing(world: Sandbox, db: Database, cli: Any) -> None:
    world.tenant_change(TENANT_A, "accept_relationship")
    before = _counts(db)
    r = cli("sync", "--dry-run", "--now", _at(1))
    assert r.exit_code == 0, r.output
    assert "would move" in r.output
    assert _counts(db) == before and _stage(db, "A").stage == "invited"


def test_a_move_by_sync_withdraws_queued_messages_of_the_old_stage(
    world: Sandbox, db: Database, cli: Any
) -> None:
    """Sync asks once per page which customers have queued messages; those are withdrawn
    exactly as a move by hand withdraws them, the others move without the UPDATE."""
    a_id = _stage(db, "A").id or 0
    reminder = queued(db, a_id, "partner_invitation_reminder", 1, stage="invited")
    world.tenant_change(TENANT_A, "accept_relationship")
    world.tenant_change(TENANT_C, "accept_relationship")
    r = cli("sync", "--now", _at(1))
    assert r.exit_code == 0, r.output
    assert _stage(db, "A").stage == "approved" and _stage(db, "C").stage == "approved"
    with db.session() as s:
        row = s.exec(select(Message).where(col(Message.id) == reminder)).one()
        assert row.status == "withdrawn" and row.last_error == "stage changed to approved"


def test_certificate_auth_signs_in_every_customer_tenant(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One msal application per customer tenant, all signing their client assertion with
    the certificate's key loaded once (PEM text would be parsed again for each tenant)."""
    cert_pem, key_pem, _ = world.make_certificate("comms-sync-tests")
    cert_file, key_file = tmp_path / "app-cert.pem", tmp_path / "app-key.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    key_file.chmod(0o600)
    world.register_app(CLIENT_ID, certificate_pem=cert_pem, roles=ROLES)
    monkeypatch.delenv("COMMS_GRAPH_CLIENT_SECRET")
    monkeypatch.setenv("COMMS_GRAPH_AUTH", "certificate")
    monkeypatch.setenv("COMMS_GRAPH_CERTIFICATE_FILE", str(cert_file))
    monkeypatch.setenv("COMMS_GRAPH_PRIVATE_KEY_FILE", str(key_file))
    world.tenant_change(TENANT_A, "accept_relationship")
    world.tenant_change(TENANT_C, "accept_relationship")
    r = cli("sync", "--now", _at(1), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["moved"] == 2 and data["cannot_verify"] == 1  # B: no consent
    with db.session() as s:
        a_id = _stage(db, "A").id
        tenant = s.exec(select(SyncEvidence).where(col(SyncEvidence.customer_id) == a_id,
                                                   col(SyncEvidence.source) == "tenant")).one()
    assert '"assigned": 26' in tenant.seen_json  # read with a token issued in A's tenant


def test_a_partner_center_name_is_shown_as_written_never_acted_on(
    world: Sandbox, db: Database, cli: Any
) -> None:
    """A company name comes from outside (the customer's own profile): an unmatched customer's
    name with terminal control characters is printed with them shown, not sent."""
    stranger = "0d0d0d0d-0000-4000-8000-00000000000d"
    world.add_customer_tenant(stranger, "stranger.example", "Evil\x1b]8;;https://x.example/\x07Co",
                              direct_licences=3)
    world.tenant_change(stranger, "accept_relationship")
    r = cli("sync", "--now", _at(1))
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert ("unmatched in Partner Center: Evil\\x1b]8;;https://x.example/\\x07Co "
            "(stranger.example") in r.stdout, r.stdout
