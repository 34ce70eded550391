"""A TLS stream that breaks is not an untrusted certificate.

requests raises ``SSLError`` both when the server's certificate does not verify (the handshake
failed: nothing was sent) and when the TLS layer breaks after the request was written (a bad
record MAC, an alert from a middlebox: Graph may have accepted the message). Only the first may
put a message back to `queued`; the second is an unknown outcome, looked up in Sent Items
before any resend.

A loopback HTTPS server with the sandbox's certificate plays Graph: it reads each request
whole, then answers it or writes a bogus TLS record (what a broken stream looks like to the
client). Tokens come from the sandbox through the real msal; requests are real.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import factories
import pytest
import requests
from test_exactly_once import make_unknown
from test_graph_transport import SENDER, _app, _email, _records, graph_settings
from test_outbox import status_of

from comms import outbox
from comms.config import Settings
from comms.delivery.auth import new_token_provider
from comms.delivery.base import LookupUnavailable, Outcome
from comms.delivery.failures import certificate_refused
from comms.delivery.graph import GraphTransport
from comms.delivery.msal_errors import call_msal
from comms.delivery.reads import ReadPolicy, RetryingReads, UntrustedServer
from comms.errors import AuthError, DeliveryError
from comms.sandbox import Sandbox
from comms.sandbox.certs import tls_files
from comms.store.db import Database

BREAK = b""  # answer: a bogus TLS record instead of an HTTP response
FOUND = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 26\r\n\r\n"
         b'{"value": [{"id": "m-1"}]}')
ACCEPTED = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"

Answer = Callable[[str, str, int], bytes]  # (method, path, index of the request) -> bytes


class BreakingServer:
    """HTTPS on 127.0.0.1 with the sandbox's server certificate (``ca_file`` trusts it)."""

    def __init__(self, sandbox: Sandbox, answer: Answer) -> None:
        self.ctx = tls_files(sandbox.state_dir).server_context()
        self.answer = answer
        self.requests: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1.0"

    def count(self, method: str) -> int:
        with self.lock:
            return sum(1 for m, _, _ in self.requests if m == method)

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
            while (request := _read_request(tls)) is not None:
                with self.lock:
                    self.requests.append(request)
                    index = len(self.requests) - 1
                reply = self.answer(request[0], request[1], index)
                if reply == BREAK:
                    # An application-data record no key can decrypt, written under the TLS
                    # layer: the client's read fails with a bad record MAC.
                    os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + os.urandom(32))
                    time.sleep(0.2)
                    return
                tls.sendall(reply)
        except (OSError, ssl.SSLError):
            return
        finally:
            raw.close()

    def close(self) -> None:
        self.sock.close()


