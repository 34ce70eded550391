"""`comms report`: the HTML file carries the figures, draws the charts, escapes names, needs no
network; and the CSV exports of the outbox and the customers."""

from __future__ import annotations

import csv
import html as html_lib
import json
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from test_status import NOW, TZ, add_customer, add_message, ago, build_ledger
from wave_ledger import AUTUMN, PILOT, SPRING, build_wave_ledger

from comms.campaign import load_campaign
from comms.config import DefaultsSettings, Settings
from comms.errors import CommsError
from comms.services.managers import stage_label
from comms.services.report import (
    build_report,
    export_outbox_csv,
    write_report,
)
from comms.store.db import Database

GENERATED = datetime(2026, 3, 4, 15, 30, 7, tzinfo=UTC)


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside elements with an id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text_by_id: dict[str, str] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag not in ("meta", "input", "br", "line", "path"):
            self._open.append(a.get("id"))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("meta", "input", "br", "line", "path") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for ident in self._open:
            if ident:
                self.text_by_id[ident] = self.text_by_id.get(ident, "") + data

    def count(self, tag: str, cls: str) -> int:
        return sum(1 for t, a in self.tags if t == tag and cls in a.get("class", "").split())

    def values(self, cls: str) -> list[str]:
        return [a["data-value"] for t, a in self.tags if t == "rect"
                and cls in a.get("class", "").split()]


def parse(html: str) -> Elements:
    p = Elements()
    p.feed(html)
    p.close()
    return p


@pytest.fixture
def settings() -> Settings:
    return Settings(defaults=DefaultsSettings(time_zone=TZ))


@pytest.fixture
def campaign() -> Any:
    return load_campaign(None)


@pytest.fixture
def html(db: Database, settings: Settings, campaign: Any) -> str:
    build_ledger(db)
    return build_report(db, settings, campaign, NOW, generated_at=GENERATED, days=14)


def test_report_carries_the_figures(html: str) -> None:
    page = parse(html)
    assert page.text_by_id["total-customers"] == "13"
    assert page.text_by_id["exposure-total"] == "GBP 235.00"
    assert page.text_by_id["generated-at"] == "2026-03-04 10:30:07"
    assert 'datetime="2026-03-04T15:30:07+00:00"' in html
    assert "figures as of <time datetime=\"2026-03-04T15:00:00+00:00\">2026-03-04 10:00</time>" \
        " (America/New_York)" in html
    rows = re.findall(r'<tr data-status="(\w+)"><td>\w+</td><td class="num">(\d+)</td>'
                      r'<td class="num">(\d+)</td><td class="num">(\d+)</td></tr>', html)
    assert rows == [("queued", "1", "2", "2"), ("sending", "0", "0", "0"),
                    ("sent", "2", "6", "21"), ("failed", "1", "1", "1"),
                    ("unknown", "0", "0", "1"), ("withdrawn", "1", "1", "1"),
                    ("bounced", "0", "0", "0")]
    assert "Stuck past expected time (4)" in html
    assert "Reminders exhausted without progress (2)" in html
    assert "All 4 customers in “Awaiting cancellation”" in html
    assert "× GBP 12.50 per licence per month ÷ 30. Total GBP 235.00." in html


def test_report_charts_have_one_bar_per_datum(html: str) -> None:
    page = parse(html)
    # Funnel: the six campaign stages plus the unknown "legacy" stage, in campaign order.
    assert page.values("funnel") == ["2.0", "1.0", "2.0", "2.0", "4.0", "1.0", "1.0"]
    # Messages per day: 14 days, a sent and a failed bar each, the queued line.
    assert page.count("rect", "sent") == 14
    assert page.count("rect", "failed") == 14
    assert page.count("path", "queued") == 1
    assert page.values("sent")[-1] == "2" and page.values("failed")[-1] == "1"
    # Exposure: highest first.
    assert page.values("exposure") == ["150.0", "62.5", "12.5", "10.0"]
    svg_ids = [a.get("id") for t, a in page.tags if t == "svg"]
    assert svg_ids == ["chart-funnel", "chart-daily", "chart-exposure"]


def test_report_customer_table_lists_everyone(html: str) -> None:
    body = html.split('id="customer-table"', 1)[1].split("</table>", 1)[0]
    keys = re.findall(r"<tr><td>(C\d\d)</td>", body)
    assert keys == [f"C{i:02d}" for i in range(1, 14)]
    c06 = re.search(r"<tr><td>C06</td>.*?</tr>", body)
    assert c06 is not None
    assert '<td class="num" data-v="150.0">150.00</td>' in c06.group(0)
    assert '<td class="hide-phone flag">paused</td>' in c06.group(0)
    assert '<td class="num">6</td>' in c06.group(0)  # six messages sent to C06


