"""The transport interface: send one rendered message and return its outcome; close.

Transports never raise for one message's fate; they return a ``SendResult``. They raise
``DeliveryError``/``AuthError`` only when the transport cannot be used at all (bad config,
no token obtainable).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# Fixed GUID namespace of comms' extended property; the send id is its value. Never change it:
# reconciliation of messages sent by earlier versions depends on it.
SEND_ID_PROPERTY_ID = "String {6d2f9a57-3c1e-4b8e-9f3a-0c6a7e5d4b21} Name CommsSendId"
SEND_ID_HEADER = "x-comms-send-id"


@dataclass(frozen=True)
class Address:
    address: str
    name: str = ""


@dataclass(frozen=True)
class OutgoingEmail:
    send_id: str
    sender: str
    to: tuple[Address, ...]
    subject: str
    html: str
    text: str
    cc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    # Extra x- headers (the send id header is always added by the transport).
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def recipient_count(self) -> int:
        return len(self.to) + len(self.cc)


def compose_email(
    *, send_id: str, sender: str, sender_name: str, to: tuple[Address, ...],
    cc: tuple[Address, ...] = (), reply_to: str, subject: str, html: str, text: str,
) -> OutgoingEmail:
    """The one way a message becomes an ``OutgoingEmail``: the dispatcher's send and
    ``comms preview -f eml`` both call it, so the previewed headers are the sent ones."""
    return OutgoingEmail(
        send_id=send_id,
        sender=sender,
        to=to,
        cc=cc,
        reply_to=(Address(reply_to, sender_name),) if reply_to else (),
        subject=subject,
        html=html,
        text=text,
        headers=((SEND_ID_HEADER, send_id),),
    )


class Outcome(enum.StrEnum):
    SENT = "sent"  # accepted (Graph 202)
    THROTTLED = "throttled"  # not accepted; try again after retry_after
    FAILED = "failed"  # definitely rejected; do not retry without a change
    UNKNOWN = "unknown"  # may or may not have been accepted; reconcile before any resend


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    status: int | None = None
    retry_after: float | None = None
    error_code: str = ""
    message: str = ""
    request_id: str = ""
    details: dict[str, str] = field(default_factory=dict)
    # We stopped waiting but the request may still be running at Exchange (a client-side
    # timeout): its concurrency slot stays taken until Exchange can no longer be working on it.
    maybe_in_flight: bool = False


@runtime_checkable
class Transport(Protocol):
    """Sends one message. Implementations: GraphTransport, OutboxDirTransport.

    One transport object is shared by the dispatch threads: it keeps no per-call state that
    another thread could see. ``close`` releases its connections; whoever built it closes it.
    """

    def send(self, email: OutgoingEmail) -> SendResult: ...

    def close(self) -> None: ...


class LookupUnavailable(Exception):
    """A Sent Items lookup failed for now (throttled, 5xx, timeout): ask again later.

    ``retry_after``: Graph said when (429/503); ``maybe_in_flight``: we gave up waiting (a
    timeout) and the read may still run at Exchange, holding a concurrency slot there."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 maybe_in_flight: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.maybe_in_flight = maybe_in_flight


@runtime_checkable
class Reconciler(Protocol):
    """Looks a send id up where accepted messages end up (Graph: the sender's Sent Items).

    Returns True (found: it was sent), False (not there), or None (cannot tell, ever: no
    permission to read that mailbox; an operator decides). Raises ``LookupUnavailable`` when
    the lookup failed for now.
    """

    def find_sent(self, sender: str, send_id: str) -> bool | None: ...
