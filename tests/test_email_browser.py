"""The rendered emails in a real browser (headless Chromium) at phone and desktop widths: no
horizontal overflow, and the call-to-action button on screen, unobstructed and clickable."""

from __future__ import annotations

import html as html_lib
import json
import re
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from comms.config import Settings
from comms.domain import ContactInfo, CustomerInfo
from comms.render import Renderer

pytestmark = pytest.mark.browser

NOW = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)

# Runs inside the page after load; writes its findings into an attribute (no layout change).
MEASURE = """
<script>
(function () {
  var d = document.documentElement, b = document.body;
  var out = {iw: window.innerWidth, sw: Math.max(d.scrollWidth, b.scrollWidth), cta: null};
  var a = document.querySelector('a.cta');
  if (a) {
    a.scrollIntoView({block: 'center'});
    var r = a.getBoundingClientRect(), s = getComputedStyle(a);
    var hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    out.cta = {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width,
               height: r.height, visible: s.visibility === 'visible' && s.display !== 'none'
               && parseFloat(s.opacity) > 0, on_top: !!hit && (hit === a || a.contains(hit)),
               vh: window.innerHeight, text: a.textContent.trim(),
               color: s.color, background: getComputedStyle(a.parentElement).backgroundColor};
  }
  // Inside the test's iframe, report to the page Chromium dumps.
  (window.parent || window).document.documentElement.setAttribute('data-measure',
                                                                   JSON.stringify(out));
})();
</script>
"""

CASES = [
    ("kickoff", 24, "en"),
    ("partner_invitation", 24, "en"),
    ("partner_invitation_reminder", 24, "en"),
    ("lose_access_warning", 26, "de"),
    ("cancel_instructions", 24, "en"),
    ("cancel_instructions", 26, "de"),
    ("cancel_reminder", 25, "en"),
    ("transition_complete", 24, "en"),
]


def customer(licences: int, locale: str) -> CustomerInfo:
    return CustomerInfo(
        key="contoso", name="<b>Contoso & Sons International Holdings</b>", licences=licences,
        stage="awaiting_cancellation", stage_entered_at=NOW, locale=locale,
        tenant_id="3f2504e0-4f89-11d3-9a0c-0305e82c3301", primary_domain="contoso.example",
        contacts=(ContactInfo("Ana Admin", "ana@contoso.example"),),
        csp_live_at=NOW - timedelta(days=6),
    )


def measure(chromium: str, html: str, width: int, tmp_path: Path) -> dict[str, object]:
    # Headless Chromium will not make its window narrower than 500 px, so the email is shown in
    # an iframe exactly `width` wide: its viewport, media queries included, is that width.
    doc = html_lib.escape(html.replace("</body>", MEASURE + "</body>"), quote=True)
    page = tmp_path / f"email-{width}.html"
    page.write_text(
        '<!DOCTYPE html><html><body style="margin:0">'
        f'<iframe style="border:0;width:{width}px;height:2000px" srcdoc="{doc}"></iframe>'
        "</body></html>", encoding="utf-8")
    profile = tmp_path / f"profile-{width}"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", f"--window-size={width},2000",
         "--hide-scrollbars", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    m = re.search(r"data-measure=\"([^\"]*)\"", proc.stdout)
    assert m, f"Chromium produced no measurement (rc={proc.returncode}): {proc.stderr[-2000:]}"
    data: dict[str, object] = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return data


@pytest.mark.parametrize(("message", "licences", "locale"), CASES)
def test_no_overflow_and_cta_visible(
    chromium: str, tmp_path: Path, message: str, licences: int, locale: str
) -> None:
    renderer = Renderer(Settings())
    email = renderer.render(message, customer(licences, locale), now=NOW, reminder_number=3)
    for width in (375, 600):
        m = measure(chromium, email.html, width, tmp_path)
        assert m["iw"] == width, m
        assert m["sw"] <= m["iw"], f"{message} overflows at {width}px: {m}"
        cta = m["cta"]
        assert isinstance(cta, dict), f"{message} has no call-to-action"
        assert cta["visible"] and cta["on_top"], (width, cta)
        assert cta["width"] > 40 and cta["height"] >= 30, (width, cta)  # a real tap target
        assert cta["left"] >= 0 and cta["right"] <= width, (width, cta)
        assert cta["top"] >= 0 and cta["bottom"] <= cta["vh"], (width, cta)
        assert cta["color"] == "rgb(255, 255, 255)" and cta["background"] == "rgb(15, 76, 129)"
        if width == 375:  # the phone rule from the media query: a full-width button
            assert cta["width"] >= 375 - 2 * 20 - 2, cta


def test_long_partner_name_still_fits_on_a_phone(chromium: str, tmp_path: Path) -> None:
    s = Settings.model_validate({"partner": {"name": "Fabrikam Cloud Services and Managed "
                                             "Microsoft Licensing Partners Worldwide"}})
    email = Renderer(s).render("partner_invitation", replace(customer(24, "en")), now=NOW)
    m = measure(chromium, email.html, 375, tmp_path)
    assert m["sw"] <= m["iw"], m
    cta = m["cta"]
    assert isinstance(cta, dict) and cta["right"] <= 375 and cta["on_top"], cta


def test_the_measurement_catches_overflow(chromium: str, tmp_path: Path) -> None:
    # Guard against a vacuous pass: a link without the fallback's word-break overflows.
    email = Renderer(Settings()).render("partner_invitation", customer(24, "en"), now=NOW)
    broken = email.html.replace("word-break:break-all; overflow-wrap:anywhere", "")
    assert broken != email.html
    m = measure(chromium, broken, 375, tmp_path)
    assert m["sw"] > m["iw"] == 375, m
