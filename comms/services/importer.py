"""The customer CSV format: import (validated upsert by key, one transaction) and export.

One row per customer; contacts sit in role columns (``primary_contact_email`` ...). The format is
documented for the people who fill it in, in docs/csv-format.md; keep the two in step.

Import streams the file and writes in batches, so memory stays flat and 100,000 rows take
seconds. Every row is validated and every problem is listed (row, column, value, why). By
default a file with any invalid row is rejected whole and nothing is written; with
``skip_invalid`` the good rows are imported and the bad ones written to ``<name>.rejects.csv``.
"""

from __future__ import annotations

import csv
import difflib
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, cast

import sqlalchemy as sa
from email_validator import EmailNotValidError, validate_email
from sqlmodel import Session, col, select

from comms.campaign import Campaign
from comms.config import Settings, check_time_zone
from comms.errors import ImportRejected
from comms.store.db import Database
from comms.store.models import Contact, Customer, CustomerTag, StageEvent
from comms.store.repo import ROLE_ORDER, customer_infos

# Core tables: batched inserts and updates skip the ORM's per-object cost.
CUSTOMERS = cast(sa.Table, Customer.__table__)  # type: ignore[attr-defined]
CONTACTS = cast(sa.Table, Contact.__table__)  # type: ignore[attr-defined]
TAGS = cast(sa.Table, CustomerTag.__table__)  # type: ignore[attr-defined]
EVENTS = cast(sa.Table, StageEvent.__table__)  # type: ignore[attr-defined]

# The documented columns, in the order export writes them.
COLUMNS: tuple[str, ...] = (
    "key",
    "name",
    "tenant_id",
    "primary_domain",
    "licences",
    "locale",
    "time_zone",
    "stage",
    "account_manager_name",
    "account_manager_email",
    "tags",
    "primary_contact_name",
    "primary_contact_email",
    "billing_contact_name",
    "billing_contact_email",
    "technical_contact_name",
    "technical_contact_email",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("key", "name", "licences")
# Spellings people type that mean a documented column.
ALIASES = {"licenses": "licences", "timezone": "time_zone", "tz": "time_zone"}
# A rejects file carries this column; importing a fixed rejects file ignores it.
PROBLEMS_COLUMN = "problems"
# Several tags, or several contacts of one role, share a cell separated by this.
SEPARATOR = "|"

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

_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_LOCALE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


@dataclass(frozen=True)
class ContactRow:
    role: str
    name: str
    email: str


@dataclass(frozen=True)
class CustomerRow:
    """One valid CSV row, normalised."""

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

    def fields(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}


@dataclass
class ImportResult:
    """What an import did (or, with ``dry_run``, would do)."""

    file: Path
    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    dry_run: bool = False
    rejects_file: Path | None = None
    problems: list[str] = field(default_factory=list)
    # key -> what changed, for the changed customers (capped, for display).
    changes: dict[str, str] = field(default_factory=dict)


class _DryRunDone(Exception):
    """Raised inside the transaction to roll a dry run back."""


def rejects_path(path: Path) -> Path:
    """Where ``--skip-invalid`` writes rejected rows: ``a.csv`` -> ``a.rejects.csv``."""
    return path.with_name(f"{path.stem}.rejects.csv")


# --------------------------------------------------------------------------- reading


def _normalise_header(name: str) -> str:
    norm = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return ALIASES.get(norm, norm)


def _sniff_delimiter(first_line: str) -> str:
    # Excel writes semicolons where the decimal separator is a comma; the header line decides.
    return ";" if first_line.count(";") > first_line.count(",") else ","


def _open_csv(path: Path) -> tuple[IO[str], str]:
    try:
        handle = path.open("r", encoding="utf-8-sig", newline="")
    except FileNotFoundError as exc:
        raise ImportRejected(f"{path} does not exist.") from exc
    except OSError as exc:
        raise ImportRejected(f"Cannot read {path}: {exc.strerror}.") from exc
    try:
        first = handle.readline()
    except UnicodeDecodeError as exc:
        handle.close()
        raise _not_utf8(path, exc) from exc
    handle.seek(0)
    # seek(0) on a utf-8-sig stream re-reads the BOM, which the codec skips again.
    return handle, _sniff_delimiter(first)


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> ImportRejected:
    return ImportRejected(
        f"{path.name} is not UTF-8 text (it contains the byte 0x{exc.object[exc.start]:02x}); "
        "nothing was written. In Excel use Save As > \"CSV UTF-8 (Comma delimited)\"."
    )


def _header_map(path: Path, header: Sequence[str]) -> list[str | None]:
    """The documented column for each header cell (None: ignored), or ``ImportRejected``."""
    problems: list[str] = []
    mapped: list[str | None] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(header, start=1):
        name = _normalise_header(raw)
        if name == PROBLEMS_COLUMN or (not name and not raw.strip()):
            mapped.append(None)
            continue
        if name not in COLUMNS:
            close = difflib.get_close_matches(name, COLUMNS, n=1, cutoff=0.7)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"header column {i} {raw.strip()!r} is not a known column; "
                f"{hint}known columns: {', '.join(COLUMNS)}"
            )
            mapped.append(None)
            continue
        if name in seen:
            problems.append(
                f"header column {i} {raw.strip()!r} repeats column {seen[name]}; "
                "each column may appear once"
            )
            mapped.append(None)
            continue
        seen[name] = i
        mapped.append(name)
    for required in REQUIRED_COLUMNS:
        if required not in seen:
            problems.append(f"the required column {required!r} is missing from the header")
    if not any(f"{r}_contact_email" in seen for r in ROLE_ORDER):
        problems.append(
            "the header has no contact email column; add primary_contact_email "
            "(and optionally billing_contact_email, technical_contact_email)"
        )
    if problems:
        raise ImportRejected(
            f"{path.name} was not imported: its header row has {len(problems)} problem(s). "
            "See docs/csv-format.md for the columns.",
            problems=problems,
        )
    return mapped