def test_report_escapes_customer_names(db: Database, settings: Settings, campaign: Any) -> None:
    evil = '<script>alert("x")</script> & <b>Co</b>'
    with db.session() as s:
        add_customer(s, "X1", "awaiting_cancellation", ago(2), name=evil, csp_live_at=ago(2))
    html = build_report(db, settings, campaign, NOW, generated_at=GENERATED)
    assert "<script>alert" not in html
    assert "<b>Co</b>" not in html
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;Co&lt;/b&gt;"
    assert html.count(escaped) >= 2  # the customer table and the exposure bar's tooltip
    # The chart label is shortened (to fit left of its bar) but escaped too.
    assert re.search(r'class="lbl" text-anchor="end">&lt;script&gt;alert\(&#34;x[^<>]*…</text>',
                     html)
    assert html.count("<script>") == 1  # only the report's own script


def test_report_needs_no_network(html: str) -> None:
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    for forbidden in (" src=", "<link", "@import", "url(", "http://", "https://"):
        assert forbidden not in html, forbidden


def test_report_on_an_empty_ledger(db: Database, settings: Settings, campaign: Any) -> None:
    page = parse(build_report(db, settings, campaign, NOW, generated_at=GENERATED, days=7))
    assert page.text_by_id["total-customers"] == "0"
    assert page.values("funnel") == ["0.0"] * 6
    assert page.count("rect", "exposure") == 0
    assert page.count("rect", "sent") == 7
    assert page.text_by_id["exposure-total"] == "GBP 0.00"


def test_exposure_chart_shows_the_top_20(db: Database, settings: Settings,
                                         campaign: Any) -> None:
    with db.session() as s:
        for i in range(25):
            add_customer(s, f"E{i:02d}", "awaiting_cancellation", ago(3), licences=i + 1,
                         csp_live_at=ago(3))
    html = build_report(db, settings, campaign, NOW, generated_at=GENERATED)
    page = parse(html)
    values = [float(v) for v in page.values("exposure")]
    assert len(values) == 20
    assert values[0] == 31.25 and values[-1] == 7.5  # 3 d × 25 lic × 12.50 / 30 … 6 licences
    assert values == sorted(values, reverse=True)
    assert "Top 20 of 25 customers in “Awaiting cancellation”" in html


def test_exposure_note_of_a_single_customer(db: Database, settings: Settings,
                                            campaign: Any) -> None:
    with db.session() as s:
        add_customer(s, "E1", "awaiting_cancellation", ago(3), licences=4, csp_live_at=ago(3))
    html = build_report(db, settings, campaign, NOW, generated_at=GENERATED)
    assert "The one customer in “Awaiting cancellation”" in html and "Top 1 of 1" not in html


def test_write_report_to_an_unwritable_place(db: Database, settings: Settings,
                                             campaign: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CommsError) as exc:
        write_report(db, settings, campaign, blocker / "r.html", NOW)
    message = str(exc.value)
    assert message.startswith(f"Cannot write the report to {blocker / 'r.html'}: ")
    assert message.endswith(". Choose another --out path.")


