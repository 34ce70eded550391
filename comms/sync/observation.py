"""What sync last observed of a customer's direct subscription, for templates (``observed``).

A template says "we see that your old subscription is still active (checked on ...)" only when
the customer has an ``Observation`` whose ``direct_status`` is Enabled; with None it must not
claim anything. The one customer loader (``comms.store.repo.load_customers``) attaches it to
every ``CustomerInfo``, so planning, sending and preview word the same email the same way.
"""

from __future__ import annotations

from sqlmodel import Session

from comms.domain import Observation
from comms.store.repo import latest_observations

__all__ = ["Observation", "observation_for"]


def observation_for(session: Session, customer_id: int) -> Observation | None:
    """The latest observation of the customer's tenant, or None when sync never saw it."""
    return latest_observations(session, [customer_id]).get(customer_id)
