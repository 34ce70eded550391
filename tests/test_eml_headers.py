"""`comms preview -f eml` shows the headers that are sent, and internationalised domains are
written in IDNA (punycode) in .eml headers while Graph gets Unicode (issue 17)."""

from __future__ import annotations

import csv
import email
import email.policy
import json
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import TEST_PARTNER_ID, sandbox_env

from comms.sandbox import Sandbox
from comms.store.db import Database

X = datetime(2024, 3, 5, 10, 0, tzinfo=UTC).isoformat()  # a Tuesday, inside the send window
SENDER = "transition@fabrikam.example"
VOLATILE = {"date", "message-id", "x-comms-send-id"}


def _csv(path: Path, contact: str) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "licences", "locale", "time_zone", "stage",
                    "account_manager_name", "account_manager_email",
                    "primary_contact_name", "primary_contact_email"])
        w.writerow(["B1", "Bücher GmbH", "12", "en", "Europe/London", "invited",
                    "Alex Manager", "am@fabrikam.example", "Ada Admin", contact])
    return path


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outbox: Path) -> None:
    config = tmp_path / "comms.toml"
    config.write_text(
        '[partner]\nname = "Fabrikam Partner"\n\n'
        f'[[senders]]\naddress = "{SENDER}"\nname = "Fabrikam Transition Desk"\n',
        encoding="utf-8")
    monkeypatch.setenv("COMMS_CONFIG", str(config))
    monkeypatch.setenv("COMMS_DELIVERY_TRANSPORT", "outbox_dir")
    monkeypatch.setenv("COMMS_PARTNER_ID", TEST_PARTNER_ID)
    monkeypatch.setenv("COMMS_DELIVERY_OUTBOX_DIR", str(outbox))


def _headers(msg: EmailMessage) -> list[tuple[str, str]]:
    out = []
    for name, value in msg.raw_items():  # as written, before any decoding
        if name.lower() in VOLATILE:
            continue
        if name.lower() == "content-type":
            value = msg.get_content_type()  # the multipart boundary is random
        out.append((name, " ".join(str(value).split())))  # folding: CRLF vs LF on stdout
    return out


def _read(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_preview_eml_headers_are_the_sent_headers(
    db: Database, tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    outbox = tmp_path / "outbox"
    _config(tmp_path, monkeypatch, outbox)
    assert cli("customers", "import", str(_csv(tmp_path / "c.csv", "ada@contoso.example")),
               "--now", X).exit_code == 0
    preview = cli("preview", "B1", "-m", "partner_invitation", "-f", "eml")
    assert preview.exit_code == 0, preview.output
    run = cli("run", "--now", X)
    assert run.exit_code == 0, run.output
    [sent_file] = outbox.glob("*.eml")
    sent, shown = _read(sent_file.read_bytes()), _read(preview.stdout.encode("utf-8"))
    assert _headers(shown) == _headers(sent)
    # The Reply-To name is the sender mailbox's, in the preview as in the sent file.
    assert sent["Reply-To"] == "Fabrikam Transition Desk <transition@fabrikam.example>"


def test_an_internationalised_domain_is_punycode_in_the_eml_and_readable_in_the_cli(
    db: Database, tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    outbox = tmp_path / "outbox"
    _config(tmp_path, monkeypatch, outbox)
    r = cli("customers", "import", str(_csv(tmp_path / "c.csv", "admin@bücher.de")),
            "--now", X)
    assert r.exit_code == 0, r.output
    show = cli("customers", "show", "B1")
    assert "admin@bücher.de" in show.stdout
    assert cli("run", "--now", X).exit_code == 0
    [sent_file] = outbox.glob("*.eml")
    raw = sent_file.read_bytes()
    assert b"admin@xn--bcher-kva.de" in raw
    assert b"=?utf-8?" not in raw.split(b"\r\n\r\n", 1)[0].split(b"Subject:")[0]
    assert _read(raw)["To"].addresses[0].domain == "xn--bcher-kva.de"
    preview = cli("preview", "B1", "-m", "partner_invitation", "-f", "eml")
    assert "To: Ada Admin <admin@xn--bcher-kva.de>" in preview.stdout


def test_graph_gets_the_unicode_domain(
    tmp_path: Path, database_url: str, db: Database, sandbox_factory: Any, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb: Sandbox = sandbox_factory(time_scale=0.005)
    for k, v in sandbox_env(sb, tmp_path, database_url, senders=[SENDER],
                            time_scale=0.005).items():
        monkeypatch.setenv(k, v)
    assert cli("customers", "import", str(_csv(tmp_path / "c.csv", "admin@bücher.de")),
               "--now", X).exit_code == 0
    run = cli("run", "--now", X, "--json")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["sent"] == 1
    [record] = sb.sent()
    assert "admin@bücher.de" in json.dumps(record["to"], ensure_ascii=False)
