"""The Graph transport against the local sandbox: real msal + requests over HTTPS, every outcome.

Nothing here patches msal, requests or the HTTP layer; the sandbox answers as Graph does.
"""

from __future__ import annotations

import json
import socket
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from comms.config import GraphSettings, SenderSettings, Settings
from comms.delivery.auth import new_token_provider
from comms.delivery.base import (
    SEND_ID_HEADER,
    SEND_ID_PROPERTY_ID,
    Address,
    LookupUnavailable,
    Outcome,
    OutgoingEmail,
    Reconciler,
    Transport,
)
from comms.delivery.graph import (
    DEFAULT_RETRY_AFTER,
    GraphTransport,
    message_payload,
    parse_retry_after,
)

SENDER = "transition@fabrikam.example"
OTHER = "billing@fabrikam.example"


# --- pure logic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [("2.128", 2.128), ("7", 7.0), ("0", 0.0), ("-3", 0.0), (None, DEFAULT_RETRY_AFTER),
     ("", DEFAULT_RETRY_AFTER), ("soon", DEFAULT_RETRY_AFTER), ("nan", DEFAULT_RETRY_AFTER)],
)
def test_parse_retry_after(header: str | None, expected: float) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < parse_retry_after(when) <= 120
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=120), usegmt=True)
    assert parse_retry_after(past) == 0.0


def _email(send_id: str | None = None, *, sender: str = SENDER, **kw: Any) -> OutgoingEmail:
    fields: dict[str, Any] = {
        "send_id": send_id or f"s-{uuid.uuid4().hex}",
        "sender": sender,
        "to": (Address("ada@contoso.example", "Ada Lovelace"),),
        "cc": (Address("am@fabrikam.example"),),
        "reply_to": (Address("help@fabrikam.example", "Fabrikam help"),),
        "subject": "Your move to Fabrikam",
        "html": "<p>Hello Ada</p>",
        "text": "Hello Ada",
        "headers": (("x-comms-stage", "invited"),),
    }
    fields.update(kw)
    return OutgoingEmail(**fields)


def test_message_payload_carries_send_id_as_header_and_extended_property() -> None:
    payload = message_payload(_email("s-1"))
    assert payload == {
        "message": {
            "subject": "Your move to Fabrikam",
            "body": {"contentType": "HTML", "content": "<p>Hello Ada</p>"},
            "toRecipients": [
                {"emailAddress": {"address": "ada@contoso.example", "name": "Ada Lovelace"}}
            ],
            "ccRecipients": [{"emailAddress": {"address": "am@fabrikam.example"}}],
            "replyTo": [
                {"emailAddress": {"address": "help@fabrikam.example", "name": "Fabrikam help"}}
            ],
            "internetMessageHeaders": [
                {"name": SEND_ID_HEADER, "value": "s-1"},
                {"name": "x-comms-stage", "value": "invited"},
            ],
            "singleValueExtendedProperties": [{"id": SEND_ID_PROPERTY_ID, "value": "s-1"}],
        },
        "saveToSentItems": True,
    }
    bare = message_payload(_email("s-2", cc=(), reply_to=(), headers=()))["message"]
    assert "ccRecipients" not in bare and "replyTo" not in bare
    assert bare["internetMessageHeaders"] == [{"name": SEND_ID_HEADER, "value": "s-2"}]


# --- against the sandbox ------------------------------------------------------------------------


def _app(sandbox: Any, **kw: Any) -> tuple[str, str]:
    client_id, secret = str(uuid.uuid4()), f"secret-{uuid.uuid4().hex}"
    sandbox.register_app(client_id, secret=secret, **kw)
    return client_id, secret


def graph_settings(
    sandbox: Any, client_id: str, secret: str, *, senders: tuple[str, ...] = (SENDER,),
    timeout: float = 10.0, base_url: str | None = None,
) -> Settings:
    return Settings(
        senders=[SenderSettings(address=a) for a in senders],
        graph=GraphSettings(
            base_url=base_url or sandbox.graph_url,
            authority_host=sandbox.authority_host,
            tenant_id=sandbox.tenant_id,
            client_id=client_id,
            auth="secret",
            client_secret=secret,
            ca_file=str(sandbox.ca_file),
            timeout_seconds=timeout,
        ),
    )


