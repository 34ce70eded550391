"""What classified inbound messages do to the ledger (``[inbox]`` in campaign.toml, see
``comms.inbox.policy``), written set-based for a whole chunk in the caller's transaction:

- hard bounce: the outbox row ``bounced`` with the status code, the address suppressed (reason
  ``bounce``), the customer flagged, one internal note to the account manager per customer per
  day at most;
- soft bounce: counted once per message it reports on (a server's repeated "still delayed"
  notices for one message count once); the address suppressed after ``soft_bounce_limit``
  messages bounced within ``soft_bounce_window_days``, measured when the reports arrived (not
  when comms read them: a first sync or one after an outage reads weeks at once);
- reply: the customer's reminders held ``hold_reminders_days``, the account manager notified
  (same one-a-day note);
- opt-out reply: the address suppressed with the reply as the reason (also from a contact of
  several customers, whose reply names no customer); one for the company ("stop emailing us")
  also holds the customer's reminders and asks the account manager to decide;
- auto-reply, unmatched: nothing.
"""

from __future__ import annotations

import html
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from comms import outbox
from comms.config import Settings
from comms.inbox.classify import Inbound, Verdict
from comms.inbox.phrases import own_text
from comms.inbox.policy import InboxPolicy
from comms.store import bodies
from comms.store.inbox_models import InboundMessage, InboxCustomerState
from comms.store.models import Customer, Message, Suppression

NOTE_MESSAGE = "inbox_account_manager_note"
BOUNCED = "bounced"  # outbox status of a message an NDR came back for

_Acting = list[tuple[int, Inbound, Verdict]]


@dataclass(frozen=True)
class _Customer:
    id: int
    key: str
    name: str
    stage: str
    account_manager_name: str
    account_manager_email: str


def _note_row(
    settings: Settings, customer: _Customer, subject: str, lines: list[str], now: datetime,
) -> dict[str, Any] | None:
    """The account manager's internal note: one per customer per day (the sequence is the
    day, so the outbox's unique key refuses a second one)."""
    am = customer.account_manager_email.strip()
    if not am:
        return None
    text = "\n".join(lines)
    markup = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    return {
        "send_id": uuid.uuid4().hex, "customer_id": customer.id, "message": NOTE_MESSAGE,
        "sequence": now.date().toordinal(), "stage": customer.stage, "internal": True,
        "status": "queued",
        "to_json": outbox.addresses_json([(am, customer.account_manager_name)]),
        "cc_json": "[]", "reply_to": settings.partner.reply_to, "subject": subject,
        "body": bodies.encode(f"<html><body>{markup}</body></html>", text), "locale": "en",
        "sender": None, "send_after": now, "send_before": None, "attempts": 0,
        "last_error": "", "error_code": "", "lease_until": None, "claimed_by": "",
        "unknown_since": None, "sent_at": None, "request_id": "", "note": "inbox",
        "created_at": now, "updated_at": now,
    }


@dataclass
class _Chunk:
    """What a chunk's effects read up front, and what they will write at the end."""

    settings: Settings
    policy: InboxPolicy
    now: datetime
    customers: dict[int, _Customer]
    suppressed: set[str]  # addresses already in the suppression list
    # Soft bounces per address already recorded: (when received, what it reports on).
    soft: dict[str, list[tuple[datetime, object]]]
    status: dict[int, str]  # outbox status of the messages hard bounces name
    states: dict[int, dict[str, Any]]  # inbox state per customer (flag, reminders held)
    noted: set[int]  # customers whose account manager has today's note
    existing_states: set[int] = field(default_factory=set)
    changed_states: set[int] = field(default_factory=set)
    new_sup: dict[str, dict[str, Any]] = field(default_factory=dict)
    bounced: dict[int, dict[str, Any]] = field(default_factory=dict)
    notes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.existing_states = set(self.states)

    def suppress(self, address: str, reason: str, by: str) -> bool:
        if not address or address in self.suppressed or address in self.new_sup:
            return False
        self.new_sup[address] = {"email": address, "reason": reason, "at": self.now, "by": by}
        return True

    def state(self, cid: int) -> dict[str, Any]:
        self.changed_states.add(cid)
        return self.states.setdefault(cid, {"flagged": False, "flag_reason": "",
                                            "reminders_held_until": None})


