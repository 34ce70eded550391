"""Hostile and broken CSV data through the real `comms customers import` (issue 12): every bad
input is one clear error naming row and column, nothing is written, no traceback; on SQLite and
PostgreSQL (a NUL used to crash PostgreSQL with a traceback full of customer data)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import select

from comms.store.db import Database
from comms.store.models import Customer, Suppression

Cli = Callable[..., Any]
HEADER = ["key", "name", "licences", "primary_contact_email"]


def csv_file(tmp_path: Path, rows: list[list[str]], header: list[str] = HEADER,
             name: str = "in.csv") -> Path:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    path = tmp_path / name
    path.write_text(out.getvalue(), encoding="utf-8")
    return path


def customers(db: Database) -> list[str]:
    with db.session() as s:
        return sorted(s.exec(select(Customer.key)).all())


def rejected(cli: Cli, db: Database, path: Path, *args: str) -> str:
    result = cli("customers", "import", str(path), *args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert customers(db) == []
    return str(result.stderr)


@pytest.mark.parametrize(
    ("column", "value", "shown", "what"),
    [
        ("name", "Contoso\rLtd", "Contoso\\x0dLtd", "a carriage return (CR) at position 8"),
        ("name", "Contoso\nLtd", "Contoso\\x0aLtd", "a line break (LF) at position 8"),
        ("name", "Contoso\x00Ltd", "Contoso\\x00Ltd", "a NUL byte at position 8"),
        ("name", "\x1b]8;;https://evil.example\x1b\\click", "\\x1b]8;;https://evil.example"
         "\\x1b\\click", "an escape (ESC) at position 1"),
        ("name", "Contoso\tLtd", "Contoso\\x09Ltd", "a tab at position 8"),
        ("name", "Contoso\x85Ltd", "Contoso\\x85Ltd", "the control character U+0085 at "
         "position 8"),
        ("key", "K\x7f1", "K\\x7f1", "the control character U+007F at position 2"),
        ("primary_contact_email", "a@one.example\r\nBcc: all@evil.example",
         "a@one.example\\x0d\\x0aBcc: all@evil.example", "a carriage return (CR) at position 14"),
    ],
)
def test_control_characters_are_refused_with_row_and_field(
    cli: Cli, db: Database, tmp_path: Path, column: str, value: str, shown: str, what: str
) -> None:
    row = {"key": "K1", "name": "One", "licences": "5", "primary_contact_email": "a@one.example"}
    row[column] = value
    path = csv_file(tmp_path, [list(row.values())])
    err = rejected(cli, db, path)
    assert (f'row 2, column {column}, value "{shown}": contains {what}; control characters '
            "are not allowed (remove it, or retype the value)") in err
    assert "\x1b" not in err and "\x00" not in err  # nothing reaches the terminal raw


def test_tabs_and_spaces_around_a_value_are_trimmed(cli: Cli, db: Database,
                                                    tmp_path: Path) -> None:
    path = csv_file(tmp_path, [["K1", "\tOne ", "5", " a@one.example\t"]])
    assert cli("customers", "import", str(path)).exit_code == 0
    assert customers(db) == ["K1"]


def test_a_million_columns_are_refused_at_once(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text("key,name,licences,primary_contact_email" + ",x" * 1_000_000 + "\n"
                    "K1,One,5,a@one.example\n", encoding="utf-8")
    err = rejected(cli, db, path)
    assert err.splitlines() == [
        "Error: wide.csv was not imported: its header row has 1 problem. See "
        "docs/csv-format.md for the columns.",
        "  - the header row has 1,000,004 columns; the format has 17 (files with up to 1,000 "
        "columns are read, extra columns are ignored)",
    ]


def test_header_problems_are_capped_at_100(cli: Cli, db: Database, tmp_path: Path) -> None:
    typos = ["nmae"] * 300  # each one a near miss of "name"
    path = csv_file(tmp_path, [], header=[*HEADER, *typos])
    lines = rejected(cli, db, path).splitlines()
    assert lines[0] == ("Error: in.csv was not imported: its header row has 300 problems. "
                        "See docs/csv-format.md for the columns.")
    assert len(lines) == 1 + 100 + 1
    assert lines[1] == ("  - header column 5 'nmae' is not a known column; did you mean 'name'? "
                        "Rename it (a misspelt column would lose its values)")
    assert lines[-1] == "  - and 200 more problem(s)"


def test_row_problems_are_capped_at_100(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = csv_file(tmp_path, [[f"K{i}", "", "5", "a@one.example"] for i in range(150)])
    lines = rejected(cli, db, path).splitlines()
    assert lines[0].startswith("Error: in.csv was not imported: 150 of 150 rows have problems")
    assert len(lines) == 1 + 100 + 1
    assert lines[-1] == "  - and 50 more problem(s)"


def test_a_field_over_128_kib_is_named_without_echoing_it(cli: Cli, db: Database,
                                                          tmp_path: Path) -> None:
    path = csv_file(tmp_path, [["K1", "x" * (128 * 1024 + 1), "5", "a@one.example"]])
    err = rejected(cli, db, path)
    assert ("row 2, column name: is 131,073 characters long, more than the 131,072 any field "
            "may have; check for a quote that is never closed") in err
    assert "xxxxxxxxxx" not in err


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("99999999999999999999999999", "is more than 10,000,000; write the number of "
         "licences such as 25"),
        ("10000001", "is more than 10,000,000; write the number of licences such as 25"),
        ("٣", "is not a whole number; write the number of licences such as 25"),
        ("1_000", "is not a whole number; write the number of licences such as 25"),
        ("+5", "is not a whole number; write the number of licences such as 25"),
    ],
)
def test_licences_must_be_a_plain_ascii_number_in_range(
    cli: Cli, db: Database, tmp_path: Path, value: str, why: str
) -> None:
    path = csv_file(tmp_path, [["K1", "One", value, "a@one.example"]])
    assert f'row 2, column licences, value "{value}": {why}' in rejected(cli, db, path)


def test_an_unterminated_quote_names_its_row_and_column(cli: Cli, db: Database,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("key,name,licences,primary_contact_email\nK1,One,5,a@one.example\n"
                    'K2,"Two,5,b@two.example\nK3,Three,5,c@three.example\n', encoding="utf-8")
    assert rejected(cli, db, path).strip() == (
        "Error: in.csv was not imported: row 3 cannot be read: a quote opened in it (column "
        "name) is never closed, so the rest of the file would be read as one value; close the "
        "quote or remove it. Nothing was written.")


def test_text_after_a_closing_quote_is_refused(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('key,name,licences,primary_contact_email\nK1,"One" Ltd,5,a@one.example\n',
                    encoding="utf-8")
    err = rejected(cli, db, path)
    assert err.startswith("Error: in.csv was not imported: row 2 cannot be read: ',' expected "
                          "after '\"'. A quote inside a quoted value is written as two quotes")


def test_a_value_under_a_blank_header_cell_is_named(cli: Cli, db: Database,
                                                    tmp_path: Path) -> None:
    path = csv_file(tmp_path, [["K1", "One", "lost?", "5", "a@one.example"]],
                    header=["key", "name", "", "licences", "primary_contact_email"])
    assert ("row 2, column 3: has a value but its header cell is empty; name the column in "
            "the header row or clear the value") in rejected(cli, db, path)
    # An empty column under a blank header cell is fine (Excel leaves those).
    path = csv_file(tmp_path, [["K1", "One", "", "5", "a@one.example"]],
                    header=["key", "name", "", "licences", "primary_contact_email"])
    assert cli("customers", "import", str(path)).exit_code == 0


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` made unwritable, also for root (which ignores the mode): immutable flag."""
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(
        ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        probe = folder / ".probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.fail("cannot make a folder read-only here (root without chattr)")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_skip_invalid_in_a_read_only_folder_is_a_clear_error(cli: Cli, db: Database,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = csv_file(folder, [["K1", "One", "5", "a@one.example"], ["K2", "Two", "-5",
                                                                   "b@two.example"]])
    with read_only(folder):
        result = cli("customers", "import", str(path), "--skip-invalid")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"Error: Cannot write {folder / 'in.rejects.csv'}: permission denied; choose a folder "
        "you can write to.")
    assert customers(db) == []  # the good row is not imported without its rejects file


