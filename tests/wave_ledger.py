"""A demo-like ledger for the per-wave figures (issue 15): three waves, three account managers
with long names, customers with long names, stage history, sent messages, and inbound bounces
and replies. The expected figures in the docstring of ``build_wave_ledger`` are worked out by
hand; tests of the manager figures, the report, `comms status` and the report in Chromium use it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from test_status import NOW, add_customer, add_message, ago

from comms.store.db import Database
from comms.store.inbox_models import InboundMessage
from comms.store.models import CustomerTag, StageEvent

SPRING = "spring-2026-north-europe-enterprise-customers"  # long and without spaces
AUTUMN = "autumn 2026"
PILOT = "pilot"

ANN = ("Maximiliane Wolkenstein-Rodenegg", "maximiliane.wolkenstein-rodenegg@partner.example")
BOB = ("Bartholomew Featherstonehaugh", "bartholomew.featherstonehaugh@partner.example")
CY = ("Cy Young", "cy@partner.example")

LONG = "Internationale Versicherungs- und Rückversicherungsgesellschaft Aktiengesellschaft"

STAGES = ("imported", "announced", "invited", "approved", "awaiting_cancellation", "completed")


def _inbound(s: Any, n: int, kind: str, customer_id: int | None, *, hard: bool = False,
             at: datetime = NOW) -> None:
    s.add(InboundMessage(
        mailbox="transition@partner.example", graph_id=f"g-{n}", kind=kind, hard=hard,
        customer_id=customer_id, address=f"it{n}@customer.example", subject="Re: invitation",
        received_at=at, processed_at=at, status_code="5.1.1" if hard else "",
    ))


def _history(s: Any, customer_id: int, stage: str, entered: datetime) -> None:
    """Stage events for every step up to ``stage``, one day apart, ending at ``entered``."""
    steps = STAGES[: STAGES.index(stage) + 1]
    for i, to in enumerate(steps):
        s.add(StageEvent(customer_id=customer_id, kind="stage",
                         from_stage=steps[i - 1] if i else None, to_stage=to,
                         at=entered - timedelta(days=len(steps) - 1 - i), source="test"))


def build_wave_ledger(db: Database) -> dict[str, int]:
    """Customers and what the manager figures must say about them.

    Wave SPRING: A1 completed, A2 awaiting_cancellation, A3 invited, A4 imported.
      reached 4, 3, 3, 2, 2, 1 -> conversion -, 75%, 100%, 67%, 100%, 50%.
      inbox: A2 hard bounce, A4 soft bounce, A3 a reply and an auto-reply (not a reply):
      bounces 2 (1 hard), replies 1.
    Wave AUTUMN: B1 approved, B2 approved, A1 (in both waves) completed.
      reached 3, 3, 3, 3, 1, 1 -> conversion -, 100%, 100%, 100%, 33%, 100%; inbox nothing.
    Wave PILOT: P1 imported. reached 1, 0, 0, 0, 0, 0 -> conversion -, 0%, -, -, -, -.
    Untagged: U1 awaiting_cancellation with a reply (counts overall, in no wave); and one
    unmatched inbound message (no customer).
    """
    ids: dict[str, int] = {}
    plan = [
        ("A1", "completed", ANN, (SPRING, AUTUMN), 30),
        ("A2", "awaiting_cancellation", ANN, (SPRING,), 20),
        ("A3", "invited", BOB, (SPRING,), 10),
        ("A4", "imported", BOB, (SPRING,), 5),
        ("B1", "approved", CY, (AUTUMN,), 8),
        ("B2", "approved", BOB, (AUTUMN,), 12),
        ("P1", "imported", CY, (PILOT,), 2),
        ("U1", "awaiting_cancellation", CY, (), 40),
    ]
    with db.session() as s:
        for n, (key, stage, (am, am_email), tags, licences) in enumerate(plan):
            entered = ago(3 + n)
            live = entered if stage == "awaiting_cancellation" else None
            c = add_customer(s, key, stage, entered, licences=licences, csp_live_at=live,
                             name=f"{LONG} {key}")
            c.account_manager_name, c.account_manager_email = am, am_email
            assert c.id is not None
            ids[key] = c.id
            _history(s, c.id, stage, entered)
            for tag in tags:
                s.add(CustomerTag(customer_id=c.id, tag=tag))
            add_message(s, c, "kickoff", 0, "sent", at=ago(1 + n % 4))
        _inbound(s, 1, "bounce", ids["A2"], hard=True)
        _inbound(s, 2, "bounce", ids["A4"])
        _inbound(s, 3, "reply", ids["A3"])
        _inbound(s, 4, "auto", ids["A3"])
        _inbound(s, 5, "reply", ids["U1"])
        _inbound(s, 6, "unmatched", None)
    return ids
