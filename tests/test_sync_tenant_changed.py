"""A customer's tenant id corrected (a CSV re-imported) while a long sync read the old one:
what was read there is another tenant's. It was recorded as the customer's evidence and acted
on: a customer whose wrong tenant showed a cancelled subscription was completed, and told so.
Now it is dropped and reported, and the next sync reads the new tenant. End to end against the
sandbox over HTTPS; the test acts between the reading and the recording (the sync's own write
transaction then starts: on SQLite nothing can commit during it)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select
from test_sync_guesses import BASE, TENANT_X, TENANT_Y, _import, _row, world  # noqa: F401

from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.models import Customer
from comms.store.sync_models import SyncEvidence
from comms.sync import service


def test_a_tenant_id_corrected_during_a_sync_drops_what_was_read_with_the_old_one(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # X (the wrong tenant, first in the CSV): its old subscription is cancelled. Y (the
    # customer's real tenant): the old subscription still runs.
    for tenant, domain in ((TENANT_X, "wrong.example"), (TENANT_Y, "alpha.example")):
        world.add_customer_tenant(tenant, domain, "Alpha Ltd", direct_licences=30)
        world.tenant_change(tenant, "accept_relationship")
        world.tenant_change(tenant, "activate_csp", quantity=30)
    world.tenant_change(TENANT_X, "direct_status", status="Suspended")
    _import(cli, tmp_path, [("A", "Alpha Ltd", TENANT_X, "alpha.example", 30,
                             "awaiting_cancellation", "")])
    real, fired = service._record, []

    def corrected_meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            with db.session() as s:
                row = s.exec(select(Customer).where(Customer.key == "A")).one()
                row.tenant_id = TENANT_Y
                s.add(row)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "_record", corrected_meanwhile)
    r = cli("sync", "--now", BASE.isoformat(), "--json")
    assert fired and r.exit_code == 0, r.output
    a = _row(db, "A")
    assert (a.stage, a.tenant_id) == ("awaiting_cancellation", TENANT_Y)
    (customer,) = json.loads(r.stdout)["customers"]
    assert customer["status"] == "cannot verify", customer
    assert f"tenant id changed while sync read it ({TENANT_X} -> {TENANT_Y})" in json.dumps(
        customer)
    with db.session() as s:
        assert s.exec(select(SyncEvidence)).all() == []  # nothing of X recorded as A's
    monkeypatch.setattr(service, "_record", real)
    r = cli("sync", "--now", (BASE + timedelta(hours=1)).isoformat(), "--json")
    assert r.exit_code == 0, r.output
    assert _row(db, "A").stage == "awaiting_cancellation"  # Y's old subscription still runs
    with db.session() as s:
        tenants = {json.loads(e.seen_json).get("tenant_id") for e in s.exec(
            select(SyncEvidence).where(SyncEvidence.source == "tenant")).all()}
    assert tenants == {TENANT_Y}
