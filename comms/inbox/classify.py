"""The inbox classifier (pure): one inbound message -> what it is, for which outbox row or
customer, and the rule that decided. No I/O: what the ledger or Sent Items know comes through a
``Resolver`` the caller passes (the sync service's asks the database and Graph, tests pass
dicts).

Rules, first match wins:

1. **bounce** — a non-delivery report (``X-MS-Exchange-Message-Is-Ndr``, a
   ``multipart/report; report-type=delivery-status``, or from postmaster / mailer-daemon /
   Exchange's system mailbox with an "Undeliverable"-like subject). Status code from the
   delivery-status part (``Status: 5.1.1``), else from the text (``550 5.1.1``); 5.x.x hard,
   4.x.x soft, none found: soft. Matched to the outbox row by ``x-comms-send-id`` in the
   attached original (or its headers, or the NDR's text), else by the original's Message-ID
   looked up in Sent Items. An NDR that matches no row is *unmatched*.
2. **unmatched** (internal) — a reply or auto-reply to an internal note or alert (the account
   manager answering us): recorded for the operator, no effect on the customer.
3. **auto** — ``Auto-Submitted`` other than ``no``, ``X-Auto-Response-Suppress``,
   ``X-Autoreply``/``X-Autorespond``, ``Precedence: auto_reply``/``bulk``/``junk``, or an
   "Automatic reply:"-like subject (several languages).
4. **optout** / **reply** — from a customer found by ``In-Reply-To``/``References`` (a message
   we sent), else the conversation, else the sender being one customer's contact. Opt-out only
   when the sender is a contact of that customer and ``optout_keyword`` finds a phrase that
   counts (about our emails, not negated, not about the subscription, not quoted or in the
   signature); otherwise a reply, read by a human. A sender who is a contact of several
   customers (no thread), or of other customers than the thread's, opts out too: no customer,
   the address suppressed.
5. **unmatched** — anything else; listed for an operator, never acted on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from comms.domain import canonical_address
from comms.inbox.phrases import optout_keyword

SEND_ID_HEADER = "x-comms-send-id"
NDR_SENDERS = ("postmaster", "mailer-daemon", "microsoftexchange329e71ec88ae4615bbc36ab6ce41109e")
_NDR_SUBJECT = re.compile(
    r"^\s*(undeliverable|undelivered mail|delivery status notification|delivery has failed|"
    r"failure notice|mail delivery failed|returned mail|unzustellbar|nicht zustellbar|"
    r"non remis|non distribuable|onbestelbaar|no se puede entregar|non recapitabile)",
    re.IGNORECASE,
)
_AUTO_SUBJECT = re.compile(
    r"^\s*(automatic reply|auto(matic)?[- ]?reply|autoreply|out of (the )?office|"
    r"abwesenheitsnotiz|automatische antwort|réponse automatique|automatisch antwoord|"
    r"respuesta automática|risposta automatica)\b",
    re.IGNORECASE,
)
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# Line starts take "[ \t]*", never "\s*": with MULTILINE, "^\s*" would run on across every
# blank line after each line start (quadratic on a report of blank lines).
_DSN_STATUS = re.compile(r"^[ \t]*Status:\s*([245]\.\d{1,3}\.\d{1,3})",
                         re.IGNORECASE | re.MULTILINE)
_FINAL_RECIPIENT = re.compile(
    r"^[ \t]*(?:Final|Original)-Recipient:\s*rfc822;\s*<?([^\s>]+@[^\s>]+)>?",
    re.IGNORECASE | re.MULTILINE,
)
_SEND_ID_LINE = re.compile(
    r"^[ \t]*x-comms-send-id:\s*([A-Za-z0-9._-]+)", re.IGNORECASE | re.MULTILINE
)
_MESSAGE_ID_LINE = re.compile(r"^[ \t]*Message-ID:\s*(<[^>\s]+>)", re.IGNORECASE | re.MULTILINE)
_ANGLE_ID = re.compile(r"<[^<>\s]+>")
# Linear: a match starts only where a run of address characters starts, and the run is taken
# whole (possessive), so a long run without "@" is scanned once, not once per position.
_ADDRESS = re.compile(r"(?<![A-Za-z0-9._%+'-])[A-Za-z0-9._%+'-]++@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# How much of an NDR's text and of each attachment is searched for status codes, send ids,
# Message-IDs and addresses: they are in the first lines of a report or of the attached
# original's headers, and a bounded scan keeps a huge (or hostile) report from holding the
# sync's write transaction.
SCAN_LIMIT = 64 * 1024

@dataclass(frozen=True)
class Attachment:
    """An attachment as the reader decoded it: its content type and text (headers, DSN, MIME)."""

    content_type: str
    text: str


@dataclass(frozen=True)
class Inbound:
    """One message read from a sender mailbox's Inbox."""

    mailbox: str
    graph_id: str
    subject: str = ""
    from_address: str = ""
    text: str = ""  # body as plain text (or bodyPreview); "" without Mail.Read
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    internet_message_id: str = ""
    conversation_id: str = ""
    received_at: datetime | None = None
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class SentRow:
    """An outbox row as the classifier needs it."""

    message_id: int
    customer_id: int
    recipients: tuple[str, ...]  # lower-case to + cc
    message: str = ""
    internal: bool = False  # a note or alert to the account manager, not mail to the customer


