"""`comms customers ...` end to end through the real CLI on the real database: exit codes and
the exact lines a user sees; plus `--help` on every command of the whole app."""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlmodel import col, select

from comms import outbox
from comms.cli import app
from comms.store import bodies, repo
from comms.store.db import Database
from comms.store.models import Customer, Message, StageEvent, Suppression, new_message_row

Cli = Callable[..., Any]


@pytest.fixture
def loaded(cli: Cli, db: Database, sample_csv: Path) -> Database:
    result = cli("customers", "import", str(sample_csv))
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "Imported customers.csv: 24 rows; 24 new, 0 updated, 0 unchanged, 0 rejected.\n")
    return db


def customer(db: Database, key: str) -> Customer:
    with db.session() as s:
        return repo.get_customer(s, key)


def events(db: Database, key: str) -> list[StageEvent]:
    with db.session() as s:
        return repo.events_of(s, repo.get_customer(s, key).id or 0)


def queue(db: Database, key: str, message: str, stage: str, *, status: str = "queued",
          at: datetime | None = None, sent_at: datetime | None = None,
          sequence: int = 0) -> int:
    """An outbox row as the planner would write it (the outbox itself is tested elsewhere)."""
    at = at or datetime.now(UTC)
    with db.session() as s:
        row = Message(
            send_id=uuid.uuid4().hex, customer_id=repo.get_customer(s, key).id or 0,
            message=message, sequence=sequence, stage=stage, status=status,
            to_json="[]", subject="s", body=bodies.encode("<p>h</p>", "t"), send_after=at,
            sent_at=sent_at, created_at=at, updated_at=at,
        )
        s.add(row)
        s.flush()
        return row.id or 0


def status_of(db: Database, message_id: int) -> tuple[str, str]:
    with db.session() as s:
        m = s.get(Message, message_id)
        assert m is not None
        return m.status, m.last_error


# ---------------------------------------------------------------- import


def test_import_rejection_is_one_clear_error(cli: Cli, db: Database, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("key,name,licences,primary_contact_email\nK1,One,-2,a@one.example\n")
    result = cli("customers", "import", str(bad))
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: bad.csv was not imported: 1 of 1 row have problems, nothing was written. "
        "Fix them and import again, or add --skip-invalid to import the good rows and write "
        "the bad ones to bad.rejects.csv.\n"
        '  - row 2, column licences, value "-2": cannot be negative; write the number of '
        "licences such as 25\n"
    )
    skipped = cli("customers", "import", str(bad), "--skip-invalid")
    assert skipped.exit_code == 0
    assert skipped.stdout == (
        "Imported bad.csv: 1 row; 0 new, 0 updated, 0 unchanged, 1 rejected.\n"
        f"1 invalid row(s) were skipped; they are in {tmp_path / 'bad.rejects.csv'} with a "
        "'problems' column.\n"
    )


def test_import_dry_run_and_changes_are_shown(cli: Cli, loaded: Database, sample_csv: Path,
                                              tmp_path: Path) -> None:
    changed = tmp_path / "changed.csv"
    changed.write_text(sample_csv.read_text(encoding="utf-8").replace(
        "CUST-0004,Fourth Coffee,", "CUST-0004,Fourth Coffee Roasters,"), encoding="utf-8")
    dry = cli("customers", "import", str(changed), "--dry-run")
    assert dry.exit_code == 0
    assert dry.stdout == (
        "Dry run of changed.csv, nothing written: 24 rows; 0 new, 1 updated, 23 unchanged, "
        "0 rejected.\n"
        '  CUST-0004: name: "Fourth Coffee" -> "Fourth Coffee Roasters"\n'
    )
    assert customer(loaded, "CUST-0004").name == "Fourth Coffee"
    assert cli("customers", "import", str(changed)).exit_code == 0
    assert customer(loaded, "CUST-0004").name == "Fourth Coffee Roasters"
    assert [e.kind for e in events(loaded, "CUST-0004")] == ["import", "update"]


# ---------------------------------------------------------------- list and show


