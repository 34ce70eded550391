"""`comms customers ...`: import, list, show, set-stage, pause, resume, opt-out, opt-in, lost,
found, export."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from comms.cli import common, present
from comms.cli.common import confirm_or_abort, console, new_app, safe, visible
from comms.services import customers as svc
from comms.wording import plural

customers_app = new_app("The customer ledger: import, list, show, move between stages, export.")


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def _flags(info: svc.CustomerInfo) -> str:
    return ", ".join(f for f, on in (("paused", info.paused), ("opted out", info.opted_out),
                                     ("lost", info.lost)) if on)


def _as_json(info: svc.CustomerInfo) -> dict[str, Any]:
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
    strict_columns: bool = typer.Option(
        False, "--strict-columns",
        help="Refuse the file if it has a column that is not part of the format (default: ignore it and say so).",
    ),
    now: str = present.now_option(f"Record the import at this simulated time ({present.NOW_READ}), for `comms run --now`; default: now."),
) -> None:
    """Import or update customers from a CSV file (upsert by key, all or nothing)."""
    app = common.app()
    r = svc.import_customers(app.database, file, settings=app.settings, campaign=app.campaign,
                             now=app.at(now), by=common.actor(),
                             skip_invalid=skip_invalid, dry_run=dry_run,
                             strict_columns=strict_columns)
    verb = "would be" if dry_run else "were"
    head = f"Dry run of {file.name}, nothing written" if dry_run else f"Imported {file.name}"
    console.print(
        f"{head}: {plural(r.rows, 'row')}; {r.created} new, {r.updated} updated, {r.unchanged} "
        f"unchanged, {r.rejected} rejected.", highlight=False, soft_wrap=True,
    )
    for key, change in list(r.changes.items())[:20]:
        console.print(safe(f"  {key}: {change}"), soft_wrap=True)
    for line in r.summary_lines():
        console.print(safe(line), soft_wrap=True)
    if r.rejected:
        console.print(f"{r.rejected} invalid row(s) {verb} skipped; they are in "
                      f"{r.rejects_file} with a 'problems' column.", highlight=False,
                      soft_wrap=True)


@customers_app.command("list")
def list_cmd(
    stage: str = typer.Option(None, "--stage", help="Only customers in this stage."),
    tag: str = typer.Option(None, "--tag", callback=common.tag_value, help="Only customers with this tag."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
    shared_contacts: bool = typer.Option(
        False, "--shared-contacts",
        help="List instead the contact addresses that several customers share (ignoring case).",
    ),
) -> None:
    """List customers with their stage, licences, flags and tags."""
    if shared_contacts:
        _print_shared(svc.shared_contacts(common.app().database), as_json)
        return
    infos = svc.list_customers(common.app().database, stage=stage, tag=tag)
    if as_json:
        typer.echo(json.dumps([_as_json(i) for i in infos], indent=2, ensure_ascii=False))
        return
    table = present.table("key", "name", "stage", "licences", "flags", "tags", "contacts")
    for i in infos:
        table.add_row(safe(i.key), safe(i.name), safe(i.stage), str(i.licences), _flags(i),
                      safe(", ".join(i.tags)), str(len(i.contacts)))
    console.print(present.fit(table))
    console.print(f"{plural(len(infos), 'customer')}.", highlight=False)


def _print_shared(shared: list[svc.SharedContact], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([{"email": s.email, "customers": [
            {"key": k, "name": n} for k, n in s.customers]} for s in shared], indent=2,
            ensure_ascii=False))
        return
    table = present.table("email", "customers")
    for s in shared:
        table.add_row(safe(s.email), safe(", ".join(f"{k} ({n})" for k, n in s.customers)))
    console.print(present.fit(table))
    console.print(f"{len(shared)} address(es) shared by several customers.", highlight=False)


@customers_app.command("show")
def show_cmd(
    key: str = typer.Argument(..., help="The customer's key."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Show a customer's details, contacts, tags and timeline (events and messages)."""
    d = svc.show_customer(common.app().database, key)
    i = d.info
    if as_json:
        data = _as_json(i)
        data["next_due_at"] = d.next_due_at.isoformat() if d.next_due_at else None
        data["timeline"] = [
            {**dataclasses.asdict(t), "at": t.at.isoformat()} for t in d.timeline
        ]
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    _print_detail(d)


def _print_detail(d: svc.CustomerDetail) -> None:
    i = d.info
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
        details.add_row(label, safe(value))
    console.print(details)
    contacts = present.table("role", "name", "email", "suppressed", title="Contacts")
    for c in i.contacts:
        contacts.add_row(safe(c.role), safe(c.name), safe(c.email),
                         "yes" if c.suppressed else "")
    console.print(present.fit(contacts))
    # One line per entry rather than a table: notes are long and terminals narrow.
    console.print("Timeline", style="bold")
    for t in d.timeline:
        if t.kind == "event":
            line = f"  {_when(t.at)}  {t.title}  {t.detail}  by {t.by} via {t.source}"
            line += f": {t.note}" if t.note else ""
        elif t.kind == "observed":
            line = f"  {_when(t.at)}  observed by {t.title} ({t.note}): {t.detail}"
        elif t.kind == "inbound":
            line = f"  {_when(t.at)}  inbound {t.title} {t.detail}" + (f": {t.note}" if t.note else "")
        else:
            line = f"  {_when(t.at)}  message {t.title} {t.detail}"
            line += f" (last error: {t.note})" if t.note else ""
        console.print(safe(line), soft_wrap=True)