def test_cli_report_writes_the_file(db: Database, cli: Any, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMS_DEFAULTS_TIME_ZONE", TZ)
    build_ledger(db)
    out = tmp_path / "out" / "report.html"
    r = cli("report", "--out", str(out), "--now", "2026-03-04T10:00", "--days", "10")
    assert r.exit_code == 0, r.output
    size = out.stat().st_size
    assert r.stdout.strip() == f"Wrote {out} ({size:,} bytes)."
    page = parse(out.read_text(encoding="utf-8"))
    assert page.text_by_id["exposure-total"] == "GBP 235.00"
    assert page.count("rect", "sent") == 10
    # The generation time is the real clock, the figures are as of --now.
    stamp = next(a["datetime"] for t, a in page.tags if t == "time" and a.get("id") ==
                 "generated-at")
    assert abs(datetime.fromisoformat(stamp) - datetime.now(UTC)) < timedelta(minutes=5)


def test_cli_report_rejects_a_bad_now(db: Database, cli: Any) -> None:
    r = cli("report", "--now", "03/04/2026")
    assert r.exit_code == 2
    assert "Error: --now '03/04/2026' is not an ISO 8601 date-time" in r.stderr


# ----------------------------------------------------------------------------- CSV exports


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def test_export_outbox_csv(db: Database, tmp_path: Path) -> None:
    build_ledger(db)
    path = tmp_path / "outbox.csv"
    assert export_outbox_csv(db, path) == 26
    rows = read_csv(path)
    assert len(rows) == 26
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # BOM: Excel reads UTF-8 right
    first = rows[0]
    assert (first["customer_key"], first["message"], first["sequence"], first["status"]) == (
        "C04", "partner_invitation", "0", "sent")
    assert first["to"] == "it@c04.example"
    assert first["internal"] == "no"
    assert first["sent_at"] == ago(30).isoformat()

    failed = tmp_path / "failed.csv"
    assert export_outbox_csv(db, failed, status="failed") == 1
    (row,) = read_csv(failed)
    assert (row["customer_key"], row["message"], row["last_error"]) == (
        "C07", "cancel_reminder", "550 mailbox unavailable")
    assert row["updated_at"] == "2026-03-04T14:30:00+00:00"


def test_export_outbox_csv_neutralises_formulas(db: Database, tmp_path: Path) -> None:
    with db.session() as s:
        c = add_customer(s, "F1", "invited", ago(1), name="=HYPERLINK(\"x\")")
        add_message(s, c, "partner_invitation", 0, "queued", at=ago(1),
                    subject="+1 action needed")
    path = tmp_path / "o.csv"
    assert export_outbox_csv(db, path, status="queued") == 1
    (row,) = read_csv(path)
    assert row["customer_name"] == "'=HYPERLINK(\"x\")"
    assert row["subject"] == "'+1 action needed"


def test_export_outbox_csv_unknown_status(db: Database, tmp_path: Path) -> None:
    with pytest.raises(CommsError) as exc:
        export_outbox_csv(db, tmp_path / "x.csv", status="lost")
    assert str(exc.value) == (
        "Unknown message status 'lost'; use one of: queued, sending, sent, failed, "
        "unknown, withdrawn, bounced."
    )
    assert not (tmp_path / "x.csv").exists()




def test_report_inbox_section_counts_bounces_replies_and_who_needs_someone(
    db: Database, settings: Settings, campaign: Any
) -> None:
    """One hard bounce (an NDR for an invitation to A1's only contact) and one reply (from B1)
    through the inbox service: the section shows them per stage, A1 unreachable, B1 awaiting
    an operator; C1, untouched, in neither list."""
    from comms.inbox import service as inbox_service
    from comms.inbox.classify import Attachment, Inbound
    from comms.store.models import Contact

    box = settings.senders[0].address
    with db.session() as s:
        a = add_customer(s, "A1", "invited", ago(10))
        b = add_customer(s, "B1", "announced", ago(5))
        c = add_customer(s, "C1", "announced", ago(5))
        for cust in (a, b, c):
            assert cust.id is not None
            s.add(Contact(customer_id=cust.id, name="IT", email=f"it@{cust.key.lower()}.example"))
        send_id = add_message(s, a, "invitation", 1, "sent", at=ago(1)).send_id
    before = parse(build_report(db, settings, campaign, NOW, generated_at=GENERATED))
    assert "Bounces 0 (0 hard, 0 soft), replies 0" in before.text_by_id["inbox-totals"]
    assert "No bounces or replies" in before.text_by_id["inbox"]

    ndr = Inbound(
        box, "g-ndr", subject="Undeliverable: Your invitation",
        from_address="postmaster@fabrikam.example",
        text="Your message to it@a1.example couldn't be delivered. Remote Server returned "
             "'550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'",
        headers={"x-ms-exchange-message-is-ndr": "", "auto-submitted": "auto-replied"},
        attachments=(
            Attachment("message/delivery-status",
                       "Final-Recipient: rfc822;it@a1.example\nAction: failed\nStatus: 5.1.1\n"),
            Attachment("message/rfc822", f"x-comms-send-id: {send_id}\n"),
        ),
    )
    reply = Inbound(box, "g-reply", subject="RE: Your invitation", from_address="it@b1.example",
                    text="We will accept it next week.")
    got = inbox_service.SyncReport()
    inbox_service._process(db, settings, campaign.inbox, None,  # type: ignore[arg-type]
                           [ndr, reply], now=NOW, dry_run=False, report=got,
                           caches=inbox_service._Caches())
    assert got.kinds == {"bounce": 1, "reply": 1}

    html = build_report(db, settings, campaign, NOW, generated_at=GENERATED)
    page = parse(html)
    assert "Bounces 1 (1 hard, 0 soft), replies 1," in page.text_by_id["inbox-totals"]
    rows = re.findall(r'<tr data-stage="(\w+)">.*?data-kind="hard">(\d+)<.*?'
                      r'data-kind="soft">(\d+)<.*?data-kind="reply">(\d+)<', html)
    assert rows == [("announced", "0", "0", "1"), ("invited", "1", "0", "0")]  # campaign order
    assert page.text_by_id["inbox-unreachable"] == (
        "Unreachable customers (no deliverable address): 1: A1")
    assert page.text_by_id["inbox-awaiting"] == "Awaiting an operator after a reply: 1: B1"


def _rows(html: str, table_id: str) -> dict[str, str]:
    """The body rows of one table by their data-group / data-wave attribute (raw HTML)."""
    body = re.search(rf'<table[^>]* id="{table_id}">.*?<tbody>(.*?)</tbody>', html, re.S)
    assert body, table_id
    return {m.group(1): m.group(2) for m in re.finditer(
        r'<tr data-(?:group|wave)="([^"]*)">(.*?)</tr>', body.group(1), re.S)}


def test_report_per_wave_conversion_and_inbox(
    db: Database, settings: Settings, campaign: Any
) -> None:
    """Per wave: reached and conversion per step, bounces and replies (hand-computed in
    tests/wave_ledger.py)."""
    build_wave_ledger(db)
    html = build_report(db, settings, campaign, NOW, generated_at=GENERATED, days=14)
    waves = _rows(html, "by-wave")
    assert list(waves) == [AUTUMN, PILOT, SPRING]
    cells = re.findall(r'data-reached="(\d+)" data-conversion="([^"]*)">[\d,]+'
                       r'(?:<span class="conv">([^<]*)</span>)?', waves[SPRING])
    assert cells == [("4", "", ""), ("3", "0.75", "75%"), ("3", "1.0", "100%"),
                     ("2", "0.6667", "67%"), ("2", "1.0", "100%"), ("1", "0.5", "50%")]
    pilot = re.findall(r'<span class="conv">([^<]*)</span>', waves[PILOT])
    assert pilot == ["0%", "-", "-", "-", "-"]
    inbox = {w: re.findall(r'data-kind="(\w+)">(\d+)<', row)
             for w, row in _rows(html, "inbox-by-wave").items()}
    assert inbox == {
        AUTUMN: [("hard", "0"), ("soft", "0"), ("reply", "0")],
        PILOT: [("hard", "0"), ("soft", "0"), ("reply", "0")],
        SPRING: [("hard", "1"), ("soft", "1"), ("reply", "1")],
    }
    # Next to the overall counts, which also hold the untagged customer's reply.
    assert re.search(r'id="inbox-bounces">2<.*id="inbox-replies">2<', html, re.S)
    managers = _rows(html, "by-account-manager")
    assert len(managers) == 3
    for group, row in managers.items():  # "Name <email>": the name, the address under it
        m = re.fullmatch(r"(.+) &lt;(.+)&gt;", group)
        if m:
            assert f'<td class="group">{m[1]}<span class="email">{m[2]}</span></td>' in row
        else:
            assert f'<td class="group">{group}</td>' in row
    assert any("&lt;" in group for group in managers)
    # The breakdown columns are named by the stage in words; the description is the tooltip.
    head = re.search(r'<table[^>]* id="by-wave">\s*<thead>(.*?)</thead>', html, re.S)
    assert head
    columns = re.findall(r'<th class="num" data-stage="(\w+)" title="([^"]+)">([^<]+)</th>',
                         head.group(1))
    assert [stage for stage, _, _ in columns] == re.findall(r'data-stage="(\w+)" data-reached',
                                                           waves[SPRING])
    assert len(columns) == 6
    for stage, title, name in columns:
        assert name == stage.replace("_", " ").capitalize()
        assert html_lib.unescape(title) == stage_label(campaign, stage)


def test_completed_card_counts_the_campaigns_final_stage_whatever_its_name(
        db: Database, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card matched the stage name `completed`: a campaign whose final stage is `done`
    showed 0 completed. It counts the final stage(s), like `status --json`'s `completed`."""
    text = (Path(__file__).resolve().parent.parent / "config" / "campaign.toml").read_text(
        encoding="utf-8")
    assert text.count('"completed"') == 2  # the stage and awaiting_cancellation's next
    campaign_file = tmp_path / "campaign.toml"
    campaign_file.write_text(text.replace('"completed"', '"done"'), encoding="utf-8")
    monkeypatch.setenv("COMMS_CAMPAIGN_FILE", str(campaign_file))
    with db.session() as s:
        for i, stage in enumerate(["done", "done", "done", "awaiting_cancellation"]):
            add_customer(s, f"C{i}", stage, ago(days=3))
    out = tmp_path / "report.html"
    r = cli("report", "--out", str(out), "--now", "2026-03-04T10:00")
    assert r.exit_code == 0, r.output
    html = out.read_text(encoding="utf-8")
    card = re.findall(r'<span class="n"[^>]*>([\d,]+)</span><span class="l">completed \((\d+)%\)',
                      html)
    assert card == [("3", "75")]
    assert json.loads(cli("status", "--json", "--now", "2026-03-04T10:00").stdout)[
        "completed"] == 3
    assert load_campaign(str(campaign_file)).completed_stages == ("done",)