def test_list_json_filters_by_stage_and_tag(cli: Cli, loaded: Database) -> None:
    result = cli("customers", "list", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert len(data) == 24
    first = data[0]
    assert (first["key"], first["name"], first["stage"], first["licences"]) == (
        "CUST-0001", "Contoso Dental Ltd", "imported", 24)
    assert first["tags"] == ["emea", "wave-1"]
    assert first["contacts"][0] == {"name": "Sarah Jones", "role": "primary",
                                    "email": "sarah.jones@contosodental.example",
                                    "suppressed": False}
    apac = json.loads(cli("customers", "list", "--tag", "APAC", "--json").stdout)
    assert [c["key"] for c in apac] == ["CUST-0010", "CUST-0014", "CUST-0018", "CUST-0021"]
    assert json.loads(cli("customers", "list", "--stage", "invited", "--json").stdout) == []


def test_list_table(cli: Cli, loaded: Database) -> None:
    result = cli("customers", "list", "--stage", "imported", "--tag", "small")
    assert result.exit_code == 0
    for key in ("CUST-0004", "CUST-0013", "CUST-0021", "CUST-0023"):
        assert key in result.stdout
    assert "CUST-0001" not in result.stdout
    assert result.stdout.endswith("4 customers.\n")


def test_show_interleaves_events_and_messages(cli: Cli, loaded: Database) -> None:
    assert cli("customers", "set-stage", "CUST-0003", "invited").exit_code == 0
    moved_at = customer(loaded, "CUST-0003").stage_entered_at
    sent = moved_at.replace(year=moved_at.year + 1)
    queue(loaded, "CUST-0003", "partner_invitation", "invited", status="sent", at=moved_at,
          sent_at=sent)
    result = cli("customers", "show", "CUST-0003", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["name"] == "Tailspin Toys"
    assert [(t["kind"], t["title"], t["detail"]) for t in data["timeline"]] == [
        ("event", "import", "(new) -> imported"),
        ("event", "stage", "imported -> invited"),
        ("message", "partner_invitation", "#0 sent"),
    ]
    assert data["timeline"][2]["at"] == sent.isoformat()
    table = cli("customers", "show", "CUST-0003")
    assert table.exit_code == 0
    for text in ("Tailspin Toys", "helpdesk@tailspintoys.example", "technical",
                 "message partner_invitation #0 sent", "amer, wave-1",
                 "import  (new) -> imported  by tester via import: imported from customers.csv "
                 "row 4"):
        assert text in table.stdout


def test_show_hostile_name_verbatim(cli: Cli, loaded: Database) -> None:
    result = cli("customers", "show", "CUST-0008", "--json")
    assert json.loads(result.stdout)["name"] == "<b>Contoso & Sons</b>"
    assert "<b>Contoso & Sons</b>" in cli("customers", "show", "CUST-0008").stdout


def test_unknown_key_suggests_close_ones(cli: Cli, loaded: Database) -> None:
    result = cli("customers", "show", "CUST-00088")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: No customer with key 'CUST-00088'. Did you mean ")
    assert "CUST-0008" in result.stderr


# ---------------------------------------------------------------- set-stage


def test_set_stage_one_customer(cli: Cli, loaded: Database) -> None:
    stale = queue(loaded, "CUST-0001", "partner_invitation_reminder", "invited", sequence=1)
    result = cli("customers", "set-stage", "CUST-0001", "invited", "--note", "kick-off call")
    assert (result.exit_code, result.stdout) == (0, "Moved CUST-0001 from imported to invited.\n")
    row = customer(loaded, "CUST-0001")
    assert row.stage == "invited"
    assert row.next_due_at == row.stage_entered_at
    last = events(loaded, "CUST-0001")[-1]
    assert (last.kind, last.from_stage, last.to_stage, last.by, last.source, last.note,
            last.forced) == ("stage", "imported", "invited", "tester", "cli", "kick-off call",
                             False)
    assert status_of(loaded, stale) == ("queued", "")  # planned for the stage it is now in
    assert cli("customers", "set-stage", "CUST-0001", "approved").exit_code == 0
    assert status_of(loaded, stale) == ("withdrawn", "stage changed to approved")


def test_set_stage_refused_lists_allowed_moves(cli: Cli, loaded: Database) -> None:
    result = cli("customers", "set-stage", "CUST-0001", "completed")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: Customer CUST-0001 cannot move from 'imported' to 'completed'. Allowed: "
        "announced, invited. To move anyway, add --force with a --note saying why.\n")
    no_note = cli("customers", "set-stage", "CUST-0001", "awaiting_cancellation", "--force")
    assert no_note.stderr == (
        "Error: Forcing CUST-0001 from 'imported' to 'awaiting_cancellation' needs a --note "
        "saying why; it is recorded in the audit trail.\n")
    unknown = cli("customers", "set-stage", "CUST-0001", "shipped")
    assert unknown.stderr == (
        "Error: Unknown stage 'shipped'. Stages: imported, announced, invited, approved, "
        "awaiting_cancellation, completed.\n")
    assert customer(loaded, "CUST-0001").stage == "imported"


def test_forced_move_is_recorded_and_starts_csp_clock(cli: Cli, loaded: Database) -> None:
    result = cli("customers", "set-stage", "CUST-0005", "awaiting_cancellation", "--force",
                 "--note", "approved by phone")
    assert result.stdout == (
        "Moved CUST-0005 from imported to awaiting_cancellation (forced).\n")
    row = customer(loaded, "CUST-0005")
    assert row.csp_live_at == row.stage_entered_at
    last = events(loaded, "CUST-0005")[-1]
    assert (last.forced, last.note) == (True, "approved by phone")


def test_bulk_where_stage_with_dry_run_and_confirmation(cli: Cli, loaded: Database) -> None:
    dry = cli("customers", "set-stage", "--where-stage", "imported", "--tag", "apac",
              "invited", "--dry-run")
    assert dry.exit_code == 0
    for key in ("CUST-0010", "CUST-0014", "CUST-0018", "CUST-0021"):
        assert key in dry.stdout
    assert dry.stdout.endswith(
        "Dry run: 4 customers would move to invited; nothing changed.\n")
    assert customer(loaded, "CUST-0010").stage == "imported"
    unconfirmed = cli("customers", "set-stage", "--where-stage", "imported", "--tag", "apac",
                      "invited")
    assert unconfirmed.exit_code == 2
    assert unconfirmed.stderr == ("Error: Move 4 customers to invited? Refusing to continue "
                                  "without a terminal; add --yes.\n")
    assert customer(loaded, "CUST-0010").stage == "imported"
    done = cli("customers", "set-stage", "--where-stage", "imported", "--tag", "apac",
               "invited", "--yes")
    assert done.exit_code == 0
    assert done.stdout.endswith("Moved 4 customers to invited.\n")
    invited = json.loads(cli("customers", "list", "--stage", "invited", "--json").stdout)
    assert [c["key"] for c in invited] == ["CUST-0010", "CUST-0014", "CUST-0018", "CUST-0021"]
    empty = cli("customers", "set-stage", "--where-stage", "imported", "--tag", "apac",
                "invited", "--yes")
    assert (empty.exit_code, empty.stderr) == (
        1, "Error: No customers in stage 'imported' with tag 'apac'; nothing to move.\n")


def test_bulk_keys_all_or_nothing(cli: Cli, loaded: Database) -> None:
    assert cli("customers", "set-stage", "CUST-0002", "invited").exit_code == 0
    result = cli("customers", "set-stage", "CUST-0001", "CUST-0002", "announced", "--yes")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: 1 of 2 customers cannot move to 'announced'; nothing was changed:\n"
        "  - Customer CUST-0002 cannot move from 'invited' to 'announced'. Allowed: approved. "
        "To move anyway, add --force with a --note saying why.\n")
    assert customer(loaded, "CUST-0001").stage == "imported"
    missing = cli("customers", "set-stage", "CUST-0001", "NOPE-1", "NOPE-2", "announced")
    assert missing.stderr == ("Error: No customers with keys 'NOPE-1', 'NOPE-2'. List the keys "
                              "with `comms customers list`.\n")
    ok = cli("customers", "set-stage", "CUST-0001", "CUST-0003", "announced", "--yes")
    assert ok.stdout.endswith("Moved 2 customers to announced.\n")