@customers_app.command("set-stage")
def set_stage_cmd(
    args: list[str] = typer.Argument(
        ..., metavar="[KEY]... STAGE",
        help="Customer keys then the target stage (only the stage with --where-stage).",
    ),
    where_stage: str = typer.Option(
        None, "--where-stage", help="Move every customer currently in this stage."),
    tag: str = typer.Option(None, "--tag", callback=common.tag_value, help="With --where-stage: only customers with this tag."),
    note: str = typer.Option("", "--note", help="Why; recorded in the audit trail."),
    force: bool = typer.Option(
        False, "--force", help="Allow a move the campaign does not allow (needs --note)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would move; change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    now: str = present.now_option(f"Record the move at this simulated time ({present.NOW_READ}), for `comms run --now`; default: now."),
) -> None:
    """Move customers to another stage: by key, or in bulk with --where-stage [--tag]."""
    *keys, stage = args
    app = common.app()

    def review(plan: list[svc.StageChange]) -> None:
        _print_moves(plan, dry_run)
        who = present.plural(len(plan), "customer")
        if dry_run:
            console.print(f"Dry run: {who} would move to {stage}; nothing changed.",
                          highlight=False, soft_wrap=True)
        else:
            confirm_or_abort(f"Move {who} to {stage}?", yes)

    result = svc.move_customers(app.database, app.campaign, keys, stage, where_stage=where_stage,
                                tag=tag, now=app.at(now), by=common.actor(),
                                note=note, force=force, dry_run=dry_run, review=review)
    if not result.applied:
        return
    if len(result.changes) == 1:
        c = result.changes[0]
        console.print(f"Moved {safe(c.key)} from {c.from_stage} to {c.to_stage}"
                      f"{' (forced)' if c.forced else ''}.", highlight=False, soft_wrap=True)
    else:
        console.print(f"Moved {plural(len(result.changes), 'customer')} to {stage}.", highlight=False,
                      soft_wrap=True)


def _print_moves(plan: list[svc.StageChange], dry_run: bool = False) -> None:
    cols = ("key", "name", "from", "to", "forced") + (("would send",) if dry_run else ())
    table = present.table(*cols)
    for p in plan:
        extra = (", ".join(p.triggers) or "nothing",) if dry_run else ()
        table.add_row(Text(visible(p.key)), Text(visible(p.name)), Text(visible(p.from_stage)),
                      p.to_stage, "yes" if p.forced else "", *extra)
    console.print(present.fit(table))


def _side(action: svc.SideAction, done: str, already: str) -> Any:
    def command(
        key: str = typer.Argument(..., help="The customer's key."),
        note: str = typer.Option("", "--note", help="Why; recorded in the audit trail."),
        now: str = present.now_option(),
    ) -> None:
        app = common.app()
        changed = svc.side_action(app.database, key, action, now=app.at(now),
                                  by=common.actor(), note=note)
        console.print(safe(f"{done} {key}." if changed else f"{key} {already}; nothing changed."),
                      soft_wrap=True)

    return command


pause_cmd = _side("pause", "Paused", "is already paused")
pause_cmd.__doc__ = ("Pause a customer: nothing is sent until `comms customers resume` (its "
                     "queued messages are withdrawn, and planned again on resume).")
resume_cmd = _side("resume", "Resumed", "is not paused")
resume_cmd.__doc__ = "Resume a paused customer: planning and sending continue."
opt_out_cmd = _side("opt_out", "Opted out", "has already opted out")
opt_out_cmd.__doc__ = "Record that a customer opted out: queued messages are withdrawn."
opt_in_cmd = _side("opt_in", "Opted in", "has not opted out")
opt_in_cmd.__doc__ = ("Record that a customer that opted out asked to be mailed again (say how "
                      "with --note): planning and sending continue. Suppressed addresses stay "
                      "suppressed (`comms contacts opt-in`).")
lost_cmd = _side("lost", "Marked lost", "is already marked lost")
lost_cmd.__doc__ = ("Mark a customer lost (it will not move to us, e.g. it chose another "
                    "partner): nothing more is sent and its queued messages are withdrawn.")
found_cmd = _side("found", "Marked not lost", "is not marked lost")
found_cmd.__doc__ = "Undo `comms customers lost`: planning and sending continue."
customers_app.command("pause")(pause_cmd)
customers_app.command("resume")(resume_cmd)
customers_app.command("opt-out")(opt_out_cmd)
customers_app.command("opt-in")(opt_in_cmd)
customers_app.command("lost")(lost_cmd)
customers_app.command("found")(found_cmd)


@customers_app.command("export")
def export_cmd(
    file: Path = typer.Argument(None, help="CSV file to write (overwritten); or --out FILE."),
    out: Path = present.out_option("CSV file to write (overwritten)."),
) -> None:
    """Export every customer in the columns import reads (round-trips unchanged)."""
    file = present.out_path(file, out)
    count = svc.export_customers(common.app().database, file)
    console.print(safe(f"Exported {plural(count, 'customer')} to {file}."), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(customers_app, name="customers")
