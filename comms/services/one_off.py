"""One-off sends (`comms send`): prepare chosen messages for customers now, refusing what
their stage does not call for unless forced, and queue them to be dispatched at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from comms import outbox, planner
from comms.campaign import Campaign, SendWindow
from comms.config import Settings
from comms.domain import ACTED_ON, CustomerInfo, MessageStatus, PlannedMessage
from comms.errors import AlreadySent, NotFound, RequestRefused, StateConflict
from comms.render import Renderer
from comms.services.engine import ONE_OFF_MINUTES, _row, load_customers, load_history, plan_one
from comms.services.queue_render import render_one
from comms.store import bodies
from comms.store.db import Database
from comms.store.models import Customer, CustomerTag, Message, StageEvent
from comms.wording import plural

# --------------------------------------------------------------------------- one-off sends


@dataclass(frozen=True)
class Prepared:
    customer: CustomerInfo
    planned: PlannedMessage
    subject: str
    row: dict[str, Any]
    resend_of: int | None = None
    window: SendWindow | None = None  # the campaign's: bounds a leftover (``queue_prepared``)


def _customer_by_key(s: Session, key: str) -> Customer:
    row = s.exec(select(Customer).where(Customer.key == key)).first()
    if row is None:
        raise NotFound(f"No customer with key {key!r}. See `comms customers list`.")
    return row


def tagged_keys(db: Database, tag: str) -> list[str]:
    with db.session() as s:
        keys = s.exec(
            select(Customer.key)
            .join(CustomerTag, col(CustomerTag.customer_id) == col(Customer.id))
            .where(CustomerTag.tag == tag)
            .order_by(col(Customer.key))
        ).all()
    if not keys:
        raise NotFound(f"No customer has the tag {tag!r}. See `comms customers list --json`.")
    return list(keys)


def prepare_send(
    db: Database,
    settings: Settings,
    campaign: Campaign,
    renderer: Renderer,
    key: str,
    *,
    now: datetime,
    message: str | None = None,
    resend_note: str | None = None,
    force_note: str | None = None,
) -> list[Prepared]:
    """What `comms send KEY` would send now: the stage's due messages (send window ignored:
    an operator decided), or the named message. Nothing is written.

    A named message of another stage is refused unless ``force_note`` says why; a forced send
    takes a negative sequence (as a resend does), so it never uses up the staged message."""
    with db.session() as s:
        row = _customer_by_key(s, key)
        assert row.id is not None
        customer = load_customers(s, [row.id])[row.id]
        history = load_history(s, [row.id])[row.id]
        existing = s.exec(select(Message).where(Message.customer_id == row.id)).all()
    if customer.opted_out or customer.lost:
        state = "opted out" if customer.opted_out else "marked lost"
        raise StateConflict(f"Customer {key} is {state}; nothing may be sent to it.")
    if customer.paused:
        raise StateConflict(f"Customer {key} is paused; `comms customers resume {key}` first.")
    if message is None:
        p = plan_one(customer, history, now, campaign)
        items = list(p.due) + list(p.deferred)
        if not items:
            raise StateConflict(
                f"Nothing is due for {key} in stage {customer.stage!r} now. Name a message "
                f"with --message (one of: {', '.join(campaign.messages())})."
            )
    else:
        items = [_explicit(customer, campaign, message, existing, resend_note, force_note)]
    out = []
    for pm in items:
        rendered = render_one(renderer, customer, pm, now)
        r = _row(settings, customer, pm, rendered.subject, rendered.locale, now,
                 body=bodies.encode(rendered.html, rendered.text))
        notes = []
        if pm.sequence < 0 and pm.stage != customer.stage and force_note:
            notes.append(f"forced out of stage {customer.stage}: {force_note}")
        if resend_note:
            notes.append(f"resend: {resend_note}")
        r["note"] = "; ".join(notes)
        out.append(Prepared(customer, pm, rendered.subject, r, window=campaign.window))
    return out


def _explicit(
    customer: CustomerInfo, campaign: Campaign, message: str, existing: Sequence[Message],
    resend_note: str | None, force_note: str | None = None,
) -> PlannedMessage:
    if message not in campaign.messages():
        raise NotFound(
            f"Unknown message {message!r}. Messages: {', '.join(campaign.messages())}."
        )
    if message in campaign.internal_messages():
        raise RequestRefused(
            f"{message} is an internal note to the account manager; it goes out with the "
            "escalated reminders, never to a customer. Name a customer message."
        )
    out_of_stage = not _stage_sends(campaign, customer.stage, message)
    # In stage, the row belongs to the customer's stage (a message two stages share must not
    # look out of stage at claim time); forced, to the stage whose message it is.
    stage = (campaign.stage_of(message) or customer.stage) if out_of_stage else customer.stage
    if out_of_stage and not force_note:
        raise StateConflict(
            f"{message} belongs to stage {stage!r}; {customer.key} is in stage "
            f"{customer.stage!r}. To send it anyway add --force --note \"why\" (the staged "
            f"message still goes out when {customer.key} reaches {stage!r})."
        )
    same = [m for m in existing if m.message == message and m.status != MessageStatus.WITHDRAWN]
    done = [m for m in same if m.status in ACTED_ON]
    if done and not resend_note:
        last = done[-1]
        when = f" on {last.sent_at:%Y-%m-%d %H:%M} UTC" if last.sent_at else ""
        status = ("sent (a bounce came back for a recipient)"
                  if last.status == MessageStatus.BOUNCED else last.status)
        raise AlreadySent(
            f"{message} is already {status} for {customer.key}{when} (outbox id "
            f"{last.id}). To send it again, add --resend --note \"why\"."
        )
    if resend_note or out_of_stage:
        # Resends and forced out-of-stage sends take negative sequences so the (customer,
        # message, sequence) key still guarantees each decision is queued once, and the planner
        # (sequences 0..max) never counts them: the staged message still goes out later.
        sequence = min([m.sequence for m in existing if m.message == message] + [0]) - 1
    else:
        # The stage's reminder sent by hand is the next reminder (1, 2, ...): the planner then
        # counts it and sends the following one, never one more than ``max``.
        st = campaign.stage(customer.stage) if campaign.has_stage(customer.stage) else None
        first = 1 if st is not None and st.reminders and message == st.reminders.message else 0
        sequence = max([m.sequence for m in same] + [first - 1]) + 1
    recipients = planner.recipients(customer, campaign)
    if not recipients:
        raise StateConflict(
            f"Customer {customer.key} has no contact that may be mailed (none, or all "
            "suppressed). Add a contact with `comms customers import`."
        )
    return PlannedMessage(message=message, sequence=sequence, stage=stage, to=recipients,
                          reminder_number=max(sequence, 0))


def _unchanged_since_prepared(s: Session, prepared: Sequence[Prepared]) -> None:
    shown = {p.customer.id: p.customer for p in prepared if p.customer.id is not None}
    now = load_customers(s, list(shown), lock="wait")
    changed: list[str] = []
    for cid, before in shown.items():
        after = now.get(cid)
        if after is None:
            changed.append(f"{before.key} (deleted)")
        elif after != before:
            what = [f.name for f in fields(CustomerInfo)
                    if getattr(after, f.name) != getattr(before, f.name)]
            changed.append(f"{before.key} ({', '.join(what)})")
    if changed:
        raise StateConflict(
            f"{plural(len(changed), 'customer')} changed since the messages were prepared: "
            f"{'; '.join(changed)}. Nothing was queued or sent (the messages were rendered from "
            "the old values). Run the command again to see them as they are now."
        )


def _stage_sends(campaign: Campaign, stage_name: str, message: str) -> bool:
    """Whether the customer's current stage itself sends ``message``."""
    if not campaign.has_stage(stage_name):
        return False
    st = campaign.stage(stage_name)
    r = st.reminders
    return message == st.on_enter or (r is not None and message == r.message)


