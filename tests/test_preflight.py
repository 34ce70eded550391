"""A run that will send first checks it can sign in and reach each sender mailbox (issue 17):
through the real CLI, the real msal + requests, against the sandbox over HTTPS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, exported_env, seed, statuses

from comms.store.db import Database

NOW = T0.isoformat()


@pytest.fixture
def env(tmp_path: Path, database_url: str, sandbox_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return exported_env(sandbox_factory, tmp_path, database_url, monkeypatch)


def test_wrong_secret_stops_the_run_before_any_row(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed(db, tmp_path, 4)
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET", "not-the-secret")
    r = cli("run", "--now", NOW)
    assert r.exit_code == 3, r.output
    assert "client secret is wrong" in r.stderr
    assert statuses(db) == {}  # nothing planned, queued or failed
    assert env["sandbox"].sent() == []


def test_empty_certificate_settings_stop_the_run_before_any_row(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The starter config's certificate auth with its file settings left empty.
    seed(db, tmp_path, 3)
    monkeypatch.setenv("COMMS_GRAPH_AUTH", "certificate")
    monkeypatch.delenv("COMMS_GRAPH_CLIENT_SECRET")
    monkeypatch.setenv("COMMS_GRAPH_CERTIFICATE_FILE", "")
    monkeypatch.setenv("COMMS_GRAPH_PRIVATE_KEY_FILE", "")
    r = cli("run", "--now", NOW)
    assert r.exit_code == 3, r.output
    assert "certificate" in r.stderr.lower()
    assert statuses(db) == {}
    assert env["sandbox"].sent() == []


def test_a_sender_mailbox_that_does_not_exist_stops_the_run(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any,
) -> None:
    seed(db, tmp_path, 3)
    config: Path = env["config"]
    config.write_text(config.read_text() + '[[senders]]\naddress = "ghost@fabrikam.example"\n')
    r = cli("run", "--now", NOW)
    assert r.exit_code == 3, r.output
    assert "The run stopped before queueing anything" in r.stderr
    assert "ghost@fabrikam.example: does not exist in tenant" in r.stderr
    assert statuses(db) == {}
    assert env["sandbox"].sent() == []


def test_dry_run_does_not_sign_in(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed(db, tmp_path, 2)
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET", "not-the-secret")
    r = cli("run", "--dry-run", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert "2 messages would be queued now" in r.stdout


def test_a_good_configuration_passes_the_check_and_sends(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any,
) -> None:
    seed(db, tmp_path, 2)
    r = cli("run", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert statuses(db) == {"sent": 2}


def test_the_starter_all_zero_partner_id_stops_every_send_before_any_row(
    env: dict[str, Any], db: Database, tmp_path: Path, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partner invitation with the starter config's all-zero partner id would invite the
    customer to no partner: `comms run` and `comms send` refuse (exit 3) before any row; a dry
    run says so; with the id set, the same run sends."""
    keys = seed(db, tmp_path, 3)  # stage invited: each is due a partner invitation
    monkeypatch.setenv("COMMS_PARTNER_ID", "00000000-0000-0000-0000-000000000000")
    dry = cli("run", "--dry-run", "--now", NOW)
    assert dry.exit_code == 0, dry.output
    assert "warning: a real run would stop here. [partner] id is all zeros" in dry.stdout
    dry_send = cli("send", keys[0], "--dry-run", "--now", NOW)
    assert dry_send.exit_code == 0, dry_send.output
    assert "warning: a real send would stop here. [partner] id is all zeros" in dry_send.stdout
    # `comms send` refuses before it asks: without --yes and a terminal it would otherwise stop
    # at the question (exit 2) and not say why the send could never go.
    for args in (("run", "--now", NOW), ("send", keys[0], "--yes", "--now", NOW),
                 ("send", keys[0], "--now", NOW)):
        r = cli(*args)
        assert r.exit_code == 3, r.output
        words = " ".join(r.stderr.split())
        assert "Nothing was queued or sent: [partner] id is all zeros" in words, r.stderr
        assert "COMMS_PARTNER_ID" in words
        assert statuses(db) == {}
        assert env["sandbox"].sent() == []
    monkeypatch.setenv("COMMS_PARTNER_ID", "7e570000-0000-4000-8000-0000000000aa")
    ok = cli("run", "--now", NOW)
    assert ok.exit_code == 0, ok.output
    links = [m["html"] for m in env["sandbox"].sent()]
    assert len(links) == 3
    assert all("partnerId=7e570000-0000-4000-8000-0000000000aa" in h for h in links)