@pytest.fixture
def mailboxes(sandbox: Any) -> Any:
    sandbox.add_mailbox(SENDER)
    sandbox.add_mailbox(OTHER)
    return sandbox


@pytest.fixture
def transport(mailboxes: Any) -> GraphTransport:
    client_id, secret = _app(mailboxes)
    t = GraphTransport(graph_settings(mailboxes, client_id, secret))
    yield t
    t.close()


def _records(sandbox: Any, send_id: str) -> list[dict[str, Any]]:
    return [r for r in sandbox.sent() if r["send_id"] == send_id]


def test_202_is_sent_and_the_sandbox_recorded_the_message(
    transport: GraphTransport, mailboxes: Any
) -> None:
    assert isinstance(transport, Transport) and isinstance(transport, Reconciler)
    email = _email()
    result = transport.send(email)
    assert result.outcome is Outcome.SENT
    assert result.status == 202
    assert result.request_id
    [record] = _records(mailboxes, email.send_id)
    assert record["header_send_id"] == email.send_id
    assert record["sender"] == SENDER
    assert record["subject"] == "Your move to Fabrikam"
    assert "ada@contoso.example" in json.dumps(record["to"])
    assert "am@fabrikam.example" in json.dumps(record["cc"])


def test_400_bad_header_is_failed_with_graphs_code(
    transport: GraphTransport, mailboxes: Any
) -> None:
    email = _email(headers=(("Importance-Level", "high"),))
    result = transport.send(email)
    assert result.outcome is Outcome.FAILED
    assert result.status == 400
    assert result.error_code == "InvalidInternetMessageHeaderCollection"
    assert result.message.startswith("Graph refused the message headers (400 ")
    assert result.message.endswith("at most 5 internet headers, each name starting with x-")
    assert _records(mailboxes, email.send_id) == []


def test_403_app_not_allowed_for_the_mailbox_names_the_fix(mailboxes: Any) -> None:
    client_id, secret = _app(mailboxes, mailboxes=[OTHER])
    transport = GraphTransport(graph_settings(mailboxes, client_id, secret))
    result = transport.send(_email())
    assert result.outcome is Outcome.FAILED
    assert result.status == 403
    assert result.error_code == "ErrorAccessDenied"
    assert result.message.startswith(f"the app may not send as {SENDER} (403 ErrorAccessDenied: ")
    assert result.message.endswith(
        "grant the app the Mail.Send application permission with admin consent, and check "
        "that no Exchange application access policy / RBAC for Applications scope excludes "
        f"mailbox {SENDER}"
    )
    assert transport.send(_email(sender=OTHER)).outcome is Outcome.SENT


def test_403_without_mail_send_role(mailboxes: Any) -> None:
    client_id, secret = _app(mailboxes, roles=("Mail.Read",))
    result = GraphTransport(graph_settings(mailboxes, client_id, secret)).send(_email())
    assert (result.outcome, result.status, result.error_code) == (
        Outcome.FAILED, 403, "ErrorAccessDenied"
    )


def test_404_unknown_mailbox_names_the_senders_setting(
    transport: GraphTransport, mailboxes: Any
) -> None:
    result = transport.send(_email(sender="nobody@fabrikam.example"))
    assert result.outcome is Outcome.FAILED
    assert result.status == 404
    assert result.error_code == "ErrorInvalidUser"
    assert result.message.startswith(
        f"mailbox nobody@fabrikam.example does not exist in tenant {mailboxes.tenant_id} (404 "
    )
    assert result.message.endswith("check the [[senders]] address")


