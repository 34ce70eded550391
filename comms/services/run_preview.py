"""What `comms run --dry-run` lists: who would get which message, in which locale, from when."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from comms import planner
from comms.domain import CustomerInfo


@dataclass(frozen=True)
class PreviewRow:
    """One message a dry run would queue: who gets what, in which locale, from when (UTC)."""

    key: str
    message: str
    sequence: int
    locale: str
    send_after: datetime
    time_zone: str
    to: tuple[str, ...]



def preview_rows(customer: CustomerInfo, p: planner.Plan, now: datetime,
                 rows: list[dict[str, Any]],
                 deferred_locales: list[str]) -> list[PreviewRow]:
    """The dry run's rows for one customer: due messages now (their locales from the rendered
    ``rows`` of this batch, the customer's last), deferred ones at the window's opening."""
    out = []
    due_locales = [r["locale"] for r in rows[len(rows) - len(p.due):]] if p.due else []
    for pm, loc in zip(p.due, due_locales, strict=True):
        out.append(PreviewRow(customer.key, pm.message, pm.sequence, loc, now,
                              customer.time_zone, tuple(c.email for c in pm.to)))
    for pm, loc in zip(p.deferred, deferred_locales, strict=True):
        out.append(PreviewRow(customer.key, pm.message, pm.sequence, loc,
                              p.next_due_at or now, customer.time_zone,
                              tuple(c.email for c in pm.to)))
    return out
