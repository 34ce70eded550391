"""Reading the customer CSV: encoding, delimiter, header, and one record per customer row.

The file is read twice, streaming both times: a first pass finds keys that repeat (ignoring
case, so both rows can be named) and any broken quoting, before the database is touched; the
second yields the records to validate and write. Memory stays flat apart from the set of keys.
"""

from __future__ import annotations

import csv
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from comms.errors import ImportRejected
from comms.importing.columns import COLUMNS, HeaderMap, capped, map_header
from comms.importing.fields import unguard_cell
from comms.wording import plural

# csv's own per-field limit is raised while reading so an oversized value reaches the field
# checks (which name its row and column); beyond this the file is refused as a whole.
_READ_LIMIT = 16 * 1024 * 1024
# Enough of the first line to tell commas from semicolons.
_SNIFF = 64 * 1024


@dataclass
class Record:
    """One non-blank row: its spreadsheet row number, cells, values by column, and problems
    of its shape (too many values, a value under a blank header cell)."""

    row: int
    cells: list[str]
    values: dict[str, str]
    problems: list[str] = field(default_factory=list)


def not_utf8(path: Path, exc: UnicodeDecodeError) -> ImportRejected:
    return ImportRejected(
        f"{path.name} is not UTF-8 text (it contains the byte 0x{exc.object[exc.start]:02x}); "
        "nothing was written. In Excel use Save As > \"CSV UTF-8 (Comma delimited)\"."
    )


@contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _open(path: Path) -> IO[str]:
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark.
        return path.open("r", encoding="utf-8-sig", newline="")
    except FileNotFoundError as exc:
        raise ImportRejected(f"{path} does not exist.") from exc
    except OSError as exc:
        raise ImportRejected(f"Cannot read {path}: {exc.strerror}.") from exc


class CustomerCsv:
    """A customer CSV whose header has been read and mapped (``ImportRejected`` otherwise)."""

    def __init__(self, path: Path, *, strict_columns: bool = False) -> None:
        self.path = path
        with _open(path) as handle:
            try:
                first = handle.readline(_SNIFF)
            except UnicodeDecodeError as exc:
                raise not_utf8(path, exc) from exc
        # Excel writes semicolons where the decimal separator is a comma; the header decides.
        self.delimiter = ";" if first.count(";") > first.count(",") else ","
        with closing(self._rows(with_header=True)) as rows:
            header = next(rows, None)
        if header is None or not any(h.strip() for h in header[1]):
            raise ImportRejected(f"{path.name} is empty; its first row must be the header, "
                                 f"e.g. {','.join(COLUMNS)}")
        self.header = header[1]
        self.map: HeaderMap = map_header(self.header, strict=strict_columns)
        if self.map.problems:
            raise ImportRejected(
                f"{path.name} was not imported: its header row has "
                f"{plural(self.map.total, 'problem')}. See docs/csv-format.md for the columns.",
                problems=self.map.problems,
            )

    def _rows(self, *, with_header: bool = False) -> Generator[tuple[int, list[str]], None, None]:
        """(spreadsheet row number, cells) of every row; the header is row 1."""
        with _open(self.path) as handle, _field_limit(_READ_LIMIT):
            reader = csv.reader(handle, delimiter=self.delimiter, strict=True)
            number = 1
            start_line = 1
            try:
                for number, cells in enumerate(reader, start=1):
                    if number > 1 or with_header:
                        yield number, cells
                    start_line = reader.line_num + 1
            except UnicodeDecodeError as exc:
                raise not_utf8(self.path, exc) from exc
            except csv.Error as exc:
                raise self._broken(number + 1, start_line, str(exc)) from exc

    def _broken(self, row: int, line: int, why: str) -> ImportRejected:
        head = f"{self.path.name} was not imported: row {row} cannot be read"
        if "unexpected end of data" in why:
            column = self._open_quote_column(line)
            where = f" (column {column})" if column else ""
            return ImportRejected(
                f"{head}: a quote opened in it{where} is never closed, so the rest of the file "
                "would be read as one value; close the quote or remove it. Nothing was written.")
        if "field larger than field limit" in why:
            return ImportRejected(f"{head}: a value is longer than {_READ_LIMIT:,} characters; "
                                  "check for a quote that is never closed. Nothing was written.")
        return ImportRejected(
            f"{head}: {why}. A quote inside a quoted value is written as two quotes (\"\"). "
            "Nothing was written.")

    def _open_quote_column(self, line: int) -> str:
        """The column whose value starts the unclosed quote on physical ``line``."""
        with _open(self.path) as handle, _field_limit(_READ_LIMIT):
            for _ in range(line - 1):
                handle.readline()
            cells = next(csv.reader(handle, delimiter=self.delimiter), [])
        index = len(cells) - 1
        if index < 0:
            return ""
        name = self.map.columns[index] if index < len(self.map.columns) else None
        return name or str(index + 1)

    def duplicate_keys(self) -> dict[str, list[tuple[int, str]]]:
        """Keys on more than one row, ignoring case: lower key -> [(row, key as written)]."""
        index = self.map.columns.index("key")
        first: dict[str, tuple[int, str]] = {}
        dups: dict[str, list[tuple[int, str]]] = {}
        for number, cells in self._rows():
            raw = cells[index].strip() if index < len(cells) else ""
            if not raw:
                continue
            lower = raw.lower()
            if lower in first:
                dups.setdefault(lower, [first[lower]]).append((number, raw))
            else:
                first[lower] = (number, raw)
        return dups

    def records(self) -> Iterator[Record]:
        """Every non-blank row with its values by documented column."""
        columns, width, blank = self.map.columns, len(self.header), self.map.blank
        for number, cells in self._rows():
            if not any(cell.strip() for cell in cells):
                continue  # Excel's trailing ;;;; rows
            values = {c: unguard_cell(cell)
                      for c, cell in zip(columns, cells, strict=False) if c is not None}
            record = Record(number, cells, values)
            if len(cells) > width and any(c.strip() for c in cells[width:]):
                record.problems.append(
                    f"row {number}: has {len(cells)} values but the header has {width} "
                    f"columns; check for an unquoted {self.delimiter!r} inside a value")
            for i in blank:
                if i < len(cells) and cells[i].strip():
                    record.problems.append(
                        f"row {number}, column {i + 1}: has a value but its header cell is "
                        "empty; name the column in the header row or clear the value")
            yield record


__all__ = ["CustomerCsv", "Record", "capped", "not_utf8"]