def apply_chunk(
    s: Session, settings: Settings, policy: InboxPolicy, items: list[tuple[Inbound, Verdict]],
    now: datetime,
) -> list[list[str]]:
    """The effects of many classified messages, with a few set-based statements (in ``s``,
    the caller's transaction); the result per message is the same as applying them one after
    the other. Returns what was done, per message."""
    effects: list[list[str]] = [[] for _ in items]
    # An opt-out from a contact of several customers, or of another customer than the thread's,
    # names no customer: suppression is per address, so it acts all the same.
    acting = [(i, m, v) for i, (m, v) in enumerate(items)
              if v.kind in ("bounce", "optout", "reply")
              and (v.customer_id is not None or v.kind == "optout")]
    if not acting:
        return effects
    chunk = _load(s, settings, policy, acting, now)
    for i, msg, v in acting:
        customer = chunk.customers.get(v.customer_id or -1)
        done = effects[i]
        if v.kind == "optout" and v.customer_id is None:
            _optout(chunk, msg, v, done)
        elif customer is None:
            continue
        elif v.kind == "bounce" and v.hard:
            _hard_bounce(chunk, msg, v, customer, done)
        elif v.kind == "bounce":
            _soft_bounce(chunk, msg, v, done)
        elif v.kind == "optout":
            _optout(chunk, msg, v, done)
            if speaks_for_the_company(v.keyword, own_text(msg.text, 3),
                                      chunk.policy.optout_commands):
                _company_optout(chunk, msg, customer, done)
        else:
            _reply(chunk, msg, customer, done)
    _write(s, chunk)
    return effects


def _load(s: Session, settings: Settings, policy: InboxPolicy, acting: _Acting,
          now: datetime) -> _Chunk:
    """Read, in one query each, what the chunk's effects depend on."""
    cids = sorted({v.customer_id for _, _, v in acting if v.customer_id is not None})
    customers = {
        row[0]: _Customer(*row) for row in s.execute(
            sa.select(col(Customer.id), col(Customer.key), col(Customer.name),
                      col(Customer.stage), col(Customer.account_manager_name),
                      col(Customer.account_manager_email))
            .where(col(Customer.id).in_(cids)))
    }
    addresses = sorted({v.address for _, _, v in acting if v.address})
    suppressed = set(s.execute(
        sa.select(col(Suppression.email)).where(col(Suppression.email).in_(addresses))
    ).scalars()) if addresses else set()
    bounce_ids = sorted({v.message_id for _, _, v in acting
                         if v.kind == "bounce" and v.hard and v.message_id is not None})
    status = dict(s.execute(
        sa.select(col(Message.id), col(Message.status)).where(col(Message.id).in_(bounce_ids))
    ).all()) if bounce_ids else {}
    states = {r[0]: {"flagged": r[1], "flag_reason": r[2], "reminders_held_until": r[3]}
              for r in s.execute(
                  sa.select(col(InboxCustomerState.customer_id), col(InboxCustomerState.flagged),
                            col(InboxCustomerState.flag_reason),
                            col(InboxCustomerState.reminders_held_until))
                  .where(col(InboxCustomerState.customer_id).in_(cids)))}
    noted = set(s.execute(
        sa.select(col(Message.customer_id)).where(
            col(Message.message) == NOTE_MESSAGE, col(Message.sequence) == now.date().toordinal(),
            col(Message.customer_id).in_(cids))
    ).scalars())
    return _Chunk(settings, policy, now, customers, suppressed,
                  _soft_history(s, policy, acting, now), status, states, noted)


def received(msg: Inbound, now: datetime) -> datetime:
    """When the message arrived (Graph's receivedDateTime), never later than ``now``."""
    return min(msg.received_at or now, now)


def _soft_history(s: Session, policy: InboxPolicy, acting: _Acting,
                  now: datetime) -> dict[str, list[tuple[datetime, object]]]:
    """Soft bounces already recorded for the chunk's addresses that can fall in the window of
    one of its reports: when each arrived and the outbox message it reports on."""
    soft = [(m, v) for _, m, v in acting if v.kind == "bounce" and not v.hard and v.address]
    if not soft:
        return {}
    since = min(received(m, now) for m, _ in soft) - timedelta(
        days=policy.soft_bounce_window_days)
    # Typed as the first column (UTCDateTime): aware UTC datetimes on both databases.
    at = sa.func.coalesce(col(InboundMessage.received_at), col(InboundMessage.processed_at))
    out: dict[str, list[tuple[datetime, object]]] = {}
    for address, when, message_id, row_id in s.execute(
        sa.select(col(InboundMessage.address), at.label("at"), col(InboundMessage.message_id),
                  col(InboundMessage.id))
        .where(col(InboundMessage.kind) == "bounce", col(InboundMessage.hard).is_(False),
               col(InboundMessage.address).in_(sorted({v.address for _, v in soft})),
               at >= since)
    ).all():
        out.setdefault(address, []).append((when, message_id or f"inbound {row_id}"))
    return out


