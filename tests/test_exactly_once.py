"""Exactly once under many workers (issue 19), each cause found by the load test reproduced
deterministically on a real database (SQLite, and PostgreSQL in the second pass):

1. a reconcile verdict applies only to the episode it looked up (no stale requeue);
2. an unknown message is looked up in every mailbox that may have accepted it;
3. Sent Items lookups take a concurrency slot, and one pass at a time looks a row up;
4. a request we gave up on keeps its slot while Exchange may still be working on it;
5. lease expiry never overwrites an outcome a worker recorded after the expired rows were read.

The cross-mailbox case runs against the real sandbox over HTTPS with the real msal + requests.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from engine_helpers import sandbox_env, settings_from
from sqlmodel import select
from test_outbox import T0, ScriptedTransport, add_customer, queue, settings_for, status_of

from comms import outbox, pacing
from comms.delivery.base import Outcome, SendResult
from comms.delivery.factory import make_transport
from comms.sandbox import Sandbox
from comms.store.db import Database
from comms.store.models import Message, SendSlot


def run_until_attempted(d: outbox.Dispatcher, db: Database, mid: int, step: float = 1.0) -> None:
    """Short dispatcher runs until message ``mid`` has been attempted (no longer queued):
    one run may end before its first claim on a busy machine. Bounded at 20 s."""
    give_up = time.monotonic() + 20
    while status_of(db, mid).status == "queued" and time.monotonic() < give_up:
        d.run(deadline=time.monotonic() + step, only_ids=frozenset({mid}))

A, B = "a@fabrikam.example", "b@fabrikam.example"


def make_unknown(db: Database, mid: int, *, mailbox: str, attempts: int = 1) -> None:
    """The row after an ambiguous attempt from ``mailbox`` (answer lost), past the grace."""
    with db.session() as s:
        m = s.get(Message, mid)
        assert m is not None
        m.status, m.sender, m.attempts = "unknown", mailbox, attempts
        m.unknown_since = outbox.Clock.real() - timedelta(seconds=10)
        m.ambiguous_from = " ".join([*m.ambiguous_from.split(), mailbox])
        s.add(m)


class HeldLookup:
    """A reconciler whose lookup waits until released, then answers ``answer``."""

    def __init__(self, answer: bool | None) -> None:
        self.answer = answer
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[tuple[str, str]] = []

    def find_sent(self, sender: str, send_id: str) -> bool | None:
        self.calls.append((sender, send_id))
        self.entered.set()
        assert self.release.wait(10)
        return self.answer


class Answer:
    def __init__(self, answer: bool | None) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str]] = []

    def find_sent(self, sender: str, send_id: str) -> bool | None:
        self.calls.append((sender, send_id))
        return self.answer


def paced(settings: Any, lease: float) -> outbox.ReconcileLimits:
    limits = {s.address: pacing.Limits.of(s, settings.delivery.time_scale)
              for s in settings.senders}
    with_lease = outbox.ReconcileLimits(limits, timedelta(seconds=lease))
    return with_lease


def test_a_stale_not_found_never_requeues_a_later_episode(db: Database) -> None:
    """The issue's repro: pass B's 'not found' is held back; meanwhile pass A requeues, attempt
    2 is accepted with its answer lost (unknown again, attempts=2); B's verdict comes late and
    must not requeue the new episode, or the next claim would send a duplicate."""
    settings = settings_for()
    cid = add_customer(db)
    mid = queue(db, cid)
    make_unknown(db, mid, mailbox=A)
    clock = outbox.Clock(T0)
    with db.session(immediate=True) as s:
        pacing.ensure_mailboxes(s, [A, B])
    b_lookup = HeldLookup(False)
    b_report = outbox.DispatchReport()
    # A lookup lease shorter than B's stalled read: pass A may take the row over, as happens
    # when a read hangs past the lease.
    b = threading.Thread(target=outbox.reconcile, args=(db, b_lookup), kwargs={
        "clock": clock, "grace": timedelta(0), "report": b_report, "worker": "B",
        "paced": paced(settings, 0.3)})
    b.start()
    assert b_lookup.entered.wait(10)
    time.sleep(0.4)  # B's lease on the row runs out while its read hangs
    a_report = outbox.DispatchReport()
    outbox.reconcile(db, Answer(False), clock=clock, grace=timedelta(0), report=a_report,
                     worker="A", paced=paced(settings, 0.3))
    assert a_report.requeued == 1 and status_of(db, mid).status == "queued"
    # Attempt 2: accepted by "Graph", answer lost.
    transport = ScriptedTransport(SendResult(Outcome.UNKNOWN, message="connection reset",
                                             details={"accepted": "yes"}))
    d = outbox.Dispatcher(db, settings, transport, clock=clock, worker="w2")
    run_until_attempted(d, db, mid, step=0.5)
    second = status_of(db, mid)
    assert (second.status, second.attempts) == ("unknown", 2)
    b_lookup.release.set()
    b.join(10)
    after = status_of(db, mid)
    assert (after.status, after.attempts) == ("unknown", 2), "a stale verdict was applied"
    assert b_report.requeued == 0
    # The new episode is reconciled on its own: found in Sent Items, never sent again.
    outbox.reconcile(db, transport, clock=clock, grace=timedelta(0),
                     report=outbox.DispatchReport(), worker="C", paced=paced(settings, 5))
    assert status_of(db, mid).status == "sent"
    assert len(transport.calls) == 1


def test_one_pass_at_a_time_looks_a_row_up(db: Database) -> None:
    settings = settings_for()
    cid = add_customer(db)
    mid = queue(db, cid)
    make_unknown(db, mid, mailbox=A)
    clock = outbox.Clock(T0)
    held = HeldLookup(True)
    first = threading.Thread(target=outbox.reconcile, args=(db, held), kwargs={
        "clock": clock, "grace": timedelta(0), "report": outbox.DispatchReport(),
        "worker": "one", "paced": paced(settings, 30)})
    first.start()
    assert held.entered.wait(10)
    other = Answer(False)
    outbox.reconcile(db, other, clock=clock, grace=timedelta(0),
                     report=outbox.DispatchReport(), worker="two", paced=paced(settings, 30))
    assert other.calls == [], "a row under lookup was looked up again by another pass"
    held.release.set()
    first.join(10)
    assert status_of(db, mid).status == "sent" and len(held.calls) == 1


def test_every_mailbox_an_attempt_went_through_is_looked_up(db: Database) -> None:
    settings = settings_for()
    cid = add_customer(db)
    mid = queue(db, cid)
    make_unknown(db, mid, mailbox=A)
    make_unknown(db, mid, mailbox=B, attempts=2)

    class OnlyInA(Answer):
        def find_sent(self, sender: str, send_id: str) -> bool | None:
            super().find_sent(sender, send_id)
            return sender == A

    lookups = OnlyInA(None)
    report = outbox.DispatchReport()
    outbox.reconcile(db, lookups, clock=outbox.Clock(T0), grace=timedelta(0), report=report,
                     worker="r", paced=paced(settings, 5))
    assert report.confirmed == 1 and status_of(db, mid).status == "sent"
    assert {box for box, _ in lookups.calls} == {A}

    # Not in either: requeued only after both said so.
    mid2 = queue(db, cid, seq=1)
    make_unknown(db, mid2, mailbox=A)
    make_unknown(db, mid2, mailbox=B, attempts=2)
    nowhere = Answer(False)
    outbox.reconcile(db, nowhere, clock=outbox.Clock(T0), grace=timedelta(0),
                     report=outbox.DispatchReport(), worker="r", paced=paced(settings, 5))
    assert sorted(box for box, _ in nowhere.calls) == [A, B]
    assert status_of(db, mid2).status == "queued"

    # One mailbox unreadable (no Mail.Read) and no copy found: an operator decides.
    mid3 = queue(db, cid, seq=2)
    make_unknown(db, mid3, mailbox=A)
    make_unknown(db, mid3, mailbox=B, attempts=2)

    class NoReadOnB(Answer):
        def find_sent(self, sender: str, send_id: str) -> bool | None:
            super().find_sent(sender, send_id)
            return None if sender == B else False

    outbox.reconcile(db, NoReadOnB(False), clock=outbox.Clock(T0), grace=timedelta(0),
                     report=outbox.DispatchReport(), worker="r", paced=paced(settings, 5))
    held = status_of(db, mid3)
    assert (held.status, held.error_code) == ("unknown", outbox.HELD)


def test_lookups_take_a_concurrency_slot(db: Database) -> None:
    settings = settings_for()
    limits = paced(settings, 5)
    one = outbox.ReconcileLimits(
        {k: pacing.Limits(k, 30, 1, 10_000, 0.001) for k in limits.limits}, limits.lease)
    cid = add_customer(db)
    mid = queue(db, cid)
    make_unknown(db, mid, mailbox=A)
    real = outbox.Clock.real()
    with db.session(immediate=True) as s:  # a send in flight on A: A's only slot is taken
        busy = pacing.try_acquire(s, one.limits[A], now=real, lease=timedelta(seconds=30))
    assert isinstance(busy, pacing.Slot)
    lookups = Answer(True)
    outbox.reconcile(db, lookups, clock=outbox.Clock(T0), grace=timedelta(0),
                     report=outbox.DispatchReport(), worker="r", paced=one)
    assert lookups.calls == [] and status_of(db, mid).status == "unknown"
    with db.session(immediate=True) as s:
        pacing.release(s, busy, now=outbox.Clock.real())
    outbox.reconcile(db, lookups, clock=outbox.Clock(T0), grace=timedelta(0),
                     report=outbox.DispatchReport(), worker="r", paced=one)
    assert len(lookups.calls) == 1 and status_of(db, mid).status == "sent"
    with db.session() as s:
        kinds = sorted(slot.kind for slot in s.exec(select(SendSlot)).all())
    assert kinds == ["lookup", "send"]


def test_a_timed_out_request_keeps_its_slot_until_exchange_is_done(db: Database) -> None:
    settings = settings_for()
    limits = pacing.Limits(A, 30, 1, 10_000, 0.001)
    lease = timedelta(seconds=30)
    real = outbox.Clock.real()
    with db.session(immediate=True) as s:
        pacing.ensure_mailboxes(s, [A])
        slot = pacing.try_acquire(s, limits, now=real, lease=lease)
        assert isinstance(slot, pacing.Slot)
        pacing.release(s, slot, now=real, in_flight_until=real + timedelta(seconds=2))
    with db.session(immediate=True) as s:
        waiting = pacing.try_acquire(s, limits, now=real + timedelta(seconds=1), lease=lease)
        assert isinstance(waiting, pacing.Wait) and waiting.reason == "concurrency limit"
        free = pacing.try_acquire(s, limits, now=real + timedelta(seconds=3), lease=lease)
        assert isinstance(free, pacing.Slot)
    # The dispatcher holds the slot for server_timeout - timeout after a client timeout.
    cid = add_customer(db)
    mid = queue(db, cid)
    hold = settings.model_copy(update={"graph": settings.graph.model_copy(
        update={"server_timeout_seconds": 30.0})})
    timeout = ScriptedTransport(SendResult(Outcome.UNKNOWN, error_code="Timeout",
                                           maybe_in_flight=True))
    d = outbox.Dispatcher(db, hold, timeout, clock=outbox.Clock(T0), worker="w")
    assert d.server_hold == timedelta(seconds=30 - settings.graph.timeout_seconds)
    run_until_attempted(d, db, mid, step=0.3)
    assert len(timeout.calls) == 1
    with db.session() as s:
        assert pacing.in_flight(s, status_of(db, mid).sender or "", outbox.Clock.real()) == 1


def test_attempt_accepted_by_one_mailbox_then_retried_on_another_is_not_sent_twice(
    tmp_path: Path, db: Database, database_url: str, sandbox_factory: Any,
) -> None:
    """Against the sandbox: attempt 1 accepted by mailbox A with the answer lost; the row is
    (wrongly, as a stale pass would) put back and attempt 2 is claimed by B, whose answer is
    lost too (503: not accepted). Reconciliation must find attempt 1 in A's Sent Items."""
    sb: Sandbox = sandbox_factory(time_scale=0.01)
    env = sandbox_env(sb, tmp_path, database_url, senders=[A, B], time_scale=0.01,
                      grace=0.0, timeout=1.0, lease=5.0,
                      server_timeout=1.5)
    settings = settings_from(env)
    transport = make_transport(settings)
    cid = add_customer(db)
    mid = queue(db, cid)
    clock = outbox.Clock(T0)
    only_a = settings.model_copy(update={"senders": [settings.senders[0]]})
    only_b = settings.model_copy(update={"senders": [settings.senders[1]]})
    sb.set_faults(drop_after_accept_rate=1.0)
    run_until_attempted(outbox.Dispatcher(db, only_a, transport, clock=clock, worker="wa"),
                        db, mid)
    first = status_of(db, mid)
    assert (first.status, first.sender) == ("unknown", A) and len(sb.sent()) == 1
    with db.session() as s:  # what a stale verdict did before the episode rule
        m = s.get(Message, mid)
        assert m is not None
        m.status, m.send_after = "queued", T0
        s.add(m)
    sb.set_faults(drop_after_accept_rate=0.0, error_rate=1.0, seed=1)
    run_until_attempted(outbox.Dispatcher(db, only_b, transport, clock=clock, worker="wb"),
                        db, mid)
    second = status_of(db, mid)
    assert (second.status, second.sender, second.attempts) == ("unknown", B, 2)
    sb.set_faults(error_rate=0.0)
    report = outbox.DispatchReport()
    outbox.Dispatcher(db, settings, transport, clock=clock, worker="w").run(
        deadline=time.monotonic() + 10, report=report)
    assert status_of(db, mid).status == "sent"
    assert report.confirmed == 1
    assert [r["send_id"] for r in sb.sent()] == [first.send_id], "sent twice"


