"""The outbox: queue, claim, dispatch, reconcile — the exactly-once loop (docs/architecture.md).

A message row moves through these statuses::

    queued ──claim──> sending ──202──────────────> sent
      ^                 │  ├──definite rejection──> failed
      │                 │  ├──429 (not accepted)──> queued (send_after = now + Retry-After)
      │                 │  └──timeout/reset/TLS break/5xx──> unknown
      │                 └──lease expired (worker killed)──> unknown
      │                                                       │
      └──── not in Sent Items after the grace period ─────────┤
                               found in Sent Items ──> sent ──┘
    queued ──stage change / opt-out──> withdrawn

1. Planning inserts rows with a unique key (customer, message, sequence), in the same
   transaction as the decision: planning twice cannot queue twice.
2. A claim takes a pacing slot and flips one row queued -> sending with a lease, in one
   transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's write lock otherwise).
3. Every request carries the row's send id (``x-comms-send-id`` and an extended property).
4. An ambiguous outcome is never retried blindly: the send id is looked up in the sender's Sent
   Items first; without Mail.Read the row waits for `comms outbox resolve`.

Leases, slots and the reconciliation grace run on the real clock; ``send_after``/``sent_at`` on
the run's clock (the real clock, or a simulated one with ``comms run --now``).
"""

from __future__ import annotations

from comms.outbox.claims import (
    Claimed,
    DispatchReport,
    ambiguous_mailboxes,
    claim,
    expire_leases,
    put_back,
    record,
)
from comms.outbox.dispatcher import Dispatcher, ProgressFn
from comms.outbox.queue import (
    BY_OPERATOR,
    HELD,
    OPEN,
    PENDING,
    Clock,
    addresses_json,
    insert_messages,
    queue_messages,
    withdraw_all_queued,
    withdraw_for_new_content,
    withdraw_stale,
)
from comms.outbox.reconcile import Episode, ReconcileLimits, reconcile, resolve

__all__ = [
    "BY_OPERATOR",
    "HELD",
    "OPEN",
    "PENDING",
    "Claimed",
    "Clock",
    "DispatchReport",
    "Dispatcher",
    "Episode",
    "ProgressFn",
    "ReconcileLimits",
    "addresses_json",
    "ambiguous_mailboxes",
    "claim",
    "expire_leases",
    "insert_messages",
    "put_back",
    "queue_messages",
    "reconcile",
    "record",
    "resolve",
    "withdraw_all_queued",
    "withdraw_for_new_content",
    "withdraw_stale",
]
