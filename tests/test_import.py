"""CSV import: the documented columns, every bad input's exact message, upsert semantics and
all-or-nothing writes, on the real database (SQLite, or PostgreSQL when configured)."""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from comms.campaign import load_campaign
from comms.config import Settings
from comms.errors import ImportRejected
from comms.services.customers import export_customers, import_customers
from comms.services.importer import COLUMNS, ImportResult
from comms.store import repo
from comms.store.db import Database
from comms.store.models import Contact, Customer, StageEvent

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=1)
HEADER = "key,name,licences,primary_contact_email"


def run(db: Database, path: Path, *, now: datetime = NOW, **kw: object) -> ImportResult:
    return import_customers(db, path, settings=Settings(), campaign=load_campaign(), now=now,
                            by="tester", **kw)  # type: ignore[arg-type]


def write(tmp_path: Path, text: str, name: str = "in.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.exec(select(sa.func.count()).select_from(model)).one())


def problems_of(db: Database, tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ImportRejected) as exc:
        run(db, write(tmp_path, text))
    assert count(db, Customer) == 0
    return exc.value.problems


def info(db: Database, key: str) -> object:
    with db.session() as s:
        return repo.customer_info(s, repo.get_customer(s, key))


# ---------------------------------------------------------------- the sample file


def test_sample_file_imports_every_customer(db: Database, sample_csv: Path) -> None:
    result = run(db, sample_csv)
    assert (result.rows, result.created, result.updated, result.rejected) == (24, 24, 0, 0)
    hostile = info(db, "CUST-0008")
    assert hostile.name == "<b>Contoso & Sons</b>"  # type: ignore[attr-defined]
    mueller = info(db, "CUST-0006")
    assert (mueller.name, mueller.locale, mueller.time_zone) == (  # type: ignore[attr-defined]
        "Müller GmbH", "de", "Europe/Berlin")
    assert mueller.tags == ("dach", "emea", "wave-1")  # type: ignore[attr-defined]
    assert [(c.role, c.email) for c in mueller.contacts] == [  # type: ignore[attr-defined]
        ("primary", "juergen.mueller@mueller-gmbh.example"),
        ("billing", "buchhaltung@mueller-gmbh.example"),
    ]
    # The same person in the primary and billing columns is one contact, with the first role.
    vanarsdel = info(db, "CUST-0022")
    assert [(c.role, c.email) for c in vanarsdel.contacts] == [  # type: ignore[attr-defined]
        ("primary", "ruth@vanarsdel.example")]
    with db.session() as s:
        licences = sorted(s.exec(select(Customer.licences)).all())
        assert {1, 24, 25, 26, 300} <= set(licences)
        rows = s.exec(select(Customer)).all()
        assert {r.stage for r in rows} == {"imported"}
        assert {r.next_due_at for r in rows} == {NOW}
        events = s.exec(select(StageEvent)).all()
        assert len(events) == 24
        assert {(e.kind, e.from_stage, e.to_stage, e.source, e.by) for e in events} == {
            ("import", None, "imported", "import", "tester")}
        first = repo.get_customer(s, "CUST-0001")
        assert [e.note for e in repo.events_of(s, first.id or 0)] == [
            "imported from customers.csv row 2"]


def test_reimporting_the_same_file_changes_nothing(db: Database, sample_csv: Path) -> None:
    run(db, sample_csv)
    again = run(db, sample_csv, now=LATER)
    assert (again.created, again.updated, again.unchanged) == (0, 0, 24)
    assert count(db, StageEvent) == 24
    with db.session() as s:
        assert {r.updated_at for r in s.exec(select(Customer)).all()} == {NOW}


def test_export_then_import_changes_nothing(db: Database, sample_csv: Path,
                                            tmp_path: Path) -> None:
    run(db, sample_csv)
    out = tmp_path / "exported.csv"
    assert export_customers(db, out) == 24
    with out.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COLUMNS
    again = run(db, out, now=LATER)
    assert (again.rows, again.created, again.updated, again.unchanged) == (24, 0, 0, 24)
    assert count(db, StageEvent) == 24


# ---------------------------------------------------------------- formats


def test_bom_semicolons_and_case_insensitive_headers(db: Database, tmp_path: Path) -> None:
    text = (
        "\ufeffKEY;Name;Licenses;Primary Contact Email;Time-Zone;TAGS\r\n"
        "K1;Société Générale Exemple;25;Amelie@SG-Exemple.example;Europe/Paris;EMEA|wave-1\r\n"
        ";;;;;\r\n"  # Excel's trailing empty row
    )
    result = run(db, write(tmp_path, text))
    assert (result.rows, result.created) == (1, 1)
    k1 = info(db, "K1")
    assert k1.name == "Société Générale Exemple"  # type: ignore[attr-defined]
    assert k1.time_zone == "Europe/Paris"  # type: ignore[attr-defined]
    assert k1.tags == ("emea", "wave-1")  # type: ignore[attr-defined]
    assert k1.contacts[0].email == "amelie@sg-exemple.example"  # type: ignore[attr-defined]


def test_defaults_and_several_contacts_per_role(db: Database, tmp_path: Path) -> None:
    text = (
        "key,name,licences,primary_contact_name,primary_contact_email,billing_contact_email\n"
        'K1,"Litware, Inc.",3,Ann|Bob,ann@litware.example|bob@litware.example,'
        "ap@example.com\n"
    )
    run(db, write(tmp_path, text))
    k1 = info(db, "K1")
    assert k1.name == "Litware, Inc."  # type: ignore[attr-defined]
    assert (k1.locale, k1.time_zone, k1.stage) == ("en", "Europe/London",  # type: ignore[attr-defined]
                                                   "imported")
    assert [(c.role, c.name, c.email) for c in k1.contacts] == [  # type: ignore[attr-defined]
        ("primary", "Ann", "ann@litware.example"),
        ("primary", "Bob", "bob@litware.example"),
        ("billing", "", "ap@example.com"),
    ]


def test_stage_column_sets_the_starting_stage_of_new_customers_only(
    db: Database, tmp_path: Path
) -> None:
    text = (f"{HEADER},stage\nK1,One,1,a@one.example,awaiting_cancellation\n"
            "K2,Two,1,b@two.example,\n")
    run(db, write(tmp_path, text))
    with db.session() as s:
        k1, k2 = repo.get_customer(s, "K1"), repo.get_customer(s, "K2")
        assert (k1.stage, k1.csp_live_at, k2.stage, k2.csp_live_at) == (
            "awaiting_cancellation", NOW, "imported", None)
    # Existing customers keep their stage: moves go through `set-stage` and the stage machine.
    moved = write(tmp_path, f"{HEADER},stage\nK1,One,1,a@one.example,invited\n", "again.csv")
    result = run(db, moved, now=LATER)
    assert result.unchanged == 1
    assert info(db, "K1").stage == "awaiting_cancellation"  # type: ignore[attr-defined]
    # ... and the operator is told, with the command that does move it.
    assert result.stages_ignored == [(2, "K1", "invited", "awaiting_cancellation")]
    assert ("Row 2: stage invited ignored for K1, already in the ledger at awaiting_cancellation "
            "(import sets the stage of new customers only; move it with "
            "`comms customers set-stage K1 invited`).") in result.summary_lines()


# ---------------------------------------------------------------- upsert


def test_changed_row_updates_and_records_what_changed(db: Database, tmp_path: Path) -> None:
    text = (
        "key,name,licences,tags,primary_contact_name,primary_contact_email,"
        "billing_contact_email\n"
        "K1,Contoso Dental Ltd,24,wave-1|emea,Sarah,sarah@contoso.example,"
        "old-billing@contoso.example\n"
        "K2,Northwind Traders,25,,Nancy,nancy@northwind.example,\n"
    )
    run(db, write(tmp_path, text))
    changed = (
        "key,name,licences,tags,primary_contact_name,primary_contact_email,"
        "billing_contact_email\n"
        "K1,Contoso Dental Ltd,26,wave-2|emea,Sarah Jones,sarah@contoso.example,"
        "billing@contoso.example\n"
        "K2,Northwind Traders,25,,Nancy,nancy@northwind.example,\n"
    )
    result = run(db, write(tmp_path, changed, "changed.csv"), now=LATER)
    assert (result.updated, result.unchanged) == (1, 1)
    with db.session() as s:
        k1 = repo.get_customer(s, "K1")
        assert (k1.licences, k1.updated_at) == (26, LATER)
        events = repo.events_of(s, k1.id or 0)
        assert [(e.kind, e.from_stage, e.to_stage, e.at) for e in events] == [
            ("import", None, "imported", NOW), ("update", "imported", "imported", LATER)]
        assert events[1].note == (
            'changed.csv row 2: licences: 24 -> 26; tags: "emea|wave-1" -> "emea|wave-2"; '
            "contact old-billing@contoso.example removed (billing); "
            'contact sarah@contoso.example: name "Sarah" -> "Sarah Jones"; '
            "contact billing@contoso.example added (billing)"
        )
    k1_info = info(db, "K1")
    assert [(c.role, c.name, c.email) for c in k1_info.contacts] == [  # type: ignore[attr-defined]
        ("primary", "Sarah Jones", "sarah@contoso.example"),
        ("billing", "", "billing@contoso.example"),
    ]
    assert k1_info.tags == ("emea", "wave-2")  # type: ignore[attr-defined]
    assert result.changes == {"K1": events[1].note.removeprefix("changed.csv row 2: ")}


def test_a_column_the_file_does_not_have_changes_nothing_for_existing_customers(
    db: Database, tmp_path: Path
) -> None:
    # A licence-correction sheet with the required columns only must not reset a Sydney
    # customer to London business hours, English, no account manager, no wave and no billing
    # contact (the defaults are for new customers).
    full = ("key,name,licences,locale,time_zone,account_manager_email,tags,"
            "primary_contact_name,primary_contact_email,billing_contact_email\n"
            "AU1,Sydney Dental,10,de,Australia/Sydney,am@fabrikam.example,wave-1,Ann,"
            "it@dental.example,billing@dental.example\n")
    run(db, write(tmp_path, full))
    fix = ("key,name,licences,primary_contact_email\n"
           "AU1,Sydney Dental,30,it@dental.example\n"
           "NEW1,New Customer,5,a@new.example\n")
    result = run(db, write(tmp_path, fix, "licences.csv"), now=LATER)
    assert (result.created, result.updated) == (1, 1)
    assert result.changes == {"AU1": "licences: 10 -> 30"}
    au1 = info(db, "AU1")
    assert (au1.licences, au1.locale, au1.time_zone, au1.account_manager_email,  # type: ignore[attr-defined]
            au1.tags) == (30, "de", "Australia/Sydney", "am@fabrikam.example", ("wave-1",))
    assert [(c.role, c.name, c.email) for c in au1.contacts] == [  # type: ignore[attr-defined]
        ("primary", "Ann", "it@dental.example"), ("billing", "", "billing@dental.example")]
    new = info(db, "NEW1")
    assert (new.locale, new.time_zone) == ("en", "Europe/London")  # type: ignore[attr-defined]
    assert result.kept_columns == [
        "tenant_id", "primary_domain", "locale", "time_zone", "account_manager_name",
        "account_manager_email", "tags", "primary_contact_name", "billing_contact_name",
        "billing_contact_email", "technical_contact_name", "technical_contact_email"]
    assert ("Not in the file, so left as they are for existing customers: tenant_id, "
            "primary_domain, locale, time_zone, account_manager_name, account_manager_email, "
            "tags, primary_contact_name, billing_contact_name, billing_contact_email, "
            "technical_contact_name, technical_contact_email (new customers get the "
            "defaults).") in result.summary_lines()
    # A column the file has is read as written, an empty cell included: it clears the value.
    # (locale and time zone have a default, which is for new customers: empty keeps them).
    cleared = ("key,name,licences,locale,time_zone,account_manager_email,tags,"
               "primary_contact_email,billing_contact_email\n"
               "AU1,Sydney Dental,30,,,,,it@dental.example,\n")
    result = run(db, write(tmp_path, cleared, "cleared.csv"), now=LATER)
    au1 = info(db, "AU1")
    assert (au1.account_manager_email, au1.tags, au1.time_zone,  # type: ignore[attr-defined]
            au1.locale) == ("", (), "Australia/Sydney", "de")
    assert [c.email for c in au1.contacts] == ["it@dental.example"]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- every bad input


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("K1,One,5,not-an-email",
         'row 2, column primary_contact_email, value "not-an-email": not a valid email '
         "address: An email address must have an @-sign."),
        ("K1,One,5,ann@@one.example",
         'row 2, column primary_contact_email, value "ann@@one.example": not a valid email '
         "address: The part after the @-sign contains invalid characters: '@'."),
        ("K1,One,-3,a@one.example",
         'row 2, column licences, value "-3": cannot be negative; write the number of '
         "licences such as 25"),
        ("K1,One,ten,a@one.example",
         'row 2, column licences, value "ten": is not a whole number; write the number of '
         "licences such as 25"),
        ("K1,One,2.5,a@one.example",
         'row 2, column licences, value "2.5": is not a whole number; write the number of '
         "licences such as 25"),
        ("K1,One,,a@one.example",
         "row 2, column licences: is empty; write the number of licences, a whole number "
         "such as 25"),
        (",One,5,a@one.example",
         "row 2, column key: is empty; every customer needs a unique key (e.g. its CRM id)"),
        ("K1,,5,a@one.example", "row 2, column name: is empty; every customer needs a name"),
        ("K1,One,5,",
         "row 2, column primary_contact_email: is empty; every customer needs at least one "
         "contact email (primary, billing or technical)"),
    ],
)
def test_bad_value_is_named_exactly(db: Database, tmp_path: Path, row: str,
                                    problem: str) -> None:
    assert problems_of(db, tmp_path, f"{HEADER}\n{row}\n") == [problem]


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("stage", "shipped",
         'row 2, column stage, value "shipped": is not a stage of the campaign; use one of: '
         "imported, announced, invited, approved, awaiting_cancellation, completed"),
        ("time_zone", "Europe/Londn",
         'row 2, column time_zone, value "Europe/Londn": is not a known time zone; did you mean '
         "Europe/London or Europe/Lisbon or Europe/Oslo?"),
        ("tenant_id", "contoso",
         'row 2, column tenant_id, value "contoso": is not a Microsoft tenant id (a GUID such '
         "as 8c6f0a2e-3b1d-4f7a-9e2c-5d4b3a2f1e0d); leave it empty if unknown"),
        ("locale", "English",
         'row 2, column locale, value "English": is not a language code; use one such as en, '
         "de or fr-CA"),
        ("primary_domain", "https://one.example",
         'row 2, column primary_domain, value "https://one.example": is not a domain name; '
         "write it like contoso.example (no https://, no @)"),
        ("account_manager_email", "priya",
         'row 2, column account_manager_email, value "priya": not a valid email address: An '
         "email address must have an @-sign."),
        ("primary_contact_name", "Ann|Bob",
         'row 2, column primary_contact_name, value "Ann|Bob": has 2 names for 1 address(es) '
         "in primary_contact_email; separate several contacts with | in both columns, in the "
         "same order"),
    ],
)
def test_bad_optional_value_is_named_exactly(db: Database, tmp_path: Path, column: str,
                                             value: str, problem: str) -> None:
    text = f"{HEADER},{column}\nK1,One,5,a@one.example,{value}\n"
    assert problems_of(db, tmp_path, text) == [problem]


