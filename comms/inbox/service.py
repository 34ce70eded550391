"""`comms inbox sync`: read each sender mailbox's new Inbox messages, classify them, apply their
effects; and the queries behind `comms inbox list/show`, the timeline and `comms status`.

Crash safety: each inbound message is recorded (unique by mailbox + Graph id) in the same
transaction as its effects (100 messages a transaction, effects written set-based), so a message
is either fully applied or not at all; the mailbox's delta link is stored only after every
message of its page was applied. A crash mid-page re-reads that page on the next sync and skips
what was already recorded. A message another sync recorded meanwhile makes the chunk roll back
and be applied again one message per savepoint, skipping the taken one.

Effects (``[inbox]`` in campaign.toml, see ``comms.inbox.policy``):

- hard bounce: the outbox row ``bounced`` with the status code, the address suppressed (reason
  ``bounce``), the customer flagged, one internal note to the account manager per customer per
  day at most;
- soft bounce: counted; the address suppressed after ``soft_bounce_limit`` in
  ``soft_bounce_window_days``;
- reply: the customer's reminders held ``hold_reminders_days``, the account manager notified
  (same one-a-day note), subject and first lines kept for the timeline;
- opt-out reply: the address suppressed with the reply as the reason;
- auto-reply, unmatched: recorded only.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from comms import outbox
from comms.config import Settings
from comms.errors import NotFound, UsageError
from comms.inbox.classify import Inbound, SentRow, Verdict, classify, own_text
from comms.inbox.policy import InboxPolicy
from comms.inbox.reader import InboxReader
from comms.store.db import Database
from comms.store.inbox_models import InboundMessage, InboxCustomerState, InboxMailbox
from comms.store.models import Contact, Customer, Message, Suppression

NOTE_MESSAGE = "inbox_account_manager_note"
BOUNCED = "bounced"  # outbox status of a message an NDR came back for


@dataclass
class SyncReport:
    mailboxes: list[str] = field(default_factory=list)
    read: int = 0
    new: int = 0  # classified and applied (or, dry run, would be)
    skipped: int = 0  # already processed
    kinds: Counter[str] = field(default_factory=Counter)
    effects: Counter[str] = field(default_factory=Counter)
    dry_run: bool = False
    requests: int = 0
    retries: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)  # dry run: what would happen

    def as_dict(self) -> dict[str, Any]:
        return {
            "mailboxes": self.mailboxes, "read": self.read, "new": self.new,
            "skipped": self.skipped, "kinds": dict(self.kinds), "effects": dict(self.effects),
            "dry_run": self.dry_run, "requests": self.requests, "retries": self.retries,
            "items": self.items,
        }


# --------------------------------------------------------------------------- parsing


def _address(value: Any) -> str:
    if isinstance(value, dict):
        return str((value.get("emailAddress") or {}).get("address") or "").strip().lower()
    return ""


def _parse_time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _html_text(markup: str) -> str:
    """Readable text of an HTML body (Graph sends text when asked; this covers when not)."""
    text = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", "", markup)
    text = re.sub(r"(?i)<br\s*/?>|</(p|div|tr|li|h[1-6])>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return "\n".join(line.strip() for line in text.splitlines())


def inbound_from_graph(mailbox: str, item: dict[str, Any]) -> Inbound:
    """A Graph message resource -> the classifier's view (headers lower-cased)."""
    headers: dict[str, str] = {}
    for h in item.get("internetMessageHeaders") or []:
        name = str(h.get("name") or "").lower()
        if name and name not in headers:
            headers[name] = str(h.get("value") or "")
    body = item.get("body") or {}
    text = str(body.get("content") or "") if isinstance(body, dict) else ""
    if text and str(body.get("contentType", "")).lower() == "html":
        text = _html_text(text)
    return Inbound(
        mailbox=mailbox.lower(),
        graph_id=str(item["id"]),
        subject=str(item.get("subject") or ""),
        from_address=_address(item.get("from")) or _address(item.get("sender")),
        text=text or str(item.get("bodyPreview") or ""),
        headers=headers,
        internet_message_id=str(item.get("internetMessageId") or ""),
        conversation_id=str(item.get("conversationId") or ""),
        received_at=_parse_time(item.get("receivedDateTime")),
    )