# --------------------------------------------------------------------------- validation


def _q(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class _RowCheck:
    """Collects one row's problems in the documented shape: row, column, value, why."""

    def __init__(self, row: int) -> None:
        self.row = row
        self.problems: list[str] = []

    def bad(self, column: str, value: str, why: str) -> None:
        if value:
            self.problems.append(f"row {self.row}, column {column}, value {_q(value)}: {why}")
        else:
            self.problems.append(f"row {self.row}, column {column}: {why}")


# A plain ASCII dot-atom local part: a strict subset of what email-validator accepts.
_PLAIN_LOCAL = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{}~-]+)*$"
)


class EmailChecker:
    """email-validator with a per-domain cache.

    Validating the domain is most of email-validator's cost, and a customer's contacts share
    one domain, so a domain already accepted is not checked again when the local part is plain
    ASCII (anything unusual still goes through email-validator in full).
    """

    def __init__(self) -> None:
        self._domains: dict[str, str] = {}

    def check(self, value: str) -> tuple[str, str | None]:
        """(normalised lower-case address, None) or (value, why it is invalid)."""
        local, at, domain = value.rpartition("@")
        known = self._domains.get(domain.lower()) if at else None
        if known is not None and len(local) <= 64 and len(value) <= 254 and (
            _PLAIN_LOCAL.match(local)
        ):
            return f"{local}@{known}".lower(), None
        try:
            # No DNS lookups: imports must work offline, and *.example test domains must pass.
            result = validate_email(value, check_deliverability=False)
        except EmailNotValidError as exc:
            return value, str(exc)
        if len(self._domains) > 20_000:  # keep memory flat on huge files
            self._domains.clear()
        self._domains[domain.lower()] = result.domain.lower()
        return result.normalized.lower(), None


def _email(check: _RowCheck, emails: EmailChecker, column: str, value: str) -> str:
    normalised, why = emails.check(value)
    if why is not None:
        check.bad(column, value, f"not a valid email address: {why}")
    return normalised