def test_413_message_too_large(transport: GraphTransport, mailboxes: Any) -> None:
    email = _email(html="<p>" + "x" * (5 * 1024 * 1024) + "</p>")
    result = transport.send(email)
    assert (result.outcome, result.status) == (Outcome.FAILED, 413)
    assert result.message.startswith("the message is too large for Graph (about 4 MB per request)")
    assert _records(mailboxes, email.send_id) == []


def test_429_is_throttled_with_retry_after(transport: GraphTransport, mailboxes: Any) -> None:
    transport.tokens.token()
    mailboxes.set_faults(throttle_rate=1.0)
    email = _email()
    result = transport.send(email)
    assert result.outcome is Outcome.THROTTLED
    assert result.status == 429
    assert result.retry_after is not None and result.retry_after > 0
    assert result.error_code
    assert _records(mailboxes, email.send_id) == []


def test_503_504_is_unknown_and_never_retried(transport: GraphTransport, mailboxes: Any) -> None:
    transport.tokens.token()
    before = mailboxes.stats()
    mailboxes.set_faults(error_rate=1.0, seed=3)
    seen: set[int] = set()
    for n in range(1, 21):  # the sandbox answers 503 or 504 at random (seeded): see both
        email = _email()
        result = transport.send(email)
        assert result.outcome is Outcome.UNKNOWN
        assert result.status in (503, 504)
        seen.add(result.status)
        if result.status == 503:  # with Retry-After: the mailbox pauses that long
            assert result.retry_after is not None and result.retry_after >= 0
        else:  # 504 without Retry-After: no pause asked for, none taken
            assert result.retry_after is None
        assert "look the send id up in Sent Items before any resend" in result.message
        assert _records(mailboxes, email.send_id) == []
        assert _send_requests(mailboxes.stats()) - _send_requests(before) == n
        if seen == {503, 504}:
            break
    assert seen == {503, 504}


def _send_requests(stats: dict[str, Any]) -> int:
    return int(stats["requests"])  # Graph requests the sandbox answered


def test_drop_after_accept_is_unknown_and_found_in_sent_items(
    transport: GraphTransport, mailboxes: Any
) -> None:
    transport.tokens.token()
    mailboxes.set_faults(drop_after_accept_rate=1.0)
    email = _email()
    result = transport.send(email)
    assert result.outcome is Outcome.UNKNOWN
    assert result.error_code == "ConnectionLost"
    assert len(_records(mailboxes, email.send_id)) == 1  # accepted once, not retried
    mailboxes.set_faults(drop_after_accept_rate=0.0)
    assert transport.find_sent(SENDER, email.send_id) is True


def test_401_after_revocation_refreshes_once_then_sends(
    transport: GraphTransport, mailboxes: Any
) -> None:
    assert transport.send(_email()).outcome is Outcome.SENT
    tokens_before = _token_requests(mailboxes.stats())
    mailboxes.revoke_tokens()
    email = _email()
    result = transport.send(email)
    assert result.outcome is Outcome.SENT
    assert _token_requests(mailboxes.stats()) == tokens_before + 1
    assert len(_records(mailboxes, email.send_id)) == 1


def _token_requests(stats: dict[str, Any]) -> int:
    return int(stats["token_requests"])


class _RefusedTokens:
    """A token source Graph never accepts (to reach the second-401 branch)."""

    delegated = False

    def __init__(self) -> None:
        self.refreshed: list[str] = []

    def token(self) -> str:
        return "not-a-token"

    def refresh(self, stale: str) -> str:
        self.refreshed.append(stale)
        return "still-not-a-token"


def test_second_401_is_failed_with_an_auth_message(mailboxes: Any) -> None:
    client_id, secret = _app(mailboxes)
    tokens = _RefusedTokens()
    transport = GraphTransport(graph_settings(mailboxes, client_id, secret), token_provider=tokens)
    email = _email()
    result = transport.send(email)
    assert result.outcome is Outcome.FAILED
    assert result.status == 401
    assert tokens.refreshed == ["not-a-token"]
    assert result.message.startswith("Graph refused a freshly issued token (401 ")
    assert result.message.endswith(
        "check [graph] tenant_id and client_id, and that [graph] base_url and authority_host "
        "belong to the same cloud"
    )
    assert _records(mailboxes, email.send_id) == []