# --------------------------------------------------------------------------- resolver


def _sent_row(row: Any) -> SentRow:
    recipients = [d["address"].lower() for d in json.loads(row.to_json or "[]")]
    recipients += [d["address"].lower() for d in json.loads(row.cc_json or "[]")]
    return SentRow(int(row.id), int(row.customer_id), tuple(recipients), row.message)


class LedgerResolver:
    """Answers the classifier from the ledger, and Sent Items through Graph (cached)."""

    def __init__(self, session: Session, reader: InboxReader | None,
                 sent_cache: dict[tuple[str, str, str], str | None] | None = None,
                 contacts: dict[str, list[int]] | None = None,
                 rows: dict[str, SentRow | None] | None = None) -> None:
        self.session = session
        self.reader = reader
        self.rows = rows if rows is not None else {}
        # Shared by the whole sync (and filled ahead, page by page).
        self.sent_cache = sent_cache if sent_cache is not None else {}
        self.contacts = contacts if contacts is not None else {}

    def prefetch_contacts(self, addresses: Sequence[str]) -> None:
        wanted = sorted({a.lower() for a in addresses if a} - set(self.contacts))
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            for a in chunk:
                self.contacts[a] = []
            rows = self.session.execute(
                sa.select(sa.func.lower(col(Contact.email)), col(Contact.customer_id))
                .where(sa.func.lower(col(Contact.email)).in_(chunk))
            ).all()
            for email, cid in rows:
                self.contacts.setdefault(email, []).append(cid)

    def prefetch_rows(self, send_ids: Sequence[str]) -> None:
        """Load many outbox rows in one query per 500 (a page's NDRs and threaded replies)."""
        wanted = sorted({x for x in send_ids if x} - set(self.rows))
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            for send_id in chunk:
                self.rows[send_id] = None
            for row in self.session.execute(
                sa.select(col(Message.send_id), col(Message.id), col(Message.customer_id),
                          col(Message.to_json), col(Message.cc_json), col(Message.message))
                .where(col(Message.send_id).in_(chunk))
            ).all():
                self.rows[row.send_id] = _sent_row(row)

    def row_by_send_id(self, send_id: str) -> SentRow | None:
        if send_id in self.rows:
            return self.rows[send_id]
        row = self.session.execute(
            sa.select(col(Message.id), col(Message.customer_id), col(Message.to_json),
                      col(Message.cc_json), col(Message.message))
            .where(col(Message.send_id) == send_id)
        ).first()
        return None if row is None else _sent_row(row)

    def _sent(self, mailbox: str, field_name: str, value: str) -> str | None:
        key = (mailbox, field_name, value)
        if key not in self.sent_cache:
            self.sent_cache[key] = (
                self.reader.sent_send_id(mailbox, field_name, value) if self.reader else None
            )
        return self.sent_cache[key]

    def send_id_by_internet_message_id(self, mailbox: str, internet_message_id: str
                                       ) -> str | None:
        return self._sent(mailbox, "internetMessageId", internet_message_id)

    def customer_by_conversation(self, mailbox: str, conversation_id: str) -> int | None:
        known = self.session.execute(
            sa.select(col(InboundMessage.customer_id)).where(
                col(InboundMessage.conversation_id) == conversation_id,
                col(InboundMessage.customer_id).is_not(None),
            ).limit(1)
        ).scalar()
        if known is not None:
            return int(known)
        send_id = self._sent(mailbox, "conversationId", conversation_id)
        row = self.row_by_send_id(send_id) if send_id else None
        return row.customer_id if row else None

    def customers_by_contact(self, address: str) -> Sequence[int]:
        if address not in self.contacts:
            self.prefetch_contacts([address])
        return self.contacts.get(address, [])


