"""`comms status` (terminal dashboard) and `comms report` (self-contained HTML file)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import typer
from rich.table import Table

from comms.cli import common, present
from comms.cli.common import console, safe
from comms.services.managers import Breakdown
from comms.services.report import write_report
from comms.services.status import StatusReport, compute_status, parse_now

SHOW = 20  # rows per list in the terminal; `comms report` has everyone
GROUP_WIDTH = 24  # room kept for an account manager or a wave beside the figures

NOW_HELP = f"Figures as of this time ({present.NOW_READ}); default: now."


def status(
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
    now: str = present.now_option(NOW_HELP),
    days: int = typer.Option(14, "--days", min=1, help="Days of messages-per-day history."),
) -> None:
    """Where every customer stands: funnel, stuck customers, messages, exposure."""
    app = common.app()
    real = datetime.now(UTC)
    moment = parse_now(now, app.settings.defaults.time_zone) or real
    report = compute_status(app.database, app.settings, app.campaign, moment, days=days,
                            sending_now=real)
    from comms.sync.status import sync_freshness
    freshness = sync_freshness(app.database)
    if as_json:
        typer.echo(json.dumps({**report.to_dict(), "sync": freshness.to_dict()}, indent=2))
        return
    _print_status(report)
    for line in freshness.lines():
        console.print(line, highlight=False, markup=False)


def _local(dt: datetime | None, tz: ZoneInfo) -> str:
    return dt.astimezone(tz).strftime("%Y-%m-%d %H:%M") if dt else "-"


def _more(shown: int, total: int) -> None:
    if total > shown:
        console.print(f"  … and {total - shown} more (see `comms report`)", highlight=False)


def _print_status(r: StatusReport) -> None:
    tz = ZoneInfo(r.time_zone)
    console.print(
        f"[bold]Status as of {_local(r.now, tz)} ({r.time_zone})[/] · "
        f"{r.customers_total} customers", highlight=False,
    )

    numbers = ("customers", "paused", "opted\nout", "lost", "expected\ndays")
    funnel = present.table("stage", *numbers, title="Customers per stage", keys=(),
                           numbers=numbers)
    for s in r.funnel:
        funnel.add_row(
            s.stage if s.in_campaign else f"{s.stage} (not in campaign)", str(s.customers),
            str(s.paused), str(s.opted_out), str(s.lost),
            f"{s.expected_days:g}" if s.expected_days else "-",
        )
    console.print(present.fit(funnel))
    _print_messages(r)
    _print_stuck(r, tz)
    _print_exposure(r)
    if r.tenant is not None:
        console.print(r.tenant.line(tz), highlight=False, markup=False)
    _print_managers(r)
    _print_inbox(r)


def _print_messages(r: StatusReport) -> None:
    numbers = ("today", "this week", "all")
    msgs = present.table("status", *numbers, title="Messages by status", keys=(),
                         numbers=numbers)
    for st in r.messages.today:
        msgs.add_row(st, str(r.messages.today[st]), str(r.messages.week[st]),
                     str(r.messages.total[st]))
    console.print(present.fit(msgs))


def _print_stuck(r: StatusReport, tz: ZoneInfo) -> None:
    numbers = ("days\nin\nstage", "expected", "over\nby")
    stuck = present.table("key", "name", "stage", *numbers, "flags",
                          title=f"Stuck past expected time: {len(r.stuck)}", keys=("key",),
                          numbers=numbers)
    for k in r.stuck[:SHOW]:
        stuck.add_row(safe(k.key), safe(k.name), safe(present.words(k.stage)), f"{k.days_in_stage:.1f}",
                      f"{k.expected_days:g}", f"{k.days_over:.1f}", ", ".join(k.flags))
    console.print(present.fit(present.whole_words(stuck, "stage")))
    _more(SHOW, len(r.stuck))

    ex = present.table("key", "name", "stage", "reminders", "last\nreminder", "days\nin\nstage",
                       title=f"Reminders exhausted without progress: {len(r.exhausted)}",
                       keys=("key",), dates=("last\nreminder",),
                       numbers=("reminders", "days\nin\nstage"))
    for e in r.exhausted[:SHOW]:
        ex.add_row(safe(e.key), safe(e.name), safe(present.words(e.stage)), str(e.reminders),
                   _local(e.last_reminder_at, tz).replace(" ", "\n"),
                   f"{e.days_in_stage:.1f}")
    console.print(present.fit(present.whole_words(ex, "stage")))
    _more(SHOW, len(r.exhausted))


def _print_exposure(r: StatusReport) -> None:
    cur = r.currency
    console.print(
        f"[bold]Double-billing exposure: {cur} {r.exposure_total:,.2f}[/] "
        f"({len(r.exposure):,} customers awaiting cancellation)", highlight=False,
    )
    numbers = ("licences", "days live", "exposure")
    exp = present.table("key", "name", *numbers, title="Exposure by customer, highest first",
                        keys=("key",), numbers=numbers)
    exp.caption = f"days live × licences × {cur} {r.price_per_licence_month:,.2f} / 30"
    exp.caption_justify = "left"
    for x in r.exposure[:SHOW]:
        exp.add_row(safe(x.key), safe(x.name), str(x.licences),
                    f"{x.days:.1f}" + ("*" if x.estimated else ""), f"{cur} {x.amount:,.2f}")
    console.print(present.fit(exp))
    _more(SHOW, len(r.exposure))
    if any(x.estimated for x in r.exposure):
        console.print("  * no CSP go-live date recorded: counted from entering the stage",
                      highlight=False)


def report(
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
    now: str = present.now_option(NOW_HELP),
    days: int = typer.Option(30, "--days", min=1, help="Days of messages-per-day history."),
    tag: str = typer.Option(None, "--tag", callback=common.tag_value, help="Manager figures for this wave (tag) only."),
    since: str = typer.Option(None, "--since", help="Manager figures for customers imported "
                              "since this moment (ISO 8601)."),
) -> None:
    """Write one self-contained HTML report (charts, sortable customer table; no network)."""
    app = common.app()
    generated = datetime.now(UTC)
    tz = app.settings.defaults.time_zone
    moment = parse_now(now, tz) or generated
    path = write_report(app.database, app.settings, app.campaign, out, moment,
                        generated_at=generated, days=days, tag=tag,
                        since=parse_now(since, tz) if since else None)
    console.print(f"Wrote {safe(str(path))} ({path.stat().st_size:,} bytes).", highlight=False,
                  soft_wrap=True)


def _print_managers(r: StatusReport) -> None:
    """The manager section (issue 15): reached funnel, durations, cost so far, breakdowns.
    Stages are numbered in the funnel table and the breakdowns name them by number, so a
    breakdown fits an 80-column terminal (or a cron mail) without cutting a figure short."""
    m = r.managers
    if m is None:
        return
    numbers = ("#", "reached", "conversion")
    t = present.table("#", "stage", "reached", "conversion", keys=(), numbers=numbers,
                      title="Funnel: customers who reached each stage")
    for n, f in enumerate(m.funnel, 1):
        t.add_row(str(n), safe(f.label), str(f.reached), _pct(f.conversion))
    console.print(present.fit(t))
    for what, p in (("invitation to acceptance", m.invitation_to_acceptance),
                    ("CSP live to cancellation", m.live_to_cancellation)):
        med = "-" if p.median_days is None else f"{p.median_days:g}"
        p90 = "-" if p.p90_days is None else f"{p.p90_days:g}"
        console.print(f"Days {what}: median {med}, 90th percentile {p90} ({p.count} customers)")
    console.print(f"Double billing incurred to date: {r.currency} {m.incurred_total:,.2f} "
                  f"(today's exposure {r.currency} {m.exposure_today:,.2f})", highlight=False)
    for title, who, rows in (("Per account manager", "account manager", m.by_account_manager),
                             ("Per wave", "wave", m.by_wave)):
        for t in _reached_tables(title, who, len(m.funnel), rows):
            console.print(present.fit(t))
        console.print(present.fit(_money_table(title, who, r.currency, rows)))


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def _group_cell(g: Breakdown) -> str:
    """A group as people read it: the manager's name, the address under it (dim)."""
    if not g.email:
        return safe(g.group)
    return f"{safe(g.name)}\n[dim]{safe(g.email)}[/]" if g.name else safe(g.email)