def _hard_bounce(c: _Chunk, msg: Inbound, v: Verdict, customer: _Customer,
                 done: list[str]) -> None:
    by = f"inbox:{msg.mailbox}"
    if v.message_id is not None and c.status.get(v.message_id, "withdrawn") != "withdrawn":
        c.bounced[v.message_id] = {
            "b_id": v.message_id, "b_code": v.status_code,
            "b_error": f"bounced for {v.address or 'a recipient'}: {v.detail}"}
        done.append(f"outbox #{v.message_id} bounced ({v.status_code})")
    if c.suppress(v.address, "bounce", f"{by} {v.status_code}"):
        done.append(f"{v.address} suppressed (bounce)")
    if v.internal:  # a note or proof to the partner's own people: nothing about the customer
        done.append("an internal note bounced: the customer is not flagged")
        return
    st = c.state(customer.id)
    st["flagged"] = True
    st["flag_reason"] = (f"hard bounce {v.status_code} for "
                         f"{v.address or 'a recipient it does not name (see comms inbox show)'}")
    done.append("customer flagged")
    _note_account_manager(
        c, customer, f"[comms] {customer.name} ({customer.key}): an email bounced",
        [f"An email to {customer.name} ({customer.key}) bounced.",
         f"Address: {v.address or 'unknown'}; status {v.status_code} ({v.detail}).",
         "The address is suppressed; please find a working contact and add it "
         "with `comms customers import`." if v.address else
         "Nothing was suppressed: please find out which address fails (the report may name "
         "a forward or alias) and fix it with `comms customers import` or "
         "`comms contacts opt-out`."],
        done)


def _soft_bounce(c: _Chunk, msg: Inbound, v: Verdict, done: list[str]) -> None:
    limit, days = c.policy.soft_bounce_limit, c.policy.soft_bounce_window_days
    at = received(msg, c.now)
    seen = c.soft.setdefault(v.address, [])
    seen.append((at, v.message_id or f"graph {msg.graph_id}"))
    count = _most_in_window(seen, timedelta(days=days), at)
    done.append(f"soft bounce {count} of {limit} for {v.address}")
    if v.address and count >= limit and c.suppress(
        v.address, "bounce", f"inbox:{msg.mailbox} {count} soft bounces in {days:g} days",
    ):
        done.append(f"{v.address} suppressed (bounce, {count} soft bounces)")


def _most_in_window(seen: list[tuple[datetime, object]], window: timedelta,
                    at: datetime) -> int:
    """The most distinct messages reported on within one window of ``window`` that contains
    ``at`` (reports are read in any order: a first sync, several mailboxes)."""
    best = 0
    for start, _ in seen:
        if at - window <= start <= at:
            best = max(best, len({about for when, about in seen
                                  if start <= when <= start + window}))
    return best


def _optout(c: _Chunk, msg: Inbound, v: Verdict, done: list[str]) -> None:
    several = f" {v.unscoped}" if v.unscoped else ""
    reason = f"opt-out reply{several}: {msg.subject} | {own_text(msg.text, 3)}"[:1000]
    if c.suppress(v.address, reason, f"inbox:{msg.mailbox}"):
        done.append(f"{v.address} suppressed (opt-out reply{several})")


# "Stop emailing us", "uns abmelden": a contact asking for the whole company. Only the writer's
# address is suppressed (other contacts may need the cancellation steps): a person decides.
_FOR_THE_COMPANY = re.compile(r"(?<!\w)(us|uns|nous|ons|nos|ci)(?!\w)", re.IGNORECASE)


def speaks_for_the_company(keyword: str, text: str, commands: list[str]) -> bool:
    """Whether an opt-out asks for the company ("us"), not only for the writer: the phrase
    found, or for a command (which is the whole reply: "Bitte uns abmelden") the reply."""
    command = keyword.lower() in {c.lower() for c in commands}
    return bool(_FOR_THE_COMPANY.search(text if command else keyword))