# --------------------------------------------------------------------------- effects


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
        "html": f"<html><body>{markup}</body></html>", "text": text, "locale": "en",
        "sender": None, "send_after": now, "send_before": None, "attempts": 0,
        "last_error": "", "error_code": "", "lease_until": None, "claimed_by": "",
        "unknown_since": None, "sent_at": None, "request_id": "", "note": "inbox",
        "created_at": now, "updated_at": now,
    }


# --------------------------------------------------------------------------- sync


def _senders(settings: Settings, mailbox: str | None) -> list[str]:
    senders = [x.address.lower() for x in settings.senders]
    if mailbox is None:
        return senders
    if mailbox.lower() not in senders:
        raise UsageError(
            f"{mailbox} is not a sender mailbox; configured: {', '.join(senders)} ([[senders]])."
        )
    return [mailbox.lower()]


def _record(msg: Inbound, verdict: Verdict, lines: int, now: datetime) -> dict[str, Any]:
    """The inbound_messages row (a dict: inserted with Core, thousands per sync)."""
    return {
        "mailbox": msg.mailbox, "graph_id": msg.graph_id,
        "internet_message_id": msg.internet_message_id[:998],
        "conversation_id": msg.conversation_id[:400], "received_at": msg.received_at,
        "from_address": msg.from_address[:320], "subject": msg.subject,
        "preview": own_text(msg.text, max(lines, 1)) if verdict.kind in ("reply", "optout")
        else msg.text[:500],
        "kind": verdict.kind, "rule": verdict.rule[:100], "detail": verdict.detail,
        "status_code": verdict.status_code, "hard": verdict.hard,
        "address": verdict.address[:320], "customer_id": verdict.customer_id,
        "message_id": verdict.message_id, "effects": "", "processed_at": now,
    }


def _needs_attachments(item: dict[str, Any], msg: Inbound) -> bool:
    from comms.inbox.classify import is_ndr

    return bool(item.get("hasAttachments")) and is_ndr(msg)


def sync(
    db: Database, settings: Settings, policy: InboxPolicy, *, now: datetime,
    mailbox: str | None = None, dry_run: bool = False, restart: bool = False,
    progress: Callable[[int], None] | None = None, reader: InboxReader | None = None,
) -> SyncReport:
    """Read, classify and apply every new Inbox message of the sender mailboxes."""
    report = SyncReport(dry_run=dry_run)
    own_reader = reader is None
    reader = reader or InboxReader(settings, read_body=policy.read_body,
                                   page_size=policy.page_size)
    try:
        for box in _senders(settings, mailbox):
            report.mailboxes.append(box)
            _sync_mailbox(db, settings, policy, reader, box, now=now, dry_run=dry_run,
                          restart=restart, report=report, progress=progress)
    finally:
        report.requests, report.retries = reader.requests, reader.retries
        if own_reader:
            reader.close()
    return report


def _sync_mailbox(
    db: Database, settings: Settings, policy: InboxPolicy, reader: InboxReader, box: str, *,
    now: datetime, dry_run: bool, restart: bool, report: SyncReport,
    progress: Callable[[int], None] | None,
) -> None:
    with db.session() as s:
        stored = s.get(InboxMailbox, box)
        link = None if (restart or stored is None) else (stored.delta_link or None)
    caches = _Caches()
    limit = next((x.max_concurrent for x in settings.senders if x.address == box), 4)
    # Graph reads of a page (attachments, Sent Items lookups) run a few at a time, ahead of the
    # chunk being applied; one slot stays free for a run sending from the same mailbox.
    pool = ThreadPoolExecutor(max_workers=max(1, min(3, limit - 1)))
    try:
        for page in reader.pages(box, link):
            report.read += len(page.messages)
            ids = [str(m["id"]) for m in page.messages]
            with db.session() as s:
                seen = set(s.execute(
                    sa.select(col(InboundMessage.graph_id)).where(
                        col(InboundMessage.mailbox) == box,
                        col(InboundMessage.graph_id).in_(ids))
                ).scalars().all()) if ids else set()
            fresh = [m for m in page.messages
                     if str(m["id"]) not in seen and "@removed" not in m]
            report.skipped += len(page.messages) - len(fresh)
            messages = [inbound_from_graph(box, item) for item in fresh]
            threaded = sum(1 for m in messages if "in-reply-to" in m.headers)
            if caches.index is None and policy.sent_index_days > 0 and (
                threaded >= SENT_INDEX_THRESHOLD
            ):
                caches.index = reader.sent_index(
                    box, now - timedelta(days=policy.sent_index_days))
            pending = _submit(pool, policy, reader, box, fresh, messages, caches)
            for start in range(0, len(messages), CHUNK):
                _collect(pending, messages, caches, upto=start + CHUNK)
                _process(db, settings, policy, reader, messages[start:start + CHUNK], now=now,
                         dry_run=dry_run, report=report, caches=caches)
            if progress:
                progress(len(page.messages))
            if page.delta_link and not dry_run:
                # Only now, with every message of the round applied, may the next sync skip
                # them.
                with db.session() as s:
                    row = s.get(InboxMailbox, box) or InboxMailbox(mailbox=box)
                    row.delta_link, row.synced_at = page.delta_link, now
                    s.add(row)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