def test_export_to_a_directory_is_a_clear_error(cli: Cli, db: Database, tmp_path: Path) -> None:
    result = cli("customers", "export", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: Cannot write {tmp_path}: it is a directory; give a file name inside it.")


def test_export_is_private_and_atomic(cli: Cli, db: Database, tmp_path: Path,
                                      sample_csv: Path) -> None:
    assert cli("customers", "import", str(sample_csv)).exit_code == 0
    out = tmp_path / "out.csv"
    assert cli("customers", "export", str(out)).exit_code == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_opt_out_does_not_treat_underscore_as_a_wildcard(cli: Cli, db: Database,
                                                         tmp_path: Path) -> None:
    path = csv_file(tmp_path, [["K1", "One", "5", "bob@x.example"],
                               ["K2", "Two", "5", "b%b@y.example"]])
    assert cli("customers", "import", str(path)).exit_code == 0
    out = cli("contacts", "opt-out", "b_b@x.example")
    assert out.stdout.strip() == "b_b@x.example suppressed (a contact of 0 customers)."
    out = cli("contacts", "opt-out", "BOB@x.example")
    assert out.stdout.strip() == "bob@x.example suppressed (a contact of 1 customer)."
    with db.session() as s:
        assert sorted(s.exec(select(Suppression.email)).all()) == [
            "b_b@x.example", "bob@x.example"]
        assert s.execute(sa.text("SELECT count(*) FROM contacts")).scalar_one() == 2
