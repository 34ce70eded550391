"""The outbox state machine and pacing on a real database, with an in-process transport
(pure logic: what the dispatcher does with each outcome). Graph itself is exercised against
the sandbox in test_e2e, test_reliability and test_exactly_once."""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import factories
import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from comms import outbox, pacing
from comms.config import Settings
from comms.delivery.base import Outcome, OutgoingEmail, SendResult
from comms.errors import CommsError
from comms.services import outbox_admin
from comms.store import bodies
from comms.store.db import Database
from comms.store.models import Message, SendSlot, Suppression, new_message_row

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


class ScriptedTransport:
    """Answers each send with the next scripted result (SENT once the script runs out) and
    keeps a 'Sent Items' of what it accepted, like Graph would."""

    def __init__(self, *results: SendResult, reconcile: bool = True) -> None:
        self.script: deque[SendResult] = deque(results)
        self.calls: list[OutgoingEmail] = []
        self.sent_items: set[str] = set()
        self.reconcile = reconcile
        self.lock = threading.Lock()

    def send(self, email: OutgoingEmail) -> SendResult:
        with self.lock:
            self.calls.append(email)
            result = self.script.popleft() if self.script else SendResult(Outcome.SENT)
            if result.outcome is Outcome.SENT or result.details.get("accepted") == "yes":
                self.sent_items.add(email.send_id)
            return result

    def find_sent(self, sender: str, send_id: str) -> bool | None:
        if not self.reconcile:
            return None
        return send_id in self.sent_items


def settings_for(**delivery: float) -> Settings:
    return Settings.model_validate({
        "senders": [{"address": "a@fabrikam.example"}, {"address": "b@fabrikam.example"}],
        "graph": {"reconcile_grace_seconds": 0, "timeout_seconds": 0.2},
        "delivery": {"lease_seconds": 5, "time_scale": 0.001, **delivery},
    })


def add_customer(db: Database, key: str = "C1", **flags: bool) -> int:
    return factories.customer(db, key, **flags)


def queue(db: Database, customer_id: int, message: str = "partner_invitation", seq: int = 0,
          to: str = "it@contoso.example", stage: str = "invited") -> int:
    return factories.queued(db, customer_id, message, seq, to=to, stage=stage)


def status_of(db: Database, mid: int) -> Message:
    with db.session() as s:
        m = s.get(Message, mid)
        assert m is not None
        return m


def dispatch(db: Database, transport: ScriptedTransport, settings: Settings | None = None,
             seconds: float = 5.0) -> outbox.DispatchReport:
    d = outbox.Dispatcher(db, settings or settings_for(), transport, clock=outbox.Clock(T0),
                          worker="w1")
    return d.run(deadline=time.monotonic() + seconds)


def test_queue_key_is_unique_planning_twice_queues_once(db: Database) -> None:
    cid = add_customer(db)
    queue(db, cid)
    row = {"send_id": "other", "customer_id": cid, "message": "partner_invitation",
           "sequence": 0, "stage": "invited", "to_json": "[]", "subject": "s",
           "body": bodies.encode("h", "t"), "send_after": T0, "created_at": T0, "updated_at": T0}
    with db.session() as s:
        assert outbox.insert_messages(s, [row]) == []
        assert len(s.exec(select(Message)).all()) == 1


def _planned(cid: int, seq: int, **fields: Any) -> dict[str, Any]:
    return new_message_row(
        customer_id=cid, message="partner_invitation_reminder", sequence=seq, stage="invited",
        to_json=outbox.addresses_json([("it@contoso.example", "IT")]), subject=f"Reminder {seq}",
        html=f"<p>{seq} Müller</p>", text=f"{seq} Müller", now=T0 + timedelta(seconds=seq),
        send_before=T0 + timedelta(hours=7), locale="de", reply_to="r@fabrikam.example",
        **fields)