class Resolver(Protocol):
    """What the classifier may ask about the ledger and Sent Items (all lookups may miss)."""

    def row_by_send_id(self, send_id: str) -> SentRow | None: ...

    def send_id_by_internet_message_id(self, mailbox: str, internet_message_id: str
                                       ) -> str | None: ...

    def customer_by_conversation(self, mailbox: str, conversation_id: str) -> int | None: ...

    def customers_by_contact(self, address: str) -> Sequence[int]: ...


@dataclass(frozen=True)
class Verdict:
    kind: str  # bounce | auto | reply | optout | unmatched
    rule: str  # which rule decided, e.g. "bounce:send-id in attached original"
    detail: str = ""
    customer_id: int | None = None
    message_id: int | None = None  # outbox row (bounces; replies found by In-Reply-To)
    address: str = ""  # bounced recipient, or the replying address
    status_code: str = ""
    hard: bool = False
    keyword: str = ""
    internal: bool = False  # a bounce of a note or proof to us, not of the customer's mail
    # An opt-out that names no customer (suppression is per address): why it names none.
    unscoped: str = ""


def _from_localpart(address: str) -> str:
    return address.partition("@")[0].lower()


def is_ndr(msg: Inbound) -> bool:
    headers = msg.headers
    if "x-ms-exchange-message-is-ndr" in headers:
        return True
    ctype = headers.get("content-type", "").lower()
    if "multipart/report" in ctype and "delivery-status" in ctype:
        return True
    return _from_localpart(msg.from_address) in NDR_SENDERS and bool(
        _NDR_SUBJECT.match(msg.subject)
    )


def is_auto_reply(msg: Inbound) -> bool:
    headers = msg.headers
    auto = headers.get("auto-submitted", "").strip().lower()
    if auto and auto != "no":
        return True
    if any(h in headers for h in ("x-auto-response-suppress", "x-autoreply", "x-autorespond")):
        return True
    # Vacation programs and ticket systems that predate Auto-Submitted mark their answers
    # bulk or junk; a person's own reply never carries it ("list" does: a list relays people).
    if headers.get("precedence", "").strip().lower() in ("auto_reply", "auto-reply", "bulk",
                                                         "junk"):
        return True
    return bool(_AUTO_SUBJECT.match(msg.subject))


