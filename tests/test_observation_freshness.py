"""An email states what sync saw only while it is the current state: dated by the last check
that read the tenant, dropped when the last check could not read it ("cannot verify"), when it
is older than `[sync] evidence_max_age_days`, or when it came from another tenant than the
customer's. Over HTTPS against the sandbox (real msal + requests), real ledger."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlmodel import select
from test_sync_guesses import BASE, TENANT_X, TENANT_Y, _row, awaiting_cancellation, world

from comms.config import load_settings
from comms.render import Renderer
from comms.render.renderer import RenderedEmail
from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.repo import load_customers
from comms.store.sync_models import SyncEvidence

__all__ = ["world"]  # the fixture, imported for pytest

STILL_ACTIVE = "subscription of Alpha Ltd is still active"


def _reminder(db: Database, now: datetime) -> RenderedEmail:
    row = _row(db, "A")
    assert row.id is not None
    with db.session() as s:
        info = load_customers(s, [row.id])[row.id]
    return Renderer(load_settings()).render(
        "cancel_reminder", info, now=now, reminder_number=2,
        extra={"reminders_max": 5, "escalated": False})


def _rewrite_evidence(db: Database, customer_id: int | None, *, drop: str = "",
                     **seen: object) -> None:
    """Change what the customer's one tenant evidence row says it saw (``drop``: a key it
    leaves out, with the digest recomputed, as an older version recorded it)."""
    with db.session() as s:
        ev = s.exec(select(SyncEvidence).where(SyncEvidence.customer_id == customer_id,
                                               SyncEvidence.source == "tenant")).one()
        merged = {**json.loads(ev.seen_json), **seen}
        if drop:
            assert merged.pop(drop)
            ev.digest = hashlib.sha256(json.dumps(merged, sort_keys=True).encode()).hexdigest()
        ev.seen_json = json.dumps(merged, sort_keys=True)
        s.add(ev)


def _sync(cli: Any, days: float) -> None:
    r = cli("sync", "--now", (BASE + timedelta(days=days)).isoformat(), "--source", "tenant")
    assert r.exit_code in (0, 1), r.output


def test_the_claim_is_dated_by_the_last_check_and_dropped_when_it_cannot_be_verified(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    awaiting_cancellation(world, cli, tmp_path, licences=26)
    for day in (0, 3, 6):  # still Enabled at every check: one evidence row, three checks
        _sync(cli, day)
    email = _reminder(db, BASE + timedelta(days=6, hours=1))
    assert STILL_ACTIVE in email.text
    assert "checked on 7 December 2026" in email.text, email.text
    # The customer cancels and the app's consent is withdrawn: the next check cannot read it.
    world.tenant_change(TENANT_X, "direct_status", status="Suspended")
    world.tenant_change(TENANT_X, "consent", granted=False)
    _sync(cli, 9)
    email = _reminder(db, BASE + timedelta(days=12))
    assert STILL_ACTIVE not in email.text and "checked on" not in email.text
    assert "If you have not cancelled the old Microsoft 365 subscription" in email.text


def test_a_claim_older_than_the_limit_is_not_made(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    awaiting_cancellation(world, cli, tmp_path, licences=26)
    _sync(cli, 0)
    assert STILL_ACTIVE in _reminder(db, BASE + timedelta(days=7)).text  # 7 days: the limit
    late = _reminder(db, BASE + timedelta(days=7, hours=1))
    assert STILL_ACTIVE not in late.text and "checked on" not in late.text


def test_evidence_from_another_tenant_is_not_the_customers(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    awaiting_cancellation(world, cli, tmp_path, licences=26)
    _sync(cli, 0)
    row = _row(db, "A")
    _rewrite_evidence(db, row.id, tenant_id=TENANT_X)
    assert STILL_ACTIVE in _reminder(db, BASE + timedelta(hours=1)).text
    with db.session() as s:  # the CSV corrected the tenant id
        customer = s.get(type(row), row.id)
        assert customer is not None
        customer.tenant_id = TENANT_Y
        s.add(customer)
    assert STILL_ACTIVE not in _reminder(db, BASE + timedelta(hours=2)).text


def test_evidence_that_did_not_identify_the_old_subscription_states_nothing(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    awaiting_cancellation(world, cli, tmp_path, licences=26)
    _sync(cli, 0)
    assert STILL_ACTIVE in _reminder(db, BASE + timedelta(hours=1)).text
    # What sync records when several products are billed directly.
    _rewrite_evidence(db, _row(db, "A").id, status="unknown", id=None, total=None,
                      assigned=None, several=["ENTERPRISEPACK", "VISIO"])
    email = _reminder(db, BASE + timedelta(hours=2))
    assert STILL_ACTIVE not in email.text and "checked on" not in email.text
    assert "If you have not cancelled the old Microsoft 365 subscription" in email.text


def test_evidence_that_names_no_tenant_states_nothing_until_the_next_sync(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    awaiting_cancellation(world, cli, tmp_path, licences=26)
    _sync(cli, 0)
    # As a version before evidence named its tenant recorded it.
    _rewrite_evidence(db, _row(db, "A").id, drop="tenant_id")
    email = _reminder(db, BASE + timedelta(hours=1))
    assert STILL_ACTIVE not in email.text and "checked on" not in email.text
    assert "If you have not cancelled the old Microsoft 365 subscription" in email.text
    _sync(cli, 1)  # the same reading, now with its tenant: new evidence
    assert STILL_ACTIVE in _reminder(db, BASE + timedelta(days=1, hours=1)).text