# ---------------------------------------------------------------- side states


def test_pause_resume_opt_out(cli: Cli, loaded: Database) -> None:
    queued = queue(loaded, "CUST-0012", "kickoff", "announced")
    assert cli("customers", "pause", "CUST-0012", "--note", "CEO on leave").stdout == (
        "Paused CUST-0012.\n")
    assert customer(loaded, "CUST-0012").paused
    # The pause withdraws what was queued; the run plans it again after the resume.
    assert status_of(loaded, queued) == ("withdrawn", "customer paused")
    assert cli("customers", "pause", "CUST-0012").stdout == (
        "CUST-0012 is already paused; nothing changed.\n")
    assert cli("customers", "resume", "CUST-0012").stdout == "Resumed CUST-0012.\n"
    assert cli("customers", "resume", "CUST-0012").stdout == (
        "CUST-0012 is not paused; nothing changed.\n")
    assert not customer(loaded, "CUST-0012").paused
    assert customer(loaded, "CUST-0012").next_due_at is not None
    with loaded.session() as ses:  # what the next run's insert does with the withdrawn row
        cid = repo.get_customer(ses, "CUST-0012").id or 0
        assert outbox.insert_messages(ses, [new_message_row(
            customer_id=cid, message="kickoff", sequence=0, stage="announced", to_json="[]",
            subject="s", html="<p>h</p>", text="t", now=datetime.now(UTC))]) == [queued]
    assert status_of(loaded, queued) == ("queued", "")
    assert cli("customers", "opt-out", "CUST-0012", "--note", "asked by phone").stdout == (
        "Opted out CUST-0012.\n")
    assert customer(loaded, "CUST-0012").opted_out
    assert status_of(loaded, queued) == ("withdrawn", "customer opted out")
    assert [(e.kind, e.note) for e in events(loaded, "CUST-0012")][1:] == [
        ("pause", "CEO on leave"), ("resume", ""), ("opt_out", "asked by phone")]
    flags = json.loads(cli("customers", "list", "--json").stdout)
    assert [c["key"] for c in flags if c["opted_out"]] == ["CUST-0012"]
    missing = cli("customers", "pause", "NOPE")
    assert missing.exit_code == 1
    assert missing.stderr.startswith("Error: No customer with key 'NOPE'.")