class _DryRun(Exception):
    """Raised inside a dry run's transaction so that nothing it did is kept."""


@dataclass
class _Caches:
    """What one mailbox's sync learned, shared by its chunks: Sent Items lookups, outbox rows
    by send id, contacts by address."""

    sent: dict[tuple[str, str, str], str | None] = field(default_factory=dict)
    rows: dict[str, SentRow | None] = field(default_factory=dict)
    contacts: dict[str, list[int]] = field(default_factory=dict)
    index: dict[str, str] | None = None  # Sent Items listing, once per sync when worth it


SENT_INDEX_THRESHOLD = 50  # threaded replies on a page that make one listing cheaper


_IN_REPLY_TO = re.compile(r"<[^<>\s]+>")


def _submit(
    pool: ThreadPoolExecutor, policy: InboxPolicy, reader: InboxReader, box: str,
    items: list[dict[str, Any]], messages: list[Inbound], caches: _Caches,
) -> list[tuple[int, str, Future[Any]]]:
    """Start a page's Graph reads: NDR attachments, and the Sent Items lookup of each reply's
    In-Reply-To (each id once)."""
    out: list[tuple[int, str, Future[Any]]] = []
    for i, (item, msg) in enumerate(zip(items, messages, strict=True)):
        if policy.read_body and _needs_attachments(item, msg):
            out.append((i, "attachments", pool.submit(reader.attachments, box, msg.graph_id)))
            continue
        for mid in _IN_REPLY_TO.findall(msg.headers.get("in-reply-to", ""))[:1]:
            key = (box, "internetMessageId", mid)
            if key not in caches.sent and caches.index is not None and mid in caches.index:
                caches.sent[key] = caches.index[mid]
            if key not in caches.sent:
                caches.sent[key] = None
                out.append((i, mid, pool.submit(reader.sent_send_id, box,
                                                "internetMessageId", mid)))
    out.reverse()  # popped from the end, lowest index first
    return out


def _collect(pending: list[tuple[int, str, Future[Any]]], messages: list[Inbound],
             caches: _Caches, *, upto: int) -> None:
    """Wait for the reads of messages before ``upto`` and put their results in place."""
    box = messages[0].mailbox if messages else ""
    while pending and pending[-1][0] < upto:
        i, what, future = pending.pop()
        if what == "attachments":
            messages[i] = replace(messages[i], attachments=tuple(future.result()))
        else:
            caches.sent[(box, "internetMessageId", what)] = future.result()


def _referenced_send_ids(messages: Sequence[Inbound], caches: _Caches) -> list[str]:
    """Send ids these messages will ask for: in NDR attachments and resolved In-Reply-To."""
    out = [m.group(1) for msg in messages for a in msg.attachments
           for m in [_SEND_ID_IN_TEXT.search(a.text)] if m]
    for msg in messages:
        for mid in _IN_REPLY_TO.findall(msg.headers.get("in-reply-to", ""))[:1]:
            found = caches.sent.get((msg.mailbox, "internetMessageId", mid))
            if found:
                out.append(found)
    return out


