"""Import edge cases a new user hits (issues 17 and 11), through the real CLI on the real
database: keys that differ only in case, contact addresses shared by customers, columns that
are not part of the format, time zones and locales as people type them."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from comms.store import repo
from comms.store.db import Database, alembic_config
from comms.store.models import Customer

Cli = Callable[..., Any]
HEADER = "key,name,licences,primary_contact_email"
# What an import of HEADER's columns says when it updates a customer.
KEPT = ("Not in the file, so left as they are for existing customers: tenant_id, "
        "primary_domain, locale, time_zone, account_manager_name, account_manager_email, tags, "
        "primary_contact_name, billing_contact_name, billing_contact_email, "
        "technical_contact_name, technical_contact_email (new customers get the defaults).")


def write(tmp_path: Path, text: str, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def keys(db: Database) -> list[str]:
    with db.session() as s:
        return sorted(s.exec(select(Customer.key)).all())


def imported(cli: Cli, path: Path, *args: str) -> list[str]:
    result = cli("customers", "import", str(path), *args)
    assert result.exit_code == 0, result.output
    return str(result.stdout).splitlines()


# ---------------------------------------------------------------- keys ignoring case


def test_keys_differing_in_case_in_one_file_reject_both_rows(cli: Cli, db: Database,
                                                             tmp_path: Path) -> None:
    path = write(tmp_path, f"{HEADER}\nCUST-1,One,5,a@one.example\nK2,Two,5,b@two.example\n"
                           "cust-1,Again,5,c@one.example\n")
    result = cli("customers", "import", str(path), "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert keys(db) == ["K2"]
    rejects = (tmp_path / "in.rejects.csv").read_text(encoding="utf-8-sig").splitlines()
    assert rejects[1:] == [
        'CUST-1,One,5,a@one.example,"row 2, column key, value ""CUST-1"": duplicate key: row 4 '
        '(cust-1) has the same key ignoring case; each customer must appear on one row only"',
        'cust-1,Again,5,c@one.example,"row 4, column key, value ""cust-1"": duplicate key: row 2 '
        '(CUST-1) has the same key ignoring case; each customer must appear on one row only"',
    ]


def test_a_key_differing_in_case_updates_the_existing_customer(cli: Cli, db: Database,
                                                               tmp_path: Path) -> None:
    imported(cli, write(tmp_path, f"{HEADER}\nCUST-1,One,5,a@one.example\n"))
    lines = imported(cli, write(tmp_path, f"{HEADER}\ncust-1,One,7,a@one.example\n", "b.csv"))
    assert lines == [
        "Imported b.csv: 1 row; 0 new, 1 updated, 0 unchanged, 0 rejected.",
        "  CUST-1: licences: 5 -> 7",
        KEPT,
        "Row 2: key cust-1 updated the existing customer CUST-1 (keys are compared ignoring "
        "case; the key stays CUST-1).",
    ]
    assert keys(db) == ["CUST-1"]
    with db.session() as s:
        assert repo.get_customer(s, "CUST-1").licences == 7


@pytest.mark.parametrize("key", ["ÄRZTE-1", "ärzte-1", "ÖBB-7", "STRAßE-3"])
def test_a_key_with_a_letter_the_databases_cannot_compare_ignoring_case_is_refused(
    cli: Cli, db: Database, tmp_path: Path, key: str
) -> None:
    # SQLite's lower() (and its unique index on the lower-case key) folds ASCII only: such a
    # key made a second customer for another spelling (each mailed), or failed on the index
    # when the same file was imported again.
    result = cli("customers", "import", str(write(tmp_path, f"{HEADER}\n{key},Ärzte GmbH,10,"
                                                            "it@aerzte.example\n")))
    assert result.exit_code != 0
    letter = next(ch for ch in key if not ch.isascii())
    assert (f'row 2, column key, value "{key}": has the letter {letter!r}; a key may use the '
            "letters A-Z (any case), digits, punctuation and letters without case") in (
        " ".join(result.output.split()))
    assert keys(db) == []
    # Keys in scripts without case (and ASCII punctuation) are fine.
    imported(cli, write(tmp_path, f"{HEADER}\n顧客-1,Kunde,10,it@kunde.example\n", "cjk.csv"))
    assert keys(db) == ["顧客-1"]


def test_the_ledger_refuses_a_second_key_differing_only_in_case(db: Database) -> None:
    now = datetime(2026, 3, 2, tzinfo=UTC)

    def add(key: str) -> None:
        with db.session() as s:
            s.add(Customer(key=key, name=key, stage="imported", stage_entered_at=now,
                           created_at=now, updated_at=now))

    add("CUST-1")
    with pytest.raises(IntegrityError):
        add("cust-1")
    assert keys(db) == ["CUST-1"]


def test_upgrading_a_ledger_that_already_has_such_keys_still_works(db: Database) -> None:
    cfg = alembic_config(db.url)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
    with db.engine.begin() as conn:
        for key in ("CUST-1", "cust-1"):
            conn.execute(sa.text(
                "INSERT INTO customers (key, name, tenant_id, primary_domain, licences, locale, "
                "time_zone, stage, stage_entered_at, paused, opted_out, lost, "
                "account_manager_name, account_manager_email, created_at, updated_at) VALUES "
                "(:k, :k, '', '', 1, 'en', 'Europe/London', 'imported', :t, false, false, false, "
                "'', '', :t, :t)"), {"k": key, "t": datetime(2026, 3, 2)})
    db.upgrade()  # a plain index instead of the unique one: the upgrade must not fail
    assert db.current_revision() == db.head_revision()
    assert keys(db) == ["CUST-1", "cust-1"]


# ---------------------------------------------------------------- shared contact addresses


def test_a_contact_shared_by_two_customers_is_a_warning_and_listed(cli: Cli, db: Database,
                                                                   tmp_path: Path) -> None:
    path = write(tmp_path, f"{HEADER}\nK1,Alpha Ltd,5,Boss@Dup.example\n"
                           "K2,Beta Ltd,5,boss@dup.example\nK3,Gamma,5,c@three.example\n")
    lines = imported(cli, path)
    assert lines == [
        "Imported in.csv: 3 rows; 3 new, 0 updated, 0 unchanged, 0 rejected.",
        "Warning: boss@dup.example is a contact of 2 customers: K1 (Alpha Ltd), K2 (Beta Ltd).",
    ]
    listed = cli("customers", "list", "--shared-contacts")
    assert listed.exit_code == 0
    assert "boss@dup.example" in listed.stdout and "K1 (Alpha Ltd), K2 (Beta Ltd)" in (
        listed.stdout)
    assert listed.stdout.splitlines()[-1] == "1 address(es) shared by several customers."
    data = json.loads(cli("customers", "list", "--shared-contacts", "--json").stdout)
    assert data == [{"email": "boss@dup.example", "customers": [
        {"key": "K1", "name": "Alpha Ltd"}, {"key": "K2", "name": "Beta Ltd"}]}]


def test_dry_run_reports_and_rolls_back(cli: Cli, db: Database, tmp_path: Path) -> None:
    imported(cli, write(tmp_path, f"{HEADER}\nK1,Alpha Ltd,5,boss@dup.example\n"))
    path = write(tmp_path, f"{HEADER}\nk1,Alpha Ltd,6,boss@dup.example\n"
                           "K2,Beta Ltd,5,boss@dup.example\n", "b.csv")
    lines = imported(cli, path, "--dry-run")
    assert lines == [
        "Dry run of b.csv, nothing written: 2 rows; 1 new, 1 updated, 0 unchanged, 0 "
        "rejected.",
        "  K1: licences: 5 -> 6",
        KEPT,
        "Row 2: key k1 would update the existing customer K1 (keys are compared ignoring case; "
        "the key stays K1).",
        "Warning: boss@dup.example is a contact of 2 customers: K1 (Alpha Ltd), K2 (Beta Ltd).",
    ]
    assert keys(db) == ["K1"]
    with db.session() as s:
        assert repo.get_customer(s, "K1").licences == 5
        assert s.execute(sa.text("SELECT count(*) FROM stage_events")).scalar_one() == 1


# ---------------------------------------------------------------- columns


def test_unknown_columns_are_ignored_and_reported(cli: Cli, db: Database,
                                                  tmp_path: Path) -> None:
    path = write(tmp_path, f"{HEADER},CRM Owner,Region\nK1,One,5,a@one.example,Dana,EMEA\n")
    assert imported(cli, path) == [
        "Imported in.csv: 1 row; 1 new, 0 updated, 0 unchanged, 0 rejected.",
        "Ignored 2 columns that are not part of the format: CRM Owner, Region "
        "(--strict-columns refuses them).",
    ]
    assert keys(db) == ["K1"]


def test_strict_columns_refuses_unknown_columns(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = write(tmp_path, f"{HEADER},Region\nK1,One,5,a@one.example,EMEA\n")
    result = cli("customers", "import", str(path), "--strict-columns")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[1].startswith(
        "  - header column 5 'Region' is not a known column (--strict-columns); known columns: "
        "key, name, tenant_id,")
    assert keys(db) == []


@pytest.mark.parametrize(("typo", "meant"), [("time_zne", "time_zone"), ("Licencs", "licences"),
                                             ("billing_contact_emial", "billing_contact_email")])
def test_a_near_miss_of_a_known_column_is_an_error_naming_it(
    cli: Cli, db: Database, tmp_path: Path, typo: str, meant: str
) -> None:
    path = write(tmp_path, f"{HEADER},{typo}\nK1,One,5,a@one.example,x\n")
    result = cli("customers", "import", str(path))
    assert result.exit_code == 1
    assert (f"  - header column 5 '{typo}' is not a known column; did you mean '{meant}'? "
            "Rename it (a misspelt column would lose its values)") in result.stderr.splitlines()
    assert keys(db) == []


def test_documented_aliases_still_work(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = write(tmp_path, "key,name,licenses,primary_contact_email,timezone\n"
                           "K1,One,5,a@one.example,Europe/Paris\n")
    assert imported(cli, path)[0].startswith("Imported in.csv: 1 row; 1 new")
    with db.session() as s:
        k1 = repo.get_customer(s, "K1")
        assert (k1.licences, k1.time_zone) == (5, "Europe/Paris")


# ---------------------------------------------------------------- time zones and locales


def test_time_zones_match_ignoring_case_and_are_stored_canonically(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    path = write(tmp_path, f"{HEADER},time_zone\nK1,One,5,a@one.example,europe/london\n"
                           "K2,Two,5,b@two.example,AMERICA/NEW_YORK\n")
    imported(cli, path)
    with db.session() as s:
        assert [repo.get_customer(s, k).time_zone for k in ("K1", "K2")] == [
            "Europe/London", "America/New_York"]


def test_a_near_miss_time_zone_suggests_the_right_one(cli: Cli, db: Database,
                                                      tmp_path: Path) -> None:
    path = write(tmp_path, f"{HEADER},time_zone\nK1,One,5,a@one.example,america/new_yrok\n")
    result = cli("customers", "import", str(path))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[1] == (
        '  - row 2, column time_zone, value "america/new_yrok": is not a known time zone; did '
        "you mean America/New_York?")


def test_an_unknown_locale_is_refused_with_row_and_field(cli: Cli, db: Database,
                                                         tmp_path: Path) -> None:
    path = write(tmp_path, f"{HEADER},locale\nK1,One,5,a@one.example,xx\n"
                           "K2,Two,5,b@two.example,zz-ZZ\n")
    result = cli("customers", "import", str(path))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[1:] == [
        "  - row 2, column locale, value \"xx\": 'xx' is not a known language code (ISO 639); "
        "use one such as en, de or fr-CA",
        "  - row 3, column locale, value \"zz-ZZ\": 'zz' is not a known language code (ISO "
        "639); use one such as en, de or fr-CA",
    ]


def test_known_locales_without_templates_are_accepted(cli: Cli, db: Database,
                                                      tmp_path: Path) -> None:
    path = write(tmp_path, f"{HEADER},locale\nK1,One,5,a@one.example,fr\n"
                           "K2,Two,5,b@two.example,pt-BR\nK3,Three,5,c@three.example,fil\n")
    imported(cli, path)
    with db.session() as s:
        assert [repo.get_customer(s, k).locale for k in ("K1", "K2", "K3")] == [
            "fr", "pt-BR", "fil"]
