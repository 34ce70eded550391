"""`comms wave list|proof|approve|hold`: proofs and approval of a wave (a tag) before launch."""

from __future__ import annotations

import json
from datetime import datetime

import typer

from comms.cli import common, present
from comms.cli.common import console, new_app, safe
from comms.services import waves
from comms.wording import plural

wave_app = new_app(
    "Waves (customer tags): proofs to the operator, approval before a wave starts. With "
    "require_approval = true in the campaign, a wave's first message waits for `wave approve`."
)


_NOW_HELP = f"Act as of this moment ({present.NOW_READ}), e.g. to match `run --now`."


def _when(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M") if dt else ""


@wave_app.command("list")
def list_(
    as_json: bool = typer.Option(False, "--json", help="JSON for machines."),
    now: str = present.now_option(_NOW_HELP),
) -> None:
    """Each wave: customers per stage, next message due, approval state."""
    ctx = common.app()
    rows = waves.list_waves(ctx.database, ctx.settings, ctx.campaign, ctx.renderer,
                            ctx.simulate(now).now())
    if as_json:
        typer.echo(json.dumps([{
            "tag": w.tag, "customers": w.customers, "by_stage": w.by_stage,
            "next_due_at": _when(w.next_due_at), "due_now": w.due_now,
            "next_messages": w.next_messages, "approval": w.approval,
            "approved_by": w.approved_by, "approved_at": _when(w.approved_at),
        } for w in rows], indent=2))
        return
    if not rows:
        console.print("No waves: no customer has a tag.")
        return
    # One line per stage and per message, in words, so a narrow terminal wraps between words.
    table = present.table("wave", "customers", "per stage", "next due", "due now", "approval",
                          keys=(), dates=("next due",), numbers=("customers",))
    for w in rows:
        who = f" by {w.approved_by} {_when(w.approved_at)}" if w.approved_by else ""
        table.add_row(safe(w.tag), str(w.customers),
                      "\n".join(f"{present.words(k)} {v}" for k, v in w.by_stage.items()),
                      _when(w.next_due_at).replace(" ", "\n"),
                      "\n".join(f"{present.words(k)} {v}" for k, v in w.next_messages.items()),
                      safe(w.approval + who))
    console.print(present.fit(table))


@wave_app.command("proof")
def proof(
    tag: str = typer.Argument(..., help="The wave (customer tag)."),
    to: str = typer.Option(None, "--to", help="Operator address (default: [partner] reply_to)."),
    now: str = present.now_option(_NOW_HELP),
) -> None:
    """Send the operator one [PROOF] copy of each message the wave gets next (per message ×
    locale × licence branch). Customers get nothing; the proof's hash goes to the audit trail."""
    ctx = common.app()
    ctx.simulate(now)
    transport = ctx.transport()
    try:
        r = waves.send_proof(ctx.database, ctx.settings, ctx.campaign, ctx.renderer, transport,
                             tag, to=to, by=common.actor(), clock=ctx.clock)
    finally:
        transport.close()
    for it in r.items:
        console.print(f"  {it.message} [{it.locale}, {it.branch}] as for {it.customer.key} "
                      f"({plural(it.customers, 'customer')})", markup=False)
    console.print(f"Sent {r.dispatch.sent} of {plural(len(r.message_ids), 'proof')} to {r.to}; "
                  f"content hash {r.content_hash[:12]}.", markup=False)
    if r.dispatch.sent != len(r.message_ids):
        raise typer.Exit(1)


@wave_app.command("approve")
def approve(
    tag: str = typer.Argument(..., help="The wave (customer tag)."),
    by: str = typer.Option(..., "--by", help="Who approves (recorded in the audit trail)."),
    note: str = typer.Option("", "--note", help="Why, or what was checked."),
    now: str = present.now_option(_NOW_HELP),
) -> None:
    """Approve the wave's proofed content: its first messages may go out with `comms run`."""
    ctx = common.app()
    ev = waves.approve(ctx.database, ctx.settings, ctx.campaign, ctx.renderer, tag, by=by,
                       note=note, now=ctx.simulate(now).now())
    console.print(f"Wave {tag} approved by {ev.by} at {_when(ev.at)} UTC "
                  f"(content hash {ev.content_hash[:12]}).", markup=False)


@wave_app.command("hold")
def hold(
    tag: str = typer.Argument(..., help="The wave (customer tag)."),
    note: str = typer.Option("", "--note", help="Why it is held."),
    now: str = present.now_option(_NOW_HELP),
) -> None:
    """Hold the wave: customers not yet started get nothing until it is approved again."""
    ctx = common.app()
    ev = waves.hold(ctx.database, tag, by=common.actor(), note=note, now=ctx.at(now))
    console.print(f"Wave {tag} held at {_when(ev.at)} UTC.", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(wave_app, name="wave")
