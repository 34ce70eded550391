"""Upsert validated customer rows into the ledger, in batches, inside the caller's transaction.

The rows come from the CSV reader (``comms.importing``), already valid and normalised. Keys are
matched ignoring case (a unique index on ``lower(key)`` keeps the ledger that way): a row whose
key differs from a stored one only in case updates that customer, and the stored spelling stays.
A column the file does not have changes nothing for a customer already in the ledger (a sheet
of licence corrections must not reset time zones, languages, tags or other contacts to the
defaults), nor does an empty cell that has a default (locale, time zone); any other empty
cell is a value like any other (it clears the account manager, the tags, a role's contacts).
Writes use Core statements on the tables, because the ORM's per-object cost dominates at
100,000 rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlmodel import Session

from comms.store.models import Contact, Customer, CustomerTag, StageEvent

CUSTOMERS = cast(sa.Table, Customer.__table__)  # type: ignore[attr-defined]
CONTACTS = cast(sa.Table, Contact.__table__)  # type: ignore[attr-defined]
TAGS = cast(sa.Table, CustomerTag.__table__)  # type: ignore[attr-defined]
EVENTS = cast(sa.Table, StageEvent.__table__)  # type: ignore[attr-defined]

# The customer fields an import compares and updates (stage is only used for new customers).
FIELDS: tuple[str, ...] = (
    "name",
    "tenant_id",
    "primary_domain",
    "licences",
    "locale",
    "time_zone",
    "account_manager_name",
    "account_manager_email",
)
# Entering this stage starts the double-billing clock (the CSP subscription is live).
CSP_LIVE_STAGE = "awaiting_cancellation"
# How many changed customers keep their change note for display.
_CHANGES_KEPT = 1000
# Contact roles in the order they are listed and exported (the CSV's column prefixes).
ROLES: tuple[str, ...] = ("primary", "billing", "technical")


@dataclass(frozen=True)
class ContactRow:
    role: str
    name: str
    email: str


@dataclass(frozen=True)
class CustomerRow:
    """One valid CSV row, normalised: what the writer stores."""

    row: int
    key: str
    name: str
    tenant_id: str
    primary_domain: str
    licences: int
    locale: str
    time_zone: str
    stage: str
    account_manager_name: str
    account_manager_email: str
    tags: tuple[str, ...]
    contacts: tuple[ContactRow, ...]
    # Columns whose empty cell got the default (locale, time_zone, stage): the default is for a
    # new customer; an existing one keeps what it has.
    defaulted: frozenset[str] = frozenset()

    def fields(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}


@dataclass
class WriteCounts:
    """What the writer did: counts, change notes by key, and keys matched ignoring case."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    changes: dict[str, str] = field(default_factory=dict)
    # Ids of the customers the import changed (their queued mail is rendered again).
    changed_ids: list[int] = field(default_factory=list)
    # (row, key as in the file, key as stored) where the two differ only in case.
    case_matches: list[tuple[int, str, str]] = field(default_factory=list)
    # (row, key as stored, stage in the file, stage in the ledger): a stage cell that differs
    # from an existing customer's stage, which import does not change.
    stages_ignored: list[tuple[int, str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class SharedContact:
    """One address that is a contact of several customers (compared ignoring case)."""

    email: str
    customers: tuple[tuple[str, str], ...]  # (key, name), ordered by key


def _q(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _fmt(value: object) -> str:
    if isinstance(value, str):
        return _q(value) if value else "(empty)"
    return str(value)


def _contact_label(role: str, name: str) -> str:
    return f"{role}, {_q(name)}" if name else role


class CustomerWriter:
    """Upserts batches of valid rows inside the caller's transaction."""

    def __init__(self, session: Session, *, now: datetime, by: str, source_name: str,
                 columns: frozenset[str] | None = None) -> None:
        """``columns``: the documented columns the file has (None: all of them); an existing
        customer's values for the others are kept."""
        self.session = session
        self.now = now
        self.by = by
        self.source_name = source_name
        self.counts = WriteCounts()
        self.fields = FIELDS if columns is None else tuple(f for f in FIELDS if f in columns)
        self.tags = columns is None or "tags" in columns
        # Contact roles whose email column the file has, and those whose name column it has.
        self.roles = {r for r in ROLES if columns is None or f"{r}_contact_email" in columns}
        self.named = {r for r in ROLES if columns is None or f"{r}_contact_name" in columns}

    def flush(self, batch: Sequence[CustomerRow]) -> None:
        """Insert the new customers of ``batch`` and update the existing ones."""
        if not batch:
            return
        existing = self._existing([r.key.lower() for r in batch])
        new_rows = [r for r in batch if r.key.lower() not in existing]
        old_rows = [r for r in batch if r.key.lower() in existing]
        if new_rows:
            self._insert(new_rows)
        if old_rows:
            self._update(old_rows, existing)

    def _existing(self, lower_keys: list[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for m in self.session.execute(
            sa.select(CUSTOMERS).where(sa.func.lower(CUSTOMERS.c.key).in_(lower_keys))
            .order_by(CUSTOMERS.c.id)
        ).mappings():
            found.setdefault(m["key"].lower(), m)
        return found

    def _event(self, customer_id: int, kind: str, from_stage: str | None, to_stage: str,
               note: str) -> dict[str, Any]:
        return {
            "customer_id": customer_id, "kind": kind, "from_stage": from_stage,
            "to_stage": to_stage, "at": self.now, "by": self.by, "source": "import",
            "note": note, "forced": False,
        }

    def _new_customer(self, r: CustomerRow) -> dict[str, Any]:
        now = self.now
        return {
            **r.fields(), "key": r.key, "stage": r.stage, "stage_entered_at": now,
            "paused": False, "opted_out": False, "lost": False,
            "csp_live_at": now if r.stage == CSP_LIVE_STAGE else None,
            # The planner looks at customers whose next_due_at has come.
            "next_due_at": now, "created_at": now, "updated_at": now,
        }

    def _insert(self, rows: list[CustomerRow]) -> None:
        s = self.session
        s.execute(sa.insert(CUSTOMERS), [self._new_customer(r) for r in rows])
        ids = dict(s.execute(
            sa.select(CUSTOMERS.c.key, CUSTOMERS.c.id).where(
                CUSTOMERS.c.key.in_([r.key for r in rows]))
        ).all())
        contacts = [
            {"customer_id": ids[r.key], "name": c.name, "email": c.email, "role": c.role}
            for r in rows for c in r.contacts
        ]
        if contacts:
            s.execute(sa.insert(CONTACTS), contacts)
        tags = [{"customer_id": ids[r.key], "tag": t} for r in rows for t in r.tags]
        if tags:
            s.execute(sa.insert(TAGS), tags)
        s.execute(sa.insert(EVENTS), [
            self._event(ids[r.key], "import", None, r.stage,
                        f"imported from {self.source_name} row {r.row}")
            for r in rows
        ])
        self.counts.created += len(rows)

    def _update(self, rows: list[CustomerRow], existing: dict[str, Any]) -> None:
        s = self.session
        ids = [existing[r.key.lower()]["id"] for r in rows]
        old_contacts: dict[int, dict[str, Any]] = defaultdict(dict)
        for m in s.execute(
            sa.select(CONTACTS).where(CONTACTS.c.customer_id.in_(ids)).order_by(CONTACTS.c.id)
        ).mappings():
            old_contacts[m["customer_id"]][m["email"].lower()] = m
        old_tags: dict[int, set[str]] = defaultdict(set)
        for cid, tag in s.execute(
            sa.select(TAGS.c.customer_id, TAGS.c.tag).where(TAGS.c.customer_id.in_(ids))
        ):
            old_tags[cid].add(tag)
        events: list[dict[str, Any]] = []
        for r in rows:
            old = existing[r.key.lower()]
            if old["key"] != r.key:
                self.counts.case_matches.append((r.row, r.key, old["key"]))
            if "stage" not in r.defaulted and r.stage != old["stage"]:
                self.counts.stages_ignored.append((r.row, old["key"], r.stage, old["stage"]))
            cid = old["id"]
            changes, values = self._changed_fields(old, r)
            if self.tags:
                changes.extend(self._sync_tags(cid, old_tags[cid], set(r.tags)))
            changes.extend(self._sync_contacts(cid, old_contacts[cid], r.contacts))
            if not changes:
                self.counts.unchanged += 1
                continue
            # Planned again at the next run: a new contact can lift a block that held the
            # customer (every address suppressed), and the planner recomputes the rest.
            s.execute(sa.update(CUSTOMERS).where(CUSTOMERS.c.id == cid)
                      .values(**values, updated_at=self.now, next_due_at=self.now))
            note = "; ".join(changes)
            events.append(self._event(cid, "update", old["stage"], old["stage"],
                                      f"{self.source_name} row {r.row}: {note}"))
            self.counts.updated += 1
            self.counts.changed_ids.append(cid)
            if len(self.counts.changes) < _CHANGES_KEPT:
                self.counts.changes[old["key"]] = note
        if events:
            s.execute(sa.insert(EVENTS), events)

    def _changed_fields(self, old: Any, r: CustomerRow) -> tuple[list[str], dict[str, Any]]:
        changes: list[str] = []
        values: dict[str, Any] = {}
        for f in self.fields:
            if f in r.defaulted:
                continue
            new = getattr(r, f)
            if old[f] != new:
                changes.append(f"{f}: {_fmt(old[f])} -> {_fmt(new)}")
                values[f] = new
        return changes, values

    def _sync_tags(self, cid: int, old: set[str], new: set[str]) -> list[str]:
        if new == old:
            return []
        s = self.session
        if old - new:
            s.execute(sa.delete(TAGS).where(TAGS.c.customer_id == cid,
                                            TAGS.c.tag.in_(old - new)))
        if new - old:
            s.execute(sa.insert(TAGS), [{"customer_id": cid, "tag": t}
                                        for t in sorted(new - old)])
        return [f"tags: {_fmt('|'.join(sorted(old)))} -> {_fmt('|'.join(sorted(new)))}"]

    def _sync_contacts(self, cid: int, old: dict[str, Any],
                       new: Sequence[ContactRow]) -> list[str]:
        s = self.session
        changes: list[str] = []
        wanted = {c.email: c for c in new}
        # A contact in a role whose column the file does not have stays.
        gone = [e for e in old if e not in wanted and old[e]["role"] in self.roles]
        for email in gone:
            o = old[email]
            changes.append(f"contact {email} removed ({_contact_label(o['role'], o['name'])})")
        if gone:
            s.execute(sa.delete(CONTACTS).where(CONTACTS.c.id.in_([old[e]["id"] for e in gone])))
        for c in new:
            o = old.get(c.email)
            if o is None:
                changes.append(f"contact {c.email} added ({_contact_label(c.role, c.name)})")
                s.execute(sa.insert(CONTACTS).values(
                    customer_id=cid, name=c.name, email=c.email, role=c.role))
                continue
            diff: dict[str, str] = {}
            if o["role"] != c.role:
                changes.append(f"contact {c.email}: role {o['role']} -> {c.role}")
                diff["role"] = c.role
            if o["name"] != c.name and c.role in self.named:
                changes.append(f"contact {c.email}: name {_fmt(o['name'])} -> {_fmt(c.name)}")
                diff["name"] = c.name
            if o["email"] != c.email:
                diff["email"] = c.email
            if diff:
                s.execute(sa.update(CONTACTS).where(CONTACTS.c.id == o["id"]).values(**diff))
        return changes


def shared_contacts(session: Session, *, limit: int | None = None) -> list[SharedContact]:
    """Addresses (ignoring case) that are contacts of more than one customer, by address."""
    email = sa.func.lower(CONTACTS.c.email)
    shared = (
        sa.select(email.label("email"))
        .group_by(email)
        .having(sa.func.count(sa.distinct(CONTACTS.c.customer_id)) > 1)
        .order_by(email)
    )
    if limit is not None:
        shared = shared.limit(limit)
    addresses = list(session.execute(shared).scalars())
    if not addresses:
        return []
    owners: dict[str, dict[str, str]] = defaultdict(dict)
    for start in range(0, len(addresses), 5000):
        chunk = addresses[start : start + 5000]
        for address, key, name in session.execute(
            sa.select(email, CUSTOMERS.c.key, CUSTOMERS.c.name)
            .join(CUSTOMERS, CUSTOMERS.c.id == CONTACTS.c.customer_id)
            .where(email.in_(chunk))
        ):
            owners[address][key] = name
    return [SharedContact(a, tuple(sorted(owners[a].items()))) for a in addresses]