def status_code(msg: Inbound) -> tuple[str, str]:
    """The NDR's enhanced status code and where it was found ("" when none)."""
    for a in msg.attachments:
        if "delivery-status" in a.content_type.lower():
            m = _DSN_STATUS.search(a.text[:SCAN_LIMIT])
            if m:
                return m.group(1), "delivery-status part"
    m = _STATUS.search(msg.text[:SCAN_LIMIT])
    if m:
        return m.group(0), "report text"
    m = _STATUS.search(msg.subject)
    if m:
        return m.group(0), "subject"
    return "", ""


def _original_send_id(msg: Inbound) -> tuple[str, str]:
    for a in msg.attachments:
        m = _SEND_ID_LINE.search(a.text[:SCAN_LIMIT])
        if m:
            return m.group(1), "send id in the attached original"
    value = msg.headers.get(SEND_ID_HEADER, "").strip()
    if value:
        return value, "send id in the report's headers"
    m = _SEND_ID_LINE.search(msg.text[:SCAN_LIMIT])
    if m:
        return m.group(1), "send id in the report's text"
    return "", ""


def _original_message_ids(msg: Inbound) -> list[str]:
    out: list[str] = []
    for a in msg.attachments:
        out += _MESSAGE_ID_LINE.findall(a.text[:SCAN_LIMIT])
    for name in ("in-reply-to", "references"):
        out += _ANGLE_ID.findall(msg.headers.get(name, ""))
    return list(dict.fromkeys(out))


def _bounced_address(msg: Inbound, row: SentRow) -> tuple[str, str]:
    """(the recipient of ``row`` the NDR is for, or "" when it cannot be told; why not)."""
    found: list[str] = []
    for a in msg.attachments:
        found += _FINAL_RECIPIENT.findall(a.text[:SCAN_LIMIT])
    found += _ADDRESS.findall(msg.text[:SCAN_LIMIT]) + _ADDRESS.findall(msg.subject[:SCAN_LIMIT])
    ours = {canonical_address(msg.mailbox), canonical_address(msg.from_address)}
    named = [a for a in map(canonical_address, found) if a not in ours
             and _from_localpart(a) not in NDR_SENDERS]
    recipients = [canonical_address(r) for r in row.recipients]
    for address in named:
        if address in recipients:
            return address, ""
    if named:
        # The report names someone we did not mail (a forward, an alias expanded downstream):
        # the recipient that forwarded it got the message; no address is guessed.
        return "", f"the report names {named[0]}, not a recipient of outbox #{row.message_id}"
    if len(recipients) == 1:
        return recipients[0], ""
    return "", f"the report names none of the {len(row.recipients)} recipients"




def _classify_bounce(msg: Inbound, resolver: Resolver) -> Verdict:
    code, code_where = status_code(msg)
    hard = code.startswith("5")
    send_id, where = _original_send_id(msg)
    row = resolver.row_by_send_id(send_id) if send_id else None
    if row is None:
        for mid in _original_message_ids(msg):
            found = resolver.send_id_by_internet_message_id(msg.mailbox, mid)
            row = resolver.row_by_send_id(found) if found else None
            if row is not None:
                where = f"original Message-ID {mid} found in Sent Items"
                break
    severity = ("hard" if hard else "soft") if code else "soft (no status code)"
    detail = f"{code or 'no code'} ({code_where or 'not found'}), {severity}"
    if row is None:
        return Verdict("unmatched", "bounce-unmatched: no send id or known Message-ID",
                       detail=detail, status_code=code, hard=hard)
    address, unknown = _bounced_address(msg, row)
    if unknown:
        detail += f"; recipient unknown: {unknown}; nothing suppressed"
    return Verdict(
        "bounce", f"bounce:{where}", detail=detail, customer_id=row.customer_id,
        message_id=row.message_id, address=address, status_code=code, hard=hard,
        internal=row.internal)