_SEND_ID_IN_TEXT = re.compile(r"^\s*x-comms-send-id:\s*([A-Za-z0-9._-]+)", re.I | re.M)
CHUNK = 100  # inbound messages per write transaction (each in its own savepoint)


def _process(
    db: Database, settings: Settings, policy: InboxPolicy, reader: InboxReader,
    messages: list[Inbound], *, now: datetime, dry_run: bool, report: SyncReport,
    caches: _Caches,
) -> None:
    """Classify and apply ``messages`` (at most a chunk) in one transaction.

    The effects and the inbound_messages rows are written set-based for the whole chunk and
    commit together, so a crash loses the uncommitted chunk whole and the next sync (same
    delta link) applies it again. If another sync recorded one of these messages meanwhile,
    the chunk's insert fails on the unique key, everything rolls back, and the chunk is applied
    again one message per savepoint (the taken ones skipped)."""
    keywords = policy.optout_keywords if policy.read_body else []
    done: list[tuple[Inbound, Verdict, list[str]]] = []
    try:
        with db.session(immediate=True) as s:
            resolver = LedgerResolver(s, reader, caches.sent, caches.contacts, caches.rows)
            resolver.prefetch_contacts([m.from_address for m in messages])
            resolver.prefetch_rows(_referenced_send_ids(messages, caches))
            verdicts = [classify(msg, resolver, keywords) for msg in messages]
            effects = apply_chunk(s, settings, policy, list(zip(messages, verdicts,
                                                                strict=True)), now)
            rows = []
            for msg, verdict, eff in zip(messages, verdicts, effects, strict=True):
                row = _record(msg, verdict, policy.timeline_lines, now)
                row["effects"] = "; ".join(eff)
                rows.append(row)
                done.append((msg, verdict, eff))
            if rows:
                s.execute(sa.insert(InboundMessage.__table__), rows)  # type: ignore[attr-defined]
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    except IntegrityError:
        _process_one_by_one(db, settings, policy, reader, messages, now=now, dry_run=dry_run,
                            report=report, caches=caches)
        return
    _count(report, done, dry_run)


def _count(report: SyncReport, done: list[tuple[Inbound, Verdict, list[str]]],
           dry_run: bool) -> None:
    for msg, verdict, effects in done:
        report.new += 1
        report.kinds[verdict.kind] += 1
        report.effects.update(_effect_keys(effects))
        if dry_run:
            report.items.append({"graph_id": msg.graph_id, "from": msg.from_address,
                                 "subject": msg.subject, "kind": verdict.kind,
                                 "rule": verdict.rule, "effects": effects})


def _process_one_by_one(
    db: Database, settings: Settings, policy: InboxPolicy, reader: InboxReader,
    messages: list[Inbound], *, now: datetime, dry_run: bool, report: SyncReport,
    caches: _Caches,
) -> None:
    """The fallback: each message's effects and record in its own savepoint."""
    table = InboundMessage.__table__  # type: ignore[attr-defined]
    keywords = policy.optout_keywords if policy.read_body else []
    done: list[tuple[Inbound, Verdict, list[str]]] = []
    try:
        with db.session(immediate=True) as s:
            resolver = LedgerResolver(s, reader, caches.sent, caches.contacts, caches.rows)
            for msg in messages:
                try:
                    with s.begin_nested(), s.no_autoflush:
                        verdict = classify(msg, resolver, keywords)
                        effects = apply_chunk(s, settings, policy, [(msg, verdict)], now)[0]
                        row = _record(msg, verdict, policy.timeline_lines, now)
                        row["effects"] = "; ".join(effects)
                        s.flush()
                        s.execute(sa.insert(table).values(**row))
                except IntegrityError:
                    report.skipped += 1  # recorded meanwhile by another sync
                    continue
                done.append((msg, verdict, effects))
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    _count(report, done, dry_run)