def test_read_timeout_is_unknown(mailboxes: Any) -> None:
    client_id, secret = _app(mailboxes)
    transport = GraphTransport(graph_settings(mailboxes, client_id, secret, timeout=0.5))
    transport.tokens.token()
    mailboxes.set_faults(latency=2.0)
    result = transport.send(_email())
    assert result.outcome is Outcome.UNKNOWN
    assert result.error_code == "Timeout"
    assert result.message.startswith(
        "no answer within 0.5 s (ReadTimeout); Graph may have accepted it: look the send id up"
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_graph_is_not_sent_and_safe_to_retry(mailboxes: Any) -> None:
    client_id, secret = _app(mailboxes)
    settings = graph_settings(mailboxes, client_id, secret)
    tokens = new_token_provider(settings.graph)
    dead = graph_settings(
        mailboxes, client_id, secret, base_url=f"https://127.0.0.1:{_closed_port()}/v1.0"
    )
    result = GraphTransport(dead, token_provider=tokens).send(_email())
    assert result.outcome is Outcome.THROTTLED
    assert result.error_code == "Unreachable"
    assert result.retry_after == 30.0
    assert "nothing was sent" in result.message


def test_find_sent_true_and_false(transport: GraphTransport) -> None:
    email = _email(send_id="s-it's-quoted")
    assert transport.send(email).outcome is Outcome.SENT
    assert transport.find_sent(SENDER, email.send_id) is True
    assert transport.find_sent(SENDER, "s-never-sent") is False
    assert transport.find_sent(OTHER, email.send_id) is False


def test_find_sent_without_mail_read_cannot_tell(mailboxes: Any) -> None:
    client_id, secret = _app(mailboxes, roles=("Mail.Send",))
    transport = GraphTransport(graph_settings(mailboxes, client_id, secret))
    email = _email()
    assert transport.send(email).outcome is Outcome.SENT
    assert transport.find_sent(SENDER, email.send_id) is None
    assert transport.last_lookup_problem.startswith(
        f"no permission to read Sent Items of {SENDER} (403 "
    )


def test_find_sent_timeout_is_unavailable_for_now(mailboxes: Any) -> None:
    client_id, secret = _app(mailboxes)
    transport = GraphTransport(graph_settings(mailboxes, client_id, secret, timeout=0.5))
    email = _email()
    assert transport.send(email).outcome is Outcome.SENT
    mailboxes.set_faults(latency=2.0)
    with pytest.raises(LookupUnavailable) as info:
        transport.find_sent(SENDER, email.send_id)
    assert str(info.value).startswith("Sent Items lookup failed (ReadTimeout: ")
    mailboxes.set_faults(latency=0.0)
    assert transport.find_sent(SENDER, email.send_id) is True  # a later pass answers


def test_each_send_is_one_request_with_pooled_connections(
    transport: GraphTransport, mailboxes: Any
) -> None:
    transport.tokens.token()
    before = _send_requests(mailboxes.stats())
    for _ in range(3):
        assert transport.send(_email()).outcome is Outcome.SENT
    assert _send_requests(mailboxes.stats()) - before == 3



@pytest.mark.sandbox(messages_per_minute=2, time_scale=1.0)
def test_mailbox_rate_limit_is_throttled_with_graphs_fractional_retry_after(
    transport: GraphTransport, mailboxes: Any
) -> None:
    assert [transport.send(_email()).outcome for _ in range(2)] == [Outcome.SENT] * 2
    email = _email()
    result = transport.send(email)
    assert result.outcome is Outcome.THROTTLED
    assert result.status == 429
    assert result.retry_after is not None and 0 < result.retry_after <= 60
    assert result.retry_after != int(result.retry_after)  # fractional seconds kept
    assert _records(mailboxes, email.send_id) == []
