"""The report in a real browser (headless Chromium): no console errors, the charts drawn with the
expected number of SVG elements, the table sorts and filters; and at 1366 px and 390 px nothing
clipped (every box inside the viewport or a scroll container, a visible hint on each box that
scrolls sideways, chart text drawn at 11 px or more), with screenshots (their paths are printed;
run pytest with -s to see them).

Two independent error signals: a probe script injected at the top of a copy of the report
records ``window.onerror``, unhandled rejections, CSP violations and ``console.error`` into the
DOM (read back with ``--dump-dom``); and Chromium's own console log (``--enable-logging``) of the
unmodified report must hold no console line at all.
"""

from __future__ import annotations

import html as html_lib
import json
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_status import NOW, TZ, build_ledger
from wave_ledger import build_wave_ledger

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

# Both probes record what goes wrong into ``errors``: script errors, CSP violations and
# console.error calls.
RECORD_ERRORS = r"""
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
"""

PROBE = r"""<script>
(function () {""" + RECORD_ERRORS + r"""
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


# ----------------------------------------------------------------------------- layout (issue 15)

# Walks every visible element and text of the report once it has loaded. A box must lie inside
# the viewport horizontally, or inside the nearest ancestor that clips it: a scroll container
# (overflow-x auto/scroll: reachable by scrolling) is fine, anything else that clips (overflow
# hidden, an <svg>) must hold the box whole, in both directions. Chart text is measured as drawn
# (computed font size × the SVG's scale). Each box that scrolls sideways reports whether the
# "swipe sideways" hint just before it is visible.
LAYOUT_JS = r"""
(function () {""" + RECORD_ERRORS + r"""
  var SKIP = { SCRIPT: 1, STYLE: 1, TITLE: 1, HEAD: 1, title: 1 };
  function name(el) {
    var s = el.tagName.toLowerCase();
    if (el.id) { s += "#" + el.id; }
    var cls = el.getAttribute("class");
    if (cls) { s += "." + cls.trim().split(/\s+/).join("."); }
    return s;
  }
  function path(el) {
    var parts = [];
    for (var a = el; a && a.tagName && parts.length < 4; a = a.parentElement) {
      parts.unshift(name(a));
    }
    return parts.join(" > ");
  }
  function shown(el) {
    var s = getComputedStyle(el);
    return s.display !== "none" && s.visibility === "visible";
  }
  function clipper(start) {
    for (var a = start; a && a !== document.body && a !== document.documentElement;
         a = a.parentElement) {
      if (a.tagName.toLowerCase() === "svg") { return a; }
      if (getComputedStyle(a).overflowX !== "visible") { return a; }
    }
    return null;
  }
  function inside(r, o) {
    return r.left >= o.left - 0.5 && r.right <= o.right + 0.5 &&
           r.top >= o.top - 0.5 && r.bottom <= o.bottom + 0.5;
  }
  var vw = document.documentElement.clientWidth;
  function verdict(r, clip) {
    if (clip) {
      var ox = getComputedStyle(clip).overflowX;
      if (clip.tagName.toLowerCase() !== "svg" && (ox === "auto" || ox === "scroll")) {
        return null;
      }
      return inside(r, clip.getBoundingClientRect()) ? null : "outside " + name(clip);
    }
    return (r.left >= -0.5 && r.right <= vw + 0.5) ? null : "outside the viewport";
  }
  function check() {
    var clipped = [];
    var all = document.body.getElementsByTagName("*");
    for (var i = 0; i < all.length; i++) {
      var el = all[i];
      if (SKIP[el.tagName] || el.id === "__probe" || el.closest("[hidden]") || !shown(el)) {
        continue;
      }
      var r = el.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) { continue; }
      var why = verdict(r, clipper(el.parentElement));
      if (why) {
        clipped.push(path(el) + " [" + Math.round(r.left) + ".." + Math.round(r.right) + "] " +
                     why);
      }
      for (var n = el.firstChild; n; n = n.nextSibling) {
        if (n.nodeType !== 3 || !n.textContent.trim()) { continue; }
        var range = document.createRange();
        range.selectNodeContents(n);
        var t = range.getBoundingClientRect();
        if (t.width === 0 && t.height === 0) { continue; }
        var whyText = verdict(t, clipper(el));
        if (whyText) {
          clipped.push("text '" + n.textContent.trim().slice(0, 30) + "' in " + path(el) +
                       " [" + Math.round(t.left) + ".." + Math.round(t.right) + "] " + whyText);
        }
      }
    }
    var scrolling = [];
    Array.prototype.forEach.call(document.querySelectorAll("main *"), function (box) {
      var ox = getComputedStyle(box).overflowX;
      if ((ox !== "auto" && ox !== "scroll") || !shown(box) ||
          box.scrollWidth <= box.clientWidth + 1) { return; }
      var hint = box.previousElementSibling;
      var ok = !!hint && hint.classList.contains("scroll-hint") && !hint.hidden &&
               shown(hint) && hint.getBoundingClientRect().height > 0;
      scrolling.push({ box: path(box), hint: ok,
                       table: !!box.querySelector("table"), svg: !!box.querySelector("svg") });
    });
    var fonts = Array.prototype.map.call(document.querySelectorAll("svg.chart text"), function (t) {
      return Math.round(parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a * 100) / 100;
    });
    return { viewport: vw, pageWidth: document.documentElement.scrollWidth, clipped: clipped,
             scrolling: scrolling, chartFonts: fonts,
             ready: document.documentElement.getAttribute("data-ready") };
  }
  window.addEventListener("load", function () {
    setTimeout(function () {
      var out;
      try { out = check(); } catch (e) { record("probe", String(e)); out = {}; }
      out.errors = errors;
      // Inside the test's iframe: write where --dump-dom can read it (the outer page).
      var doc = (window.parent || window).document;
      var pre = doc.createElement("pre");
      pre.id = "__layout";
      pre.textContent = JSON.stringify(out);
      doc.body.appendChild(pre);
    }, 0);
  });
})();
"""


def framed(html: str, width: int, height: int) -> str:
    """A page showing ``html`` in an iframe exactly ``width`` × ``height``: its viewport, media
    queries included, is that size (headless Chromium will not make a window narrower than
    500 px, but an iframe can be)."""
    doc = html_lib.escape(html, quote=True)
    return ('<!DOCTYPE html><html><body style="margin:0">'
            f'<iframe style="border:0;display:block;width:{width}px;height:{height}px" '
            f'srcdoc="{doc}"></iframe></body></html>')


def layout(chromium: str, tmp: Path, html: str, width: int, height: int) -> dict[str, Any]:
    """Open ``html`` (the layout probe injected before its policy) at ``width``; return what the
    probe found."""
    probed = html.replace("<head>", f"<head>\n<script>{LAYOUT_JS}</script>", 1)
    page = tmp / f"layout-{width}.html"
    page.write_text(framed(probed, width, height), encoding="utf-8")
    result = chromium_run(chromium, tmp, page, "--virtual-time-budget=5000", "--dump-dom",
                          f"--window-size={max(width, 500)},{height}")
    match = re.search(r'<pre id="__layout">(.*?)</pre>', result.stdout, re.S)
    assert match, f"layout probe did not report; chromium stderr:\n{result.stderr[-2000:]}"
    data: dict[str, Any] = json.loads(html_lib.unescape(match.group(1)))
    return data


@pytest.fixture
def wide_report_html(db: Database) -> str:
    """Every section filled, with long customer, account-manager and wave names (wide tables)."""
    build_ledger(db)
    build_wave_ledger(db)
    settings = Settings(defaults=DefaultsSettings(time_zone=TZ))
    return build_report(db, settings, load_campaign(None), NOW, days=30)


@pytest.mark.parametrize(("width", "height"), [(1366, 768), (390, 844)])
def test_report_layout_nothing_clipped(
    chromium: str, wide_report_html: str, tmp_path: Path, width: int, height: int
) -> None:
    data = layout(chromium, tmp_path, wide_report_html, width, height)
    assert data["errors"] == [] and data["ready"] == "1"
    assert data["viewport"] == width
    assert data["clipped"] == [], "\n".join(data["clipped"])
    assert data["pageWidth"] <= width  # the page itself never scrolls sideways
    assert min(data["chartFonts"]) >= 11, data["chartFonts"]
    assert len(data["chartFonts"]) > 30  # labels, values and ticks of three charts
    scrolling = data["scrolling"]
    if width >= 1366:
        assert scrolling == [], json.dumps(scrolling, indent=1)  # a laptop sees all whole
    else:
        assert all(s["hint"] for s in scrolling), json.dumps(scrolling, indent=1)
        # The wide tables (per wave, per account manager, customers) scroll, with the hint.
        assert sum(1 for s in scrolling if s["table"]) >= 3, scrolling
    # Screenshot and Chromium's own console log of the unmodified report at this size.
    page = tmp_path / f"framed-{width}.html"
    page.write_text(framed(wide_report_html, width, height), encoding="utf-8")
    shot = tmp_path / f"report-{width}x{height}.png"
    result = chromium_run(
        chromium, tmp_path, page, "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=3000", f"--window-size={width},{height}", f"--screenshot={shot}",
    )
    print(f"\nscreenshot ({width} px): {shot}")
    assert shot.exists(), result.stderr[-2000:]
    assert png_size(shot) == (width, height)
    assert shot.stat().st_size > 10_000  # a drawn page, not a blank one
    assert [line for line in result.stderr.splitlines() if ":CONSOLE" in line] == []


def test_layout_probe_catches_clipping(
    chromium: str, wide_report_html: str, tmp_path: Path
) -> None:
    """The checker itself can fail: a box wider than the phone outside any scroll container,
    chart text outside its SVG, a scrolling box without its hint and text too small are all
    reported."""
    broken = wide_report_html.replace(
        '<section class="panel" id="customers">',
        '<div id="too-wide" style="width:700px">wide</div>'
        '<div class="scroll" id="no-hint"><table><tr><td style="min-width:900px">x</td></tr>'
        '</table></div><section class="panel" id="customers">', 1).replace(
        "</svg>", '<text x="2000" y="20" class="lbl">far</text>'
        '<text x="8" y="30" style="font-size:6px">tiny</text></svg>', 1)
    data = layout(chromium, tmp_path, broken, 390, 844)
    assert any(c.endswith("div#too-wide [10..710] outside the viewport")
               for c in data["clipped"]), data["clipped"]
    assert any(c.startswith("text 'far' in ") and c.endswith("outside svg#chart-funnel.chart")
               for c in data["clipped"]), data["clipped"]
    no_hint = [x for x in data["scrolling"] if x["box"].endswith("div#no-hint.scroll")]
    assert no_hint, data["scrolling"]
    assert no_hint == [{"box": no_hint[0]["box"], "hint": False, "table": True, "svg": False}]
    assert min(data["chartFonts"]) < 11