def test_a_scheduled_runs_queueing_stores_what_insert_messages_stores(db: Database) -> None:
    """``queue_messages`` (a scheduled run: SQLite binds the values itself) and
    ``insert_messages`` store the same values, and count what they queued the same way: new
    rows and rows the run had withdrawn itself count, rows already there do not."""
    a, b = add_customer(db, "A"), add_customer(db, "B")
    with db.session() as s:
        assert len(outbox.insert_messages(s, [_planned(a, n) for n in range(3)])) == 3
        assert outbox.queue_messages(s, [_planned(b, n) for n in range(3)]) == 3
        # Withdrawn by the run (queued again) and by an operator (stays withdrawn).
        s.execute(sa.update(Message).where(col(Message.sequence) == 1)
                  .values(status="withdrawn", last_error="paused"))
        s.execute(sa.update(Message).where(col(Message.sequence) == 2)
                  .values(status="withdrawn", error_code=outbox.BY_OPERATOR))
    with db.session() as s:
        assert len(outbox.insert_messages(s, [_planned(a, n) for n in range(4)])) == 2
        assert outbox.queue_messages(s, [_planned(b, n) for n in range(4)]) == 2
        assert outbox.queue_messages(s, [_planned(b, n) for n in range(4)]) == 0
    columns = [c for c in Message.__table__.columns  # type: ignore[attr-defined]
               if c.name not in ("id", "customer_id", "send_id")]
    with db.engine.connect() as conn:  # the stored values, not as the ORM reads them back
        raw = conn.execute(sa.select(Message.__table__.c.customer_id,  # type: ignore[attr-defined]
                                     *(c if c.name == "body" else sa.cast(c, sa.Text)
                                       for c in columns))
                           .order_by(Message.__table__.c.customer_id,  # type: ignore[attr-defined]
                                     Message.__table__.c.sequence)).all()  # type: ignore[attr-defined]
    by_customer = {cid: [tuple(r[1:]) for r in raw if r[0] == cid] for cid in (a, b)}
    assert len(by_customer[a]) == 4
    named = {cid: [[(c.name, v) for c, v in zip(columns, row, strict=True)] for row in rows]
             for cid, rows in by_customer.items()}
    assert ("send_after", "2026-12-01 10:00:00.000000") in named[a][0] or db.url.startswith(
        "postgresql")  # SQLite: SQLAlchemy's own text form of a time
    assert named[a] == named[b]


def test_sent_is_recorded_with_request_id_and_send_id_header(db: Database) -> None:
    cid = add_customer(db)
    mid = queue(db, cid)
    t = ScriptedTransport(SendResult(Outcome.SENT, status=202, request_id="req-1"))
    report = dispatch(db, t)
    assert report.sent == 1
    m = status_of(db, mid)
    assert (m.status, m.request_id, m.attempts) == ("sent", "req-1", 1)
    assert m.sender in ("a@fabrikam.example", "b@fabrikam.example")
    email = t.calls[0]
    assert email.send_id == m.send_id
    assert ("x-comms-send-id", m.send_id) in email.headers


def test_throttled_goes_back_to_queue_and_is_sent_later_never_failed(db: Database) -> None:
    cid = add_customer(db)
    mid = queue(db, cid)
    t = ScriptedTransport(
        SendResult(Outcome.THROTTLED, status=429, retry_after=0.2, error_code="TooManyRequests"),
        SendResult(Outcome.THROTTLED, status=429, retry_after=0.1, error_code="TooManyRequests"),
    )
    report = dispatch(db, t)
    assert (report.throttled, report.sent, report.failed) == (2, 1, 0)
    assert status_of(db, mid).status == "sent"
    assert len(t.calls) == 3


def test_failed_records_reason_and_is_not_retried(db: Database) -> None:
    cid = add_customer(db)
    mid = queue(db, cid)
    t = ScriptedTransport(SendResult(Outcome.FAILED, status=404, error_code="ErrorInvalidUser",
                                     message="mailbox does not exist"))
    report = dispatch(db, t)
    assert report.failed == 1 and report.failures[0][1] == "C1"
    m = status_of(db, mid)
    assert (m.status, m.error_code, m.last_error) == (
        "failed", "ErrorInvalidUser", "mailbox does not exist")
    assert len(t.calls) == 1


def test_unknown_found_in_sent_items_is_not_sent_again(db: Database) -> None:
    cid = add_customer(db)
    mid = queue(db, cid)
    # Accepted by "Graph", but the connection dropped before the answer.
    t = ScriptedTransport(SendResult(Outcome.UNKNOWN, message="connection reset",
                                     details={"accepted": "yes"}))
    report = dispatch(db, t)
    assert (report.unknown, report.confirmed, report.sent) == (1, 1, 0)
    assert status_of(db, mid).status == "sent"
    assert len(t.calls) == 1  # never resent