def _reached_tables(title: str, who: str, steps: int, rows: list[Breakdown]) -> list[Table]:
    """One row per group: customers who reached each numbered stage of the funnel, the
    conversion from the stage before under each figure. A campaign with more stages than fit
    the terminal gets several tables (stages 1-6, 7-12, ...), never a column cut off."""
    cells = [[str(f.reached) if i == 0 else f"{f.reached}\n({_pct(f.conversion)})"
              for i, f in enumerate(g.funnel)] for g in rows]
    widest = max([len(line) for row in cells for cell in row for line in cell.split("\n")]
                 + [len(str(steps))])
    per_table = max(1, (console.width - GROUP_WIDTH) // (widest + 3))  # 3: padding, border
    tables = []
    for first in range(0, steps, per_table):
        part = range(first, min(steps, first + per_table))
        numbers = tuple(str(n + 1) for n in part)
        which = "" if len(part) == steps else f", stages {part[0] + 1}-{part[-1] + 1}"
        t = present.table(who, *numbers, keys=(), numbers=numbers, title=(
            f"{title}: customers who reached each stage (# as in the funnel; conversion from "
            f"the stage before{which})"))
        for g, row in zip(rows, cells, strict=True):
            t.add_row(_group_cell(g), *(row[n] for n in part))
        tables.append(t)
    return tables


def _money_table(title: str, who: str, currency: str, rows: list[Breakdown]) -> Table:
    """One row per group: customers, share completed, exposure today, incurred."""
    numbers = ("customers", "completion\nrate", "exposure\ntoday", "incurred")
    t = present.table(who, *numbers, keys=(), numbers=numbers,
                      title=f"{title}: completion and double billing ({currency})")
    for g in rows:
        t.add_row(_group_cell(g), str(g.customers), _pct(g.completed_rate),
                  f"{g.exposure_today:,.2f}", f"{g.incurred:,.2f}")
    return t


def _print_inbox(r: StatusReport) -> None:
    i = r.inbox
    if i is None:
        return
    console.print(
        f"[bold]Inbox:[/] bounces {i.bounces} ({i.hard_bounces} hard), replies {i.replies}, "
        f"opt-outs {i.optouts}, auto-replies {i.auto}, unmatched {i.unmatched}"
        + (f", [bold red]not processed {i.errors}[/] (comms inbox list --kind error)"
           if i.errors else ""), highlight=False)
    for stage, kinds in sorted(i.by_stage.items()):
        console.print(f"  {stage}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
                      highlight=False)
    for g in r.managers.by_wave if r.managers else ():
        console.print(f"  wave {safe(g.group)}: bounces {g.bounces} ({g.hard_bounces} hard), "
                      f"replies {g.replies}", highlight=False)
    console.print(f"Unreachable customers (no deliverable address): {len(i.unreachable)}"
                  + (f": {safe(', '.join(i.unreachable[:SHOW]))}" if i.unreachable else ""),
                  highlight=False)
    console.print(f"Awaiting an operator after a reply: {len(i.awaiting_operator)}"
                  + (f": {safe(', '.join(i.awaiting_operator[:SHOW]))}" if i.awaiting_operator
                     else ""), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("report")(report)
