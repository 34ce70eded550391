"""Preview emails exactly as they would be sent: one customer from the ledger, or every message
and branch for the built-in sample customers (an index page to browse them)."""

from __future__ import annotations

import html as html_lib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from comms import planner
from comms.campaign import Campaign, Reminders, load_campaign
from comms.config import Settings
from comms.delivery.base import Address, compose_email
from comms.delivery.eml import build_eml
from comms.domain import ContactInfo, CustomerInfo
from comms.errors import NotFound
from comms.fileio import write_atomic
from comms.render import RenderedEmail, Renderer
from comms.store import repo
from comms.store.db import Database

Format = Literal["html", "text", "eml"]


def sample_customers(settings: Settings, now: datetime, locale: str = "en") -> list[CustomerInfo]:
    """Customers just below, at and just above the licence threshold (24/25/26 by default).

    The first has a hostile name, so previews and checks show that names are escaped."""
    t = settings.partner.licence_threshold
    out: list[CustomerInfo] = []
    for i, (licences, name) in enumerate(
        [(t - 1, "<b>Contoso & Sons</b>"), (t, "Northwind Traders"), (t + 1, "Müller & Söhne GmbH")]
    ):
        key = f"sample-{licences}"
        out.append(
            CustomerInfo(
                key=key,
                name=name,
                licences=max(licences, 1),
                stage="awaiting_cancellation",
                stage_entered_at=now - timedelta(days=9),
                locale=locale,
                tenant_id=f"00000000-0000-4000-8000-00000000002{i}",
                primary_domain=f"{key}.example",
                account_manager_name="Sam Account-Manager",
                account_manager_email="sam.manager@fabrikam.example",
                contacts=(
                    ContactInfo("Ana O'Neil", f"ana@{key}.example", "primary"),
                    ContactInfo("Billing desk", f"billing@{key}.example", "billing"),
                ),
                csp_live_at=now - timedelta(days=9),
            )
        )
    return out


@dataclass(frozen=True)
class Branch:
    """One way a message can come out: licence count, reminder number, escalation."""

    licences: int
    reminder_number: int = 0
    escalated: bool = False
    reminders_max: int | None = None  # the campaign's max for this reminder message

    @property
    def label(self) -> str:
        parts = [f"{self.licences} licences"]
        if self.reminder_number:
            parts.append(f"reminder {self.reminder_number}")
            if self.reminder_number == self.reminders_max:
                parts.append("the last")
        if self.escalated:
            parts.append("escalated")
        return ", ".join(parts)

    def context(self) -> dict[str, object]:
        """What the planner tells a reminder's templates in this branch."""
        return {"escalated": self.escalated, "reminders_max": self.reminders_max}


def reminder_messages(campaign: Campaign | None) -> dict[str, Reminders]:
    """Message -> its reminders settings, for every reminder or escalation message."""
    out: dict[str, Reminders] = {}
    for stage in (campaign or load_campaign()).stages:
        r = stage.reminders
        if r is None:
            continue
        out[r.message] = r
        if r.escalate_after:
            out[r.escalation_message] = r
    return out


def branches(message: str, settings: Settings, campaign: Campaign | None) -> list[Branch]:
    """Below / at / above the threshold, and for reminders each of the first ones and the last
    (escalating as the campaign says)."""
    t = settings.partner.licence_threshold
    counts = [max(t - 1, 1), t, t + 1]
    r = reminder_messages(campaign).get(message)
    if r is None:
        return [Branch(n) for n in counts]
    numbers = sorted({*range(1, min(r.max, 3) + 1), max(r.max, 1)})
    esc = r.escalate_after
    return [Branch(n, k, bool(esc and k >= esc), r.max) for n in counts for k in numbers]


def render_sample(
    renderer: Renderer, message: str, locale: str, branch: Branch, now: datetime
) -> RenderedEmail:
    """Render one message for the sample customer of a branch."""
    customers = sample_customers(renderer.settings, now, locale)
    customer = next(c for c in customers if c.licences == branch.licences)
    return renderer.render(message, customer, now=now, reminder_number=branch.reminder_number,
                           extra=branch.context())


# ---------------------------------------------------------------------------------------------
# One customer from the ledger


def load_customer(db: Database, key: str) -> CustomerInfo:
    """The domain view of one ledger customer, from the same loader planning and sending use
    (so contacts come in the order they are mailed); ``NotFound`` suggests close keys."""
    with db.session() as session:
        return repo.customer_info(session, repo.get_customer(session, key))


def save(path: Path, data: bytes, *, ledger: Database | None = None) -> Path:
    """Write a preview for people to open (world-readable, like a saved email), atomically;
    never over the ``ledger`` database (``RequestRefused``)."""
    if ledger is not None:
        ledger.refuse_as_output(path)
    return write_atomic(path, data, mode=0o644)