def _leftover_by(p: Prepared, now: datetime) -> datetime | None:
    """The row's ``send_before``: the operator's "send now" covers the command's own dispatch
    (``engine.dispatch_ids``, which checks no window) and, inside the send window, the rest of
    that window. Whatever is still queued after that (the dispatch ran out of time, a 429, a
    Ctrl-C, a resend after an unknown outcome) is moved by the next run or worker to the
    customer's next window, never sent at any hour."""
    if p.window is None:
        return None
    own = now + timedelta(minutes=ONE_OFF_MINUTES)
    if not planner.in_window(now, p.window, p.customer.time_zone):
        return own  # sent outside the window on purpose: now, not later at night
    return max(own, planner.window_end(now, p.window, p.customer.time_zone))


def queue_prepared(
    db: Database, prepared: Sequence[Prepared], *, by: str, now: datetime
) -> list[int]:
    """Freeze prepared messages into the outbox (a resend is also recorded in the audit trail).
    A later dispatcher keeps a leftover to the customer's send window (``_leftover_by``).

    Refuses (``StateConflict``, nothing queued) when a customer changed since the messages
    were prepared and shown (an import, stage sync or another operator while the operator read
    the question): they were rendered from the old values, which pick the cancellation route
    and the recipients."""
    ids: list[int] = []
    with db.session(immediate=True) as s:
        _unchanged_since_prepared(s, prepared)
        for p in prepared:
            inserted = outbox.insert_messages(s, [{**p.row, "send_before": _leftover_by(p, now)}])
            if not inserted:
                raise AlreadySent(
                    f"{p.planned.message} #{p.planned.sequence} for {p.customer.key} was queued "
                    "meanwhile by another run; see `comms outbox list`."
                )
            ids.extend(inserted)
            if p.row["note"]:
                assert p.customer.id is not None
                s.add(StageEvent(
                    customer_id=p.customer.id,
                    kind="forced_send" if p.row["note"].startswith("forced") else "resend",
                    from_stage=p.customer.stage,
                    to_stage=p.customer.stage, at=now, by=by, source="send",
                    note=f"{p.planned.message}: {p.row['note']}",
                ))
    return ids


