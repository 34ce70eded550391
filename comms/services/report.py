"""`comms report`: one self-contained HTML file (the CSV export of the outbox lives in
``comms.services.report_csv`` and stays importable from here).

The report needs nothing at view time: CSS, the charts (inline SVG drawn here) and the small
sorting script are all inside the file, and its Content-Security-Policy forbids any network
request. Customer names and every other ledger text are HTML-escaped (Jinja2 autoescape for the
page, ``markupsafe.escape`` inside the SVG).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from sqlmodel import col

from comms.campaign import Campaign
from comms.config import Settings
from comms.domain import MessageStatus
from comms.errors import OutputError
from comms.fileio import write_atomic
from comms.services.report_csv import OUTBOX_COLUMNS as OUTBOX_COLUMNS
from comms.services.report_csv import export_outbox_csv as export_outbox_csv
from comms.services.report_script import TEMPLATES_DIR, script_context
from comms.services.status import (
    DAYS_PER_MONTH,
    STATUSES,
    DayCount,
    Exposure,
    StageCount,
    StatusReport,
    compute_status,
)
from comms.store.db import Database
from comms.store.models import Customer, Message

EXPOSURE_CHART_TOP = 20
LIST_LIMIT = 50  # rows shown in the stuck / exhausted tables (the customer table has them all)


# ----------------------------------------------------------------------------- SVG charts


def _fmt_num(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _fmt_pct(share: float | None) -> str:
    """A share (0..1) as a whole percentage; "-" when there is none."""
    return "-" if share is None else f"{100 * share:.0f}%"


def _nice_step(value: float) -> float:
    """The smallest 1/2/5 x 10^k at or above ``value`` and at least 1 (counts are whole)."""
    if value <= 1:
        return 1.0
    exp = math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        step = m * 10.0**exp
        if step >= value:
            return step
    return 10.0 ** (exp + 1)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


_NARROW = frozenset("fijlrtI!|.,:;'()[] ")
_WIDE = frozenset("mwMW@%")


def _text_px(text: str, font_px: float) -> float:
    """A generous estimate of the drawn width of ``text`` in a sans-serif font (the report
    cannot measure: it is drawn before any browser sees it). Calibrated on DejaVu Sans, the
    widest common fallback of ``system-ui``, plus 5 %."""
    em = sum(0.34 if ch in _NARROW else 0.95 if ch in _WIDE else 0.76 if ch.isupper()
             else 0.64 for ch in text)
    return em * font_px * 1.05


def _fit(text: str, max_px: float, font_px: float = 13.0) -> str:
    """``text``, cut with "…" so that it fits in ``max_px`` (a bar label left of its bar)."""
    if _text_px(text, font_px) <= max_px:
        return text
    while text and _text_px(text + "\u2026", font_px) > max_px:
        text = text[:-1]
    return text.rstrip() + "\u2026"


def hbar_chart(
    chart_id: str,
    title: str,
    rows: Sequence[tuple[str, float, str]],
    *,
    width: int = 460,
    label_width: int = 170,
    row_height: int = 26,
    bar_class: str = "bar",
) -> Markup:
    """Horizontal bars: one ``rect.bar`` per row (``(label, value, value text)``), zero drawn
    as a zero-width bar so the count of bars always equals the count of rows."""
    height = max(row_height * len(rows) + 8, 40)
    top = max((v for _, v, _ in rows), default=0.0) or 1.0
    # The longest bar leaves room for its value text inside the chart.
    widest = max((_text_px(shown, 13.0) for _, _, shown in rows), default=0.0)
    room = max(width - label_width - 10 - widest, 40.0)
    parts = [
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {width} {height}" '
        f'style="min-width:{width}px" '  # never drawn smaller: text stays at its CSS size
        f'role="img" aria-label="{escape(title)}" preserveAspectRatio="xMinYMin meet">',
        f"<title>{escape(title)}</title>",
    ]
    if not rows:
        parts.append('<text x="8" y="24" class="empty">No data</text>')
    for i, (label, value, shown) in enumerate(rows):
        y = 4 + i * row_height
        w = room * (value / top) if value > 0 else 0.0
        parts.append(
            f'<text x="{label_width - 8}" y="{y + row_height / 2 + 4:.1f}" class="lbl" '
            f'text-anchor="end">{escape(_fit(_short(label, 26), label_width - 12))}</text>'
            f'<rect class="{bar_class}" x="{label_width}" y="{y + 3}" width="{w:.1f}" '
            f'height="{row_height - 8}" rx="2" data-value="{value}">'
            f"<title>{escape(label)}: {escape(shown)}</title></rect>"
            f'<text x="{label_width + w + 6:.1f}" y="{y + row_height / 2 + 4:.1f}" '
            f'class="val">{escape(shown)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def daily_chart(chart_id: str, days: Sequence[DayCount], *, width: int = 520,
                height: int = 240) -> Markup:
    """Columns per day: sent (``rect.bar.sent``) with failed stacked on top (``rect.bar.failed``),
    and the messages queued that day as one line (``path.line``)."""
    # The right margin holds half of the last day's label (centred under its column).
    left, right, top_pad, bottom = 40, 24, 12, 36
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    n = max(len(days), 1)
    peak = max((max(d.sent + d.failed, d.queued) for d in days), default=0)
    # Four grid steps of a round whole number: axis labels read 0, 5, 10 ... never 1.25.
    step = _nice_step(peak / 4)
    ymax = step * max(1, math.ceil(peak / step))
    slot = plot_w / n
    bar_w = max(slot * 0.7, 1.0)

    def y(v: float) -> float:
        return top_pad + plot_h - plot_h * (v / ymax)

    parts = [
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'style="min-width:{width}px" '  # never drawn smaller: text stays at its CSS size
        'aria-label="Messages per day" preserveAspectRatio="xMinYMin meet">',
        "<title>Messages per day: sent, failed, queued</title>",
    ]
    for k in range(round(ymax / step) + 1):  # horizontal grid with value ticks
        v = step * k
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(v):.1f}" '
            f'y2="{y(v):.1f}"/><text class="tick" x="{left - 4}" y="{y(v) + 4:.1f}" '
            f'text-anchor="end">{_fmt_num(v)}</text>'
        )
    label_every = max(1, math.ceil(n / 8))
    points: list[str] = []
    for i, d in enumerate(days):
        x = left + i * slot + (slot - bar_w) / 2
        day_label = d.day.strftime("%d %b")
        parts.append(
            f'<rect class="bar sent" x="{x:.1f}" y="{y(d.sent):.1f}" width="{bar_w:.1f}" '
            f'height="{y(0) - y(d.sent):.1f}" data-value="{d.sent}">'
            f"<title>{day_label}: {d.sent} sent</title></rect>"
            f'<rect class="bar failed" x="{x:.1f}" y="{y(d.sent + d.failed):.1f}" '
            f'width="{bar_w:.1f}" height="{y(d.sent) - y(d.sent + d.failed):.1f}" '
            f'data-value="{d.failed}"><title>{day_label}: {d.failed} failed</title></rect>'
        )
        points.append(f"{left + i * slot + slot / 2:.1f},{y(d.queued):.1f}")
        if (n - 1 - i) % label_every == 0:  # spaced evenly, ending on today
            parts.append(
                f'<text class="tick" x="{left + i * slot + slot / 2:.1f}" '
                f'y="{height - bottom + 16}" text-anchor="middle">{day_label}</text>'
            )
    if points:
        parts.append(f'<path class="line queued" d="M{" L".join(points)}" fill="none"/>')
    parts.append(
        f'<line class="axis" x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))


def stage_words(stage: str) -> str:
    """A stage as people read it: "Awaiting cancellation", not ``awaiting_cancellation``."""
    return stage.replace("_", " ").capitalize()


def funnel_chart(funnel: Sequence[StageCount]) -> Markup:
    """The stage funnel: one bar per stage, campaign order, labelled in words ("Awaiting
    cancellation", not ``awaiting_cancellation``; the descriptions are sentences, too long
    for a bar and shown in the tables)."""
    return hbar_chart(
        "chart-funnel", "Customers per stage",
        [(stage_words(s.stage), float(s.customers), _fmt_num(s.customers)) for s in funnel],
        width=500, label_width=200, bar_class="bar funnel",
    )


def exposure_chart(exposure: Sequence[Exposure], currency: str) -> Markup:
    """Double-billing exposure of the ``EXPOSURE_CHART_TOP`` most exposed customers."""
    top = exposure[:EXPOSURE_CHART_TOP]
    return hbar_chart(
        "chart-exposure", "Double-billing exposure by customer",
        [(e.name or e.key, e.amount, f"{currency} {e.amount:,.2f}") for e in top],
        bar_class="bar exposure",
    )


# ----------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class CustomerRow:
    key: str
    name: str
    stage: str
    stage_order: int
    days_in_stage: float
    licences: int
    flags: str
    sent: int
    last_sent: datetime | None
    exposure: float


def _customer_rows(
    db: Database, report: StatusReport, campaign: Campaign
) -> list[CustomerRow]:
    order = {s.stage: i for i, s in enumerate(report.funnel)}
    exposure = {e.key: e.amount for e in report.exposure}
    sent = (
        sa.select(
            col(Message.customer_id).label("cid"),
            sa.func.count().label("n"),
            sa.func.max(col(Message.sent_at)).label("last"),
        )
        .where(col(Message.status) == MessageStatus.SENT, col(Message.internal) == sa.false())
        .group_by(col(Message.customer_id))
        .subquery()
    )
    with db.session() as s:
        rows = s.execute(
            sa.select(
                col(Customer.key), col(Customer.name), col(Customer.stage),
                col(Customer.stage_entered_at), col(Customer.licences), col(Customer.paused),
                col(Customer.opted_out), col(Customer.lost), sent.c.n,
                sent.c.last,
            )
            .outerjoin(sent, sent.c.cid == col(Customer.id))
            .order_by(col(Customer.key))
        ).all()
    now = report.now
    out: list[CustomerRow] = []
    for r in rows:
        flags = [n for n, on in (("paused", r.paused), ("opted out", r.opted_out),
                                 ("lost", r.lost)) if on]
        last = r.last
        if isinstance(last, str):
            last = datetime.fromisoformat(last)
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=UTC)
        out.append(
            CustomerRow(
                key=r.key, name=r.name, stage=r.stage, stage_order=order.get(r.stage, 99),
                days_in_stage=(now - r.stage_entered_at).total_seconds() / 86400.0,
                licences=int(r.licences), flags=", ".join(flags), sent=int(r.n or 0),
                last_sent=last, exposure=exposure.get(r.key, 0.0),
            )
        )
    return out


@dataclass(frozen=True)
class InboxStageRow:
    stage: str
    hard_bounces: int
    soft_bounces: int
    replies: int


def inbox_rows(report: StatusReport) -> list[InboxStageRow]:
    """Bounces (hard, soft) and replies per stage, campaign order (a stage that left the
    campaign last), only stages that have any."""
    inbox = report.inbox
    if inbox is None:
        return []
    order = [s.stage for s in report.funnel]
    stages = sorted(inbox.by_stage, key=lambda st: (order.index(st) if st in order
                                                    else len(order), st))
    rows = []
    for stage in stages:
        kinds = inbox.by_stage[stage]
        hard = inbox.hard_by_stage.get(stage, 0)
        row = InboxStageRow(stage, hard, kinds.get("bounce", 0) - hard, kinds.get("reply", 0))
        if row.hard_bounces or row.soft_bounces or row.replies:
            rows.append(row)
    return rows


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _fmt_num
    env.filters["stage"] = stage_words
    env.globals["pct"] = _fmt_pct
    return env


def render_report(
    report: StatusReport,
    customers: Sequence[CustomerRow],
    *,
    partner_name: str,
    generated_at: datetime,
) -> str:
    """The report page for already computed figures (pure: no database, no clock)."""
    tz = ZoneInfo(report.time_zone)

    def local(dt: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
        return dt.astimezone(tz).strftime(fmt) if dt else ""

    completed = report.completed
    awaiting = sum(s.customers for s in report.funnel if s.stage == report.csp_live_stage)
    template = _environment().get_template("report.html.j2")
    return template.render(
        **script_context(),
        r=report,
        partner_name=partner_name,
        generated_at=local(generated_at.astimezone(UTC), "%Y-%m-%d %H:%M:%S"),
        generated_iso=generated_at.astimezone(UTC).isoformat(timespec="seconds"),
        as_of=local(report.now),
        as_of_iso=report.now.isoformat(timespec="seconds"),
        local=local,
        completed=completed,
        completed_pct=(100.0 * completed / report.customers_total) if report.customers_total
        else 0.0,
        awaiting=awaiting,
        statuses=STATUSES,
        funnel_svg=funnel_chart(report.funnel),
        daily_svg=daily_chart("chart-daily", report.daily),
        exposure_svg=exposure_chart(report.exposure, report.currency),
        exposure_top=min(len(report.exposure), EXPOSURE_CHART_TOP),
        stuck=report.stuck[:LIST_LIMIT],
        exhausted=report.exhausted[:LIST_LIMIT],
        list_limit=LIST_LIMIT,
        customers=customers,
        days_per_month=int(DAYS_PER_MONTH),
        inbox_rows=inbox_rows(report),
        attention=(report.messages.total[MessageStatus.FAILED]
                   + report.messages.total[MessageStatus.UNKNOWN]),
    )


def build_report(
    db: Database,
    settings: Settings,
    campaign: Campaign,
    now: datetime,
    *,
    generated_at: datetime | None = None,
    days: int = 30,
    **scope: Any,
) -> str:
    """The whole report as one HTML string: the figures as of ``now``, stamped ``generated_at``
    (defaults to ``now``; the CLI passes the real clock)."""
    report = compute_status(db, settings, campaign, now, days=days,
                            sending_now=generated_at or now, **scope)  # tag, since
    rows = _customer_rows(db, report, campaign)
    return render_report(
        report, rows, partner_name=settings.partner.name, generated_at=generated_at or now
    )


def write_report(
    db: Database,
    settings: Settings,
    campaign: Campaign,
    out: Path,
    now: datetime,
    *,
    generated_at: datetime | None = None,
    days: int = 30, **scope: Any,
) -> Path:
    """Build the report and write it to ``out`` (UTF-8), replacing the file atomically (never
    the ledger itself: ``RequestRefused``)."""
    db.refuse_as_output(out)
    html = build_report(db, settings, campaign, now, generated_at=generated_at, days=days, **scope)
    out = Path(out)
    # A unique temporary name per write: two runs writing the same report never collide.
    try:
        return write_atomic(out, html, make_parents=True)
    except OutputError as exc:
        why = exc.message.removeprefix(f"Cannot write {out}: ").rstrip(".")
        raise OutputError(
            f"Cannot write the report to {out}: {why}. Choose another --out path."
        ) from exc