def preview_customer(
    settings: Settings,
    customer: CustomerInfo,
    message: str,
    *,
    fmt: Format,
    now: datetime,
    campaign: Campaign | None = None,
    reminder_number: int | None = None,
    renderer: Renderer | None = None,
) -> bytes:
    """The email for one customer in the requested format, as it would be sent."""
    renderer = renderer or Renderer(settings)
    campaign = campaign or load_campaign()
    if not renderer.has_message(message):
        raise NotFound(
            f"No message named {message!r}. Messages: {', '.join(renderer.messages())}."
        )
    r = reminder_messages(campaign).get(message)
    if reminder_number is None:
        reminder_number = 1 if r is not None else 0
    internal = message in campaign.internal_messages()
    # The same recipients, account manager and reminder context the planner gives, so the
    # preview is what would be sent.
    recipients = planner.recipients(customer, campaign)
    manager = planner.copied_manager(customer)
    context = (planner.reminder_context(r, reminder_number, manager) if r is not None
               else {"escalated": False})
    rendered = renderer.render(
        message, customer, now=now, reminder_number=reminder_number,
        recipient=None if internal else (recipients[0] if recipients else None),
        extra=context,
    )
    if fmt == "html":
        return rendered.html.encode("utf-8")
    if fmt == "text":
        return rendered.text.encode("utf-8")
    to: tuple[Address, ...]
    cc: tuple[Address, ...] = ()
    if internal:
        to = (Address(customer.account_manager_email, customer.account_manager_name),) \
            if customer.account_manager_email else (Address(settings.partner.reply_to),)
    else:
        to = tuple(Address(c.email, c.name) for c in recipients)
        if context["escalated"] and manager is not None:
            cc = (Address(manager.email, manager.name),)
    sender = settings.senders[0]
    # The dispatcher's own composition, so every header here is the one that is sent.
    email = compose_email(
        send_id=f"preview-{customer.key}-{message}", sender=sender.address,
        sender_name=sender.name, to=to, cc=cc, reply_to=settings.partner.reply_to,
        subject=rendered.subject, html=rendered.html, text=rendered.text,
    )
    return build_eml(email, date=now, sender_name=sender.name)


# ---------------------------------------------------------------------------------------------
# Everything, for the sample customers


@dataclass(frozen=True)
class PreviewFile:
    message: str
    locale: str
    branch: Branch
    subject: str
    html_file: str
    text_file: str


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def preview_all(
    settings: Settings, out_dir: Path, *, now: datetime, campaign: Campaign | None = None,
    renderer: Renderer | None = None,
) -> list[PreviewFile]:
    """Render every message x locale x branch for the sample customers into ``out_dir``, with
    an ``index.html`` linking them all. Returns what was written."""
    renderer = renderer or Renderer(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[PreviewFile] = []
    for message in renderer.messages():
        for locale in renderer.locales(message):
            for branch in branches(message, settings, campaign):
                r = render_sample(renderer, message, locale, branch, now)
                stem = _slug(f"{message}-{locale}-{branch.label}")
                (out_dir / f"{stem}.html").write_text(r.html, encoding="utf-8")
                (out_dir / f"{stem}.txt").write_text(r.text, encoding="utf-8")
                written.append(PreviewFile(message, locale, branch, r.subject,
                                           f"{stem}.html", f"{stem}.txt"))
    (out_dir / "index.html").write_text(_index(written, settings), encoding="utf-8")
    return written


def _index(files: list[PreviewFile], settings: Settings) -> str:
    e = html_lib.escape
    rows: list[str] = []
    current = ""
    for f in files:
        if f.message != current:
            current = f.message
            rows.append(f'<tr><th colspan="4" id="{e(f.message)}">{e(f.message)}</th></tr>')
        rows.append(
            f"<tr><td>{e(f.locale)}</td><td>{e(f.branch.label)}</td>"
            f'<td><a href="{e(f.html_file)}">{e(f.subject)}</a></td>'
            f'<td><a href="{e(f.text_file)}">text</a></td></tr>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Email previews: {e(settings.partner.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;text-align:left}"
        "th{background:#eef;padding-top:12px}</style></head><body>"
        f"<h1>Email previews ({len(files)})</h1>"
        "<p>Sample customers below, at and above the licence threshold; reminders 1-3.</p>"
        "<table><tr><th>Locale</th><th>Branch</th><th>Subject (HTML)</th><th>Text</th></tr>"
        + "\n".join(rows)
        + "</table></body></html>\n"
    )
