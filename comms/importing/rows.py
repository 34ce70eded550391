"""One CSV row -> a normalised ``CustomerRow``, or every problem of the row.

Each problem has the documented shape: row, column, value, why. Defaults for empty optional
cells come from the settings and the campaign.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from comms.campaign import Campaign
from comms.config import Settings
from comms.importing import fields
from comms.importing.columns import ROLES
from comms.importing.fields import SEPARATOR, FieldError, visible
from comms.store.customer_upsert import ContactRow, CustomerRow


def _q(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class RowProblems:
    """Collects one row's problems in the documented shape: row, column, value, why."""

    def __init__(self, row: int) -> None:
        self.row = row
        self.problems: list[str] = []

    def bad(self, column: str, value: str, why: str) -> None:
        if value:
            self.problems.append(
                f"row {self.row}, column {column}, value {_q(visible(value))}: {why}")
        else:
            self.problems.append(f"row {self.row}, column {column}: {why}")


class RowValidator:
    """Validates and normalises rows; duplicate keys come from the reader's scan of the file."""

    def __init__(self, settings: Settings, campaign: Campaign,
                 duplicates: Mapping[str, list[tuple[int, str]]] | None = None) -> None:
        self.campaign = campaign
        self.duplicates = duplicates or {}
        self.email = fields.EmailChecker()
        self._row = 0
        self._suspect = False
        self._zones: dict[str, tuple[str, str | None]] = {}
        self._checks: dict[str, Callable[[str], Any]] = {
            "key": self._key,
            "name": fields.name,
            "licences": fields.licences,
            "tenant_id": fields.tenant_id,
            "primary_domain": fields.primary_domain,
            "locale": fields.locale,
            "time_zone": self._time_zone,
            "stage": self._stage,
            "account_manager_name": fields.plain(200),
            "account_manager_email": lambda v: self.email(v) if v else "",
            "tags": fields.tags,
        }
        self._defaults = {"locale": settings.defaults.locale,
                          "time_zone": settings.defaults.time_zone,
                          "stage": campaign.initial_stage}

    def _key(self, value: str) -> str:
        fields.key(value)
        others = [(r, k) for r, k in self.duplicates.get(value.lower(), ()) if r != self._row]
        if others:
            rows = [f"row {r}" + (f" ({k})" if k != value else "") for r, k in others]
            ignoring = " ignoring case" if any(k != value for _, k in others) else ""
            raise FieldError(f"duplicate key: {' and '.join(rows)} "
                             f"{'has' if len(rows) == 1 else 'have'} the same key{ignoring}; "
                             "each customer must appear on one row only")
        return value

    def _time_zone(self, value: str) -> str:
        # A file has a handful of zones: look each one up once.
        if value not in self._zones:
            try:
                self._zones[value] = (fields.time_zone(value), None)
            except FieldError as exc:
                self._zones[value] = (value, exc.why)
        zone, why = self._zones[value]
        if why is not None:
            raise FieldError(why)
        return zone

    def _stage(self, value: str) -> str:
        if value not in self.campaign.stage_names:
            raise FieldError("is not a stage of the campaign; use one of: "
                             f"{', '.join(self.campaign.stage_names)}")
        return value

    def validate(self, row: int, values: Mapping[str, str]) -> tuple[CustomerRow | None,
                                                                     list[str]]:
        """The normalised row, or None and the row's problems."""
        p = RowProblems(row)
        self._row = row
        out: dict[str, Any] = {}
        # One search over the whole row; cell by cell only when something is there to name.
        joined = ",".join(values.values())
        self._suspect = suspect = (len(joined) > fields.MAX_CELL
                                   or fields.CONTROL.search(joined) is not None)
        for column, check in self._checks.items():
            raw = (values.get(column) or "").strip() or self._defaults.get(column, "")
            try:
                if suspect:
                    fields.check_text(raw)
                out[column] = check(raw)
            except FieldError as exc:
                p.bad(column, raw if exc.shown is None else exc.shown, exc.why)
        contacts = self._contacts(p, values)
        if p.problems:
            return None, p.problems
        defaulted = frozenset(c for c in self._defaults if not (values.get(c) or "").strip())
        return CustomerRow(row=row, contacts=contacts, defaulted=defaulted, **out), []

    def _contacts(self, p: RowProblems, values: Mapping[str, str]) -> tuple[ContactRow, ...]:
        before = len(p.problems)
        contacts: list[ContactRow] = []
        seen: set[str] = set()
        for role in ROLES:
            for contact in self._role(p, role, values):
                # A person named in two role columns is stored once, with the first role.
                if contact.email not in seen:
                    seen.add(contact.email)
                    contacts.append(contact)
        if not contacts and len(p.problems) == before:
            p.bad("primary_contact_email", "",
                  "is empty; every customer needs at least one contact email (primary, "
                  "billing or technical)")
        return tuple(contacts)

    def _role(self, p: RowProblems, role: str,
              values: Mapping[str, str]) -> list[ContactRow]:
        ncol, ecol = f"{role}_contact_name", f"{role}_contact_email"
        names_raw, emails_raw = (values.get(ncol) or "").strip(), (values.get(ecol) or "").strip()
        for column, raw in ((ncol, names_raw), (ecol, emails_raw)):
            try:
                if self._suspect:
                    fields.check_text(raw)
            except FieldError as exc:
                p.bad(column, raw if exc.shown is None else exc.shown, exc.why)
                return []
        emails = [e for e in fields.split(emails_raw) if e] if emails_raw else []
        names = fields.split(names_raw) if names_raw else []
        if names and not emails:
            p.bad(ecol, "", f"is empty but {ncol} is {_q(visible(names_raw))}; add the address "
                  "or clear the name")
            return []
        if len(names) > len(emails):
            p.bad(ncol, names_raw,
                  f"has {len(names)} names for {len(emails)} address(es) in {ecol}; separate "
                  f"several contacts with {SEPARATOR} in both columns, in the same order")
            return []
        found: list[ContactRow] = []
        for i, raw_email in enumerate(emails):
            person = names[i] if i < len(names) else ""
            try:
                email = self.email(raw_email)
            except FieldError as exc:
                p.bad(ecol, raw_email, exc.why)
                continue
            if len(person) > 200:
                p.bad(ncol, person, "is longer than 200 characters")
            found.append(ContactRow(role=role, name=person, email=email))
        return found