# Spreadsheets run a cell starting with these as a formula (CSV injection); export prefixes
# such cells with an apostrophe and import removes it again, so the round trip is exact.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def guard_cell(value: str) -> str:
    """A cell as export writes it: formula-like text gets a leading apostrophe."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def unguard_cell(value: str) -> str:
    """Undo ``guard_cell`` on import."""
    if value.startswith("'") and value[1:].startswith(_FORMULA_START):
        return value[1:]
    return value


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(SEPARATOR)]


class RowValidator:
    """Validates and normalises rows; remembers keys to catch duplicates within one file."""

    def __init__(self, settings: Settings, campaign: Campaign) -> None:
        self.settings = settings
        self.campaign = campaign
        self.stages = set(campaign.stage_names)
        self.seen_keys: dict[str, int] = {}
        self._zones: dict[str, bool] = {}
        self.emails = EmailChecker()

    def _zone_ok(self, name: str) -> bool:
        if name not in self._zones:
            try:
                check_time_zone(name)
                self._zones[name] = True
            except ValueError:
                self._zones[name] = False
        return self._zones[name]

    def validate(self, row: int, values: dict[str, str]) -> tuple[CustomerRow | None, list[str]]:
        """The normalised row, or None and the row's problems."""
        c = _RowCheck(row)
        get = values.get

        key = (get("key") or "").strip()
        if not key:
            c.bad("key", "", "is empty; every customer needs a unique key (e.g. its CRM id)")
        elif len(key) > 100:
            c.bad("key", key, "is longer than 100 characters")
        elif key in self.seen_keys:
            c.bad(
                "key", key,
                f"duplicate key: row {self.seen_keys[key]} has the same key; "
                "each customer must appear on one row only",
            )
        else:
            self.seen_keys[key] = row

        name = (get("name") or "").strip()
        if not name:
            c.bad("name", "", "is empty; every customer needs a name")
        elif len(name) > 300:
            c.bad("name", name, "is longer than 300 characters")

        licences_raw = (get("licences") or "").strip()
        licences = 0
        if not licences_raw:
            c.bad("licences", "", "is empty; write the number of licences, a whole number such "
                  "as 25")
        else:
            try:
                licences = int(licences_raw)
            except ValueError:
                c.bad("licences", licences_raw,
                      "is not a whole number; write the number of licences such as 25")
            else:
                if licences < 0:
                    c.bad("licences", licences_raw,
                          "cannot be negative; write the number of licences such as 25")

        tenant_id = (get("tenant_id") or "").strip().lower()
        if tenant_id and not _GUID.match(tenant_id):
            c.bad("tenant_id", tenant_id,
                  "is not a Microsoft tenant id (a GUID such as "
                  "8c6f0a2e-3b1d-4f7a-9e2c-5d4b3a2f1e0d); leave it empty if unknown")

        domain = (get("primary_domain") or "").strip().lower()
        if domain and not _DOMAIN.match(domain):
            c.bad("primary_domain", domain,
                  "is not a domain name; write it like contoso.example (no https://, no @)")

        locale = (get("locale") or "").strip() or self.settings.defaults.locale
        if not _LOCALE.match(locale) or len(locale) > 20:
            c.bad("locale", locale, "is not a language code; use one such as en, de or fr-CA")

        tz = (get("time_zone") or "").strip() or self.settings.defaults.time_zone
        if not self._zone_ok(tz):
            c.bad("time_zone", tz,
                  "is not a known time zone; use an IANA name such as Europe/London or "
                  "America/New_York")

        stage = (get("stage") or "").strip() or self.campaign.initial_stage
        if stage not in self.stages:
            c.bad("stage", stage,
                  f"is not a stage of the campaign; use one of: "
                  f"{', '.join(self.campaign.stage_names)}")

        am_name = (get("account_manager_name") or "").strip()
        am_email = (get("account_manager_email") or "").strip()
        if am_email:
            am_email = _email(c, self.emails, "account_manager_email", am_email)

        tags: list[str] = []
        for tag in _split(get("tags") or ""):
            tag = tag.lower()
            if not tag or tag in tags:
                continue
            if len(tag) > 100:
                c.bad("tags", tag, "is longer than 100 characters")
            tags.append(tag)

        problems_before_contacts = len(c.problems)
        contacts: list[ContactRow] = []
        seen_emails: set[str] = set()
        for role in ROLE_ORDER:
            ncol, ecol = f"{role}_contact_name", f"{role}_contact_email"
            names_raw, emails_raw = (get(ncol) or "").strip(), (get(ecol) or "").strip()
            emails = [e for e in _split(emails_raw) if e] if emails_raw else []
            names = _split(names_raw) if names_raw else []
            if names and not emails:
                c.bad(ecol, "", f"is empty but {ncol} is {_q(names_raw)}; add the address or "
                      "clear the name")
                continue
            if len(names) > len(emails):
                c.bad(ncol, names_raw,
                      f"has {len(names)} names for {len(emails)} address(es) in {ecol}; "
                      f"separate several contacts with {SEPARATOR} in both columns, in the "
                      "same order")
                continue
            for i, raw_email in enumerate(emails):
                email = _email(c, self.emails, ecol, raw_email)
                # A person named in two role columns is stored once, with the first role.
                if email in seen_emails:
                    continue
                seen_emails.add(email)
                person = names[i] if i < len(names) else ""
                if len(person) > 200:
                    c.bad(ncol, person, "is longer than 200 characters")
                contacts.append(ContactRow(role=role, name=person, email=email))
        if not contacts and len(c.problems) == problems_before_contacts:
            c.bad("primary_contact_email", "",
                  "is empty; every customer needs at least one contact email (primary, "
                  "billing or technical)")

        if c.problems:
            return None, c.problems
        return (
            CustomerRow(
                row=row, key=key, name=name, tenant_id=tenant_id, primary_domain=domain,
                licences=licences, locale=locale, time_zone=tz, stage=stage,
                account_manager_name=am_name, account_manager_email=am_email,
                tags=tuple(sorted(tags)), contacts=tuple(contacts),
            ),
            [],
        )


