"""The outbox-folder transport writes one RFC 5322 .eml per send id, atomically, never twice."""

from __future__ import annotations

from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from comms.config import DeliverySettings, SenderSettings, Settings
from comms.delivery.base import Address, Outcome, OutgoingEmail, Reconciler, Transport
from comms.delivery.factory import make_transport
from comms.delivery.graph import GraphTransport
from comms.delivery.outbox_dir import OutboxDirTransport
from comms.errors import DeliveryError

WHEN = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def _settings(folder: Path | str = "") -> Settings:
    return Settings(
        senders=[SenderSettings(address="transition@fabrikam.example", name="Fabrikam Transition")],
        delivery=DeliverySettings(transport="outbox_dir", outbox_dir=str(folder)),
    )


def _email(send_id: str = "s-0001", subject: str = "Your move to Fabrikam") -> OutgoingEmail:
    return OutgoingEmail(
        send_id=send_id,
        sender="transition@fabrikam.example",
        to=(Address("ada@contoso.example", "Ada Lovelace"),),
        cc=(Address("am@fabrikam.example", "Account Manager"),),
        reply_to=(Address("help@fabrikam.example"),),
        subject=subject,
        html="<p>Hello <b>Ada</b> \u2014 caf\u00e9</p>",
        text="Hello Ada \u2014 caf\u00e9",
        headers=(("x-comms-stage", "invited"),),
    )


def _parse(path: Path) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    assert isinstance(msg, EmailMessage)
    return msg


def test_send_writes_a_multipart_alternative_eml_any_client_opens(tmp_path: Path) -> None:
    transport = OutboxDirTransport(_settings(tmp_path / "out"), clock=lambda: WHEN)
    assert isinstance(transport, Transport) and isinstance(transport, Reconciler)
    assert transport.find_sent("transition@fabrikam.example", "s-0001") is False

    result = transport.send(_email())

    path = tmp_path / "out" / "s-0001.eml"
    assert result.outcome is Outcome.SENT
    assert result.details == {"path": str(path)}
    msg = _parse(path)
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["From"] == "Fabrikam Transition <transition@fabrikam.example>"
    assert msg["To"] == "Ada Lovelace <ada@contoso.example>"
    assert msg["Cc"] == "Account Manager <am@fabrikam.example>"
    assert msg["Reply-To"] == "help@fabrikam.example"
    assert msg["Subject"] == "Your move to Fabrikam"
    assert msg["x-comms-send-id"] == "s-0001"
    assert msg["x-comms-stage"] == "invited"
    assert msg["Date"] == "Mon, 02 Mar 2026 09:30:00 +0000"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().strip() == "Hello Ada \u2014 caf\u00e9"
    assert parts[1].get_content().strip() == "<p>Hello <b>Ada</b> \u2014 caf\u00e9</p>"
    assert transport.find_sent("transition@fabrikam.example", "s-0001") is True


def test_second_send_of_the_same_send_id_does_not_duplicate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = OutboxDirTransport(_settings(out), clock=lambda: WHEN)
    first.send(_email())
    before = (out / "s-0001.eml").read_bytes()

    later = OutboxDirTransport(_settings(out), clock=lambda: datetime(2026, 4, 1, tzinfo=UTC))
    again = later.send(_email(subject="A different rendering"))

    assert again.outcome is Outcome.SENT
    assert again.message == f"already written to {out / 's-0001.eml'}"
    assert sorted(p.name for p in out.iterdir()) == ["s-0001.eml"]  # no temp files either
    assert (out / "s-0001.eml").read_bytes() == before


def test_each_send_id_gets_its_own_file(tmp_path: Path) -> None:
    transport = OutboxDirTransport(_settings(tmp_path / "out"), clock=lambda: WHEN)
    for i in range(3):
        assert transport.send(_email(f"s-{i}")).outcome is Outcome.SENT
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["s-0.eml", "s-1.eml", "s-2.eml"]


def test_a_send_id_that_is_not_a_file_name_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    transport = OutboxDirTransport(_settings(out), clock=lambda: WHEN)
    result = transport.send(_email("../escape"))
    assert result.outcome is Outcome.FAILED
    assert result.error_code == "BadSendId"
    assert result.message == (
        "send id '../escape' cannot be used as a file name (letters, digits, . _ -)"
    )
    assert not out.exists() and not (tmp_path / "escape.eml").exists()
    assert transport.find_sent("transition@fabrikam.example", "../escape") is False


def test_unwritable_outbox_folder_is_a_delivery_error_naming_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    transport = OutboxDirTransport(_settings(blocker), clock=lambda: WHEN)
    with pytest.raises(DeliveryError) as info:
        transport.send(_email())
    assert str(info.value).startswith(f"cannot write to the outbox folder {blocker} (")
    assert str(info.value).endswith("check [delivery] outbox_dir and its permissions")


def test_default_folder_is_under_comms_home(comms_home: Path) -> None:
    transport = OutboxDirTransport(_settings(""), clock=lambda: WHEN)
    transport.send(_email())
    assert (comms_home / "outbox" / "s-0001.eml").is_file()


def test_make_transport_follows_delivery_transport(tmp_path: Path) -> None:
    outbox = make_transport(_settings(tmp_path))
    assert isinstance(outbox, OutboxDirTransport) and outbox.folder == tmp_path
    graph_settings = _settings(tmp_path)
    graph_settings.delivery.transport = "graph"
    # Building the Graph transport must not touch the network (the token comes on first use).
    assert isinstance(make_transport(graph_settings), GraphTransport)
