"""From Graph to the classifier: a Graph message resource as an ``Inbound``, and the answers
the classifier asks of the ledger (outbox rows by send id, customers by contact or thread) and
of Sent Items (through the reader, cached for the whole sync)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from comms.domain import canonical_address
from comms.inbox.classify import Inbound, SentRow
from comms.inbox.reader import InboxReader
from comms.store.inbox_models import InboundMessage
from comms.store.models import Contact, Message


def _address(value: Any) -> str:
    if isinstance(value, dict):
        return canonical_address(str((value.get("emailAddress") or {}).get("address") or ""))
    return ""


def _parse_time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_BLOCK_OPEN = re.compile(r"<(script|style|head)\b")
_BREAK = re.compile(r"(?i)<br\s*/?>|</(p|div|tr|li|h[1-6])>")
_TAG = re.compile(r"<[^<>]*>")  # stops at the next "<": linear in the body's length


def _html_text(markup: str) -> str:
    """Readable text of an HTML body (Graph sends text when asked; this covers when not).

    Linear in the body's length (anyone can send one): script, style and head blocks are cut
    with one forward scan instead of a lazy ``.*?`` tried from every opening tag."""
    lower = markup.lower()
    kept: list[str] = []
    pos = 0
    while (m := _BLOCK_OPEN.search(lower, pos)) is not None:
        end = lower.find(f"</{m.group(1)}", m.end())
        if end < 0:
            break  # never closed: kept as text, as a browser would not hide it either
        kept.append(markup[pos:m.start()])
        close = lower.find(">", end)
        pos = len(markup) if close < 0 else close + 1
    kept.append(markup[pos:])
    text = _BREAK.sub("\n", "".join(kept))
    text = html.unescape(_TAG.sub("", text))
    return "\n".join(line.strip() for line in text.splitlines())


def no_nul(text: Any) -> str:
    """``text`` as a string without NUL characters: PostgreSQL refuses them in text columns,
    and anyone can put one in a subject (an encoded word such as ``=?utf-8?b?AA==?=``)."""
    return str(text).replace("\x00", "")


def inbound_from_graph(mailbox: str, item: dict[str, Any]) -> Inbound:
    """A Graph message resource -> the classifier's view (headers lower-cased, no NULs)."""
    headers: dict[str, str] = {}
    for h in item.get("internetMessageHeaders") or []:
        name = no_nul(h.get("name") or "").lower()
        if name and name not in headers:
            headers[name] = no_nul(h.get("value") or "")
    body = item.get("body") or {}
    text = no_nul(body.get("content") or "") if isinstance(body, dict) else ""
    if text and str(body.get("contentType", "")).lower() == "html":
        text = _html_text(text)
    return Inbound(
        mailbox=mailbox.lower(),
        graph_id=str(item["id"]),
        subject=no_nul(item.get("subject") or ""),
        from_address=no_nul(_address(item.get("from")) or _address(item.get("sender"))),
        text=text or no_nul(item.get("bodyPreview") or ""),
        headers=headers,
        internet_message_id=no_nul(item.get("internetMessageId") or ""),
        conversation_id=no_nul(item.get("conversationId") or ""),
        received_at=_parse_time(item.get("receivedDateTime")),
    )


def _sent_row(row: Any) -> SentRow:
    recipients = [canonical_address(d["address"]) for d in json.loads(row.to_json or "[]")]
    recipients += [canonical_address(d["address"]) for d in json.loads(row.cc_json or "[]")]
    return SentRow(int(row.id), int(row.customer_id), tuple(recipients), row.message,
                   bool(row.internal))


class LedgerResolver:
    """Answers the classifier from the ledger, and Sent Items through Graph (cached)."""

    def __init__(self, session: Session, reader: InboxReader | None,
                 sent_cache: dict[tuple[str, str, str], str | None] | None = None,
                 contacts: dict[str, list[int]] | None = None,
                 rows: dict[str, SentRow | None] | None = None,
                 failed: dict[tuple[str, str, str], Exception] | None = None) -> None:
        self.session = session
        self.reader = reader
        # Sent Items lookups Graph refused (one message's fault): raised again, not re-asked.
        self.failed = failed if failed is not None else {}
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
                          col(Message.to_json), col(Message.cc_json), col(Message.message),
                          col(Message.internal))
                .where(col(Message.send_id).in_(chunk))
            ).all():
                self.rows[row.send_id] = _sent_row(row)

    def row_by_send_id(self, send_id: str) -> SentRow | None:
        if send_id in self.rows:
            return self.rows[send_id]
        row = self.session.execute(
            sa.select(col(Message.id), col(Message.customer_id), col(Message.to_json),
                      col(Message.cc_json), col(Message.message), col(Message.internal))
            .where(col(Message.send_id) == send_id)
        ).first()
        return None if row is None else _sent_row(row)

    def _sent(self, mailbox: str, field_name: str, value: str) -> str | None:
        key = (mailbox, field_name, value)
        if key in self.failed:
            raise self.failed[key]
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
        # A thread of an internal note is the account manager's, not the customer's.
        return row.customer_id if row and not row.internal else None

    def customers_by_contact(self, address: str) -> Sequence[int]:
        if address not in self.contacts:
            self.prefetch_contacts([address])
        return self.contacts.get(address, [])
