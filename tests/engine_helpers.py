"""Helpers for engine tests that run real sends against the sandbox: seed customers through the
real import, build the COMMS_* environment that points a `comms` process at a sandbox, and
compare the ledger with what the sandbox accepted."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from comms.campaign import load_campaign
from comms.config import Settings, load_settings
from comms.sandbox import Sandbox
from comms.services import customers as customer_service
from comms.store.db import Database
from comms.store.models import Customer, Message

# A Tuesday, 10:00 in London: inside the default send window.
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
CLIENT_ID = "5e1f0c2a-9d3b-4c7e-8a6f-1b2c3d4e5f60"
SECRET = "sandbox-only-test-secret"
TEST_PARTNER_ID = "7e570000-0000-4000-8000-000000000001"  # an example id for tests


def write_customers_csv(path: Path, n: int, *, stage: str = "invited", prefix: str = "K") -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "locale", "time_zone", "stage", "tags",
                    "account_manager_name", "account_manager_email",
                    "primary_contact_name", "primary_contact_email"])
        for i in range(n):
            w.writerow([f"{prefix}{i:04d}", f"Customer {i} Ltd", 5 + i % 40, "en",
                        "Europe/London", stage, "wave-1" if i % 2 else "wave-2",
                        "Alex Manager", "am@fabrikam.example",
                        f"Admin {i}", f"admin{i}@customer{i}.example"])
    return path


def seed(db: Database, tmp_path: Path, n: int, *, stage: str = "invited",
         now: datetime = T0, settings: Settings | None = None) -> list[str]:
    path = write_customers_csv(tmp_path / f"seed-{n}.csv", n, stage=stage)
    settings = settings or load_settings(env={})
    customer_service.import_customers(db, path, settings=settings, campaign=load_campaign(),
                                 now=now, by="test")
    return [f"K{i:04d}" for i in range(n)]


def seed_lettered(db: Database, tmp_path: Path, keys: tuple[str, ...]) -> None:
    """One customer per key (``B`` -> "B Ltd", admin@b.example, account manager
    am@f.example), in stage invited, imported at T0."""
    path = tmp_path / "lettered.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "stage", "account_manager_email",
                    "primary_contact_name", "primary_contact_email"])
        for key in keys:
            w.writerow([key, f"{key} Ltd", 5, "invited", "am@f.example", "Admin",
                        f"admin@{key.lower()}.example"])
    customer_service.import_customers(db, path, settings=load_settings(env={}),
                                      campaign=load_campaign(), now=T0, by="test")


def sandbox_env(sb: Sandbox, tmp_path: Path, database_url: str, *, senders: list[str],
                time_scale: float, grace: float = 0.3, timeout: float = 1.0,
                lease: float = 2.0, reconcile: bool = True, server_timeout: float | None = None,
                **extra: str) -> dict[str, str]:
    """Environment for a `comms` process (or load_settings) aimed at ``sb``.

    ``server_timeout`` (how long the sandbox may keep working on a request we gave up on)
    defaults to two request timeouts here, which bounds every latency the tests inject."""
    for s in senders:
        sb.add_mailbox(s)
    sb.register_app(CLIENT_ID, secret=SECRET)
    config = tmp_path / "engine.toml"
    config.write_text("".join(f'[[senders]]\naddress = "{s}"\n\n' for s in senders),
                      encoding="utf-8")
    env = {
        "COMMS_CONFIG": str(config),
        "COMMS_HOME": str(tmp_path / "home"),
        "COMMS_DATABASE_URL": database_url,
        "COMMS_GRAPH_BASE_URL": sb.graph_url,
        "COMMS_GRAPH_AUTHORITY_HOST": sb.authority_host,
        "COMMS_GRAPH_TENANT_ID": sb.tenant_id,
        "COMMS_GRAPH_CLIENT_ID": CLIENT_ID,
        "COMMS_GRAPH_CA_FILE": str(sb.ca_file),
        "COMMS_GRAPH_AUTH": "secret",
        "COMMS_GRAPH_CLIENT_SECRET": SECRET,
        "COMMS_GRAPH_TIMEOUT_SECONDS": str(timeout),
        "COMMS_GRAPH_SERVER_TIMEOUT_SECONDS": str(server_timeout or 2 * timeout),
        "COMMS_GRAPH_RECONCILE": "true" if reconcile else "false",
        "COMMS_GRAPH_RECONCILE_GRACE_SECONDS": str(grace),
        "COMMS_DELIVERY_LEASE_SECONDS": str(lease),
        "COMMS_DELIVERY_TIME_SCALE": str(time_scale),
        "COMMS_PARTNER_ID": TEST_PARTNER_ID,  # the starter's all-zero id stops a run
        **extra,
    }
    return env


def settings_from(env: dict[str, str]) -> Settings:
    return load_settings(env["COMMS_CONFIG"], env=env)


def run_comms(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("COMMS_")}, **env}
    return subprocess.run([sys.executable, "-m", "comms", *args], env=full, text=True,
                          capture_output=True, timeout=timeout)


def popen_comms(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("COMMS_")}, **env}
    return subprocess.Popen([sys.executable, "-m", "comms", *args], env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def statuses(db: Database) -> Counter[str]:
    with db.session() as s:
        return Counter(s.exec(select(Message.status)).all())


def ledger(db: Database) -> list[dict[str, Any]]:
    with db.session() as s:
        rows = s.exec(
            select(Message, Customer.key)
            .join(Customer, col(Customer.id) == col(Message.customer_id))
            .order_by(col(Message.id))
        ).all()
    return [{"key": k, "message": m.message, "sequence": m.sequence, "status": m.status,
             "send_id": m.send_id, "sender": m.sender, "html": m.body_html()} for m, k in rows]


def assert_exactly_once(db: Database, sb: Sandbox, expected: int) -> None:
    """Every ledger row is sent, the sandbox accepted each send id exactly once, nothing else."""
    rows = ledger(db)
    st = Counter(r["status"] for r in rows)
    assert st == Counter({"sent": expected}), f"ledger statuses: {dict(st)}"
    accepted = Counter(rec["send_id"] for rec in sb.sent())
    dupes = {k: v for k, v in accepted.items() if v > 1}
    assert not dupes, f"sent more than once: {dupes}"
    assert set(accepted) == {r["send_id"] for r in rows}, "ledger and sandbox disagree"


ENGINE_SENDERS = ["transition@fabrikam.example", "transition2@fabrikam.example"]


def exported_env(sandbox_factory: Any, tmp_path: Path, database_url: str, monkeypatch: Any,
                 **extra: str) -> dict[str, Any]:
    """A sandbox at time scale 0.005 with two sender mailboxes, its COMMS_* environment
    exported for in-process CLI calls: {"sandbox", "env", "config"}."""
    sb: Sandbox = sandbox_factory(time_scale=0.005)
    values = sandbox_env(sb, tmp_path, database_url, senders=ENGINE_SENDERS, time_scale=0.005)
    for k, v in {**values, **extra}.items():
        monkeypatch.setenv(k, v)
    return {"sandbox": sb, "env": values, "config": Path(values["COMMS_CONFIG"])}