def _find_customer(msg: Inbound, resolver: Resolver,
                   contact_of: list[int]) -> tuple[int | None, int | None, str]:
    """(customer, outbox row, rule) for a reply or auto-reply; ``contact_of``: the customers
    the sender is a contact of."""
    ids = _ANGLE_ID.findall(msg.headers.get("in-reply-to", ""))
    ids += list(reversed(_ANGLE_ID.findall(msg.headers.get("references", ""))))
    for mid in dict.fromkeys(ids):
        send_id = resolver.send_id_by_internet_message_id(msg.mailbox, mid)
        row = resolver.row_by_send_id(send_id) if send_id else None
        if row is not None and row.internal:
            return None, row.message_id, INTERNAL
        if row is not None:
            return row.customer_id, row.message_id, "In-Reply-To/References"
    if msg.conversation_id:
        cid = resolver.customer_by_conversation(msg.mailbox, msg.conversation_id)
        if cid is not None:
            return cid, None, "conversation"
    if len(contact_of) == 1:
        return contact_of[0], None, "sender is a contact"
    if len(contact_of) > 1:
        return None, None, f"sender is a contact of {len(contact_of)} customers (ambiguous)"
    return None, None, ""


INTERNAL = "answers an internal note"


def classify(msg: Inbound, resolver: Resolver, optout_keywords: Sequence[str],
             optout_commands: Sequence[str] = ()) -> Verdict:
    """What ``msg`` is (see the module docstring for the rules, applied in order)."""
    if is_ndr(msg):
        return _classify_bounce(msg, resolver)
    sender = canonical_address(msg.from_address)
    contact_of = list(dict.fromkeys(resolver.customers_by_contact(sender))) if sender else []
    customer, row, how = _find_customer(msg, resolver, contact_of)
    if how == INTERNAL:
        # The account manager answering our note or alert: nothing it says is the customer's.
        return Verdict("unmatched", f"unmatched: {INTERNAL} (outbox #{row}), not the customer",
                       detail="a reply to an internal message; no effect on the customer",
                       message_id=row, address=sender)
    if is_auto_reply(msg):
        return Verdict("auto", "auto-reply: " + _auto_reason(msg), customer_id=customer,
                       message_id=row, address=sender)
    keyword = (optout_keyword(msg.subject, msg.text, optout_keywords, optout_commands)
               if customer is not None or contact_of else "")
    if keyword and contact_of and customer not in contact_of:
        # Suppression is per address: a contact of several customers (no thread tells which),
        # or of other customers than the thread's, opts out of all of them.
        unscoped = ("matched to several customers" if customer is None
                    else "from another customer's contact")
        thread = "" if customer is None else f", in a thread of customer #{customer}"
        return Verdict("optout", f"optout:keyword {keyword!r}; {how}" + (
                           f"; sender is a contact of {len(contact_of)} other customer(s)"
                           if customer is not None else ""),
                       address=sender, keyword=keyword, unscoped=unscoped,
                       detail=f"opt-out phrase {keyword!r} from {sender}, a contact of "
                              f"{len(contact_of)} customer(s){thread}: the address is "
                              "suppressed")
    if customer is None:
        return Verdict("unmatched", f"unmatched: {how or 'no reference, unknown sender'}",
                       address=sender)
    if keyword and customer not in contact_of:
        # Only a contact opts out: the account manager (Cc'd) or a colleague asking to stop is
        # read by a human.
        return Verdict("reply", f"reply:{how}; opt-out phrase from a non-contact",
                       detail=f"opt-out phrase {keyword!r} from {sender}, not a contact of the "
                              "customer: not acted on", customer_id=customer, message_id=row,
                       address=sender)
    if keyword:
        return Verdict("optout", f"optout:keyword {keyword!r}; customer by {how}",
                       customer_id=customer, message_id=row, address=sender, keyword=keyword)
    return Verdict("reply", f"reply:{how}", customer_id=customer, message_id=row, address=sender)


def _auto_reason(msg: Inbound) -> str:
    headers = msg.headers
    for name in ("auto-submitted", "x-auto-response-suppress", "x-autoreply", "x-autorespond",
                 "precedence"):
        if name in headers:
            return f"{name}: {headers[name]}".strip()
    return "subject"
