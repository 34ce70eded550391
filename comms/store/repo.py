"""Ledger rows <-> the plain domain views the pure core works on, and lookups by customer key.

Everything here takes an open ``Session`` (the caller owns the transaction) and never reads the
clock: times come in as arguments.
"""

from __future__ import annotations

import difflib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal

import sqlalchemy as sa
from sqlmodel import Session, col, select

from comms.domain import ContactInfo, CustomerInfo, Event, Observation
from comms.errors import NotFound
from comms.store.inbox_models import reminder_holds
from comms.store.models import Contact, Customer, CustomerTag, StageEvent, Suppression
from comms.store.sync_models import ATTENTION, SyncCheck, SyncEvidence

# Contact roles in the order they are listed and exported.
ROLE_ORDER = ("primary", "billing", "technical")

# Suggesting similar keys scans every key; above this many customers it is not worth the wait.
_SUGGEST_LIMIT = 20_000


def _role_rank(role: str) -> int:
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)


# Rows per IN (...) list: within every database's parameter limit.
_CHUNK = 5000


def load_customers(session: Session, ids: Sequence[int], *,
                   lock: Literal["", "wait", "skip"] = "") -> dict[int, CustomerInfo]:
    """The domain view of many customers by id: the one loader behind planning, sending,
    preview, `customers show/list` and the account manager's note.

    ``lock`` (PostgreSQL; SQLite serialises writers already and ignores it): the customer
    rows stay locked until the caller's transaction ends, so what was read is what the caller
    writes against. ``"skip"`` (the run's planning) leaves out a customer another transaction
    is changing right now (a stage move, an import, stage sync): it stays due and the next run
    plans it on what was committed; without the lock, a move committed while the run planned
    was partly undone by the run's write of the old plan's ``next_due_at``. ``"wait"`` (a
    one-off send checking its customers before queueing) waits for such a change to end.

    Core queries (no ORM objects: this runs for every due customer of a scheduled run).
    Contacts come in role order (primary, billing, technical), then in the order they were
    added, so every reader sees the same recipients in the same order. Suppressions are stored
    normalised (lower case), so contacts are matched by their lower-cased address.
    """
    id_list = list(dict.fromkeys(ids))
    if not id_list:
        return {}
    rows, contacts, tags = _read_customers(session, id_list, lock)
    suppressed = _suppressed(session, {c.email.lower() for cs in contacts.values() for c in cs}
                             | {r.account_manager_email.strip().lower() for r in rows
                                if r.account_manager_email})
    seen = latest_observations(session, id_list)
    held = reminder_holds(session, id_list)
    attention = sync_attention(session, id_list)
    out: dict[int, CustomerInfo] = {}
    for r in rows:
        cs = sorted(contacts.get(r.id, []), key=lambda c: (_role_rank(c.role), c.id))
        out[r.id] = CustomerInfo(
            id=r.id, key=r.key, name=r.name, licences=r.licences, stage=r.stage,
            stage_entered_at=r.stage_entered_at, locale=r.locale, time_zone=r.time_zone,
            tenant_id=r.tenant_id, primary_domain=r.primary_domain, paused=r.paused,
            opted_out=r.opted_out, lost=r.lost, account_manager_name=r.account_manager_name,
            account_manager_email=r.account_manager_email,
            account_manager_suppressed=(r.account_manager_email or "").strip().lower()
            in suppressed,
            tags=tuple(sorted(tags[r.id])),
            contacts=tuple(
                ContactInfo(c.name, c.email, c.role, c.email.lower() in suppressed) for c in cs
            ),
            csp_live_at=r.csp_live_at, observation=seen.get(r.id),
            reminders_held_until=held.get(r.id), sync_attention=attention.get(r.id, ""),
        )
    return out


def sync_attention(session: Session, ids: Sequence[int]) -> dict[int, str]:
    """Customers stage sync reports as needing attention (``ATTENTION``) -> why."""
    out: dict[int, str] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = list(ids[start : start + _CHUNK])
        for cid, problem in session.execute(_attention_read(), {"ids": chunk}).all():
            out[cid] = "; ".join(filter(None, (out.get(cid), problem)))
    return out