# --------------------------------------------------------------------------- writing


def _fmt(value: object) -> str:
    if isinstance(value, str):
        return _q(value) if value else "(empty)"
    return str(value)


def _contact_label(role: str, name: str) -> str:
    return f"{role}, {_q(name)}" if name else role


class _Writer:
    """Upserts batches of valid rows inside the caller's transaction."""

    def __init__(self, session: Session, *, now: datetime, by: str, source_name: str,
                 result: ImportResult) -> None:
        self.session = session
        self.now = now
        self.by = by
        self.source_name = source_name
        self.result = result

    def flush(self, batch: list[CustomerRow]) -> None:
        if not batch:
            return
        s = self.session
        keys = [r.key for r in batch]
        existing = {
            m["key"]: m
            for m in s.execute(sa.select(CUSTOMERS).where(CUSTOMERS.c.key.in_(keys))).mappings()
        }
        new_rows = [r for r in batch if r.key not in existing]
        old_rows = [r for r in batch if r.key in existing]
        if new_rows:
            self._insert(new_rows)
        if old_rows:
            self._update(old_rows, existing)

    def _insert(self, rows: list[CustomerRow]) -> None:
        s, now = self.session, self.now
        s.execute(
            sa.insert(CUSTOMERS),
            [
                {
                    **r.fields(),
                    "key": r.key,
                    "stage": r.stage,
                    "stage_entered_at": now,
                    "paused": False,
                    "opted_out": False,
                    "lost": False,
                    "csp_live_at": now if r.stage == "awaiting_cancellation" else None,
                    # The planner looks at customers whose next_due_at has come.
                    "next_due_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for r in rows
            ],
        )
        ids = dict(
            s.execute(
                sa.select(CUSTOMERS.c.key, CUSTOMERS.c.id).where(
                    CUSTOMERS.c.key.in_([r.key for r in rows])
                )
            ).all()
        )
        contacts = [
            {"customer_id": ids[r.key], "name": c.name, "email": c.email, "role": c.role}
            for r in rows
            for c in r.contacts
        ]
        if contacts:
            s.execute(sa.insert(CONTACTS), contacts)
        tags = [{"customer_id": ids[r.key], "tag": t} for r in rows for t in r.tags]
        if tags:
            s.execute(sa.insert(TAGS), tags)
        s.execute(
            sa.insert(EVENTS),
            [
                self._event(ids[r.key], "import", None, r.stage,
                            f"imported from {self.source_name} row {r.row}")
                for r in rows
            ],
        )
        self.result.created += len(rows)

    def _event(self, customer_id: int, kind: str, from_stage: str | None, to_stage: str,
               note: str) -> dict[str, Any]:
        return {
            "customer_id": customer_id, "kind": kind, "from_stage": from_stage,
            "to_stage": to_stage, "at": self.now, "by": self.by, "source": "import",
            "note": note, "forced": False,
        }

    def _update(self, rows: list[CustomerRow], existing: dict[str, Any]) -> None:
        s = self.session
        ids = [existing[r.key]["id"] for r in rows]
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
            old = existing[r.key]
            cid = old["id"]
            changes: list[str] = []
            values: dict[str, Any] = {}
            for f, new in r.fields().items():
                if old[f] != new:
                    changes.append(f"{f}: {_fmt(old[f])} -> {_fmt(new)}")
                    values[f] = new
            new_tags = set(r.tags)
            if new_tags != old_tags[cid]:
                changes.append(
                    f"tags: {_fmt(SEPARATOR.join(sorted(old_tags[cid])))} -> "
                    f"{_fmt(SEPARATOR.join(sorted(new_tags)))}"
                )
                if old_tags[cid] - new_tags:
                    s.execute(sa.delete(TAGS).where(
                        TAGS.c.customer_id == cid, TAGS.c.tag.in_(old_tags[cid] - new_tags)))
                if new_tags - old_tags[cid]:
                    s.execute(sa.insert(TAGS), [{"customer_id": cid, "tag": t}
                                                for t in sorted(new_tags - old_tags[cid])])
            changes.extend(self._sync_contacts(cid, old_contacts[cid], r.contacts))
            if not changes:
                self.result.unchanged += 1
                continue
            values["updated_at"] = self.now
            s.execute(sa.update(CUSTOMERS).where(CUSTOMERS.c.id == cid).values(**values))
            note = "; ".join(changes)
            events.append(self._event(cid, "update", old["stage"], old["stage"],
                                      f"{self.source_name} row {r.row}: {note}"))
            self.result.updated += 1
            if len(self.result.changes) < 1000:
                self.result.changes[r.key] = note
        if events:
            s.execute(sa.insert(EVENTS), events)

    def _sync_contacts(self, cid: int, old: dict[str, Any],
                       new: Sequence[ContactRow]) -> list[str]:
        s = self.session
        changes: list[str] = []
        wanted = {c.email: c for c in new}
        gone = [e for e in old if e not in wanted]
        for email in gone:
            o = old[email]
            changes.append(f"contact {email} removed ({_contact_label(o['role'], o['name'])})")
        if gone:
            s.execute(sa.delete(CONTACTS).where(
                CONTACTS.c.id.in_([old[e]["id"] for e in gone])))
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
            if o["name"] != c.name:
                changes.append(f"contact {c.email}: name {_fmt(o['name'])} -> {_fmt(c.name)}")
                diff["name"] = c.name
            if o["email"] != c.email:
                diff["email"] = c.email
            if diff:
                s.execute(sa.update(CONTACTS).where(CONTACTS.c.id == o["id"]).values(**diff))
        return changes


# --------------------------------------------------------------------------- import


def _records(reader: Iterator[list[str]]) -> Iterator[tuple[int, list[str]]]:
    """(spreadsheet row number, cells) for each non-blank record; the header is row 1."""
    for number, cells in enumerate(reader, start=2):
        if any(cell.strip() for cell in cells):
            yield number, cells


def import_customers(
    db: Database,
    path: Path,
    *,
    settings: Settings,
    campaign: Campaign,
    now: datetime,
    by: str,
    skip_invalid: bool = False,
    dry_run: bool = False,
    batch_size: int = 1000,
) -> ImportResult:
    """Import (upsert by key) the customers of a CSV file in one transaction.

    Raises ``ImportRejected`` listing every problem when any row is invalid (unless
    ``skip_invalid``: then good rows are imported and bad ones written to
    ``rejects_path(path)`` with a ``problems`` column). ``dry_run`` validates and counts what
    would change, and writes nothing to the ledger.
    """
    path = Path(path)
    result = ImportResult(file=path, dry_run=dry_run)
    handle, delimiter = _open_csv(path)
    rejects_tmp: Path | None = None
    try:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from exc
        if header is None or not any(h.strip() for h in header):
            raise ImportRejected(
                f"{path.name} is empty; its first row must be the header, e.g. "
                f"{','.join(COLUMNS)}"
            )
        columns = _header_map(path, header)
        validator = RowValidator(settings, campaign)
        rejects_writer: Any = None
        rejects_handle: IO[str] | None = None
        if skip_invalid:
            fd, tmp_name = tempfile.mkstemp(prefix=".rejects-", suffix=".csv", dir=path.parent)
            rejects_tmp = Path(tmp_name)
            # BOM so Excel reads non-ASCII names correctly; same delimiter as the input.
            rejects_handle = os.fdopen(fd, "w", encoding="utf-8-sig", newline="")
            rejects_writer = csv.writer(rejects_handle, delimiter=delimiter)
            rejects_writer.writerow(
                [h for h, m in zip(header, columns, strict=True)
                 if _normalise_header(h) != PROBLEMS_COLUMN] + [PROBLEMS_COLUMN]
            )
        try:
            # One transaction; on SQLite it takes the write lock at once, because the import
            # reads existing customers and then writes (a deferred upgrade could fail as busy).
            with db.session(immediate=True) as session:
                writer = _Writer(session, now=now, by=by, source_name=path.name, result=result)
                batch: list[CustomerRow] = []
                try:
                    for number, cells in _records(reader):
                        result.rows += 1
                        values: dict[str, str] = {}
                        for col_name, cell in zip(columns, cells, strict=False):
                            if col_name is not None:
                                values[col_name] = unguard_cell(cell)
                        parsed, problems = validator.validate(number, values)
                        if len(cells) > len(header) and any(c.strip() for c in
                                                            cells[len(header):]):
                            problems = [*problems, f"row {number}: has {len(cells)} values but "
                                        f"the header has {len(header)} columns; check for an "
                                        f"unquoted {delimiter!r} inside a value"]
                            parsed = None
                        if parsed is None:
                            result.rejected += 1
                            result.problems.extend(problems)
                            if rejects_writer is not None:
                                kept = [c for c, h in zip(cells, header, strict=False)
                                        if _normalise_header(h) != PROBLEMS_COLUMN]
                                kept += [""] * (
                                    sum(1 for h in header
                                        if _normalise_header(h) != PROBLEMS_COLUMN) - len(kept))
                                rejects_writer.writerow([*kept, "; ".join(problems)])
                            continue
                        if result.problems and not skip_invalid:
                            continue  # the file will be rejected; only keep validating
                        batch.append(parsed)
                        if len(batch) >= batch_size:
                            writer.flush(batch)
                            batch = []
                    writer.flush(batch)
                except UnicodeDecodeError as exc:
                    raise _not_utf8(path, exc) from exc
                if result.problems and not skip_invalid:
                    raise ImportRejected(
                        f"{path.name} was not imported: {result.rejected} of {result.rows} "
                        "row(s) have problems, nothing was written. Fix them and import again, "
                        "or add --skip-invalid to import the good rows and write the bad ones "
                        f"to {rejects_path(path).name}.",
                        problems=result.problems,
                    )
                if dry_run:
                    raise _DryRunDone
        except _DryRunDone:
            pass
        finally:
            if rejects_handle is not None:
                rejects_handle.close()
        if rejects_tmp is not None:
            if result.rejected:
                target = rejects_path(path)
                os.replace(rejects_tmp, target)
                result.rejects_file = target
            else:
                rejects_tmp.unlink()
            rejects_tmp = None
    finally:
        handle.close()
        if rejects_tmp is not None and rejects_tmp.exists():
            rejects_tmp.unlink()
    return result


# --------------------------------------------------------------------------- export


def export_customers(db: Database, path: Path, *, batch_size: int = 1000) -> int:
    """Write every customer in the columns import reads (UTF-8 with BOM, comma); return count.

    Exporting and importing the result changes nothing. Written to a temporary file first, so
    a failed export never leaves half a file behind.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=".export-", suffix=".csv",
                                    dir=path.parent if str(path.parent) else ".")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8-sig", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(COLUMNS)
            last_id = 0
            with db.session() as session:
                while True:
                    rows = _page(session, last_id, batch_size)
                    if not rows:
                        break
                    last_id = rows[-1].id or last_id
                    for info in customer_infos(session, rows):
                        by_role: dict[str, list[tuple[str, str]]] = defaultdict(list)
                        for c in info.contacts:
                            by_role[c.role].append((c.name, c.email))
                        cells: dict[str, str] = {
                            "key": info.key, "name": info.name, "tenant_id": info.tenant_id,
                            "primary_domain": info.primary_domain,
                            "licences": str(info.licences), "locale": info.locale,
                            "time_zone": info.time_zone, "stage": info.stage,
                            "account_manager_name": info.account_manager_name,
                            "account_manager_email": info.account_manager_email,
                            "tags": SEPARATOR.join(info.tags),
                        }
                        for role in ROLE_ORDER:
                            people = by_role.get(role, [])
                            names = [n for n, _ in people]
                            # Trailing empty names are dropped so the cell reads naturally.
                            while names and not names[-1]:
                                names.pop()
                            cells[f"{role}_contact_name"] = SEPARATOR.join(names)
                            cells[f"{role}_contact_email"] = SEPARATOR.join(e for _, e in people)
                        writer.writerow([guard_cell(cells[c]) for c in COLUMNS])
                        count += 1
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return count


def _page(session: Session, after_id: int, limit: int) -> list[Customer]:
    return list(session.exec(
        select(Customer).where(col(Customer.id) > after_id).order_by(col(Customer.id)).limit(limit)
    ).all())