def test_opt_in_lost_found(cli: Cli, loaded: Database) -> None:
    """Lost, found and opt-in had a service and no command: a customer opted out by mistake,
    or one that went to another partner, could not be recorded from the CLI."""
    queued = queue(loaded, "CUST-0012", "kickoff", "announced")
    assert cli("customers", "opt-in", "CUST-0012").stdout == (
        "CUST-0012 has not opted out; nothing changed.\n")
    assert cli("customers", "lost", "CUST-0012", "--note", "went to another partner").stdout == (
        "Marked lost CUST-0012.\n")
    assert customer(loaded, "CUST-0012").lost
    assert status_of(loaded, queued) == ("withdrawn", "customer marked lost")
    assert cli("customers", "lost", "CUST-0012").stdout == (
        "CUST-0012 is already marked lost; nothing changed.\n")
    flags = json.loads(cli("customers", "list", "--json").stdout)
    assert [c["key"] for c in flags if c["lost"]] == ["CUST-0012"]
    assert cli("customers", "found", "CUST-0012").stdout == "Marked not lost CUST-0012.\n"
    assert not customer(loaded, "CUST-0012").lost
    assert customer(loaded, "CUST-0012").next_due_at is not None
    assert cli("customers", "opt-out", "CUST-0012").exit_code == 0
    assert cli("customers", "opt-in", "CUST-0012", "--note", "asked again in writing").stdout == (
        "Opted in CUST-0012.\n")
    assert not customer(loaded, "CUST-0012").opted_out
    assert [(e.kind, e.note) for e in events(loaded, "CUST-0012")][1:] == [
        ("lost", "went to another partner"), ("found", ""), ("opt_out", ""),
        ("opt_in", "asked again in writing")]
    for command in ("opt-in", "lost", "found"):
        assert cli("customers", command, "--help").exit_code == 0
        assert cli("customers", command, "NOPE").exit_code == 1


# ---------------------------------------------------------------- export


def test_export_round_trip(cli: Cli, loaded: Database, tmp_path: Path) -> None:
    assert cli("customers", "set-stage", "CUST-0001", "invited").exit_code == 0
    out = tmp_path / "ledger.csv"
    result = cli("customers", "export", str(out))
    assert (result.exit_code, result.stdout) == (0, f"Exported 24 customers to {out}.\n")
    with out.open(encoding="utf-8-sig", newline="") as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    assert rows["CUST-0001"]["stage"] == "invited"
    assert rows["CUST-0006"]["name"] == "Müller GmbH"
    assert rows["CUST-0001"]["tags"] == "emea|wave-1"
    with loaded.session() as s:
        before = s.exec(select(StageEvent.id).order_by(col(StageEvent.id))).all()
    again = cli("customers", "import", str(out))
    assert again.stdout == (
        "Imported ledger.csv: 24 rows; 0 new, 0 updated, 24 unchanged, 0 rejected.\n")
    with loaded.session() as s:
        assert s.exec(select(StageEvent.id).order_by(col(StageEvent.id))).all() == before


# ---------------------------------------------------------------- help everywhere


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, command in sorted(getattr(group, "commands", {}).items()):
        yield (*path, name), command
        yield from _commands(command, (*path, name))


def test_every_command_has_help(cli: Cli) -> None:
    root = typer.main.get_command(app)
    commands = list(_commands(root))
    names = {" ".join(p) for p, _ in commands}
    assert {"customers import", "customers list", "customers show", "customers set-stage",
            "customers pause", "customers resume", "customers opt-out",
            "customers export", "init", "config show", "db upgrade", "db backup"} <= names
    for path, command in commands:
        assert (command.help or "").strip(), f"`comms {' '.join(path)}` has no help text"
        result = cli(*path, "--help")
        assert result.exit_code == 0, f"comms {' '.join(path)} --help: {result.output}"
        # CliRunner names the program "root"; `comms` when run for real.
        assert result.stdout.startswith(f"Usage: root {' '.join(path)} "), result.stdout


def test_suppressed_contacts_are_marked(cli: Cli, loaded: Database) -> None:
    with loaded.session() as s:
        s.add(Suppression(email="accounts@contosodental.example", reason="hard bounce",
                          at=datetime.now(UTC), by="tester"))
    data = json.loads(cli("customers", "show", "CUST-0001", "--json").stdout)
    assert [(c["email"], c["suppressed"]) for c in data["contacts"]] == [
        ("sarah.jones@contosodental.example", False),
        ("accounts@contosodental.example", True),
        ("it@contosodental.example", False),
    ]
