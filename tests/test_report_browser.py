"""The report in a real browser (headless Chromium): no console errors, the charts drawn with the
expected number of SVG elements, the table sorts and filters, and screenshots at laptop and
phone size (their paths are printed; run pytest with -s to see them).

Two independent error signals: a probe script injected at the top of a copy of the report
records ``window.onerror``, unhandled rejections, CSP violations and ``console.error`` into the
DOM (read back with ``--dump-dom``); and Chromium's own console log (``--enable-logging``) of the
unmodified report must hold no console line at all.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_status import NOW, TZ, build_ledger

from comms.campaign import load_campaign
from comms.config import DefaultsSettings, Settings
from comms.services.report import build_report
from comms.store.db import Database

pytestmark = pytest.mark.browser

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)

PROBE = r"""<script>
(function () {
  var errors = [];
  function record(kind, msg) { errors.push(kind + ": " + msg); }
  window.addEventListener("error", function (e) {
    record("error", e.message || (e.target && (e.target.src || e.target.href)) || "resource");
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    record("rejection", String(e.reason));
  });
  document.addEventListener("securitypolicyviolation", function (e) {
    record("csp", e.violatedDirective + " " + e.blockedURI);
  });
  var origError = console.error;
  console.error = function () {
    record("console.error", Array.prototype.join.call(arguments, " "));
    return origError.apply(console, arguments);
  };
  function count(sel) { return document.querySelectorAll(sel).length; }
  function firstKey() {
    var row = document.getElementById("customer-table").tBodies[0].rows[0];
    return row.cells[0].textContent;
  }
  window.addEventListener("load", function () {
    setTimeout(function () {
      var out = { errors: errors, ready: document.documentElement.getAttribute("data-ready") };
      try {
        out.funnelBars = count("#chart-funnel rect.bar");
        out.sentBars = count("#chart-daily rect.bar.sent");
        out.failedBars = count("#chart-daily rect.bar.failed");
        out.queuedLines = count("#chart-daily path.line.queued");
        out.exposureBars = count("#chart-exposure rect.bar");
        out.funnelWidths = Array.prototype.map.call(
          document.querySelectorAll("#chart-funnel rect.bar"),
          function (r) { return Math.round(r.getBBox().width); });
        out.exposureWidths = Array.prototype.map.call(
          document.querySelectorAll("#chart-exposure rect.bar"),
          function (r) { return Math.round(r.getBBox().width); });
        out.chartPixels = Math.round(document.getElementById("chart-funnel")
          .getBoundingClientRect().width);
        var heads = document.getElementById("customer-table").tHead.rows[0].cells;
        var exposureHead = heads[heads.length - 1];
        exposureHead.querySelector("button").click();
        out.ascFirst = firstKey();
        out.ascSort = exposureHead.getAttribute("aria-sort");
        exposureHead.querySelector("button").click();
        out.descFirst = firstKey();
        heads[1].querySelector("button").click();  // by name, alphabetical
        out.nameFirst = firstKey();
        var filter = document.getElementById("customer-filter");
        filter.value = "contoso";
        filter.dispatchEvent(new Event("input"));
        out.visibleAfterFilter = Array.prototype.filter.call(
          document.getElementById("customer-table").tBodies[0].rows,
          function (r) { return !r.hidden; }).length;
        out.countText = document.getElementById("customer-count").textContent;
      } catch (e) { record("probe", String(e)); out.errors = errors; }
      var pre = document.createElement("pre");
      pre.id = "__probe";
      pre.textContent = JSON.stringify(out);
      document.body.appendChild(pre);
    }, 0);
  });
})();
</script>"""


def chromium_run(
    chromium: str, tmp: Path, page: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )


def probe(chromium: str, tmp: Path, html: str) -> dict[str, Any]:
    """Open a copy of ``html`` with the probe injected; return what the probe wrote."""
    page = tmp / "probed.html"
    assert "<head>" in html
    page.write_text(html.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    result = chromium_run(chromium, tmp, page, "--virtual-time-budget=5000", "--dump-dom")
    match = re.search(r'<pre id="__probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"probe did not report; chromium stderr:\n{result.stderr[-2000:]}"
    text = match.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
    data: dict[str, Any] = json.loads(text.replace("&amp;", "&"))
    return data


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.fixture
def report_html(db: Database) -> str:
    build_ledger(db)
    settings = Settings(defaults=DefaultsSettings(time_zone=TZ))
    return build_report(db, settings, load_campaign(None), NOW, days=14)


def test_report_in_chromium_draws_charts_without_errors(
    chromium: str, report_html: str, tmp_path: Path
) -> None:
    data = probe(chromium, tmp_path, report_html)
    assert data["errors"] == []
    assert data["ready"] == "1"  # the report's own script ran to its end
    assert data["funnelBars"] == 7  # six campaign stages + the unknown "legacy" stage
    assert data["sentBars"] == 14 and data["failedBars"] == 14  # one per day, 14 days
    assert data["queuedLines"] == 1
    assert data["exposureBars"] == 4
    # Bars really have size: awaiting_cancellation (4 customers) is the longest, twice imported.
    widths = data["funnelWidths"]
    assert widths[4] == max(widths) > 0 and abs(widths[0] * 2 - widths[4]) <= 1
    assert data["exposureWidths"] == sorted(data["exposureWidths"], reverse=True)
    assert data["exposureWidths"][-1] > 0
    assert data["chartPixels"] > 300
    # Sorting the customer table by exposure, then by name; filtering.
    assert data["ascSort"] == "ascending"
    assert data["ascFirst"] == "C01"  # exposure 0, ties keep key order
    assert data["descFirst"] == "C06"  # highest exposure
    assert data["nameFirst"] == "C11"  # "Contoso <Ltd> & Sons" sorts before "Customer …"
    assert data["visibleAfterFilter"] == 1
    assert data["countText"] == "1 of 13 customers shown."


def test_probe_catches_script_errors(chromium: str, report_html: str, tmp_path: Path) -> None:
    """The harness itself can fail: a broken script and a blocked fetch are reported."""
    # Before the policy (as the probe itself): it runs and fails. After it, an injected inline
    # script is refused by the policy's script hash (no 'unsafe-inline'), like the fetch.
    broken = report_html.replace(
        "<head>", "<head>\n<script>undefinedFunction();</script>", 1).replace(
        "</body>", '<script>document.title = "injected";</script>'
        '<img src="https://example.com/x.png"></body>')
    data = probe(chromium, tmp_path, broken)
    assert any("undefinedFunction" in e for e in data["errors"]), data["errors"]
    assert any(e.startswith("csp: img-src") for e in data["errors"]), data["errors"]
    assert any(e.startswith("csp: script-src") for e in data["errors"]), data["errors"]


@pytest.mark.parametrize(("width", "height", "name"), [(1280, 900, "laptop"),
                                                        (390, 844, "phone")])
def test_report_screenshots_and_console(
    chromium: str, report_html: str, tmp_path: Path, width: int, height: int, name: str
) -> None:
    page = tmp_path / "report.html"
    page.write_text(report_html, encoding="utf-8")
    shot = tmp_path / f"report-{name}-{width}x{height}.png"
    result = chromium_run(
        chromium, tmp_path, page, "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=3000", f"--window-size={width},{height}", f"--screenshot={shot}",
    )
    print(f"\nscreenshot ({name}): {shot}")
    assert shot.exists(), result.stderr[-2000:]
    assert png_size(shot) == (width, height)
    assert shot.stat().st_size > 10_000  # a drawn page, not a blank one
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