def apply_chunk(
    s: Session, settings: Settings, policy: InboxPolicy, items: list[tuple[Inbound, Verdict]],
    now: datetime,
) -> list[list[str]]:
    """The effects of many classified messages, with a few set-based statements (in ``s``,
    the caller's transaction); the result per message is the same as applying them one after
    the other. Returns what was done, per message."""
    effects: list[list[str]] = [[] for _ in items]
    acting = [(i, m, v) for i, (m, v) in enumerate(items)
              if v.kind in ("bounce", "optout", "reply") and v.customer_id is not None]
    if not acting:
        return effects
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
    new_sup: dict[str, dict[str, Any]] = {}
    soft = sorted({v.address for _, _, v in acting
                   if v.kind == "bounce" and not v.hard and v.address})
    window = now - timedelta(days=policy.soft_bounce_window_days)
    soft_counts: Counter[str] = Counter(dict(s.execute(
        sa.select(col(InboundMessage.address), sa.func.count())
        .where(col(InboundMessage.kind) == "bounce", col(InboundMessage.hard).is_(False),
               col(InboundMessage.address).in_(soft),
               col(InboundMessage.processed_at) >= window)
        .group_by(col(InboundMessage.address))
    ).all())) if soft else Counter()
    bounce_ids = sorted({v.message_id for _, _, v in acting
                         if v.kind == "bounce" and v.hard and v.message_id is not None})
    status = dict(s.execute(
        sa.select(col(Message.id), col(Message.status)).where(col(Message.id).in_(bounce_ids))
    ).all()) if bounce_ids else {}
    bounced: dict[int, dict[str, Any]] = {}
    states = {r[0]: {"flagged": r[1], "flag_reason": r[2], "reminders_held_until": r[3]}
              for r in s.execute(
                  sa.select(col(InboxCustomerState.customer_id), col(InboxCustomerState.flagged),
                            col(InboxCustomerState.flag_reason),
                            col(InboxCustomerState.reminders_held_until))
                  .where(col(InboxCustomerState.customer_id).in_(cids)))}
    existing_states = set(states)
    changed_states: set[int] = set()
    day = now.date().toordinal()
    noted = set(s.execute(
        sa.select(col(Message.customer_id)).where(
            col(Message.message) == NOTE_MESSAGE, col(Message.sequence) == day,
            col(Message.customer_id).in_(cids))
    ).scalars())
    notes: list[dict[str, Any]] = []

    def suppress(address: str, reason: str, by: str) -> bool:
        if not address or address in suppressed or address in new_sup:
            return False
        new_sup[address] = {"email": address, "reason": reason, "at": now, "by": by}
        return True

    def state(cid: int) -> dict[str, Any]:
        changed_states.add(cid)
        return states.setdefault(cid, {"flagged": False, "flag_reason": "",
                                       "reminders_held_until": None})

    def note(customer: _Customer, subject: str, lines: list[str]) -> bool:
        if not policy.notify_account_manager or customer.id in noted:
            return False
        row = _note_row(settings, customer, subject, lines, now)
        if row is None:
            return False
        noted.add(customer.id)
        notes.append(row)
        return True

    for i, msg, v in acting:
        customer = customers.get(v.customer_id or -1)
        if customer is None:
            continue
        done = effects[i]
        by = f"inbox:{msg.mailbox}"
        if v.kind == "bounce" and v.hard:
            if v.message_id is not None and status.get(v.message_id, "withdrawn") != "withdrawn":
                bounced[v.message_id] = {
                    "b_id": v.message_id, "b_code": v.status_code,
                    "b_error": f"bounced for {v.address or 'a recipient'}: {v.detail}"}
                done.append(f"outbox #{v.message_id} bounced ({v.status_code})")
            if suppress(v.address, "bounce", f"{by} {v.status_code}"):
                done.append(f"{v.address} suppressed (bounce)")
            st = state(customer.id)
            st["flagged"] = True
            st["flag_reason"] = f"hard bounce {v.status_code} for {v.address}"
            done.append("customer flagged")
            if note(customer, f"[comms] {customer.name} ({customer.key}): an email bounced",
                    [f"An email to {customer.name} ({customer.key}) bounced.",
                     f"Address: {v.address or 'unknown'}; status {v.status_code} "
                     f"({v.detail}).",
                     "The address is suppressed; please find a working contact and add it "
                     "with `comms customers import`."]):
                done.append("account manager note queued")
        elif v.kind == "bounce":
            soft_counts[v.address] += 1
            count = soft_counts[v.address]
            done.append(f"soft bounce {count} of {policy.soft_bounce_limit} for {v.address}")
            if v.address and count >= policy.soft_bounce_limit and suppress(
                v.address, "bounce",
                f"{by} {count} soft bounces in {policy.soft_bounce_window_days:g} days",
            ):
                done.append(f"{v.address} suppressed (bounce, {count} soft bounces)")
        elif v.kind == "optout":
            reason = f"opt-out reply: {msg.subject} | {own_text(msg.text, 3)}"[:1000]
            if suppress(v.address, reason, by):
                done.append(f"{v.address} suppressed (opt-out reply)")
        else:
            until = now + timedelta(days=policy.hold_reminders_days)
            st = state(customer.id)
            if st["reminders_held_until"] is None or st["reminders_held_until"] < until:
                st["reminders_held_until"] = until
            done.append(f"reminders held until {until:%Y-%m-%d %H:%M} UTC")
            first = own_text(msg.text, policy.timeline_lines or 3)
            if note(customer, f"[comms] {customer.name} ({customer.key}) replied",
                    [f"{msg.from_address} replied: {msg.subject}", *first.splitlines(),
                     f"Reminders are held for {policy.hold_reminders_days:g} days."]):
                done.append("account manager note queued")

    messages_t = Message.__table__  # type: ignore[attr-defined]
    if bounced:
        s.execute(
            sa.update(messages_t).where(messages_t.c.id == sa.bindparam("b_id"))
            .values(status=BOUNCED, error_code=sa.bindparam("b_code"),
                    last_error=sa.bindparam("b_error"), updated_at=now),
            list(bounced.values()),
        )
    if new_sup:
        s.execute(sa.insert(Suppression.__table__),  # type: ignore[attr-defined]
                  list(new_sup.values()))
    states_t = InboxCustomerState.__table__  # type: ignore[attr-defined]
    updates = [{"s_id": cid, "s_flagged": states[cid]["flagged"],
                "s_reason": states[cid]["flag_reason"],
                "s_held": states[cid]["reminders_held_until"]}
               for cid in sorted(changed_states & existing_states)]
    if updates:
        s.execute(
            sa.update(states_t).where(states_t.c.customer_id == sa.bindparam("s_id"))
            .values(flagged=sa.bindparam("s_flagged"), flag_reason=sa.bindparam("s_reason"),
                    reminders_held_until=sa.bindparam("s_held"), updated_at=now),
            updates,
        )
    inserts = [{"customer_id": cid, **states[cid], "updated_at": now}
               for cid in sorted(changed_states - existing_states)]
    if inserts:
        s.execute(sa.insert(states_t), inserts)
    if notes:
        outbox.insert_messages(s, notes)
    return effects


