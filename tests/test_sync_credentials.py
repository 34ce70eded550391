"""The app's own credential refused by the token endpoint (a client secret expired or wrong)
makes every read unreadable, for every customer: `comms sync` stops with exit code 3 and says
what failed and how to fix it, instead of reporting each customer "cannot verify" and exiting 0
(what cron would take for a good run). A tenant that refuses the app (no consent there) is still
that customer's "cannot verify". Through the CLI, over HTTPS against the sandbox, with the real
msal and requests."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import CLIENT_ID, SECRET
from test_sync_guesses import BASE, TENANT_X, TENANT_Y, _import, _row, _world

from comms.sandbox import Sandbox
from comms.store.db import Database


@pytest.fixture
def world(sandbox_factory: Any, tmp_path: Path, database_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    sb = _world(sandbox_factory, tmp_path, database_url, monkeypatch)
    monkeypatch.setenv("COMMS_SYNC_PARTNER_CENTER", "false")  # the tenant source only
    return sb


def _customers(world: Sandbox, cli: Any, tmp_path: Path) -> None:
    world.add_customer_tenant(TENANT_X, "alpha.example", "Alpha Ltd", direct_licences=30)
    world.add_customer_tenant(TENANT_Y, "beta.example", "Beta Ltd", direct_licences=20,
                              consented=False)
    _import(cli, tmp_path, [
        ("A", "Alpha Ltd", TENANT_X, "alpha.example", 30, "awaiting_cancellation", ""),
        ("B", "Beta Ltd", TENANT_Y, "beta.example", 20, "awaiting_cancellation", "")])


def _at(hours: float) -> str:
    return (BASE + timedelta(hours=hours)).isoformat()


def test_the_sandbox_answers_an_expired_secret_with_aadsts7000222(world: Sandbox) -> None:
    import requests

    world.expire_secret(CLIENT_ID, SECRET)
    with requests.Session() as http:
        http.verify = str(world.ca_file)
        http.trust_env = False
        r = http.post(f"{world.authority_host}/{world.tenant_id}/oauth2/v2.0/token", data={
            "grant_type": "client_credentials", "client_id": CLIENT_ID,
            "client_secret": SECRET, "scope": "https://graph.microsoft.com/.default"})
    assert r.status_code == 401
    body = r.json()
    assert (body["error"], body["error_codes"]) == ("invalid_client", [7000222])
    assert body["error_description"].startswith("AADSTS7000222: The provided client secret")


def test_an_expired_secret_fails_the_tenant_only_sync_with_exit_code_3(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path
) -> None:
    _customers(world, cli, tmp_path)
    r = cli("sync", "--now", _at(0), "--json")
    assert r.exit_code == 0, r.output
    statuses = {c["key"]: c["status"] for c in json.loads(r.stdout)["customers"]}
    assert statuses == {"A": "seen", "B": "cannot verify"}  # B: no consent in its tenant
    world.expire_secret(CLIENT_ID, SECRET)
    for args in (("sync",), ("sync", "--source", "tenant", "--json")):
        r = cli(*args, "--now", _at(1))
        assert r.exit_code == 3, (args, r.output)
        assert "AADSTS7000222" in r.stderr and "expired" in r.stderr, r.stderr
        assert "app registration" in r.stderr and "comms auth check" in r.stderr, r.stderr
        assert "customer tenant" in r.stderr and "cannot verify" not in r.stdout, r.output
    # `comms run --sync` stops too (its sign-in check before the run already stops it).
    assert cli("run", "--sync", "--now", _at(1)).exit_code == 3
    assert (_row(db, "A").stage, _row(db, "B").stage) == ("awaiting_cancellation",) * 2


def test_a_wrong_secret_fails_the_tenant_only_sync_with_exit_code_3(
    world: Sandbox, db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _customers(world, cli, tmp_path)
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET", "not-the-secret")
    r = cli("sync", "--now", _at(0))
    assert r.exit_code == 3, r.output
    assert "AADSTS7000215" in r.stderr and "comms auth check" in r.stderr, r.stderr
