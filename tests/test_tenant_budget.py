"""The tenant-wide external-recipient budget (issue 18, Exchange's TERRL): one rolling-day
budget shared by every sender mailbox, worker and host, counted per external recipient;
internal recipients (accepted domains) do not count; a message over it waits, never fails."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine_helpers import T0, ledger, popen_comms, run_comms, sandbox_env, seed, statuses

from comms import pacing
from comms.config import Settings
from comms.sandbox import Sandbox
from comms.store.db import Database

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def test_budget_formula_share_and_accepted_domains() -> None:
    s = Settings.model_validate({
        "senders": [{"address": "t1@fabrikam.example"}],
        "tenant": {"licences": 50, "accepted_domains": ["Fabrikam.co.uk"]},
    })
    assert s.tenant.cap == 17_231  # 500 x 50^0.7 + 9,500: "about 17,000" for 50 licences
    assert s.tenant.budget == 8_615  # half of it by default
    assert s.accepted_domains == {"fabrikam.co.uk", "fabrikam.example"}
    explicit = Settings.model_validate({"tenant": {"external_recipients_per_day": 1000,
                                                   "share": 0.3}})
    assert (explicit.tenant.cap, explicit.tenant.budget) == (1000, 300)
    budget = pacing.TenantBudget.of(s)
    assert budget.external(["a@contoso.example", "am@FABRIKAM.example",
                            "b@fabrikam.co.uk", "c@sub.fabrikam.example"]) == 2


def test_budget_is_shared_by_every_mailbox_and_frees_with_the_rolling_day(
    db: Database,
) -> None:
    tenant = pacing.TenantBudget(5, frozenset({"fabrikam.example"}), time_scale=0.001)
    boxes = [pacing.Limits(f"t{i}@fabrikam.example", 30, 4, 10_000, 0.001, tenant)
             for i in range(3)]
    lease = timedelta(seconds=30)
    granted = 0
    now = NOW
    with db.session(immediate=True) as s:
        pacing.ensure_mailboxes(s, [b.mailbox for b in boxes])
    for i in range(5):  # one external recipient each, spread over the three mailboxes
        now += timedelta(seconds=1)
        with db.session(immediate=True) as s:
            got = pacing.try_acquire(s, boxes[i % 3], now=now, lease=lease, recipients=2,
                                     external=1)
        assert isinstance(got, pacing.Slot)
        granted += 1
    with db.session(immediate=True) as s:
        over = pacing.try_acquire(s, boxes[2], now=now + timedelta(seconds=1), lease=lease,
                                  recipients=1, external=1)
        internal = pacing.try_acquire(s, boxes[2], now=now + timedelta(seconds=2),
                                      lease=lease, recipients=1, external=0)
        used, frees = pacing.tenant_usage(s, tenant, now=now)
    assert isinstance(over, pacing.Wait) and over.reason == "tenant external-recipient budget"
    assert over.until == NOW + timedelta(seconds=1) + tenant.day  # the oldest ages out
    assert isinstance(internal, pacing.Slot)  # internal recipients never count
    assert (used, frees) == (5, NOW + timedelta(seconds=1) + tenant.day)
    with db.session(immediate=True) as s:
        later = pacing.try_acquire(s, boxes[0], now=NOW + timedelta(seconds=2) + tenant.day,
                                   lease=lease, recipients=1, external=1)
    assert isinstance(later, pacing.Slot) and granted == 5


SENDERS = [f"transition{i}@fabrikam.example" for i in range(1, 4)]
SCALE = 0.0002  # a Graph "day" of 17.3 s


def test_three_mailboxes_two_workers_send_exactly_the_budget_then_the_rest_later(
    tmp_path: Path, db: Database, database_url: str, sandbox_factory: Any,
) -> None:
    """Exchange's cap here is 20 a day; comms may use half: exactly 10 external recipients go
    out in the scaled day, the 4 customers at accepted domains go out too, 2 wait (nothing
    fails, the sandbox never blocks the tenant), and they go out once the day has rolled."""
    sb: Sandbox = sandbox_factory(time_scale=SCALE, tenant_external_per_day=20)
    n = 16
    seed(db, tmp_path, n)  # contacts admin{i}@customer{i}.example
    env = sandbox_env(sb, tmp_path, database_url, senders=SENDERS, time_scale=SCALE,
                      grace=0.3, timeout=2.0, lease=5.0)
    internal = [f"customer{i}.example" for i in range(4)]
    Path(env["COMMS_CONFIG"]).write_text(
        Path(env["COMMS_CONFIG"]).read_text(encoding="utf-8")
        + "[tenant]\nexternal_recipients_per_day = 20\nshare = 0.5\n"
        + f"accepted_domains = {internal!r}\n".replace("'", '"'), encoding="utf-8")
    queued = run_comms(env, "run", "--now", T0.isoformat(), "--limit", "0")
    assert queued.returncode == 0, queued.stdout + queued.stderr
    first_round = time.monotonic()
    workers = [popen_comms(env, "worker", "--once", "--max-minutes", "0.15",
                           "--now", T0.isoformat()) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, out + err
    assert statuses(db) == {"sent": 14, "queued": 2}
    sent_to = [a for rec in sb.sent() for a in rec["to"] + rec["cc"]]
    external = [a for a in sent_to if a.rsplit("@", 1)[1] not in internal]
    assert len(external) == 10 and len(sent_to) == 14
    assert sb.stats()["terrl_blocked"] == 0
    assert len({rec["sender"] for rec in sb.sent()}) >= 2  # the budget spans mailboxes
    # When the rolling day has moved past the first sends, the rest goes out.
    time.sleep(max(0.0, first_round + 86400 * SCALE + 0.5 - time.monotonic()))
    again = run_comms(env, "worker", "--once", "--max-minutes", "0.1", "--now", T0.isoformat())
    assert again.returncode == 0, again.stdout + again.stderr
    assert statuses(db) == {"sent": 16}
    assert {r["status"] for r in ledger(db)} == {"sent"} and sb.stats()["terrl_blocked"] == 0
