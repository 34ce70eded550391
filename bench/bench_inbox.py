"""Benchmark: `comms inbox sync` of 10,000 inbound messages (target <= 30 s), then a re-run
with nothing new (target <= 1 s).

Builds a 10,000-customer SQLite ledger with one sent message each, starts the sandbox over
HTTPS in a second process, fills one sender mailbox's Inbox with a realistic mix (NDRs with the
original attached, threaded replies, auto-replies, opt-outs, unmatched mail), then times the real
sync service (Graph delta pages, NDR attachments in JSON batches, Sent Items lookups,
classification, effects in chunks of 500 messages a transaction) and a second sync.

    .venv/bin/python bench/bench_inbox.py [--messages 10000] [--append-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from comms.campaign import load_campaign  # noqa: E402
from comms.config import load_settings  # noqa: E402
from comms.delivery.base import SEND_ID_HEADER, SEND_ID_PROPERTY_ID  # noqa: E402
from comms.inbox import service  # noqa: E402
from comms.sandbox import Sandbox  # noqa: E402
from comms.sandbox import inbox as sandbox_inbox  # noqa: E402
from comms.store.db import open_database  # noqa: E402
from comms.store.models import Contact, Customer, Message  # noqa: E402

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
SENDER = "transition@fabrikam.example"
CLIENT_ID = "b3c4d5e6-0000-4000-8000-00000000bench"
SECRET = "bench-secret"
MIX = (("ndr", 35), ("reply", 35), ("auto", 15), ("optout", 5), ("unmatched", 10))


def build_ledger(url: str, n: int) -> list[dict[str, str]]:
    db = open_database(url)
    customers, contacts, messages, sent = [], [], [], []
    for i in range(n):
        email = f"admin{i}@c{i}.example"
        send_id = uuid.uuid4().hex
        customers.append({
            "id": i + 1, "key": f"C{i:05d}", "name": f"Customer {i}", "tenant_id": "",
            "primary_domain": "", "licences": 5, "locale": "en", "time_zone": "Europe/London",
            "stage": "invited", "stage_entered_at": NOW, "paused": False, "opted_out": False,
            "lost": False, "account_manager_name": "AM", "account_manager_email": "am@f.example",
            "csp_live_at": None, "next_due_at": None, "created_at": NOW, "updated_at": NOW,
        })
        contacts.append({"customer_id": i + 1, "name": "Admin", "email": email,
                         "role": "primary"})
        messages.append({
            "send_id": send_id, "customer_id": i + 1, "message": "partner_invitation",
            "sequence": 0, "stage": "invited", "internal": False, "status": "sent",
            "to_json": json.dumps([{"address": email, "name": "Admin"}]), "cc_json": "[]",
            "reply_to": "", "subject": "Your invitation", "html": "<p>x</p>", "text": "x",
            "locale": "en", "sender": SENDER, "send_after": NOW, "send_before": None,
            "attempts": 1, "last_error": "", "error_code": "", "lease_until": None,
            "claimed_by": "", "unknown_since": None, "sent_at": NOW, "request_id": "",
            "note": "", "created_at": NOW, "updated_at": NOW,
        })
        sent.append({"email": email, "send_id": send_id})
    with db.engine.begin() as conn:
        conn.execute(sa.insert(Customer.__table__), customers)  # type: ignore[attr-defined]
        conn.execute(sa.insert(Contact.__table__), contacts)  # type: ignore[attr-defined]
        conn.execute(sa.insert(Message.__table__), messages)  # type: ignore[attr-defined]
    db.dispose()
    return sent


def fill_inbox(sb: Sandbox, sent: list[dict[str, str]], n: int, seed: int = 3) -> None:
    core = sb._core
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    sent_items = core.state.sent_items.setdefault(SENDER, [])
    for i, s in enumerate(sent):
        original = {
            "id": f"sent{i}", "subject": "Your invitation", "internetMessageId":
            f"<sent{i}@fabrikam.example>", "conversationId": f"conv{i}",
            "toRecipients": [{"emailAddress": {"address": s["email"]}}],
            "internetMessageHeaders": [{"name": SEND_ID_HEADER, "value": s["send_id"]}],
            "_properties": [{"id": SEND_ID_PROPERTY_ID, "value": s["send_id"]}],
            "@odata.etag": 'W/"x"', "body": {"contentType": "text", "content": "x"},
            "sentDateTime": "2026-12-01T10:00:00Z",
        }
        sent_items.append(original)
    for i in range(n):
        s = sent[i % len(sent)]
        original = sent_items[i % len(sent)]
        kind = rng.choices(kinds, weights)[0]
        headers = [{"name": "In-Reply-To", "value": original["internetMessageId"]}]
        if kind == "ndr":
            sandbox_inbox.ndr(core, SENDER, recipient=s["email"], original=original,
                              status=rng.choice(("5.1.1", "5.1.1", "5.2.2", "4.4.7")),
                              attach=rng.choice(("item", "file")))
            continue
        body = {"reply": "Done, case 123. Thanks!", "auto": "I am out of the office.",
                "optout": "Bitte keine E-Mails mehr.", "unmatched": "Buy our product"}[kind]
        sender = s["email"] if kind != "unmatched" else f"spam{i}@else.example"
        message = {
            "subject": ("Automatic reply: " if kind == "auto" else "RE: ") + "Your invitation",
            "from": {"emailAddress": {"address": sender}},
            "body": {"contentType": "text", "content": body},
            "internetMessageHeaders": (
                headers if kind != "unmatched" else []
            ) + ([{"name": "Auto-Submitted", "value": "auto-replied"}] if kind == "auto"
                 else []),
            "conversationId": original["conversationId"] if kind != "unmatched" else None,
        }
        sandbox_inbox.deliver(core, SENDER, message)


def serve(folder: Path, messages: int) -> None:
    """The sandbox in its own process (as Graph is a remote service): fill the Inbox, write
    where it listens, serve until killed."""
    sent = json.loads((folder / "sent.json").read_text(encoding="utf-8"))
    sb = Sandbox(folder / "sandbox", time_scale=0.01).start()
    sb.add_mailbox(SENDER)
    sb.register_app(CLIENT_ID, secret=SECRET)
    fill_inbox(sb, sent, messages)
    ready = {"graph_url": sb.graph_url, "authority_host": sb.authority_host,
             "tenant_id": sb.tenant_id, "ca_file": str(sb.ca_file)}
    (folder / "ready.tmp").write_text(json.dumps(ready), encoding="utf-8")
    (folder / "ready.tmp").rename(folder / "ready.json")
    while True:
        time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--append-docs", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve), args.messages)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = f"sqlite:///{folder / 'bench.db'}"
        t0 = time.perf_counter()
        sent = build_ledger(url, args.messages)
        (folder / "sent.json").write_text(json.dumps(sent), encoding="utf-8")
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(folder),
                                   "--messages", str(args.messages)])
        try:
            while not (folder / "ready.json").exists():
                if server.poll() is not None:
                    raise SystemExit("the sandbox process ended before it was ready")
                time.sleep(0.1)
            where = json.loads((folder / "ready.json").read_text(encoding="utf-8"))
            setup = time.perf_counter() - t0
            config = folder / "comms.toml"
            config.write_text(f'[[senders]]\naddress = "{SENDER}"\n', encoding="utf-8")
            env = {
                "COMMS_DATABASE_URL": url, "COMMS_GRAPH_BASE_URL": where["graph_url"],
                "COMMS_GRAPH_AUTHORITY_HOST": where["authority_host"],
                "COMMS_GRAPH_TENANT_ID": where["tenant_id"], "COMMS_GRAPH_CLIENT_ID": CLIENT_ID,
                "COMMS_GRAPH_CA_FILE": where["ca_file"], "COMMS_GRAPH_AUTH": "secret",
                "COMMS_GRAPH_CLIENT_SECRET": SECRET, "COMMS_HOME": str(folder / "home"),
            }
            settings = load_settings(str(config), env=env)
            policy = load_campaign().inbox.model_copy(update={"page_size": 1000})
            db = open_database(url)
            t1 = time.perf_counter()
            first = service.sync(db, settings, policy, now=NOW + timedelta(hours=1))
            first_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            second = service.sync(db, settings, policy, now=NOW + timedelta(hours=2))
            second_s = time.perf_counter() - t2
            db.dispose()
        finally:
            server.kill()
            server.wait()
    assert first.new == args.messages, first.as_dict()
    assert second.new == 0 and second.read == 0, second.as_dict()
    mix = ", ".join(f"{k} {v}" for k, v in sorted(first.kinds.items()))
    lines = [
        f"- {args.messages:,} inbound messages ({mix}): "
        f"**{first_s:.1f} s** ({args.messages / first_s:,.0f}/s; {first.requests:,} Graph "
        f"requests, {first.retries} retried); target <= 30 s",
        f"- re-run with nothing new: **{second_s:.2f} s** ({second.requests} request); "
        "target <= 1 s",
        f"- setup (ledger + sandbox inbox): {setup:.1f} s, not counted",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, SQLite, the sandbox in a second process",
    ]
    print("\n".join(lines))
    if args.append_docs:
        doc = REPO / "docs" / "benchmarks.md"
        doc.write_text(doc.read_text(encoding="utf-8").rstrip("\n") + "\n\n## Inbox sync of "
                       "10,000 inbound messages\n\n`.venv/bin/python bench/bench_inbox.py`\n\n"
                       + "\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
