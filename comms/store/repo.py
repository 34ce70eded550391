"""Ledger rows <-> the plain domain views the pure core works on, and lookups by customer key.

Everything here takes an open ``Session`` (the caller owns the transaction) and never reads the
clock: times come in as arguments.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlmodel import Session, col, select

from comms.domain import ContactInfo, CustomerInfo
from comms.errors import NotFound
from comms.stages import Event
from comms.store.models import Contact, Customer, CustomerTag, StageEvent, Suppression

# Contact roles in the order they are listed and exported.
ROLE_ORDER = ("primary", "billing", "technical")

# Suggesting similar keys scans every key; above this many customers it is not worth the wait.
_SUGGEST_LIMIT = 20_000


def _role_rank(role: str) -> int:
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)


def customer_infos(session: Session, rows: Sequence[Customer]) -> list[CustomerInfo]:
    """Domain views of many customers with three queries in all (contacts, tags, suppressions)."""
    ids = [r.id for r in rows if r.id is not None]
    contacts: dict[int, list[Contact]] = defaultdict(list)
    tags: dict[int, list[str]] = defaultdict(list)
    suppressed: set[str] = set()
    # Chunked so a 100,000-customer list stays within every database's parameter limit.
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        for c in session.exec(
            select(Contact).where(col(Contact.customer_id).in_(chunk)).order_by(col(Contact.id))
        ):
            contacts[c.customer_id].append(c)
        for t in session.exec(
            select(CustomerTag).where(col(CustomerTag.customer_id).in_(chunk))
        ):
            tags[t.customer_id].append(t.tag)
        emails = sorted({c.email.lower() for cid in chunk for c in contacts[cid]})
        for e_start in range(0, len(emails), 5000):
            suppressed.update(
                session.exec(
                    select(Suppression.email).where(
                        sa.func.lower(col(Suppression.email)).in_(emails[e_start : e_start + 5000])
                    )
                ).all()
            )
    suppressed = {e.lower() for e in suppressed}
    out: list[CustomerInfo] = []
    for row in rows:
        assert row.id is not None, "customer row must be flushed before conversion"
        cs = sorted(contacts[row.id], key=lambda c: (_role_rank(c.role), c.id or 0))
        out.append(
            CustomerInfo(
                id=row.id,
                key=row.key,
                name=row.name,
                licences=row.licences,
                stage=row.stage,
                stage_entered_at=row.stage_entered_at,
                locale=row.locale,
                time_zone=row.time_zone,
                tenant_id=row.tenant_id,
                primary_domain=row.primary_domain,
                paused=row.paused,
                opted_out=row.opted_out,
                lost=row.lost,
                account_manager_name=row.account_manager_name,
                account_manager_email=row.account_manager_email,
                tags=tuple(sorted(tags[row.id])),
                contacts=tuple(
                    ContactInfo(
                        name=c.name,
                        email=c.email,
                        role=c.role,
                        suppressed=c.email.lower() in suppressed,
                    )
                    for c in cs
                ),
                csp_live_at=row.csp_live_at,
            )
        )
    return out


def customer_info(session: Session, customer: Customer) -> CustomerInfo:
    """The domain view of one customer row: contacts (with suppression), tags, flags."""
    return customer_infos(session, [customer])[0]


def record_event(session: Session, customer: Customer, event: Event) -> StageEvent:
    """Append one audit-trail entry for ``customer`` (never updated or deleted afterwards)."""
    assert customer.id is not None, "customer row must be flushed before recording events"
    row = StageEvent(
        customer_id=customer.id,
        kind=event.kind,
        from_stage=event.from_stage,
        to_stage=event.to_stage,
        at=event.at,
        by=event.by,
        source=event.source,
        note=event.note,
        forced=event.forced,
    )
    session.add(row)
    return row


def _suggestion(session: Session, key: str) -> str:
    count = session.exec(select(sa.func.count()).select_from(Customer)).one()
    if count == 0:
        return " The ledger is empty; import customers with `comms customers import FILE.csv`."
    if count <= _SUGGEST_LIMIT:
        keys = list(session.exec(select(Customer.key)).all())
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        if close:
            return f" Did you mean {', '.join(close)}?"
    return " List the keys with `comms customers list`."


def get_customer(session: Session, key: str, *, lock: bool = False) -> Customer:
    """The customer row with this key, or ``NotFound`` suggesting similar keys.

    ``lock`` takes a row lock on PostgreSQL (``FOR UPDATE``) for a read-then-write change; on
    SQLite open the session with ``immediate=True`` instead.
    """
    query = select(Customer).where(col(Customer.key) == key)
    row = session.exec(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFound(f"No customer with key {key!r}.{_suggestion(session, key)}")
    return row


def get_customers(
    session: Session, keys: Iterable[str], *, lock: bool = False
) -> list[Customer]:
    """The rows for ``keys`` in the order given; ``NotFound`` naming every missing key.

    ``lock``: as for ``get_customer``.
    """
    wanted = list(dict.fromkeys(keys))
    found: dict[str, Customer] = {}
    for start in range(0, len(wanted), 5000):
        chunk = wanted[start : start + 5000]
        query = select(Customer).where(col(Customer.key).in_(chunk))
        for row in session.exec(query.with_for_update() if lock else query):
            found[row.key] = row
    missing = [k for k in wanted if k not in found]
    if len(missing) == 1:
        raise NotFound(f"No customer with key {missing[0]!r}.{_suggestion(session, missing[0])}")
    if missing:
        raise NotFound(
            f"No customers with keys {', '.join(repr(k) for k in missing)}. "
            "List the keys with `comms customers list`."
        )
    return [found[k] for k in wanted]


def find_customers(
    session: Session, *, stage: str | None = None, tag: str | None = None
) -> list[Customer]:
    """Customers filtered by stage and/or tag (tags are compared lower-cased), ordered by key."""
    query = select(Customer)
    if stage:
        query = query.where(col(Customer.stage) == stage)
    if tag:
        tagged = select(CustomerTag.customer_id).where(col(CustomerTag.tag) == tag.strip().lower())
        query = query.where(col(Customer.id).in_(tagged))
    return list(session.exec(query.order_by(col(Customer.key))).all())


def events_of(session: Session, customer_id: int) -> list[StageEvent]:
    """A customer's audit trail, oldest first."""
    return list(
        session.exec(
            select(StageEvent)
            .where(col(StageEvent.customer_id) == customer_id)
            .order_by(col(StageEvent.at), col(StageEvent.id))
        ).all()
    )