def _effect_keys(effects: list[str]) -> list[str]:
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


# --------------------------------------------------------------------------- queries


def list_inbound(db: Database, *, kind: str | None = None, limit: int = 200
                 ) -> list[dict[str, Any]]:
    with db.session() as s:
        q = (sa.select(InboundMessage, col(Customer.key))
             .join(Customer, col(Customer.id) == col(InboundMessage.customer_id), isouter=True)
             .order_by(col(InboundMessage.id).desc()).limit(limit))
        if kind:
            q = q.where(col(InboundMessage.kind) == kind)
        return [_row_dict(m, key) for m, key in s.execute(q).all()]


def show_inbound(db: Database, inbound_id: int) -> dict[str, Any]:
    with db.session() as s:
        found = s.execute(
            sa.select(InboundMessage, col(Customer.key))
            .join(Customer, col(Customer.id) == col(InboundMessage.customer_id), isouter=True)
            .where(col(InboundMessage.id) == inbound_id)
        ).first()
    if found is None:
        raise NotFound(f"No inbound message #{inbound_id}. See `comms inbox list`.")
    return _row_dict(found[0], found[1], full=True)


def _row_dict(m: InboundMessage, key: str | None, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": m.id, "mailbox": m.mailbox, "received_at": m.received_at, "kind": m.kind,
        "from": m.from_address, "subject": m.subject, "customer": key, "rule": m.rule,
        "status_code": m.status_code, "address": m.address, "outbox_id": m.message_id,
        "effects": m.effects,
    }
    if full:
        out.update({"graph_id": m.graph_id, "internet_message_id": m.internet_message_id,
                    "conversation_id": m.conversation_id, "detail": m.detail, "hard": m.hard,
                    "preview": m.preview, "processed_at": m.processed_at})
    return out