@cache
def _attention_read() -> Any:
    checks_t = SyncCheck.__table__  # type: ignore[attr-defined]
    return (sa.select(checks_t.c.customer_id, checks_t.c.problem)
            .where(_ids_in(checks_t.c.customer_id),
                   checks_t.c.problem.startswith(ATTENTION, autoescape=True))
            .order_by(checks_t.c.customer_id, checks_t.c.source))


def _ids_in(column: Any) -> Any:
    """``column IN (...ids)`` with the ids given at execution (``{"ids": [...]}``): the statement
    is built once, and SQLAlchemy does not coerce every id into the statement and its cache
    key each time (most of a small query's cost)."""
    return column.in_(sa.bindparam("ids", expanding=True))


# The columns of a customer its domain view needs (never the bookkeeping columns).
_customer_columns = ("id", "key", "name", "licences", "stage", "stage_entered_at", "locale",
                     "time_zone", "tenant_id", "primary_domain", "paused", "opted_out", "lost",
                     "account_manager_name", "account_manager_email", "csp_live_at")


@cache
def _customer_reads() -> dict[str, Any]:
    customers_t = Customer.__table__  # type: ignore[attr-defined]
    contacts_t = Contact.__table__  # type: ignore[attr-defined]
    tags_t = CustomerTag.__table__  # type: ignore[attr-defined]
    read = sa.select(*(customers_t.c[n] for n in _customer_columns)).where(
        _ids_in(customers_t.c.id))
    return {
        "": read, "wait": read.with_for_update(), "skip": read.with_for_update(skip_locked=True),
        "contacts": sa.select(contacts_t.c.id, contacts_t.c.customer_id, contacts_t.c.name,
                              contacts_t.c.email, contacts_t.c.role)
        .where(_ids_in(contacts_t.c.customer_id)),
        "tags": sa.select(tags_t.c.customer_id, tags_t.c.tag).where(
            _ids_in(tags_t.c.customer_id)),
    }


def _read_customers(
    session: Session, id_list: list[int], lock: Literal["", "wait", "skip"]
) -> tuple[list[Any], dict[int, list[Any]], dict[int, list[str]]]:
    """The customers' rows, contacts and tags, ``_CHUNK`` ids a query."""
    reads = _customer_reads()
    rows: list[Any] = []
    contacts: dict[int, list[Any]] = defaultdict(list)
    tags: dict[int, list[str]] = defaultdict(list)
    for start in range(0, len(id_list), _CHUNK):
        ids = {"ids": id_list[start : start + _CHUNK]}
        rows += session.execute(reads[lock], ids).all()
        for c in session.execute(reads["contacts"], ids).all():
            contacts[c.customer_id].append(c)
        for t in session.execute(reads["tags"], ids).all():
            tags[t.customer_id].append(t.tag)
    return rows, contacts, tags


def latest_observations(session: Session, ids: Sequence[int]) -> dict[int, Observation]:
    """What stage sync last saw of each customer's own tenant (evidence source ``tenant``),
    as of the last time a sync confirmed it.

    Evidence is written when what is seen changes; every sync of the tenant updates its
    ``sync_checks`` row. So the observation is the latest evidence, dated by the latest check
    (``at``: when it was last seen so), and there is none when that check could not read the
    tenant ("cannot verify": what was seen before may have changed since) or when the evidence
    came from another tenant than the customer's current one (a corrected tenant id), or does
    not say which tenant it came from."""
    out: dict[int, Observation] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = list(ids[start : start + _CHUNK])
        latest: dict[int, Any] = {}
        for ev in session.execute(_observations_read(), {"ids": chunk}).all():
            latest[ev.customer_id] = ev  # the last one per customer wins
        for customer_id, ev in latest.items():
            found = _observation(ev)
            if found is not None:
                out[customer_id] = found
    return out


@cache
def _observations_read() -> Any:
    evidence_t = SyncEvidence.__table__  # type: ignore[attr-defined]
    checks_t = SyncCheck.__table__  # type: ignore[attr-defined]
    customers_t = Customer.__table__  # type: ignore[attr-defined]
    return (
        sa.select(evidence_t.c.customer_id, evidence_t.c.at, evidence_t.c.source,
                  evidence_t.c.seen_json, checks_t.c.checked_at, checks_t.c.problem,
                  customers_t.c.tenant_id)
        .join(customers_t, customers_t.c.id == evidence_t.c.customer_id)
        .outerjoin(checks_t, sa.and_(checks_t.c.customer_id == evidence_t.c.customer_id,
                                     checks_t.c.source == evidence_t.c.source))
        .where(_ids_in(evidence_t.c.customer_id), evidence_t.c.source == "tenant")
        .order_by(evidence_t.c.customer_id, evidence_t.c.id)
    )