def test_unknown_not_found_is_sent_again_with_the_same_send_id(db: Database) -> None:
    cid = add_customer(db)
    mid = queue(db, cid)
    t = ScriptedTransport(SendResult(Outcome.UNKNOWN, message="read timeout"))
    report = dispatch(db, t)
    assert (report.unknown, report.requeued, report.sent) == (1, 1, 1)
    assert status_of(db, mid).status == "sent"
    assert [c.send_id for c in t.calls] == [status_of(db, mid).send_id] * 2


def test_unknown_without_mail_read_waits_for_an_operator(db: Database) -> None:
    cid = add_customer(db)
    mid = queue(db, cid)
    t = ScriptedTransport(SendResult(Outcome.UNKNOWN, message="read timeout"), reconcile=False)
    report = dispatch(db, t, seconds=2)
    assert (report.unknown, report.held, report.sent) == (1, 1, 0)
    m = status_of(db, mid)
    assert m.status == "unknown"
    assert f"comms outbox resolve {mid} --sent" in m.last_error
    assert len(t.calls) == 1
    outbox.resolve(db, mid, sent=False, by="op", now=T0)
    report = dispatch(db, t, seconds=2)
    assert report.sent == 1 and status_of(db, mid).status == "sent"
    with pytest.raises(CommsError, match="is sent, not unknown"):
        outbox.resolve(db, mid, sent=True, by="op", now=T0)


def test_a_resend_by_hand_waits_while_sent_items_can_still_decide(db: Database,
                                                                 cli: Any) -> None:
    # Graph accepted the message but the answer was lost. With Mail.Read, the lookup after the
    # grace period finds it; an operator's `resolve --resend` before that (or during the
    # lookup) sent the customer a second copy.
    cid = add_customer(db)
    mid = queue(db, cid)
    t = ScriptedTransport(SendResult(Outcome.UNKNOWN, message="read timeout",
                                     details={"accepted": "yes"}))
    patient = Settings.model_validate({
        "senders": [{"address": "a@fabrikam.example"}],
        "graph": {"reconcile_grace_seconds": 600, "timeout_seconds": 0.2},
        "delivery": {"lease_seconds": 5, "time_scale": 0.001}})
    dispatch(db, t, patient, seconds=1)
    assert (status_of(db, mid).status, status_of(db, mid).error_code) == ("unknown", "")
    refused = cli("outbox", "resolve", str(mid), "--resend")
    assert refused.exit_code != 0
    assert (f"Message {mid} may have been accepted: comms looks its send id up in Sent Items "
            "once the grace period has passed") in " ".join(refused.output.split())
    assert status_of(db, mid).status == "unknown"
    # A reconcile pass holds the row while it looks: no decision meanwhile, --sent included.
    with db.session() as s:
        s.execute(sa.update(Message).where(col(Message.id) == mid).values(
            claimed_by="reconcile-pass", lease_until=datetime.now(UTC) + timedelta(minutes=1)))
    with pytest.raises(CommsError, match="is being looked up in Sent Items right now"):
        outbox.resolve(db, mid, sent=True, by="op", now=T0, reconciling=True)
    # The lookup decides: found, sent once.
    with db.session() as s:
        s.execute(sa.update(Message).where(col(Message.id) == mid).values(
            claimed_by="", lease_until=None, unknown_since=T0 - timedelta(hours=1)))
    report = dispatch(db, t, patient, seconds=2)
    assert (report.confirmed, status_of(db, mid).status, len(t.calls)) == (1, "sent", 1)
    # Held because Sent Items could not be read: the operator decides, --resend allowed.
    other = queue(db, cid, seq=1)
    with db.session() as s:
        s.execute(sa.update(Message).where(col(Message.id) == other).values(
            status="unknown", error_code=outbox.HELD, attempts=1, unknown_since=T0))
    assert outbox.resolve(db, other, sent=False, by="op", now=T0,
                          reconciling=True).status == "queued"