def _read_request(tls: ssl.SSLSocket) -> tuple[str, str, bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next((int(line.split(b":")[1]) for line in lines
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += tls.recv(65536)
    method, path, _ = lines[0].decode().split(" ", 2)
    return method, path, body


@pytest.fixture
def breaking(sandbox: Sandbox) -> Iterator[Callable[[Answer], BreakingServer]]:
    servers: list[BreakingServer] = []

    def start(answer: Answer) -> BreakingServer:
        servers.append(BreakingServer(sandbox, answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _transport(sandbox: Sandbox, server: BreakingServer, **graph: Any) -> GraphTransport:
    """A transport whose Graph is ``server``, with a real token from the sandbox."""
    client_id, secret = _app(sandbox)
    good = graph_settings(sandbox, client_id, secret)
    settings = Settings.model_validate({
        "senders": [{"address": SENDER}],
        "graph": {**good.graph.model_dump(), "base_url": server.base_url, "timeout_seconds": 2,
                  **graph},
        "delivery": {"lease_seconds": 5, "time_scale": 0.001},
    })
    return GraphTransport(settings, token_provider=new_token_provider(good.graph))


def _break_sends(method: str, path: str, index: int) -> bytes:
    """sendMail breaks after the request was read whole; Sent Items has the message."""
    return BREAK if method == "POST" else FOUND


# --- the transport -------------------------------------------------------------------------


def test_tls_break_after_sendmail_was_written_is_an_unknown_outcome(
    sandbox: Sandbox, breaking: Callable[[Answer], BreakingServer]
) -> None:
    server = breaking(_break_sends)
    transport = _transport(sandbox, server)
    email = _email()
    result = transport.send(email)  # before the fix: DeliveryError "certificate not trusted"
    assert result.outcome is Outcome.UNKNOWN
    assert result.error_code == "ConnectionLost"
    assert result.message.startswith(
        "the TLS connection broke while the request was sent or answered (SSLError); Graph "
        "may have accepted it: look the send id up in Sent Items before any resend")
    assert server.count("POST") == 1  # the whole request reached "Graph"; never retried
    assert email.send_id in server.requests[0][2].decode()


def test_untrusted_certificate_on_sendmail_is_still_a_delivery_error(sandbox: Sandbox) -> None:
    """A certificate that does not verify: the handshake failed, nothing left."""
    sandbox.add_mailbox(SENDER)
    client_id, secret = _app(sandbox)
    good = graph_settings(sandbox, client_id, secret)
    untrusting = Settings.model_validate({
        "senders": [{"address": SENDER}],
        "graph": {**good.graph.model_dump(), "ca_file": ""},  # the system CAs only
    })
    transport = GraphTransport(untrusting, token_provider=new_token_provider(good.graph))
    email = _email()
    with pytest.raises(DeliveryError) as info:
        transport.send(email)
    assert str(info.value).startswith(f"the TLS certificate of {sandbox.graph_url.split('/')[2]} "
                                      "is not trusted (")
    assert str(info.value).endswith("set [graph] ca_file to the CA bundle that signs it, or "
                                    "check [graph] base_url")
    assert info.value.__cause__ is not None and certificate_refused(info.value.__cause__)
    assert _records(sandbox, email.send_id) == []


def test_tls_break_on_a_sent_items_lookup_is_unavailable_for_now(
    sandbox: Sandbox, breaking: Callable[[Answer], BreakingServer]
) -> None:
    server = breaking(lambda method, path, index: BREAK)
    transport = _transport(sandbox, server)
    with pytest.raises(LookupUnavailable) as info:  # before the fix: DeliveryError
        transport.find_sent(SENDER, "s-1")
    assert str(info.value).startswith("Sent Items lookup failed (SSLError: ")
    status, code, _ = transport.user_lookup(SENDER)
    assert (status, code) == (None, "SSLError")


# --- the outbox ----------------------------------------------------------------------------


def test_dispatch_after_a_tls_break_looks_the_send_id_up_and_never_resends(
    db: Database, sandbox: Sandbox, breaking: Callable[[Answer], BreakingServer]
) -> None:
    """The reviewer's case: before the fix the row went back to `queued` (attempts - 1) and the
    next run POSTed the same message again without a Sent Items lookup."""
    server = breaking(_break_sends)
    # Grace = max(reconcile grace 0, 2 request timeouts, server timeout) = 1 s.
    transport = _transport(sandbox, server, timeout_seconds=0.5, server_timeout_seconds=0.5,
                           reconcile_grace_seconds=0)
    mid = factories.queued(db, factories.customer(db, "C1"))
    d = outbox.Dispatcher(db, transport.settings, transport, clock=outbox.Clock(factories.T0),
                          worker="w1")
    report = d.run(deadline=time.monotonic() + 15)
    row = status_of(db, mid)
    assert (row.status, row.attempts) == ("sent", 1)
    assert (report.unknown, report.confirmed, report.sent) == (1, 1, 0)
    assert "confirmed in Sent Items" in row.note
    assert server.count("POST") == 1
    assert server.count("GET") == 1
    d.run(deadline=time.monotonic() + 2)  # the next run has nothing to send
    assert server.count("POST") == 1


def test_a_lookup_that_breaks_leaves_the_row_unknown(
    db: Database, sandbox: Sandbox, breaking: Callable[[Answer], BreakingServer]
) -> None:
    server = breaking(lambda method, path, index: BREAK)
    transport = _transport(sandbox, server)
    mid = factories.queued(db, factories.customer(db, "C1"))
    make_unknown(db, mid, mailbox=SENDER)
    report = outbox.DispatchReport()
    outbox.reconcile(db, transport, clock=outbox.Clock(), grace=timedelta(0), report=report)
    row = status_of(db, mid)
    assert (row.status, row.attempts, row.error_code) == ("unknown", 1, "")
    assert (report.confirmed, report.requeued, report.held) == (0, 0, 0)
    assert (server.count("GET"), server.count("POST")) == (1, 0)


# --- reads and the authority: retried, never "not trusted" ---------------------------------


def test_reads_retry_a_tls_break_and_refuse_an_untrusted_certificate(
    sandbox: Sandbox, breaking: Callable[[Answer], BreakingServer]
) -> None:
    server = breaking(lambda method, path, index: BREAK if index == 0 else FOUND)
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would win over Session.verify
    session.verify = str(sandbox.ca_file)
    reads = RetryingReads(session, ReadPolicy(max_attempts=3), sleep=lambda s: None)
    url = f"{server.base_url}/users/{SENDER}/messages"
    answer = reads.send(url, token=lambda: "t", refresh=lambda stale: "t")
    assert answer.status_code == 200 and answer.json()["value"] == [{"id": "m-1"}]
    assert server.count("GET") == 2
    untrusting = RetryingReads(requests.Session(), ReadPolicy(max_attempts=3),
                               sleep=lambda s: None)
    with pytest.raises(UntrustedServer):
        untrusting.send(url, token=lambda: "t", refresh=lambda stale: "t")
    assert server.count("GET") == 2  # the handshake failed: nothing reached the server


def test_authority_request_whose_tls_breaks_is_asked_again(
    sandbox: Sandbox, breaking: Callable[[Answer], BreakingServer]
) -> None:
    server = breaking(lambda method, path, index: BREAK if index == 0 else FOUND)
    client_id, secret = _app(sandbox)
    graph = graph_settings(sandbox, client_id, secret).graph

    def discovery() -> Any:
        return requests.get(f"{server.base_url}/x", verify=str(sandbox.ca_file),
                            timeout=5).json()

    assert call_msal(graph, "Discovery", discovery) == json.loads(FOUND.split(b"\r\n\r\n")[1])
    assert server.count("GET") == 2

    def untrusted() -> Any:
        return requests.get(f"{server.base_url}/x", timeout=5)

    with pytest.raises(AuthError, match="is not trusted"):
        call_msal(graph, "Discovery", untrusted)
    assert server.count("GET") == 2