def timeline_entries(session: Session, customer_id: int) -> list[InboundMessage]:
    """Inbound messages of one customer, oldest first (for `customers show`)."""
    return list(session.exec(
        select(InboundMessage).where(col(InboundMessage.customer_id) == customer_id)
        .order_by(col(InboundMessage.id))
    ).all())


@dataclass(frozen=True)
class InboxCounts:
    bounces: int
    hard_bounces: int
    replies: int
    optouts: int
    auto: int
    unmatched: int
    unreachable: list[str]  # customer keys with no deliverable address left
    awaiting_operator: list[str]  # customers whose reminders are held after a reply
    by_stage: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> kind -> n


def counts(session: Session, now: datetime) -> InboxCounts:
    """Inbox numbers for `comms status`."""
    by_kind: Counter[str] = Counter()
    hard = 0
    for kind, is_hard, n in session.execute(
        sa.select(col(InboundMessage.kind), col(InboundMessage.hard), sa.func.count())
        .group_by(col(InboundMessage.kind), col(InboundMessage.hard))
    ).all():
        by_kind[kind] += n
        if kind == "bounce" and is_hard:
            hard += n
    deliverable = (
        sa.select(col(Contact.customer_id))
        .where(sa.func.lower(col(Contact.email)).not_in(sa.select(col(Suppression.email))))
    )
    unreachable = session.execute(
        sa.select(col(Customer.key)).where(
            col(Customer.id).in_(sa.select(col(Contact.customer_id))),
            col(Customer.id).not_in(deliverable),
            col(Customer.lost).is_(False),
        ).order_by(col(Customer.key))
    ).scalars().all()
    awaiting = session.execute(
        sa.select(col(Customer.key))
        .join(InboxCustomerState, col(InboxCustomerState.customer_id) == col(Customer.id))
        .where(col(InboxCustomerState.reminders_held_until) > now).order_by(col(Customer.key))
    ).scalars().all()
    by_stage: dict[str, dict[str, int]] = {}
    for stage, kind, n in session.execute(
        sa.select(col(Customer.stage), col(InboundMessage.kind), sa.func.count())
        .join(Customer, col(Customer.id) == col(InboundMessage.customer_id))
        .group_by(col(Customer.stage), col(InboundMessage.kind))
    ).all():
        by_stage.setdefault(stage, {})[kind] = int(n)
    return InboxCounts(by_kind["bounce"], hard, by_kind["reply"], by_kind["optout"],
                       by_kind["auto"], by_kind["unmatched"], list(unreachable), list(awaiting),
                       by_stage)


SUMMARY_KINDS = ("bounce", "reply", "auto", "optout", "unmatched")


def summary_line(report: SyncReport) -> str:
    """One line for `comms inbox sync` and `comms run --inbox`."""
    kinds = ", ".join(f"{k} {report.kinds.get(k, 0)}" for k in SUMMARY_KINDS)
    verb = "would apply" if report.dry_run else "applied"
    return (f"Inbox: read {report.read} message(s) from {len(report.mailboxes)} mailbox(es), "
            f"{report.new} new ({kinds}), {report.skipped} already processed; {verb}: "
            + (", ".join(f"{k} {v}" for k, v in sorted(report.effects.items())) or "nothing"))