def test_name_without_email_is_named(db: Database, tmp_path: Path) -> None:
    text = f"{HEADER},billing_contact_name,billing_contact_email\nK1,One,5,a@one.example,Ann,\n"
    assert problems_of(db, tmp_path, text) == [
        'row 2, column billing_contact_email: is empty but billing_contact_name is "Ann"; add '
        "the address or clear the name"]


def test_duplicate_key_names_both_rows(db: Database, tmp_path: Path) -> None:
    text = f"{HEADER}\nK1,One,5,a@one.example\nK2,Two,5,b@two.example\nK1,Again,5,c@one.example\n"
    assert problems_of(db, tmp_path, text) == [
        'row 2, column key, value "K1": duplicate key: row 4 has the same key; each customer '
        "must appear on one row only",
        'row 4, column key, value "K1": duplicate key: row 2 has the same key; each customer '
        "must appear on one row only"]


def test_too_many_values_is_named(db: Database, tmp_path: Path) -> None:
    text = f"{HEADER}\nK1,Contoso, Inc.,5,a@one.example\n"
    assert problems_of(db, tmp_path, text) == [
        'row 2, column licences, value "Inc.": is not a whole number; write the number of '
        "licences such as 25",
        'row 2, column primary_contact_email, value "5": not a valid email address: An email '
        "address must have an @-sign.",
        "row 2: has 5 values but the header has 4 columns; check for an unquoted ',' inside a "
        "value",
    ]


