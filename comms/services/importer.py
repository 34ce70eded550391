"""Customer CSV import (validated upsert by key, one transaction) and export.

The format is documented for the people who fill it in, in docs/csv-format.md; the reading and
the checks live in ``comms.importing`` (pure), the writing in ``comms.store.customer_upsert``.
This module ties them together: by default a file with any invalid row is rejected whole and
nothing is written; with ``skip_invalid`` the good rows are imported and the bad ones written to
``<name>.rejects.csv``; a dry run does all the work in a transaction that is rolled back.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlmodel import Session, col, select

from comms import outbox
from comms.campaign import Campaign
from comms.config import Settings
from comms.domain import CustomerInfo
from comms.errors import ImportRejected
from comms.fileio import write_atomic
from comms.importing.columns import COLUMNS, PROBLEMS_COLUMN, ROLES, capped, normalise_header
from comms.importing.fields import SEPARATOR, guard_cell
from comms.importing.reader import CustomerCsv
from comms.importing.rows import RowValidator
from comms.store.customer_upsert import (
    CustomerRow,
    CustomerWriter,
    SharedContact,
    WriteCounts,
    shared_contacts,
)
from comms.store.db import Database
from comms.store.models import Customer
from comms.store.repo import customer_infos
from comms.wording import plural

__all__ = ["COLUMNS", "ImportResult", "export_customers", "import_customers", "rejects_path"]

# Shared contact addresses named in an import's summary (the rest are counted).
_SHARED_SHOWN = 20


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
    # The first problems (capped, with a last line counting the rest).
    problems: list[str] = field(default_factory=list)
    # key -> what changed, for the changed customers (capped, for display).
    changes: dict[str, str] = field(default_factory=dict)
    # Columns of the file that are not part of the format and were not read.
    ignored_columns: list[str] = field(default_factory=list)
    # (row, key in the file, key in the ledger) where the keys differ only in case.
    case_matches: list[tuple[int, str, str]] = field(default_factory=list)
    # Addresses that are contacts of several customers (legitimate, but worth a look).
    shared_contacts: list[SharedContact] = field(default_factory=list)
    # Optional columns the file does not have: existing customers kept their values.
    kept_columns: list[str] = field(default_factory=list)
    # (row, key, stage in the file, stage in the ledger) for existing customers.
    stages_ignored: list[tuple[int, str, str, str]] = field(default_factory=list)

    def absorb(self, counts: WriteCounts) -> None:
        self.created, self.updated, self.unchanged = (counts.created, counts.updated,
                                                      counts.unchanged)
        self.changes = counts.changes
        self.case_matches = counts.case_matches
        self.stages_ignored = counts.stages_ignored

    def summary_lines(self) -> list[str]:
        """What the operator reads after the counts: ignored columns, key and contact notes."""
        verb = "would update" if self.dry_run else "updated"
        lines: list[str] = []
        if self.ignored_columns:
            names = ", ".join(self.ignored_columns[:_SHARED_SHOWN])
            more = len(self.ignored_columns) - _SHARED_SHOWN
            names += f" and {more} more" if more > 0 else ""
            lines.append(f"Ignored {plural(len(self.ignored_columns), 'column')} that are not "
                         f"part of the format: {names} (--strict-columns refuses them).")
        if self.kept_columns and self.updated:
            lines.append(f"Not in the file, so left as they are for existing customers: "
                         f"{', '.join(self.kept_columns)} (new customers get the defaults).")
        for row, key, wanted, stage in self.stages_ignored[:_SHARED_SHOWN]:
            lines.append(f"Row {row}: stage {wanted} ignored for {key}, already in the ledger "
                         f"at {stage} (import sets the stage of new customers only; move it "
                         f"with `comms customers set-stage {key} {wanted}`).")
        if len(self.stages_ignored) > _SHARED_SHOWN:
            lines.append(f"... and {len(self.stages_ignored) - _SHARED_SHOWN} more stage(s) "
                         "ignored.")
        for row, key, stored in self.case_matches[:_SHARED_SHOWN]:
            lines.append(f"Row {row}: key {key} {verb} the existing customer {stored} (keys are "
                         f"compared ignoring case; the key stays {stored}).")
        if len(self.case_matches) > _SHARED_SHOWN:
            lines.append(f"... and {len(self.case_matches) - _SHARED_SHOWN} more key(s) "
                         "matched ignoring case.")
        for shared in self.shared_contacts[:_SHARED_SHOWN]:
            who = ", ".join(f"{k} ({n})" for k, n in shared.customers)
            lines.append(f"Warning: {shared.email} is a contact of {len(shared.customers)} "
                         f"customers: {who}.")
        if len(self.shared_contacts) > _SHARED_SHOWN:
            lines.append(f"... and {len(self.shared_contacts) - _SHARED_SHOWN} more shared "
                         "address(es): see `comms customers list --shared-contacts`.")
        return lines


def rejects_path(path: Path) -> Path:
    """Where ``--skip-invalid`` writes rejected rows: ``a.csv`` -> ``a.rejects.csv``."""
    return path.with_name(f"{path.stem}.rejects.csv")


class _Rejects:
    """The rejected rows, written at the end as the original columns plus ``problems``."""

    def __init__(self, source: CustomerCsv) -> None:
        self.delimiter = source.delimiter
        self.keep = [i for i, h in enumerate(source.header)
                     if normalise_header(h) != PROBLEMS_COLUMN]
        self.rows: list[list[str]] = [[source.header[i] for i in self.keep] + [PROBLEMS_COLUMN]]

    def add(self, cells: list[str], problems: list[str]) -> None:
        kept = [cells[i] if i < len(cells) else "" for i in self.keep]
        self.rows.append([*kept, "; ".join(problems)])

    def write(self, path: Path) -> Path:
        out = io.StringIO()
        csv.writer(out, delimiter=self.delimiter).writerows(self.rows)
        # BOM so Excel reads non-ASCII names correctly; same delimiter as the input.
        return write_atomic(path, "\ufeff" + out.getvalue())


def _read_and_write(source: CustomerCsv, validator: RowValidator, writer: CustomerWriter,
                    result: ImportResult, rejects: _Rejects | None, batch_size: int) -> int:
    """Validate every record, write the valid ones in batches; return the problem count."""
    total = 0
    batch: list[CustomerRow] = []
    for record in source.records():
        result.rows += 1
        parsed, problems = validator.validate(record.row, record.values)
        if record.problems:
            parsed, problems = None, [*problems, *record.problems]
        if parsed is None:
            result.rejected += 1
            total += len(problems)
            if len(result.problems) < 100:
                result.problems.extend(problems)
            if rejects is not None:
                rejects.add(record.cells, problems)
            continue
        if result.rejected and rejects is None:
            continue  # the file will be rejected; only keep validating
        batch.append(parsed)
        if len(batch) >= batch_size:
            writer.flush(batch)
            batch = []
    writer.flush(batch)
    return total


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
    strict_columns: bool = False,
    batch_size: int = 1000,
) -> ImportResult:
    """Import (upsert by key, ignoring case) the customers of a CSV file in one transaction.

    Raises ``ImportRejected`` listing the problems when any row is invalid (unless
    ``skip_invalid``: then good rows are imported and bad ones written to
    ``rejects_path(path)`` with a ``problems`` column; ``OutputError`` if that file cannot be
    written, and then nothing is imported). ``dry_run`` does the same work and rolls it back.
    """
    path = Path(path)
    source = CustomerCsv(path, strict_columns=strict_columns)
    validator = RowValidator(settings, campaign, source.duplicate_keys())
    present = frozenset(c for c in source.map.columns if c is not None)
    result = ImportResult(file=path, dry_run=dry_run, ignored_columns=source.map.ignored,
                          kept_columns=[c for c in COLUMNS if c not in present and c != "stage"])
    rejects = _Rejects(source) if skip_invalid else None
    # One transaction; on SQLite it takes the write lock at once, because the import reads
    # existing customers and then writes (a deferred upgrade could fail as busy).
    with db.session(immediate=True) as session:
        work = session.begin_nested()
        writer = CustomerWriter(session, now=now, by=by, source_name=path.name,
                                columns=present)
        total = _read_and_write(source, validator, writer, result, rejects, batch_size)
        result.problems = capped(result.problems[:100], max(total, len(result.problems)))
        if result.rejected and rejects is None:
            raise ImportRejected(
                f"{path.name} was not imported: {result.rejected} of "
                f"{plural(result.rows, 'row')} have problems, nothing was written. Fix them and "
                "import again, or add --skip-invalid to import the good rows and write the bad "
                f"ones to {rejects_path(path).name}.",
                problems=result.problems,
            )
        result.absorb(writer.counts)
        # Mail queued for a changed customer was rendered from the old row (licences pick
        # the cancellation route, contacts the recipients): the next run renders it again.
        outbox.withdraw_for_new_content(session, writer.counts.changed_ids,
                                        f"customer changed by import of {path.name}", now)
        result.shared_contacts = shared_contacts(session)
        if rejects is not None and result.rejected:
            # Inside the transaction: a rejects file that cannot be written imports nothing.
            result.rejects_file = rejects.write(rejects_path(path))
        if dry_run:
            work.rollback()
        else:
            work.commit()
    return result


# --------------------------------------------------------------------------- export


def _export_cells(info: CustomerInfo) -> list[str]:
    by_role: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for c in info.contacts:
        by_role[c.role].append((c.name, c.email))
    cells: dict[str, str] = {
        "key": info.key, "name": info.name, "tenant_id": info.tenant_id,
        "primary_domain": info.primary_domain, "licences": str(info.licences),
        "locale": info.locale, "time_zone": info.time_zone, "stage": info.stage,
        "account_manager_name": info.account_manager_name,
        "account_manager_email": info.account_manager_email,
        "tags": SEPARATOR.join(info.tags),
    }
    for role in ROLES:
        people = by_role.get(role, [])
        names = [n for n, _ in people]
        # Trailing empty names are dropped so the cell reads naturally.
        while names and not names[-1]:
            names.pop()
        cells[f"{role}_contact_name"] = SEPARATOR.join(names)
        cells[f"{role}_contact_email"] = SEPARATOR.join(e for _, e in people)
    return [guard_cell(cells[c]) for c in COLUMNS]


def export_customers(db: Database, path: Path, *, batch_size: int = 1000) -> int:
    """Write every customer in the columns import reads (UTF-8 with BOM, comma); return count.

    Exporting and importing the result changes nothing. Written atomically and owner-only
    (``comms.fileio``): a failed export leaves the previous file as it was. The ledger itself
    is refused (``RequestRefused``).
    """
    db.refuse_as_output(path)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    count, last_id = 0, 0
    with db.session() as session:
        while rows := _page(session, last_id, batch_size):
            last_id = rows[-1].id or last_id
            for info in customer_infos(session, rows):
                writer.writerow(_export_cells(info))
                count += 1
    write_atomic(Path(path), "\ufeff" + out.getvalue())
    return count


def _page(session: Session, after_id: int, limit: int) -> list[Customer]:
    return list(session.exec(
        select(Customer).where(col(Customer.id) > after_id).order_by(col(Customer.id)).limit(limit)
    ).all())
