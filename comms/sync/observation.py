"""What sync last observed of a customer's direct subscription, for templates (``observed``).

A template says "we see that your old subscription is still active (checked on ...)" only when
this returns an ``Observation`` with ``direct_active``; with None it must not claim anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from comms.store.sync_models import SyncEvidence
from comms.sync.rules import SyncRules


@dataclass(frozen=True)
class Observation:
    at: datetime
    source: str
    direct_active: bool
    direct_cancelled: bool
    direct_status: str  # Enabled, Warning, Suspended, Deleted, LockedOut or absent
    assigned_licences: int | None


def observation_for(
    session: Session, customer_id: int, rules: SyncRules | None = None
) -> Observation | None:
    """The latest observation of the customer's tenant, or None when sync never saw it."""
    ev = session.exec(
        select(SyncEvidence)
        .where(col(SyncEvidence.customer_id) == customer_id, col(SyncEvidence.source) == "tenant")
        .order_by(col(SyncEvidence.id).desc())
        .limit(1)
    ).first()
    if ev is None:
        return None
    seen = json.loads(ev.seen_json)
    status = str(seen.get("status") or "absent")
    inactive = (rules or SyncRules()).direct_inactive_statuses
    assigned = seen.get("assigned")
    return Observation(
        at=ev.at, source=f"sync:{ev.source}", direct_active=status == "Enabled",
        direct_cancelled=status in inactive, direct_status=status,
        assigned_licences=int(assigned) if assigned is not None else None,
    )