def test_example_domains_are_accepted(db: Database, tmp_path: Path) -> None:
    text = (f"{HEADER},billing_contact_email\nK1,One,5,ann@contoso.example,"
            "bill@example.com\nK2,Two,5,a@sub.fabrikam.example,\n")
    assert run(db, write(tmp_path, text)).created == 2


def test_every_problem_of_every_row_is_listed_and_nothing_written(
    db: Database, tmp_path: Path
) -> None:
    good = "".join(f"G{i},Good {i},5,g{i}@good.example\n" for i in range(25))
    text = f"{HEADER}\n{good}B1,Bad,-1,nope\nB2,,x,b@bad.example\n"
    path = write(tmp_path, text)
    with pytest.raises(ImportRejected) as exc:
        # Small batches: the good rows were already written when the bad ones came.
        import_customers(db, path, settings=Settings(), campaign=load_campaign(), now=NOW,
                         by="tester", batch_size=10)
    assert str(exc.value) == (
        "in.csv was not imported: 2 of 27 rows have problems, nothing was written. Fix them "
        "and import again, or add --skip-invalid to import the good rows and write the bad ones "
        "to in.rejects.csv.\n"
        '  - row 27, column licences, value "-1": cannot be negative; write the number of '
        "licences such as 25\n"
        '  - row 27, column primary_contact_email, value "nope": not a valid email address: An '
        "email address must have an @-sign.\n"
        "  - row 28, column name: is empty; every customer needs a name\n"
        '  - row 28, column licences, value "x": is not a whole number; write the number of '
        "licences such as 25"
    )
    assert count(db, Customer) == 0
    assert count(db, Contact) == 0
    assert count(db, StageEvent) == 0
    assert not (tmp_path / "in.rejects.csv").exists()


