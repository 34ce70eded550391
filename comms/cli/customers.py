"""`comms customers ...`: import, list, show, set-stage, pause, resume, opt-out, export."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from comms.campaign import Campaign, load_campaign
from comms.cli import common
from comms.cli.common import confirm_or_abort, console, new_app
from comms.domain import CustomerInfo
from comms.errors import CommsError
from comms.services import customers as svc
from comms.stages import SideAction

customers_app = new_app("The customer ledger: import, list, show, move between stages, export.")


def _campaign() -> Campaign:
    return load_campaign(common.settings().campaign_file or None)


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def _flags(info: CustomerInfo) -> str:
    return ", ".join(f for f, on in (("paused", info.paused), ("opted out", info.opted_out),
                                     ("lost", info.lost)) if on)


def _as_json(info: CustomerInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data.pop("id", None)
    data["tags"] = list(info.tags)
    for k in ("stage_entered_at", "csp_live_at"):
        data[k] = data[k].isoformat() if data[k] else None
    return data


@customers_app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="CSV file (columns: see docs/csv-format.md)."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid",
        help="Import the valid rows; write the invalid ones to <file>.rejects.csv.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and count; write nothing."),
) -> None:
    """Import or update customers from a CSV file (upsert by key, all or nothing)."""
    r = svc.import_customers(common.database(), file, settings=common.settings(),
                        campaign=_campaign(), now=datetime.now(UTC), by=common.actor(),
                        skip_invalid=skip_invalid, dry_run=dry_run)
    verb = "would be" if dry_run else "were"
    head = f"Dry run of {file.name}, nothing written" if dry_run else f"Imported {file.name}"
    console.print(
        f"{head}: {r.rows} row(s); {r.created} new, {r.updated} updated, {r.unchanged} "
        f"unchanged, {r.rejected} rejected.", highlight=False, soft_wrap=True,
    )
    for key, change in list(r.changes.items())[:20]:
        console.print(Text(f"  {key}: {change}"), soft_wrap=True)
    if r.rejected:
        console.print(f"{r.rejected} invalid row(s) {verb} skipped; they are in "
                      f"{r.rejects_file} with a 'problems' column.", highlight=False,
                      soft_wrap=True)


@customers_app.command("list")
def list_cmd(
    stage: str = typer.Option(None, "--stage", help="Only customers in this stage."),
    tag: str = typer.Option(None, "--tag", help="Only customers with this tag."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """List customers with their stage, licences, flags and tags."""
    infos = svc.list_customers(common.database(), stage=stage, tag=tag)
    if as_json:
        typer.echo(json.dumps([_as_json(i) for i in infos], indent=2, ensure_ascii=False))
        return
    table = Table("key", "name", "stage", "licences", "flags", "tags", "contacts")
    for i in infos:
        table.add_row(Text(i.key), Text(i.name), i.stage, str(i.licences), _flags(i),
                      Text(", ".join(i.tags)), str(len(i.contacts)))
    console.print(table)
    console.print(f"{len(infos)} customer(s).", highlight=False)


@customers_app.command("show")
def show_cmd(
    key: str = typer.Argument(..., help="The customer's key."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Show a customer's details, contacts, tags and timeline (events and messages)."""
    d = svc.show_customer(common.database(), key)
    i = d.info
    if as_json:
        data = _as_json(i)
        data["next_due_at"] = d.next_due_at.isoformat() if d.next_due_at else None
        data["timeline"] = [
            {**dataclasses.asdict(t), "at": t.at.isoformat()} for t in d.timeline
        ]
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    details = Table.grid(padding=(0, 2))
    for label, value in (
        ("key", i.key), ("name", i.name),
        ("stage", f"{i.stage} since {_when(i.stage_entered_at)}"),
        ("flags", _flags(i) or "-"), ("licences", str(i.licences)),
        ("locale", i.locale), ("time zone", i.time_zone),
        ("tenant id", i.tenant_id or "-"), ("primary domain", i.primary_domain or "-"),
        ("account manager",
         f"{i.account_manager_name} <{i.account_manager_email}>".strip()
         if i.account_manager_email else (i.account_manager_name or "-")),
        ("tags", ", ".join(i.tags) or "-"),
        ("CSP live since", _when(i.csp_live_at)), ("next due", _when(d.next_due_at)),
    ):
        details.add_row(label, Text(value))
    console.print(details)
    contacts = Table("role", "name", "email", "suppressed", title="Contacts")
    for c in i.contacts:
        contacts.add_row(c.role, Text(c.name), Text(c.email), "yes" if c.suppressed else "")
    console.print(contacts)
    # One line per entry rather than a table: notes are long and terminals narrow.
    console.print("Timeline", style="bold")
    for t in d.timeline:
        if t.kind == "event":
            line = f"  {_when(t.at)}  {t.title}  {t.detail}  by {t.by} via {t.source}"
            line += f": {t.note}" if t.note else ""
        elif t.kind == "inbound":
            line = f"  {_when(t.at)}  inbound {t.title} {t.detail}" + (f": {t.note}" if t.note else "")
        else:
            line = f"  {_when(t.at)}  message {t.title} {t.detail}"
            line += f" (last error: {t.note})" if t.note else ""
        console.print(Text(line), soft_wrap=True)