def test_expired_lease_of_a_dead_worker_becomes_unknown_then_reconciled(db: Database) -> None:
    cid = add_customer(db)
    mid = queue(db, cid)
    with db.session() as s:
        m = s.get(Message, mid)
        assert m is not None
        m.status, m.claimed_by, m.sender = "sending", "dead-worker", "a@fabrikam.example"
        m.lease_until = datetime.now(UTC) - timedelta(seconds=1)
        s.add(m)
    t = ScriptedTransport()
    t.sent_items.add(status_of(db, mid).send_id)  # the dead worker's request did get through
    report = dispatch(db, t)
    assert report.confirmed == 1 and report.sent == 0
    assert status_of(db, mid).status == "sent"
    assert t.calls == []


def test_live_lease_is_left_alone(db: Database) -> None:
    cid = add_customer(db)
    mid = queue(db, cid)
    with db.session() as s:
        m = s.get(Message, mid)
        assert m is not None
        m.status, m.claimed_by = "sending", "other-worker"
        m.lease_until = datetime.now(UTC) + timedelta(minutes=5)
        s.add(m)
    t = ScriptedTransport()
    dispatch(db, t, seconds=1)
    assert status_of(db, mid).status == "sending" and t.calls == []


def test_opted_out_customer_and_suppressed_recipients_are_withdrawn_at_claim(db: Database) -> None:
    gone = add_customer(db, "OUT", opted_out=True)
    quiet = add_customer(db, "SUP")
    m1 = queue(db, gone)
    m2 = queue(db, quiet, to="blocked@contoso.example")
    with db.session() as s:
        s.add(Suppression(email="blocked@contoso.example", reason="asked", at=T0, by="t"))
    t = ScriptedTransport()
    report = dispatch(db, t)
    assert report.withdrawn == 2 and t.calls == []
    assert status_of(db, m1).last_error == "customer opted out"
    assert status_of(db, m2).last_error == "every recipient is on the suppression list"


def test_stage_change_withdraws_only_queued_messages_of_other_stages(db: Database) -> None:
    cid = add_customer(db)
    old = queue(db, cid, "partner_invitation_reminder", 1, stage="invited")
    new = queue(db, cid, "lose_access_warning", 0, stage="approved")
    with db.session() as s:
        assert outbox.withdraw_stale(s, cid, "approved", T0) == 1
    assert status_of(db, old).status == "withdrawn"
    assert status_of(db, new).status == "queued"


def test_pacing_rate_concurrency_daily_cap_and_block(db: Database) -> None:
    lim = pacing.Limits("a@fabrikam.example", messages_per_minute=3, max_concurrent=2,
                        recipients_per_day=5, time_scale=1.0)
    lease = timedelta(minutes=2)
    now = T0
    with db.session() as s:
        first = pacing.try_acquire(s, lim, now=now, lease=lease)
        assert isinstance(first, pacing.Slot)
        # Too soon after the last start: wait one interval (60 s / 3, with slack).
        wait = pacing.try_acquire(s, lim, now=now + timedelta(seconds=1), lease=lease)
        assert isinstance(wait, pacing.Wait) and wait.reason == "rate limit"
        assert wait.until == now + lim.interval
        second = pacing.try_acquire(s, lim, now=now + lim.interval, lease=lease)
        assert isinstance(second, pacing.Slot)
        # Two in flight: the concurrency limit holds until one is released.
        busy = pacing.try_acquire(s, lim, now=now + 2 * lim.interval, lease=lease)
        assert isinstance(busy, pacing.Wait) and busy.reason == "concurrency limit"
        pacing.release(s, first, now=now + 2 * lim.interval)
        third = pacing.try_acquire(s, lim, now=now + 2 * lim.interval, lease=lease)
        assert isinstance(third, pacing.Slot)
        pacing.release(s, second, now=now + 3 * lim.interval)
        pacing.release(s, third, now=now + 3 * lim.interval)
        later = now + 3 * lim.interval
        # Daily cap: 3 recipients used, 3 more would exceed 5.
        capped = pacing.try_acquire(s, lim, now=later, lease=lease, recipients=3)
        assert isinstance(capped, pacing.Wait) and capped.reason == "daily recipient limit"
        ok = pacing.try_acquire(s, lim, now=later, lease=lease, recipients=2)
        assert isinstance(ok, pacing.Slot)
        pacing.release(s, ok, now=later)
        pacing.block(s, lim.mailbox, later + timedelta(minutes=10))
        blocked = pacing.try_acquire(s, lim, now=later + timedelta(minutes=5), lease=lease)
        assert isinstance(blocked, pacing.Wait) and blocked.reason == "throttled by Graph"
        assert len(s.exec(select(SendSlot)).all()) == 4