# ---------------------------------------------------------------- file-level problems


def test_header_problems_are_listed(db: Database, tmp_path: Path) -> None:
    path = write(tmp_path, "key,nmae,licences,emial,key\nK1,One,5,a@one.example,K1\n")
    with pytest.raises(ImportRejected) as exc:
        run(db, path)
    assert exc.value.message == (
        "in.csv was not imported: its header row has 4 problems. See docs/csv-format.md for "
        "the columns.")
    # 'emial' is like no documented column: ignored (see test_columns.py), not an error.
    assert exc.value.problems == [
        "header column 2 'nmae' is not a known column; did you mean 'name'? Rename it (a "
        "misspelt column would lose its values)",
        "header column 5 'key' repeats column 1; each column may appear once",
        "the required column 'name' is missing from the header",
        "the header has no contact email column; add primary_contact_email (and optionally "
        "billing_contact_email, technical_contact_email)",
    ]


def test_not_utf8_empty_and_missing_files(db: Database, tmp_path: Path) -> None:
    latin = write(tmp_path, f"{HEADER}\nK1,Café,1,a@one.example\n", "latin.csv", "cp1252")
    with pytest.raises(ImportRejected) as exc:
        run(db, latin)
    assert str(exc.value) == (
        "latin.csv is not UTF-8 text (it contains the byte 0xe9); nothing was written. In "
        'Excel use Save As > "CSV UTF-8 (Comma delimited)".')
    with pytest.raises(ImportRejected) as exc:
        run(db, write(tmp_path, "", "empty.csv"))
    assert str(exc.value) == (
        f"empty.csv is empty; its first row must be the header, e.g. {','.join(COLUMNS)}")
    with pytest.raises(ImportRejected) as exc:
        run(db, tmp_path / "missing.csv")
    assert str(exc.value) == f"{tmp_path / 'missing.csv'} does not exist."


