"""The Graph reads of a page, ahead of the chunk being applied: NDR attachments (JSON batches)
and Sent Items lookups of In-Reply-To, and what one message's failure means for the sync
(``message_fault``): that message recorded as an ``error``, or the mailbox's sync stopped."""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa

from comms.errors import CommsError
from comms.inbox.classify import SCAN_LIMIT, Attachment, Inbound, SentRow, Verdict, is_ndr
from comms.inbox.policy import InboxPolicy
from comms.inbox.reader import BATCH_SIZE, InboxError, InboxReader
from comms.inbox.resolver import no_nul


def message_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is one message's fault (Graph refusing a read about it with a 4xx, text
    the database refuses, a classifier bug): that message is recorded as an ``error`` and the
    sync moves on. Anything else (sign-in, permissions, throttling, the network, the database
    itself) stops that mailbox's sync; its next sync reads the same messages again."""
    if isinstance(exc, InboxError):
        return 400 <= exc.status < 500 and exc.status not in (401, 403, 408, 429)
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, CommsError)):
        return False
    return isinstance(exc, Exception)


def _error_verdict(msg: Inbound, exc: BaseException) -> Verdict:
    return Verdict("error", f"error: {type(exc).__name__}", detail=no_nul(exc)[:2000],
                   address=msg.from_address.lower())


# --------------------------------------------------------------------------- sync


def _needs_attachments(item: dict[str, Any], msg: Inbound) -> bool:
    return bool(item.get("hasAttachments")) and is_ndr(msg)


@dataclass
class _Caches:
    """What one mailbox's sync learned, shared by its chunks: Sent Items lookups, outbox rows
    by send id, contacts by address."""

    sent: dict[tuple[str, str, str], str | None] = field(default_factory=dict)
    rows: dict[str, SentRow | None] = field(default_factory=dict)
    contacts: dict[str, list[int]] = field(default_factory=dict)
    index: dict[str, str] | None = None  # Sent Items listing, once per sync when worth it
    failed: dict[tuple[str, str, str], Exception] = field(default_factory=dict)  # refused lookups
    broken: dict[str, Exception] = field(default_factory=dict)  # graph id -> attachments refused


SENT_INDEX_THRESHOLD = 50  # threaded replies on a page that make one listing cheaper


_IN_REPLY_TO = re.compile(r"<[^<>\s]+>")


_Pending = list[tuple[int, "str | tuple[int, ...]", Future[Any]]]


def _submit(
    pool: ThreadPoolExecutor, policy: InboxPolicy, reader: InboxReader, box: str,
    items: list[dict[str, Any]], messages: list[Inbound], caches: _Caches,
) -> _Pending:
    """Start a page's Graph reads: NDR attachments (``BATCH_SIZE`` NDRs a JSON batch), and the
    Sent Items lookup of each reply's In-Reply-To (each id once)."""
    out: _Pending = []
    ndrs: list[int] = []

    def flush() -> None:
        if ndrs:
            ids = [messages[i].graph_id for i in ndrs]
            out.append((ndrs[0], tuple(ndrs), pool.submit(reader.attachments_many, box, ids)))
            ndrs.clear()

    for i, (item, msg) in enumerate(zip(items, messages, strict=True)):
        if policy.read_body and _needs_attachments(item, msg):
            ndrs.append(i)
            if len(ndrs) == BATCH_SIZE:
                flush()
            continue
        for mid in _IN_REPLY_TO.findall(msg.headers.get("in-reply-to", ""))[:1]:
            key = (box, "internetMessageId", mid)
            if key not in caches.sent and caches.index is not None and mid in caches.index:
                caches.sent[key] = caches.index[mid]
            if key not in caches.sent:
                caches.sent[key] = None
                out.append((i, mid, pool.submit(reader.sent_send_id, box,
                                                "internetMessageId", mid)))
    flush()
    out.sort(key=lambda entry: entry[0], reverse=True)  # popped from the end, lowest first
    return out


def _collect(pending: _Pending, messages: list[Inbound], caches: _Caches, *, upto: int,
             reader: InboxReader) -> None:
    """Wait for the reads of messages before ``upto`` and put their results in place. A read
    Graph refuses for one message is kept in ``caches`` (that message becomes an ``error``);
    a refused batch of attachment reads is read again one message at a time."""
    box = messages[0].mailbox if messages else ""
    while pending and pending[-1][0] < upto:
        _, what, future = pending.pop()
        try:
            found = future.result()
        except Exception as exc:
            if not message_fault(exc):
                raise
            if isinstance(what, tuple):
                found = _attachments_one_by_one(reader, box, [messages[i] for i in what],
                                                caches)
            else:
                caches.failed[(box, "internetMessageId", what)] = exc
                continue
        if isinstance(what, tuple):
            for i in what:
                got = found.get(messages[i].graph_id, [])
                messages[i] = replace(messages[i], attachments=tuple(
                    Attachment(no_nul(a.content_type), no_nul(a.text)) for a in got))
        else:
            caches.sent[(box, "internetMessageId", what)] = found


def _attachments_one_by_one(reader: InboxReader, box: str, messages: list[Inbound],
                            caches: _Caches) -> dict[str, list[Attachment]]:
    found: dict[str, list[Attachment]] = {}
    for msg in messages:
        try:
            found.update(reader.attachments_many(box, [msg.graph_id]))
        except Exception as exc:
            if not message_fault(exc):
                raise
            caches.broken[msg.graph_id] = exc
    return found


def _referenced_send_ids(messages: Sequence[Inbound], caches: _Caches) -> list[str]:
    """Send ids these messages will ask for: in NDR attachments and resolved In-Reply-To."""
    out = [m.group(1) for msg in messages for a in msg.attachments
           for m in [_SEND_ID_IN_TEXT.search(a.text[:SCAN_LIMIT])] if m]
    for msg in messages:
        for mid in _IN_REPLY_TO.findall(msg.headers.get("in-reply-to", ""))[:1]:
            found = caches.sent.get((msg.mailbox, "internetMessageId", mid))
            if found:
                out.append(found)
    return out


_SEND_ID_IN_TEXT = re.compile(r"^[ \t]*x-comms-send-id:\s*([A-Za-z0-9._-]+)", re.I | re.M)