def test_limit_sends_at_most_n(db: Database) -> None:
    cid = add_customer(db)
    for seq in range(5):
        queue(db, cid, "cancel_reminder", seq + 1)
    t = ScriptedTransport()
    d = outbox.Dispatcher(db, settings_for(), t, clock=outbox.Clock(T0), worker="w1")
    report = d.run(deadline=time.monotonic() + 5, limit=2)
    assert report.sent == 2 and len(t.calls) == 2
    assert d.pending(None, None)["queued"] == 3


def test_a_message_that_waited_past_its_send_window_moves_to_the_next_one(db: Database) -> None:
    from comms.campaign import load_campaign

    window = load_campaign().window
    cid = add_customer(db)  # Europe/London
    mid = queue(db, cid)
    friday_evening = datetime(2026, 12, 4, 18, 30, tzinfo=UTC)
    with db.session() as s:
        m = s.get(Message, mid)
        assert m is not None
        m.send_after = datetime(2026, 12, 4, 16, 0, tzinfo=UTC)
        m.send_before = datetime(2026, 12, 4, 17, 0, tzinfo=UTC)  # closed at 17:00 London
        s.add(m)
    t = ScriptedTransport()
    d = outbox.Dispatcher(db, settings_for(), t, clock=outbox.Clock(friday_evening),
                          worker="w1", window=window)
    report = outbox.DispatchReport()
    give_up = time.monotonic() + 20  # short runs until it is claimed (a busy machine; bounded)
    while report.deferred == 0 and time.monotonic() < give_up:
        d.run(deadline=time.monotonic() + 1, report=report)
    assert (report.deferred, report.sent, t.calls) == (1, 0, [])
    m = status_of(db, mid)
    assert m.status == "queued"
    assert m.send_after == datetime(2026, 12, 7, 9, 0, tzinfo=UTC)  # Monday 09:00 London
    assert m.send_before == datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
    # Monday morning, inside the window: it goes out.
    monday = outbox.Dispatcher(db, settings_for(), t, clock=outbox.Clock(
        datetime(2026, 12, 7, 9, 30, tzinfo=UTC)), worker="w1", window=window)
    report = outbox.DispatchReport()
    give_up = time.monotonic() + 20
    while status_of(db, mid).status == "queued" and time.monotonic() < give_up:
        monday.run(deadline=time.monotonic() + 2, report=report)
    assert report.sent == 1 and status_of(db, mid).status == "sent"


def test_a_withdrawal_and_a_claim_of_the_same_row_never_both_win(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL: `comms outbox withdraw` read the row without a lock; a run claiming it
    # between that read and the write had it sent while the operator read "withdrawn".
    cid = add_customer(db)
    mid = queue(db, cid)
    settings = settings_for()
    limits = pacing.Limits.of(settings.senders[0], 1.0, None)
    claims: list[object] = []
    started: list[bool] = []
    if not db.is_sqlite:  # SQLite: one writer at a time, the claim cannot come in between
        from sqlmodel import Session

        read = Session.get

        def read_then_claim(self: Session, *args: Any, **kwargs: Any) -> Any:
            row = read(self, *args, **kwargs)
            if not started:  # once (the claim reads rows with Session.get too)
                started.append(True)
                claims.append(outbox.claim(db, limits, settings=settings, clock=outbox.Clock(),
                                           worker="w1", lease=timedelta(seconds=60)))
            return row

        monkeypatch.setattr(Session, "get", read_then_claim)
    told = outbox_admin.withdraw(db, mid, now=T0, by="op")
    monkeypatch.undo()
    assert told.status == "withdrawn"
    assert claims in ([], [None])  # the locked row is skipped by the claim
    m = status_of(db, mid)
    assert (m.status, m.attempts, m.error_code) == ("withdrawn", 0, outbox.BY_OPERATOR)

