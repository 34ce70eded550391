"""`comms status` (text and --json) and the HTML report show the tenant budget (TERRL, issue
18): external recipients used in the rolling day vs comms' share and Exchange's cap, and when it
frees up. Sends go through the real CLI to the sandbox; the ledger is real SQLite/PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import T0, sandbox_env, seed

from comms.sandbox import Sandbox
from comms.store.db import Database

NOW = T0.isoformat()


@pytest.fixture
def env(tmp_path: Path, database_url: str, sandbox_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    sb: Sandbox = sandbox_factory(time_scale=0.005)
    values = sandbox_env(sb, tmp_path, database_url, senders=["transition@fabrikam.example"],
                         time_scale=0.005)
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("COLUMNS", "200")
    return sb


def test_status_and_report_show_the_budget_used_and_when_it_frees(
    env: Sandbox, db: Database, tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COMMS_TENANT_LICENCES", "50")  # cap 17,231; comms' half: 8,615
    seed(db, tmp_path, 3)
    before = datetime.now(UTC)
    assert cli("run", "--now", NOW).exit_code == 0

    r = cli("status", "--json")
    assert r.exit_code == 0, r.output
    tenant = json.loads(r.stdout)["tenant"]
    assert (tenant["used"], tenant["budget"], tenant["cap"], tenant["remaining"]) == (
        3, 8_615, 17_231, 8_612)
    assert tenant["share"] == 0.5 and tenant["full"] is False
    # The scaled day (time_scale 0.005: 432 s) after the first send.
    frees = datetime.fromisoformat(tenant["frees_at"])
    assert before + timedelta(seconds=432) <= frees <= datetime.now(UTC) + timedelta(seconds=432)

    text = cli("status")
    assert "Tenant budget: 3 of 8,615 external recipients used in the last 0.12 hours " \
           "(scaled) (50% of Exchange's 17,231/day cap); the oldest free up at" in text.stdout

    out = tmp_path / "report.html"
    assert cli("report", "--out", str(out)).exit_code == 0
    page = out.read_text(encoding="utf-8")
    assert 'id="tenant-budget"><span class="n">3 / 8,615</span>' in page
    assert "of Exchange&#39;s 17,231/day" in page or "of Exchange's 17,231/day" in page


def test_a_full_budget_says_until_when_sending_waits(
    env: Sandbox, db: Database, tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COMMS_TENANT_EXTERNAL_RECIPIENTS_PER_DAY", "4")  # comms' half: 2
    seed(db, tmp_path, 3)
    run = cli("run", "--now", NOW, "--max-minutes", "0.05")
    assert run.exit_code == 0, run.output
    data = json.loads(cli("status", "--json").stdout)["tenant"]
    assert (data["used"], data["budget"], data["cap"], data["full"]) == (2, 2, 4, True)
    text = cli("status").stdout
    assert "Tenant budget: 2 of 2 external recipients used" in text
    assert "; full: sending waits until " in text


def test_status_as_of_a_simulated_time_still_reads_the_budget_now(
    env: Sandbox, db: Database, tmp_path: Path, cli: Any,
) -> None:
    # Send slots carry the real clock, so an --now in the past does not hide today's sends.
    seed(db, tmp_path, 2)
    assert cli("run", "--now", NOW).exit_code == 0
    data = json.loads(cli("status", "--json", "--now", "2024-01-01T00:00").stdout)
    assert data["tenant"]["used"] == 2