@customers_app.command("set-stage")
def set_stage_cmd(
    args: list[str] = typer.Argument(
        ..., metavar="[KEY]... STAGE",
        help="Customer keys then the target stage (only the stage with --where-stage).",
    ),
    where_stage: str = typer.Option(
        None, "--where-stage", help="Move every customer currently in this stage."),
    tag: str = typer.Option(None, "--tag", help="With --where-stage: only customers with this tag."),
    note: str = typer.Option("", "--note", help="Why; recorded in the audit trail."),
    force: bool = typer.Option(
        False, "--force", help="Allow a move the campaign does not allow (needs --note)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would move; change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Move customers to another stage: by key, or in bulk with --where-stage [--tag]."""
    *keys, stage = args
    db = common.database()
    if where_stage:
        if keys:
            raise CommsError("Give either customer keys or --where-stage, not both.")
        keys = svc.select_keys(db, where_stage=where_stage, tag=tag)
        if not keys:
            which = f" with tag {tag!r}" if tag else ""
            raise CommsError(f"No customers in stage {where_stage!r}{which}; nothing to move.")
    elif tag:
        raise CommsError("--tag selects customers only together with --where-stage.")
    if not keys:
        raise CommsError("Give the keys of the customers to move, or --where-stage.")
    campaign, now, by = _campaign(), datetime.now(UTC), common.actor()
    bulk = len(keys) > 1 or bool(where_stage)
    if bulk or dry_run:
        plan = svc.set_stage(db, campaign, keys, stage, now=now, by=by, note=note,
                             force=force, dry_run=True)
        table = Table("key", "name", "from", "to", "forced")
        for p in plan:
            table.add_row(Text(p.key), Text(p.name), p.from_stage, p.to_stage,
                          "yes" if p.forced else "")
        console.print(table)
        if dry_run:
            console.print(f"Dry run: {len(plan)} customer(s) would move to {stage}; nothing "
                          "changed.", highlight=False, soft_wrap=True)
            return
        confirm_or_abort(f"Move {len(plan)} customer(s) to {stage}?", yes)
    done = svc.set_stage(db, campaign, keys, stage, now=now, by=by, note=note, force=force)
    if len(done) == 1:
        c = done[0]
        console.print(f"Moved {c.key} from {c.from_stage} to {c.to_stage}"
                      f"{' (forced)' if c.forced else ''}.", highlight=False, soft_wrap=True)
    else:
        console.print(f"Moved {len(done)} customer(s) to {stage}.", highlight=False,
                      soft_wrap=True)


def _side(action: SideAction, done: str, already: str) -> Any:
    def command(
        key: str = typer.Argument(..., help="The customer's key."),
        note: str = typer.Option("", "--note", help="Why; recorded in the audit trail."),
    ) -> None:
        changed = svc.side_action(common.database(), key, action, now=datetime.now(UTC),
                                  by=common.actor(), note=note)
        console.print(Text(f"{done} {key}." if changed else f"{key} {already}; nothing changed."),
                      soft_wrap=True)

    return command


pause_cmd = _side("pause", "Paused", "is already paused")
pause_cmd.__doc__ = "Pause a customer: nothing is sent until `comms customers resume`."
resume_cmd = _side("resume", "Resumed", "is not paused")
resume_cmd.__doc__ = "Resume a paused customer: planning and sending continue."
opt_out_cmd = _side("opt_out", "Opted out", "has already opted out")
opt_out_cmd.__doc__ = "Record that a customer opted out: queued messages are withdrawn."
customers_app.command("pause")(pause_cmd)
customers_app.command("resume")(resume_cmd)
customers_app.command("opt-out")(opt_out_cmd)


@customers_app.command("export")
def export_cmd(
    file: Path = typer.Argument(..., help="CSV file to write (overwritten)."),
) -> None:
    """Export every customer in the columns import reads (round-trips unchanged)."""
    count = svc.export_customers(common.database(), file)
    console.print(Text(f"Exported {count} customer(s) to {file}."), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(customers_app, name="customers")
