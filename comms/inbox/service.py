"""`comms inbox sync`: read each sender mailbox's new Inbox messages, classify them and apply
their effects (``comms.inbox.effects``). The parts live in their own modules and stay importable
from here: ``comms.inbox.resolver`` (Graph message -> classifier input, ledger answers),
``comms.inbox.effects`` (what a bounce, reply or opt-out does) and ``comms.inbox.queries``
(`comms inbox list/show`, the timeline, the counts behind `comms status` and the report).

Crash safety: each inbound message is recorded (unique by mailbox + Graph id) in the same
transaction as its effects (500 messages a transaction, effects written set-based), so a message
is either fully applied or not at all; the mailbox's delta link is stored only after every
message of its page was applied. A crash mid-page re-reads that page on the next sync and skips
what was already recorded. A message another sync recorded meanwhile makes the chunk roll back
and be applied again one message per savepoint, skipping the taken one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from comms.config import Settings
from comms.errors import UsageError
from comms.inbox.classify import Inbound, Verdict, classify
from comms.inbox.effects import BOUNCED, NOTE_MESSAGE, apply_chunk, effect_keys
from comms.inbox.phrases import own_text
from comms.inbox.policy import InboxPolicy
from comms.inbox.prefetch import (
    SENT_INDEX_THRESHOLD,
    _Caches,
    _collect,
    _error_verdict,
    _referenced_send_ids,
    _submit,
    message_fault,
)
from comms.inbox.queries import (
    InboxCounts,
    counts,
    list_inbound,
    show_inbound,
    timeline_entries,
)
from comms.inbox.reader import InboxError, InboxReader, Page
from comms.inbox.resolver import LedgerResolver, inbound_from_graph, no_nul
from comms.store.db import Database
from comms.store.inbox_models import InboundMessage, InboxMailbox

__all__ = [
    "BOUNCED", "CHUNK", "NOTE_MESSAGE", "SENT_INDEX_THRESHOLD", "SUMMARY_KINDS", "InboxCounts",
    "LedgerResolver", "SyncReport", "apply_chunk", "counts", "inbound_from_graph",
    "list_inbound", "show_inbound", "summary_line", "sync", "timeline_entries",
]


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
    errors: list[str] = field(default_factory=list)  # "mailbox: why" per mailbox not synced
    restarted: list[str] = field(default_factory=list)  # mailboxes whose delta link had expired

    def as_dict(self) -> dict[str, Any]:
        return {
            "mailboxes": self.mailboxes, "read": self.read, "new": self.new,
            "skipped": self.skipped, "kinds": dict(self.kinds), "effects": dict(self.effects),
            "dry_run": self.dry_run, "requests": self.requests, "retries": self.retries,
            "items": self.items, "errors": self.errors, "restarted": self.restarted,
        }


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
    """The inbound_messages row (a dict: inserted with Core, thousands per sync), without NULs
    in its text (PostgreSQL refuses them)."""
    row = {
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
    return {k: no_nul(v) if isinstance(v, str) else v for k, v in row.items()}


def sync(
    db: Database, settings: Settings, policy: InboxPolicy, *, now: datetime,
    mailbox: str | None = None, dry_run: bool = False, restart: bool = False,
    progress: Callable[[int], None] | None = None, reader: InboxReader | None = None,
) -> SyncReport:
    """Read, classify and apply every new Inbox message of the sender mailboxes.

    A mailbox that cannot be read (permissions, throttling, the network) is reported in
    ``errors`` and the others are read; when none could be, the first error is raised."""
    report = SyncReport(dry_run=dry_run)
    boxes = _senders(settings, mailbox)
    own_reader = reader is None
    reader = reader or InboxReader(settings, read_body=policy.read_body,
                                   page_size=policy.page_size)
    first: Exception | None = None
    try:
        for box in boxes:
            report.mailboxes.append(box)
            try:
                _sync_mailbox(db, settings, policy, reader, box, now=now, dry_run=dry_run,
                              restart=restart, report=report, progress=progress)
            except Exception as exc:  # one mailbox's failure must not keep the others unread
                first = first or exc
                report.errors.append(f"{box}: {no_nul(exc)}")
        if first is not None and len(report.errors) == len(boxes):
            raise first
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
        for page in _delta_pages(reader, box, link, report):
            report.read += len(page.messages)
            fresh = _unread(db, box, page.messages)
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
                _collect(pending, messages, caches, upto=start + CHUNK, reader=reader)
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


def _delta_pages(reader: InboxReader, box: str, link: str | None,
                 report: SyncReport) -> Iterator[Page]:
    """The delta round from the stored ``link``; when Graph no longer knows it (it expired
    after a long pause), from the start of the Inbox: what was processed before is recognised
    and skipped (``_unread``), so a scheduled run does not stop until someone restarts it."""
    try:
        pages = reader.pages(box, link)
        first = next(pages, None)
    except InboxError as exc:
        if link is None or not exc.sync_state_lost:
            raise
        report.restarted.append(box)
        pages = reader.pages(box, None)
        first = next(pages, None)
    if first is not None:
        yield first
        yield from pages


def _imid(item: dict[str, Any]) -> str:
    return no_nul(item.get("internetMessageId") or "")[:998]


def _unread(db: Database, box: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The page's messages not read before: neither their Graph id nor their Message-ID is
    recorded for this mailbox. Graph gives a message a new id when it is moved (a reply filed
    in a folder and dragged back, restored from Deleted Items); its Message-ID stays, so it is
    not acted on twice (a second note, an opt-out an operator reversed applied again). Messages
    recorded as ``error`` are read again."""
    ids = [str(m["id"]) for m in items]
    imids = sorted({_imid(m) for m in items} - {""})
    with db.session() as s:
        known = sa.select(col(InboundMessage.graph_id), col(InboundMessage.internet_message_id)
                          ).where(col(InboundMessage.mailbox) == box,
                                  col(InboundMessage.kind) != "error")
        seen = set(s.execute(known.where(col(InboundMessage.graph_id).in_(ids))
                             .with_only_columns(col(InboundMessage.graph_id))).scalars()
                   ) if ids else set()
        seen_imids = set(s.execute(
            known.where(col(InboundMessage.internet_message_id).in_(imids))
            .with_only_columns(col(InboundMessage.internet_message_id))).scalars()
        ) if imids else set()
    return [m for m in items if "@removed" not in m and str(m["id"]) not in seen
            and (not _imid(m) or _imid(m) not in seen_imids)]