def _observation(ev: Any) -> Observation | None:
    """One customer's latest tenant evidence as an observation, or None when it cannot be
    stated as current (see ``latest_observations``)."""
    if ev.problem:
        return None
    seen = json.loads(ev.seen_json)
    if str(seen.get("status") or "unknown") == "unknown" or seen.get("several"):
        # Unknown which subscription is the old one (several products still billed): no
        # statement about "the old subscription" can rest on it.
        return None
    # Evidence names the tenant it was read in; evidence without one (recorded before it was
    # recorded) cannot be told apart from a reading of a tenant id corrected since: nothing
    # is stated on it, and the next sync records the tenant (a new digest, so new evidence).
    tenant = str(seen.get("tenant_id") or "").strip().lower()
    if not tenant or tenant != str(ev.tenant_id or "").strip().lower():
        return None
    at = max(_aware(ev.at), _aware(ev.checked_at)) if ev.checked_at else _aware(ev.at)
    assigned = seen.get("assigned")
    return Observation(
        at=at, source=f"sync:{ev.source}",
        direct_status=str(seen["status"]),
        assigned_licences=int(assigned) if assigned is not None else None,
    )


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _suppressed(session: Session, emails: set[str]) -> set[str]:
    """Which of these lower-cased addresses are on the suppression list."""
    ordered = sorted(emails)
    found: set[str] = set()
    for start in range(0, len(ordered), _CHUNK):
        found.update(session.execute(
            _suppressed_read(), {"ids": ordered[start : start + _CHUNK]}).scalars())
    return {e.lower() for e in found}


@cache
def _suppressed_read() -> Any:
    table = Suppression.__table__  # type: ignore[attr-defined]
    return sa.select(table.c.email).where(_ids_in(table.c.email))


def customer_infos(session: Session, rows: Sequence[Customer]) -> list[CustomerInfo]:
    """Domain views of these customer rows, in their order (see ``load_customers``)."""
    loaded = load_customers(session, [r.id for r in rows if r.id is not None])
    out: list[CustomerInfo] = []
    for row in rows:
        assert row.id is not None, "customer row must be flushed before conversion"
        out.append(loaded[row.id])
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
        query = query.where(col(Customer.id).in_(tagged(tag)))
    return list(session.exec(query.order_by(col(Customer.key))).all())


def tagged(tag: str) -> Any:
    """The ids of the customers with ``tag`` (compared lower-cased), as a subquery."""
    return select(CustomerTag.customer_id).where(col(CustomerTag.tag) == tag.strip().lower())


def events_of(session: Session, customer_id: int) -> list[StageEvent]:
    """A customer's audit trail, oldest first."""
    return list(
        session.exec(
            select(StageEvent)
            .where(col(StageEvent.customer_id) == customer_id)
            .order_by(col(StageEvent.at), col(StageEvent.id))
        ).all()
    )


@dataclass(frozen=True)
class EvidenceEntry:
    """One observation stage sync stored for a customer (what was seen, where, when)."""

    id: int
    source: str
    at: datetime
    summary: str


def evidence_of(session: Session, customer_id: int) -> list[EvidenceEntry]:
    """Every observation of one customer, oldest first, summarised for a timeline."""
    out: list[EvidenceEntry] = []
    for ev in session.exec(
        select(SyncEvidence).where(col(SyncEvidence.customer_id) == customer_id)
        .order_by(col(SyncEvidence.id))
    ).all():
        assert ev.id is not None
        seen = json.loads(ev.seen_json)
        parts = [f"{k}={_brief(v)}" for k, v in seen.items()]
        text = ", ".join(parts)
        out.append(EvidenceEntry(ev.id, ev.source, ev.at,
                                 text if len(text) <= 160 else text[:157] + "..."))
    return out


def _brief(value: Any) -> str:
    if isinstance(value, list):
        return f"[{len(value)} item(s)]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in list(value.items())[:4]) + "}"
    return str(value)