def _claimed_past_its_lease(db: Database, worker: str) -> tuple[int, Any, outbox.Clock]:
    """One queued message claimed by ``worker`` with a lease that has already run out."""
    settings = settings_for()
    mid = queue(db, add_customer(db))
    clock = outbox.Clock(T0)
    limits = pacing.Limits.of(settings.senders[0], settings.delivery.time_scale)
    with db.session(immediate=True) as s:
        pacing.ensure_mailboxes(s, [A, B])
    claimed = outbox.claim(db, limits, settings=settings, clock=clock, worker=worker,
                           lease=timedelta(milliseconds=1))
    assert isinstance(claimed, outbox.Claimed)
    time.sleep(0.01)
    return mid, claimed, clock


def test_lease_expiry_never_overwrites_an_outcome_recorded_meanwhile(db: Database) -> None:
    """expire_leases reads the expired `sending` rows without a lock, then updates them. A slow
    worker whose request outlived its lease records `sent` in between: the row must stay sent,
    never become `unknown` (a later pass could resend it). A SQL hook records the outcome just
    before expire_leases' first UPDATE: on PostgreSQL the real ``record`` commits from its own
    connection; on SQLite (whose BEGIN IMMEDIATE rules the race out) the same change is written
    on the expiring connection, which puts the conditional update to the same test."""
    mid, claimed, clock = _claimed_past_its_lease(db, "slow")  # the request is still going
    fired: list[str] = []

    def record_sent_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired or not statement.lstrip().upper().startswith("UPDATE MESSAGES"):
            return
        fired.append(statement)
        if db.is_sqlite:
            cursor.connection.execute(
                "UPDATE messages SET status = 'sent', lease_until = NULL WHERE id = ?", (mid,))
            return
        worker = threading.Thread(target=outbox.record, args=(
            db, claimed, SendResult(Outcome.SENT, status=202)), kwargs={
            "clock": clock, "worker": "slow", "report": outbox.DispatchReport()})
        worker.start()
        worker.join(10)
        assert not worker.is_alive()

    sa.event.listen(db.engine, "before_cursor_execute", record_sent_first)
    try:
        expired = outbox.expire_leases(db, clock=clock)
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", record_sent_first)
    assert fired, "expire_leases updated nothing: the hook never ran"
    row = status_of(db, mid)
    assert (row.status, row.unknown_since, row.ambiguous_from) == ("sent", None, "")
    assert expired == 0


def test_lease_expiry_marks_the_dead_workers_row_unknown_with_its_mailbox(db: Database) -> None:
    mid, _, clock = _claimed_past_its_lease(db, "dead")
    assert outbox.expire_leases(db, clock=clock) == 1
    row = status_of(db, mid)
    assert (row.status, row.lease_until, row.ambiguous_from, row.attempts) == (
        "unknown", None, A, 1)
    assert row.last_error == "lease expired: the worker stopped mid-send"
    assert row.unknown_since is not None
    assert outbox.expire_leases(db, clock=clock) == 0