class _DryRun(Exception):
    """Raised inside a dry run's transaction so that nothing it did is kept."""


# Inbound messages per write transaction: the statements of a chunk cost about the same for 100
# rows as for 500 (bench/bench_inbox.py), and one chunk holds SQLite's write lock well under a
# second.
CHUNK = 500


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
    again one message per savepoint (the taken ones skipped). A message that cannot be
    classified is recorded as an ``error``; one whose effects or record fail (``message_fault``)
    makes the chunk go one message per savepoint too, where it is recorded as an ``error``."""
    done: list[tuple[Inbound, Verdict, list[str]]] = []
    try:
        with db.session(immediate=True) as s:
            resolver = _resolver(s, reader, caches)
            resolver.prefetch_contacts([m.from_address for m in messages])
            resolver.prefetch_rows(_referenced_send_ids(messages, caches))
            verdicts = [_classify(msg, resolver, policy, caches) for msg in messages]
            effects = apply_chunk(s, settings, policy, list(zip(messages, verdicts,
                                                                strict=True)), now)
            rows = []
            for msg, verdict, eff in zip(messages, verdicts, effects, strict=True):
                row = _record(msg, verdict, policy.timeline_lines, now)
                row["effects"] = "; ".join(eff)
                rows.append(row)
                done.append((msg, verdict, eff))
            _forget_errors(s, messages)
            if rows:
                s.execute(sa.insert(InboundMessage.__table__), rows)  # type: ignore[attr-defined]
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    except Exception as exc:
        if not (isinstance(exc, IntegrityError) or message_fault(exc)):
            raise
        _process_one_by_one(db, settings, policy, reader, messages, now=now, dry_run=dry_run,
                            report=report, caches=caches)
        return
    _count(report, done, dry_run)


def _resolver(s: Any, reader: InboxReader, caches: _Caches) -> LedgerResolver:
    return LedgerResolver(s, reader, caches.sent, caches.contacts, caches.rows, caches.failed)


def _classify(msg: Inbound, resolver: LedgerResolver, policy: InboxPolicy,
              caches: _Caches) -> Verdict:
    """The message's verdict, or an ``error`` one when a read about it was refused or the
    classifier fails on it (a database error is left to the caller: the transaction is
    gone)."""
    keywords = policy.optout_keywords if policy.read_body else []
    commands = policy.optout_commands if policy.read_body else []
    broken = caches.broken.get(msg.graph_id)
    if broken is not None:
        return _error_verdict(msg, broken)
    try:
        return classify(msg, resolver, keywords, commands)
    except Exception as exc:
        if isinstance(exc, sa.exc.DBAPIError) or not message_fault(exc):
            raise
        return _error_verdict(msg, exc)


def _forget_errors(s: Any, messages: Sequence[Inbound]) -> None:
    """Drop the ``error`` records of messages processed again (read again after --restart)."""
    table = InboundMessage.__table__  # type: ignore[attr-defined]
    for box in {m.mailbox for m in messages}:
        ids = [m.graph_id for m in messages if m.mailbox == box]
        for start in range(0, len(ids), 500):
            s.execute(sa.delete(table).where(table.c.mailbox == box, table.c.kind == "error",
                                             table.c.graph_id.in_(ids[start:start + 500])))


def _count(report: SyncReport, done: list[tuple[Inbound, Verdict, list[str]]],
           dry_run: bool) -> None:
    for msg, verdict, effects in done:
        report.new += 1
        report.kinds[verdict.kind] += 1
        report.effects.update(effect_keys(effects))
        if dry_run:
            report.items.append({"graph_id": msg.graph_id, "from": msg.from_address,
                                 "subject": msg.subject, "kind": verdict.kind,
                                 "rule": verdict.rule, "effects": effects})


def _process_one_by_one(
    db: Database, settings: Settings, policy: InboxPolicy, reader: InboxReader,
    messages: list[Inbound], *, now: datetime, dry_run: bool, report: SyncReport,
    caches: _Caches,
) -> None:
    """The fallback: each message's effects and record in its own savepoint; a message whose
    effects or record fail is recorded as an ``error`` (with the exception) instead."""
    table = InboundMessage.__table__  # type: ignore[attr-defined]
    done: list[tuple[Inbound, Verdict, list[str]]] = []
    try:
        with db.session(immediate=True) as s:
            resolver = _resolver(s, reader, caches)
            _forget_errors(s, messages)
            for msg in messages:
                try:
                    with s.begin_nested(), s.no_autoflush:
                        verdict = _classify(msg, resolver, policy, caches)
                        effects = apply_chunk(s, settings, policy, [(msg, verdict)], now)[0]
                        row = _record(msg, verdict, policy.timeline_lines, now)
                        row["effects"] = "; ".join(effects)
                        s.flush()
                        s.execute(sa.insert(table).values(**row))
                except IntegrityError as exc:
                    if _recorded(s, msg):
                        report.skipped += 1  # recorded meanwhile by another sync
                        continue
                    # An effect's write failed, not the record: recorded as an error, for an
                    # operator (taken for "recorded meanwhile", it vanished with its effects).
                    verdict, effects = _error_verdict(msg, exc), []
                    with s.begin_nested():
                        s.execute(sa.insert(table).values(
                            **_record(msg, verdict, policy.timeline_lines, now)))
                except Exception as exc:
                    if not message_fault(exc):
                        raise
                    verdict, effects = _error_verdict(msg, exc), []
                    with s.begin_nested():
                        s.execute(sa.insert(table).values(
                            **_record(msg, verdict, policy.timeline_lines, now)))
                done.append((msg, verdict, effects))
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    _count(report, done, dry_run)


def _recorded(s: Any, msg: Inbound) -> bool:
    """Whether ``msg`` is in the ledger (another sync recorded it)."""
    return s.execute(sa.select(col(InboundMessage.id)).where(
        col(InboundMessage.mailbox) == msg.mailbox,
        col(InboundMessage.graph_id) == msg.graph_id)).first() is not None


SUMMARY_KINDS = ("bounce", "reply", "auto", "optout", "unmatched")


def summary_line(report: SyncReport) -> str:
    """One line for `comms inbox sync` and `comms run --inbox`."""
    kinds = ", ".join(f"{k} {report.kinds.get(k, 0)}" for k in SUMMARY_KINDS)
    if report.kinds.get("error"):
        kinds += f", error {report.kinds['error']} (see `comms inbox list --kind error`)"
    verb = "would apply" if report.dry_run else "applied"
    return (f"Inbox: read {report.read} message(s) from {len(report.mailboxes)} mailbox(es), "
            f"{report.new} new ({kinds}), {report.skipped} already processed; {verb}: "
            + (", ".join(f"{k} {v}" for k, v in sorted(report.effects.items())) or "nothing")
            + "".join(f"; NOT SYNCED {e}" for e in report.errors)
            + "".join(f"; {box}: the stored delta link had expired, read from the start "
                      "(what was processed before was skipped)" for box in report.restarted))