def _company_optout(c: _Chunk, msg: Inbound, customer: _Customer, done: list[str]) -> None:
    """An opt-out for the whole company: the customer's reminders held as for a reply, and the
    account manager asked to decide (the other contacts are still mailed until then)."""
    _hold_reminders(c, customer, done)
    _note_account_manager(
        c, customer, f"[comms] {customer.name} ({customer.key}) asked to stop all emails",
        [f"{msg.from_address} asked to stop emails to the company: {msg.subject}",
         *own_text(msg.text, c.policy.timeline_lines or 3).splitlines(),
         f"{msg.from_address} is suppressed. The other contacts are still mailed; reminders "
         f"are held for {c.policy.hold_reminders_days:g} days. To stop every email to the "
         f"customer: comms customers opt-out {customer.key}"],
        done)


def _hold_reminders(c: _Chunk, customer: _Customer, done: list[str]) -> None:
    # From when comms read it, not when it arrived: the account manager learns of it now and
    # gets the whole hold to answer it.
    until = c.now + timedelta(days=c.policy.hold_reminders_days)
    st = c.state(customer.id)
    if st["reminders_held_until"] is None or st["reminders_held_until"] < until:
        st["reminders_held_until"] = until
    done.append(f"reminders held until {until:%Y-%m-%d %H:%M} UTC")


def _reply(c: _Chunk, msg: Inbound, customer: _Customer, done: list[str]) -> None:
    _hold_reminders(c, customer, done)
    first = own_text(msg.text, c.policy.timeline_lines or 3)
    _note_account_manager(
        c, customer, f"[comms] {customer.name} ({customer.key}) replied",
        [f"{msg.from_address} replied: {msg.subject}", *first.splitlines(),
         f"Reminders are held for {c.policy.hold_reminders_days:g} days."],
        done)


def _note_account_manager(c: _Chunk, customer: _Customer, subject: str, lines: list[str],
                          done: list[str]) -> None:
    """Queue the account manager's note, unless notes are off, the customer has none, or
    today's note is already queued."""
    if not c.policy.notify_account_manager or customer.id in c.noted:
        return
    row = _note_row(c.settings, customer, subject, lines, c.now)
    if row is None:
        return
    c.noted.add(customer.id)
    c.notes.append(row)
    done.append("account manager note queued")


def _write(s: Session, c: _Chunk) -> None:
    """The chunk's writes: a statement per kind, each for every row at once."""
    now = c.now
    messages_t = Message.__table__  # type: ignore[attr-defined]
    if c.bounced:
        s.execute(
            sa.update(messages_t).where(messages_t.c.id == sa.bindparam("b_id"))
            .values(status=BOUNCED, error_code=sa.bindparam("b_code"),
                    last_error=sa.bindparam("b_error"), updated_at=now),
            list(c.bounced.values()),
        )
    if c.new_sup:
        # An address suppressed meanwhile by `comms contacts opt-out` (committed after this
        # chunk read the list, on PostgreSQL) stays as it was: its conflict failed the chunk,
        # and the message was then taken as recorded by another sync, its bounce never marked.
        table = Suppression.__table__  # type: ignore[attr-defined]
        insert: Any = (postgresql.insert if s.get_bind().dialect.name == "postgresql"
                       else sqlite.insert)
        s.execute(insert(table).on_conflict_do_nothing(index_elements=["email"]),
                  list(c.new_sup.values()))
    states_t = InboxCustomerState.__table__  # type: ignore[attr-defined]
    updates = [{"s_id": cid, "s_flagged": c.states[cid]["flagged"],
                "s_reason": c.states[cid]["flag_reason"],
                "s_held": c.states[cid]["reminders_held_until"]}
               for cid in sorted(c.changed_states & c.existing_states)]
    if updates:
        s.execute(
            sa.update(states_t).where(states_t.c.customer_id == sa.bindparam("s_id"))
            .values(flagged=sa.bindparam("s_flagged"), flag_reason=sa.bindparam("s_reason"),
                    reminders_held_until=sa.bindparam("s_held"), updated_at=now),
            updates,
        )
    inserts = [{"customer_id": cid, **c.states[cid], "updated_at": now}
               for cid in sorted(c.changed_states - c.existing_states)]
    if inserts:
        s.execute(sa.insert(states_t), inserts)
    if c.notes:
        outbox.insert_messages(s, c.notes)


def effect_keys(effects: list[str]) -> list[str]:
    """The report's counter keys for what was done to one message."""
    keys = []
    for e in effects:
        if e.startswith("outbox #"):
            keys.append("bounced")
        elif "suppressed" in e:
            keys.append("suppressed")
        elif "note queued" in e:
            keys.append("notes")
        elif "held" in e:
            keys.append("held")
        elif "flagged" in e:
            keys.append("flagged")
        elif e.startswith("soft bounce"):
            keys.append("soft_bounces")
    return keys