# ---------------------------------------------------------------- --skip-invalid, --dry-run


def test_skip_invalid_imports_good_rows_and_writes_rejects(db: Database,
                                                           tmp_path: Path) -> None:
    text = ("Key;Name;Licences;Primary_Contact_Email\n"
            "K1;One;5;a@one.example\nK2;Two;-5;b@two.example\nK3;Three;7;c@three.example\n")
    result = run(db, write(tmp_path, text, "wave.csv"), skip_invalid=True)
    assert (result.created, result.rejected) == (2, 1)
    assert result.rejects_file == tmp_path / "wave.rejects.csv"
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["wave.csv", "wave.rejects.csv"]
    assert list(tmp_path.glob(".*")) == []  # no temporary file left behind
    raw = result.rejects_file.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # Excel needs the BOM for non-ASCII text
    assert raw.decode("utf-8-sig").splitlines() == [
        "Key;Name;Licences;Primary_Contact_Email;problems",
        'K2;Two;-5;b@two.example;"row 3, column licences, value ""-5"": cannot be negative; '
        'write the number of licences such as 25"',
    ]
    with db.session() as s:
        assert s.exec(select(Customer.key).order_by(col(Customer.key))).all() == ["K1", "K3"]
    # The rejects file, once fixed, imports as it is: its problems column is ignored.
    fixed = result.rejects_file.read_text(encoding="utf-8-sig").replace(";-5;", ";5;")
    again = run(db, write(tmp_path, fixed, "fixed.csv"))
    assert (again.created, again.unchanged) == (1, 0)


def test_dry_run_writes_nothing(db: Database, sample_csv: Path) -> None:
    result = run(db, sample_csv, dry_run=True)
    assert (result.dry_run, result.created) == (True, 24)
    assert count(db, Customer) == 0
    assert count(db, StageEvent) == 0


def test_formula_like_cells_are_guarded_on_export_and_round_trip(db: Database,
                                                                 tmp_path: Path) -> None:
    text = (f'{HEADER}\nK1,"=HYPERLINK(""https://evil.example"")",5,a@one.example\n'
            "K2,-Dash Ltd,3,b@two.example\n")
    run(db, write(tmp_path, text))
    out = tmp_path / "out.csv"
    export_customers(db, out)
    with out.open(encoding="utf-8-sig", newline="") as f:
        names = {r["key"]: r["name"] for r in csv.DictReader(f)}
    assert names == {"K1": "'=HYPERLINK(\"https://evil.example\")", "K2": "'-Dash Ltd"}
    assert run(db, out, now=LATER).unchanged == 2
    assert info(db, "K2").name == "-Dash Ltd"  # type: ignore[attr-defined]
