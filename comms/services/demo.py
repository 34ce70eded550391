"""The demo: the sample customers walked through the whole transition against the local sandbox,
on a simulated clock, showing what was sent to whom. The README's first command runs it.

The customers act in their sandbox tenants and stage sync moves their stages (hand moves only
where Microsoft sees nothing); the sender mailboxes' Inbox is read before every run, so one bounce
and one reply are handled. What it prints lives in ``services.demo_story``.

It is also the scenario of the end-to-end test, which checks the sandbox's record against what
each customer's history calls for. It is the one service allowed to import ``comms.sandbox`` (the
import-linter contract names this exception); no other service imports this module, only the
`comms demo` command and the tests do.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from comms.campaign import Campaign, load_campaign
from comms.config import Settings, load_settings
from comms.delivery.base import Transport
from comms.delivery.factory import make_transport
from comms.domain import MessageStatus
from comms.errors import UsageError
from comms.outbox import Clock
from comms.paths import examples_dir
from comms.render import Renderer
from comms.sandbox import Sandbox
from comms.services import customers as customer_service
from comms.services import engine
from comms.services.demo_story import START as START
from comms.services.demo_story import Cast as Cast
from comms.services.demo_story import DemoResult as DemoResult
from comms.services.demo_story import few, inbox_step, sent_counts, sync_step
from comms.store.db import Database, open_database

# Runs every 4 hours reach every customer's local business hours (Tokyo to New York).
RUN_EVERY = timedelta(hours=4)
NDR_DELAY = timedelta(minutes=2)  # how long after the send the demo's bounce arrives
DAYS = 30
TIME_SCALE = 0.01  # Exchange's "minute" lasts 0.6 s in the sandbox: the demo takes seconds
CLIENT_ID = "0d3c5a1e-7b6f-4e1a-9c2d-5f8e7a6b4c3d"
SENDERS = ("transition@fabrikam.example", "transition2@fabrikam.example")
DEMO_PARTNER_ID = "de300000-0000-4000-8000-000000000001"  # an example: no real partner has it


@dataclass(frozen=True)
class Step:
    day: float
    # A stage set by hand, pause / opt_out (by hand); a change in the customer's tenant that
    # Microsoft sees (accept_relationship, activate_csp, cancel_direct: sync moves the stage);
    # or reply (the customer answers the last cancel_instructions email).
    action: str
    keys: tuple[str, ...]
    note: str = ""


TENANT_ACTIONS = {
    "accept_relationship": "reseller relationship accepted in the admin center",
    "activate_csp": "CSP subscription active in Partner Center",
    "cancel_direct": "old direct subscription cancelled (Suspended in the tenant)",
}
REPLY_TEXT = "Done, we cancelled the old subscription this morning.\nThanks"


def cast(keys: list[str]) -> Cast:
    fast = sorted(keys)[: len(keys) // 2]
    return Cast(
        recount=fast[0] if fast else None,
        bounce=fast[1] if len(fast) > 2 else None,
        unverified=fast[-1] if len(fast) > 2 else None,
    )


def scenario(keys: list[str]) -> list[Step]:
    """Who does what when. Stage moves Microsoft sees (the customer accepts the relationship,
    the CSP subscription goes live, the customer cancels the old subscription) are changes in
    the sandbox's tenants that stage sync picks up; only what Microsoft cannot see is set by
    hand: the partner's own decisions (announce, invite), a customer's request to pause or to
    get no more email, and the completion of the customer sync cannot verify, on its word."""
    keys = sorted(keys)
    n = len(keys)
    a = tuple(keys[: n // 2])  # fast movers
    b = tuple(keys[n // 2 : n // 2 + n // 3])  # slower; the first opts out, the last stalls
    c = tuple(keys[n // 2 + n // 3 :])  # never approve during the demo; the first pauses
    who = cast(keys)
    unverified = (who.unverified,) if who.unverified else ()
    steps = [
        Step(0, "announced", tuple(keys)),
        Step(2, "invited", tuple(keys)),
        Step(3, "pause", c[:1], "customer asked us to wait until January"),
        Step(4, "accept_relationship", a),
        Step(5, "activate_csp", a),
        Step(6, "opt_out", b[:1], "asked to receive no more email"),
        Step(8, "cancel_direct", unverified),
        Step(8, "reply", unverified),
        Step(9, "accept_relationship", b[1:]),
        Step(10, "activate_csp", b[1:]),
        Step(12, "cancel_direct", tuple(k for k in a if k not in unverified)),
        Step(12, "completed", unverified,
             "the customer replied it is done; its tenant cannot be verified"),
        Step(20, "cancel_direct", b[1:-1]),
    ]
    return [s for s in steps if s.keys]


def demo_settings(sandbox: Sandbox, workdir: Path, secret_file: Path) -> Settings:
    env = {
        "COMMS_HOME": str(workdir),
        "COMMS_DATABASE_URL": f"sqlite:///{workdir / 'comms.db'}",
        "COMMS_GRAPH_BASE_URL": sandbox.graph_url,
        "COMMS_GRAPH_AUTHORITY_HOST": sandbox.authority_host,
        "COMMS_GRAPH_TENANT_ID": sandbox.tenant_id,
        "COMMS_GRAPH_CLIENT_ID": CLIENT_ID,
        "COMMS_GRAPH_CA_FILE": str(sandbox.ca_file),
        "COMMS_GRAPH_AUTH": "secret",
        "COMMS_GRAPH_CLIENT_SECRET_FILE": str(secret_file),
        "COMMS_GRAPH_RECONCILE_GRACE_SECONDS": "1",
        "COMMS_GRAPH_TIMEOUT_SECONDS": "10",
        "COMMS_DELIVERY_TIME_SCALE": str(TIME_SCALE),
        # Stage sync reads the sandbox's Partner Center, GDAP and customer tenants.
        "COMMS_SYNC_PARTNER_CENTER": "true",
        "COMMS_SYNC_GDAP": "true",
        "COMMS_SYNC_CUSTOMER_TENANTS": "true",
        "COMMS_SYNC_PARTNER_CENTER_URL": sandbox.partner_center_url,
    }
    settings = load_settings(workdir / "demo.toml", env=env)
    return settings


def _write_config(workdir: Path) -> Path:
    path = workdir / "demo.toml"
    lines = ["# Written by `comms demo`: an example partner id, two sender mailboxes, everything "
             "else default.\n",
             f'[partner]\nid = "{DEMO_PARTNER_ID}"  # yours: Partner Center > Account settings\n']
    for address in SENDERS:
        lines.append(f'[[senders]]\naddress = "{address}"\nname = "Fabrikam Transition Team"\n')
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


MARKER = ".comms-demo"  # written into every folder the demo creates; only those are ever wiped


def prepare_workdir(workdir: Path) -> None:
    """Make ``workdir`` empty for a fresh demo without ever deleting someone's files: a missing
    or empty folder is used, a folder with the demo's marker (an earlier demo) is wiped, any
    other folder is refused."""
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--dir {workdir} is a file, not a folder; choose a new folder.")
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise UsageError(
                f"--dir {workdir} is not empty and was not created by `comms demo` (it has no "
                f"{MARKER} marker); nothing was deleted. Choose a new or empty folder."
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("created by `comms demo`; the demo may wipe this folder\n",
                                  encoding="utf-8")


def run_demo(
    workdir: Path,
    *,
    csv_path: Path | None = None,
    echo: Callable[[str], None] = print,
    days: int = DAYS,
) -> DemoResult:
    """Run the whole simulated transition in ``workdir`` (wiped first, only if the demo made
    it: see ``prepare_workdir``)."""
    prepare_workdir(workdir)
    sandbox_dir = workdir / "sandbox"
    csv_path = csv_path or examples_dir() / "customers.csv"
    _write_config(workdir)
    secret = "demo-secret-" + workdir.name  # sandbox-only secret; never a real credential
    secret_file = workdir / "client_secret.txt"
    secret_file.write_text(secret, encoding="utf-8")
    secret_file.chmod(0o600)

    with Sandbox(sandbox_dir, time_scale=TIME_SCALE) as sandbox:
        for address in SENDERS:
            sandbox.add_mailbox(address)
        sandbox.register_app(CLIENT_ID, secret=secret, roles=APP_ROLES)
        settings = demo_settings(sandbox, workdir, secret_file)
        campaign = load_campaign(settings.campaign_file or None)
        db = open_database(settings.database_url())
        result = DemoResult(workdir, settings.database_url(), sandbox_dir)
        try:
            _simulate(db, settings, campaign, csv_path, result, echo, days, sandbox)
        finally:
            db.dispose()
        result.received = sandbox.sent()
    return result


# What the partner's app holds: send and read mail, read customer tenants' subscriptions
# (consented in each customer tenant) and the partner's GDAP relationships.
APP_ROLES = ("Mail.Send", "Mail.Read", "Organization.Read.All",
             "DelegatedAdminRelationship.Read.All")


def _simulate(
    db: Database, settings: Settings, campaign: Campaign, csv_path: Path,
    result: DemoResult, echo: Callable[[str], None], days: int, sandbox: Sandbox,
) -> None:
    imported = customer_service.import_customers(
        db, csv_path, settings=settings, campaign=campaign, now=START, by="demo"
    )
    echo(f"Imported {imported.created} customers from {csv_path.name}.")
    keys = [c.key for c in customer_service.list_customers(db)]
    result.cast = cast(keys)
    _tenants(db, settings, sandbox, result, echo)
    steps = sorted(scenario(keys), key=lambda s: s.day)
    renderer = Renderer(settings)
    with closing(make_transport(settings)) as transport:
        _run_days(db, settings, campaign, renderer, transport, steps, result, echo, days,
                  sandbox)


def _tenants(db: Database, settings: Settings, sandbox: Sandbox, result: DemoResult,
             echo: Callable[[str], None]) -> None:
    """Each customer's Microsoft 365 tenant in the sandbox: its direct subscription with the
    CSV's licences, except for the cast's parts (more licences assigned than the CSV says; no
    consent for the partner's app; a dead address)."""
    from sqlmodel import col, select

    from comms.sandbox.inbox import InboxAdmin
    from comms.store.models import Contact, Customer

    who = result.cast
    threshold = settings.partner.licence_threshold
    with db.session() as s:
        customers = s.exec(select(Customer).order_by(col(Customer.key))).all()
        contacts = s.exec(select(Contact)).all()
        for c in customers:
            if not c.tenant_id:
                continue
            assigned = c.licences
            if c.key == who.recount:
                # Just across the threshold: the cancellation route changes with the count.
                assigned = max(threshold + 1, c.licences + 2)
                echo(f"{c.key}: the CSV says {c.licences} licences; its tenant shows "
                     f"{assigned} assigned.")
            consented = c.key != who.unverified
            if not consented:
                echo(f"{c.key}: its admin never consented the partner's app; sync cannot "
                     "verify its tenant.")
            sandbox.add_customer_tenant(c.tenant_id, c.primary_domain, c.name,
                                        direct_licences=max(assigned, c.licences),
                                        assigned=assigned, consented=consented)
        bounce = next((c for c in customers if c.key == who.bounce), None)
        if bounce is not None:
            mine = [x for x in contacts if x.customer_id == bounce.id]
            dead = next((x for x in mine if x.role == "billing"), mine[0] if mine else None)
            if dead is not None:
                result.dead = dead.email
                InboxAdmin(sandbox).set_dead(dead.email)
                echo(f"{bounce.key}: {dead.email} no longer exists; mail to it bounces.")


def _run_days(
    db: Database, settings: Settings, campaign: Campaign, renderer: Renderer,
    transport: Transport, steps: list[Step], result: DemoResult, echo: Callable[[str], None],
    days: int, sandbox: Sandbox,
) -> None:
    from comms.sandbox.inbox import InboxAdmin

    t = START
    end = START + timedelta(days=days)
    pending = list(steps)
    while t <= end:
        # One clock per run, shared with the sandbox's Inbox: a reply injected by a step and an
        # NDR produced by a send are dated on the simulated timeline, not the machine's.
        clock = Clock(t)
        InboxAdmin(sandbox).set_clock(clock.now, ndr_delay=NDR_DELAY)
        while pending and START + timedelta(days=pending[0].day) <= t:
            step = pending.pop(0)
            what = _apply(db, campaign, step, t, sandbox)
            result.steps.append((t, what))
            echo(f"{t:%a %d %b %H:%M} UTC  {what}")
        # What `comms run --inbox` does every 4 hours (and `--sync` in the first run of each
        # day): replies and bounces first, then stage sync, then planning and sending.
        inbox_step(db, settings, campaign, t, result, echo)
        if t.hour == 0:
            sync_step(db, settings, campaign, t, result, echo)
        before = sent_counts(db)
        summary = engine.run(db, settings, campaign, renderer, transport, clock=clock,
                             worker="demo", max_minutes=2)
        result.runs += 1
        result.sent += summary.dispatch.sent
        result.failed += summary.dispatch.failed
        if summary.dispatch.sent:
            after = sent_counts(db)
            by_msg = ", ".join(f"{m} {n - before.get(m, 0)}" for m, n in sorted(after.items())
                               if n > before.get(m, 0))
            echo(f"{t:%a %d %b %H:%M} UTC  sent {summary.dispatch.sent}: {by_msg}")
        result.ended_at = t
        t += RUN_EVERY


def _apply(db: Database, campaign: Campaign, step: Step, at: datetime,
           sandbox: Sandbox) -> str:
    """Carry out one step; returns what happened, for the printed story."""
    who = few(list(step.keys))
    if step.action in TENANT_ACTIONS:
        tenants = _tenant_ids(db, step.keys)
        for key in step.keys:
            if step.action == "accept_relationship":
                sandbox.tenant_change(tenants[key], "accept_relationship")
            elif step.action == "activate_csp":
                sandbox.tenant_change(tenants[key], "activate_csp",
                                      quantity=_licences(db, key))
            else:
                sandbox.tenant_change(tenants[key], "direct_status", status="Suspended")
        return f"tenant change for {who}: {TENANT_ACTIONS[step.action]}"
    if step.action == "reply":
        from comms.sandbox.inbox import InboxAdmin

        for key in step.keys:
            mailbox, send_id, sender = _last_sent(db, key, "cancel_instructions")
            InboxAdmin(sandbox).inject(kind="reply", mailbox=mailbox, send_id=send_id,
                                       body=REPLY_TEXT, **{"from": sender})
        return f"{who} replied \"done\" to cancel_instructions"
    if step.action in ("pause", "opt_out"):
        for key in step.keys:
            customer_service.side_action(db, key, step.action,  # type: ignore[arg-type]
                                         now=at, by="demo", note=step.note, source="demo")
        return f"by hand: {step.action} for {who} ({step.note})"
    customer_service.set_stage(db, campaign, list(step.keys), step.action, now=at, by="demo",
                               note=step.note or "demo scenario", source="demo")
    why = f" ({step.note})" if step.note else ""
    return f"by hand: {step.action} for {who}{why}"


def _tenant_ids(db: Database, keys: tuple[str, ...]) -> dict[str, str]:
    return {c.key: c.tenant_id for c in customer_service.list_customers(db) if c.key in keys}


def _licences(db: Database, key: str) -> int:
    return next(c.licences for c in customer_service.list_customers(db) if c.key == key)


def _last_sent(db: Database, key: str, message: str) -> tuple[str, str, str]:
    """(sender mailbox, send id, first recipient) of ``key``'s last sent ``message``."""
    import json

    from sqlmodel import col, select

    from comms.store.models import Customer, Message

    with db.session() as s:
        m = s.exec(
            select(Message).join(Customer, col(Customer.id) == col(Message.customer_id))
            .where(col(Customer.key) == key, col(Message.message) == message,
                   col(Message.status) == MessageStatus.SENT)
            .order_by(col(Message.id).desc())
        ).first()
        if m is None:
            raise RuntimeError(f"the demo expected {key} to have been sent {message} by now")
        return m.sender or SENDERS[0], m.send_id, json.loads(m.to_json)[0]["address"]
