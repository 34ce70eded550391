"""One customer loader: after a re-import that swaps contact roles, `preview`, `customers show`
and what `comms send` actually writes agree on the recipients and their order."""

from __future__ import annotations

import email
import email.policy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import TEST_PARTNER_ID

HEADER = ("key,name,licences,locale,time_zone,stage,account_manager_name,account_manager_email,"
          "primary_contact_name,primary_contact_email,billing_contact_name,billing_contact_email")


def _csv(path: Path, primary: tuple[str, str], billing: tuple[str, str],
         stage: str = "invited") -> Path:
    path.write_text(
        HEADER + "\n" + f"K1,Contoso Ltd,30,en,Europe/London,{stage},Sam Manager,"
        f"sam@fabrikam.example,{primary[0]},{primary[1]},{billing[0]},{billing[1]}\n",
        encoding="utf-8",
    )
    return path


def _eml(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_preview_equals_sent_after_a_reimport_swaps_contact_roles(
    cli: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = tmp_path / "eml"
    monkeypatch.setenv("COMMS_DELIVERY_TRANSPORT", "outbox_dir")
    monkeypatch.setenv("COMMS_PARTNER_ID", TEST_PARTNER_ID)
    monkeypatch.setenv("COMMS_DELIVERY_OUTBOX_DIR", str(outbox))
    ana, bill = ("Ana Admin", "ana@contoso.example"), ("Bill Payer", "bill@contoso.example")
    first = cli("customers", "import", str(_csv(tmp_path / "a.csv", ana, bill)))
    assert first.exit_code == 0, first.output
    # The same people with their roles swapped: Bill is now the primary contact.
    again = cli("customers", "import", str(_csv(tmp_path / "b.csv", bill, ana)))
    assert again.exit_code == 0, again.output

    shown = cli("customers", "show", "K1", "--json")
    assert shown.exit_code == 0, shown.output
    contacts = [(c["role"], c["email"]) for c in json.loads(shown.stdout)["contacts"]]
    assert contacts == [("primary", bill[1]), ("billing", ana[1])]

    preview_file = tmp_path / "preview.eml"
    preview = cli("preview", "K1", "-m", "partner_invitation", "--format", "eml",
                  "--out", str(preview_file))
    assert preview.exit_code == 0, preview.output
    sent = cli("send", "K1", "--message", "partner_invitation", "--yes")
    assert sent.exit_code == 0, sent.output
    files = list(outbox.glob("*.eml"))
    assert len(files) == 1, files

    previewed, delivered = _eml(preview_file.read_bytes()), _eml(files[0].read_bytes())
    assert delivered["To"] == "Bill Payer <bill@contoso.example>, Ana Admin <ana@contoso.example>"
    assert previewed["To"] == delivered["To"]
    assert previewed["Subject"] == delivered["Subject"]
    body = delivered.get_body(("plain",))
    preview_body = previewed.get_body(("plain",))
    assert body is not None and preview_body is not None
    # The greeting names the first recipient: the same person in preview and sent mail.
    assert body.get_content().splitlines()[0] == preview_body.get_content().splitlines()[0]
    assert body.get_content().startswith("Hello Bill Payer")


def _contact_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("- ")]


def test_account_manager_note_lists_contacts_as_preview_and_show_do(
    cli: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The internal note lists the customer's contacts; after the roles swap, the note that is
    sent lists them in the order `preview` and `customers show` do (primary first)."""
    outbox = tmp_path / "eml"
    monkeypatch.setenv("COMMS_DELIVERY_TRANSPORT", "outbox_dir")
    monkeypatch.setenv("COMMS_PARTNER_ID", TEST_PARTNER_ID)
    monkeypatch.setenv("COMMS_DELIVERY_OUTBOX_DIR", str(outbox))
    ana, bill = ("Ana Admin", "ana@contoso.example"), ("Bill Payer", "bill@contoso.example")
    stage = "awaiting_cancellation"
    for name, people in (("a.csv", (ana, bill)), ("b.csv", (bill, ana))):
        imported = cli("customers", "import", str(_csv(tmp_path / name, *people, stage)))
        assert imported.exit_code == 0, imported.output
    start = datetime.now(UTC) + timedelta(minutes=1)
    # Instructions, then reminders 1 and 2 (days 2 and 5): the 2nd escalates with the note.
    for days, hours in ((0, 1), (2, 2), (5, 3)):
        at = (start + timedelta(days=days, hours=hours)).isoformat(timespec="minutes")
        sent = cli("send", "K1", "--yes", "--now", at)
        assert sent.exit_code == 0, sent.output
    notes = [p for p in outbox.glob("*.eml")
             if "sam@fabrikam.example" in str(_eml(p.read_bytes())["To"])]
    assert len(notes) == 1, sorted(p.name for p in outbox.glob("*.eml"))
    body = _eml(notes[0].read_bytes()).get_body(("plain",))
    assert body is not None
    sent_lines = _contact_lines(body.get_content())
    assert sent_lines == [f"- Bill Payer (primary): {bill[1]}", f"- Ana Admin (billing): {ana[1]}"]

    preview = cli("preview", "K1", "-m", "account_manager_alert", "--format", "text")
    assert preview.exit_code == 0, preview.output
    assert _contact_lines(preview.stdout) == sent_lines
