"""The HTTPS server and the public ``Sandbox`` object.

A ``ThreadingHTTPServer`` on loopback speaking HTTP/1.1 with keep-alive (``requests.Session``
reuses connections), one daemon thread per connection; TLS is negotiated in that thread so a
slow client never blocks the accept loop. ``stop()`` closes the listener and every open
connection and wakes any injected latency, so shutdown is bounded.

Requests are dispatched to one module per emulated service by ``routes.route``; the admin
endpoints (``admin``) let other processes drive and inspect it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from comms.sandbox import graph, identity
from comms.sandbox.certs import load_client_certificate, make_certificate, tls_files
from comms.sandbox.core import Core
from comms.sandbox.routes import route
from comms.sandbox.state import App, Faults, State
from comms.sandbox.tenants import CustomerTenant, SyncFaults, Tenants
from comms.sandbox.tokens import TokenService
from comms.sandbox.web import Request, Response, graph_error

log = logging.getLogger("comms.sandbox")

MAX_GRAPH_BODY = 4 * 1024 * 1024  # Graph's request size limit (413 past it)
MAX_READ_BODY = 64 * 1024 * 1024  # beyond this the connection is closed instead of drained
IDLE_TIMEOUT = 120.0  # seconds a keep-alive connection may sit idle
HANDSHAKE_TIMEOUT = 10.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], core: Core, tls: ssl.SSLContext) -> None:
        self.core = core
        self.tls = tls
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT)
        # Headers and body go out as separate writes: without this, Nagle + delayed ACK add
        # ~40 ms to every small response (the inbox reads hundreds of them).
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return  # a client that went away or does not trust our CA
        with self.connections_lock:
            self.connections.add(conn)
        self.core.state.count("connections")
        try:
            _Handler(conn, client_address, self)
        except (OSError, ssl.SSLError):
            pass  # connection reset mid-request: nothing to answer
        finally:
            with self.connections_lock:
                self.connections.discard(conn)
            conn.close()

    def close_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error from %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server: _Server

    def version_string(self) -> str:
        return "Microsoft-IIS/10.0"

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _read_body(self) -> bytes | None:
        """The request body; None when it is too large to drain (connection will close)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            size = 0
            while True:
                line = self.rfile.readline(1024)
                length = int(line.split(b";")[0].strip() or b"0", 16)
                if length == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                size += length
                if size > MAX_READ_BODY:
                    return None
                chunks.append(self.rfile.read(length))
                self.rfile.readline(1024)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_READ_BODY:
            return None
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/") if s]
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = self._read_body()
        req = Request(
            method=self.command,
            path=split.path,
            segments=segments,
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers=headers,
            body=body or b"",
        )
        if body is None or len(req.body) > MAX_GRAPH_BODY:
            resp = graph_error(
                req, 413, "RequestEntityTooLarge",
                f"The request body is larger than Microsoft Graph's limit of 4 MB "
                f"({MAX_GRAPH_BODY} bytes); send large attachments with an upload session.",
            )
            if body is None:
                self.close_connection = True
        else:
            try:
                resp = route(self.server.core, req)
            except Exception:  # a sandbox bug must answer 500, not kill the connection thread
                log.exception("sandbox error on %s %s", self.command, self.path)
                resp = graph_error(req, 500, "InternalServerError", "Sandbox internal error.")
        if resp.drop:
            self.close_connection = True
            return
        self._write(req, resp)

    def _write(self, req: Request, resp: Response) -> None:
        self.send_response(resp.status)
        self.send_header("request-id", req.request_id)
        self.send_header("client-request-id", req.client_request_id)
        self.send_header("Cache-Control", "no-store, no-cache")
        if resp.body or resp.content_type:
            ctype = resp.content_type
            if ctype == "application/json":
                ctype = "application/json; charset=utf-8"
            self.send_header("Content-Type", ctype)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if resp.body and self.command != "HEAD":
            self.wfile.write(resp.body)


class Sandbox:
    """A local Microsoft Graph + identity platform on ``https://127.0.0.1:PORT``.

    >>> with Sandbox(tmp_path) as sb:
    ...     sb.add_mailbox("transition@fabrikam.example")
    ...     sb.register_app(client_id, secret="s3cret")
    ...     # point msal at sb.authority_host / sb.tenant_id, requests at sb.graph_url,
    ...     # trusting sb.ca_file
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        time_scale: float = 1.0,
        tenant_id: str = "11111111-2222-3333-4444-555555555555",
        messages_per_minute: int = 30,
        max_concurrent: int = 4,
        recipients_per_day: int = 10_000,
        token_lifetime: float = 3600.0,
        auto_approve_device_codes: bool = False,
        port: int = 0,
        pc_requests_per_minute: int = 300,
        directory_requests_per_10s: int = 100,
        tenant_external_per_day: int = 0,
        directory_page_size: int = 100,
        gdap_page_size: int = 300,
        subscriptions_page_size: int = 0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.tenant_id = tenant_id
        self.port = port
        self._tls = tls_files(self.state_dir)
        state = State(
            self.state_dir,
            time_scale=time_scale,
            messages_per_minute=messages_per_minute,
            max_concurrent=max_concurrent,
            recipients_per_day=recipients_per_day,
            tenant_external_per_day=tenant_external_per_day,
        )
        graph.restore_sent_items(state)
        tokens = TokenService(self.state_dir, tenant_id, "", token_lifetime)
        tenants = Tenants(
            tenant_id, time_scale=time_scale, pc_requests_per_minute=pc_requests_per_minute,
            directory_requests_per_10s=directory_requests_per_10s,
            directory_page_size=directory_page_size, gdap_page_size=gdap_page_size,
            subscriptions_page_size=subscriptions_page_size,
        )
        self._core = Core(state, tokens, tenant_id, auto_approve_device_codes, tenants)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Sandbox:
        """Bind, then serve in a background thread; returns self."""
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", self.port), self._core, self._tls.server_context())
        self.port = server.server_address[1]
        self._core.base_url = f"https://127.0.0.1:{self.port}"
        self._core.tokens.issuer = self._core.issuer
        self._core.stopping.clear()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"comms-sandbox-{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every connection, and wake injected latency."""
        server, self._server = self._server, None
        if server is None:
            return
        self._core.stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if not self._core.base_url:
            raise RuntimeError("the sandbox is not started; call start() first")
        return self._core.base_url

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def authority_host(self) -> str:
        return self.base_url

    @property
    def authority(self) -> str:
        return f"{self.authority_host}/{self.tenant_id}"

    @property
    def time_scale(self) -> float:
        return self._core.state.time_scale

    @property
    def partner_center_url(self) -> str:
        """Partner Center's REST base (``.../v1/customers`` ...), like
        ``https://api.partnercenter.microsoft.com``."""
        return self.base_url

    @property
    def ca_file(self) -> Path:
        return self._tls.ca_file

    @property
    def sent_file(self) -> Path:
        return self._core.state.sent_file

    # -- directory ----------------------------------------------------------------------

    def add_mailbox(self, address: str) -> None:
        """A user with an Exchange Online mailbox (a sender, or a delegated user)."""
        self._core.state.add_user(address, mailbox=True)

    def register_app(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: bytes | None = None,
        roles: Sequence[str] = ("Mail.Send", "Mail.Read"),
        mailboxes: Sequence[str] | None = None,
        name: str = "comms",
    ) -> None:
        """Register (or update) an app: its credentials, application permissions granted
        with admin consent, and an optional application access policy (mailboxes it may
        use; None = all)."""
        state = self._core.state
        certs = [load_client_certificate(certificate_pem)] if certificate_pem else []
        with state.lock:
            app = state.apps.get(client_id)
            if app is None:
                app = App(client_id, name, [], [], frozenset(), None)
                state.apps[client_id] = app
            if secret is not None:
                app.secrets.append(secret)
            app.certificates.extend(certs)
            app.roles = frozenset(roles)
            app.mailboxes = (
                None if mailboxes is None else frozenset(m.strip().lower() for m in mailboxes)
            )

    def expire_secret(self, client_id: str, secret: str) -> None:
        """The app's ``secret`` is past its end date: the token endpoint answers it 401
        ``invalid_client`` AADSTS7000222 (in every tenant, the customers' too)."""
        with self._core.state.lock:
            self._core.state.apps[client_id].expired.add(secret)

    @staticmethod
    def make_certificate(common_name: str = "comms-test") -> tuple[bytes, bytes, str]:
        """``(cert_pem, key_pem, sha1_thumbprint_hex)`` of a new self-signed certificate."""
        return make_certificate(common_name)

    # -- knobs and observations ---------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._core.state.faults

    def set_faults(self, **fields: Any) -> Faults:
        """Replace the named fault fields (others keep their value); thread-safe."""
        return self._core.state.set_faults(**fields)

    def sent(self) -> list[dict[str, Any]]:
        """Every accepted message, in order, as recorded in ``state_dir/sent.jsonl``."""
        return self._core.state.records()

    def stats(self) -> dict[str, Any]:
        """Counters since start: ``requests`` (Graph), ``token_requests`` (identity),
        ``connections`` (TLS connections accepted), ``accepted``, ``throttled_rate``,
        ``throttled_concurrency``, ``throttled_recipients``, ``throttled_injected``,
        ``errors_injected``, ``dropped``, ``rejected`` (4xx other than 401), ``unauthorized``,
        ``batches`` (JSON batches, whose requests count in ``requests`` each), and per mailbox
        ``max_in_flight_per_mailbox`` (the most requests a client had in flight at once,
        counting one refused for concurrency), ``accepted_per_mailbox``,
        ``in_flight_per_mailbox``."""
        return self._core.state.stats()

    def approve_device_code(self, user_code: str, user: str) -> None:
        """Complete a device-code sign-in as ``user`` (KeyError for an unknown code)."""
        identity.approve_device_code(self._core, user_code, user)

    def revoke_tokens(self) -> None:
        """Access tokens issued so far are refused (401 InvalidAuthenticationToken) from now
        on. Refresh tokens stay valid, so a client that gets a new token recovers."""
        self._core.tokens.revoke_all()

    # -- customer tenants (Partner Center, GDAP, the customers' directories) ---------------

    def add_customer_tenant(
        self,
        tenant_id: str,
        domain: str,
        company_name: str = "",
        *,
        direct_licences: int = 0,
        assigned: int | None = None,
        consented: bool = True,
    ) -> CustomerTenant:
        """A customer tenant with an Enabled direct subscription of ``direct_licences``
        (``assigned`` of them assigned; default all), not yet the partner's customer."""
        return self._core.tenants.add(
            tenant_id, domain, company_name, direct_licences=direct_licences,
            assigned=assigned, consented=consented,
        )

    def tenant_change(self, tenant_id: str, action: str, **args: Any) -> dict[str, Any]:
        """What the customer or Microsoft does: ``accept_relationship``, ``listed_as``
        (relationship=advisor|...), ``gdap`` (status=...), ``activate_csp`` (quantity=...,
        offer="m365"|"azure_plan"|"add_on", trial=...),
        ``add_direct_product`` (sku_part_number=..., total=..., assigned=..., status=...),
        ``csp_status`` (status=...),
        ``direct_status`` (status=Enabled|Warning|Suspended|Deleted|LockedOut|absent),
        ``assigned`` (count=...), ``consent`` (granted=...)."""
        return self._core.tenants.change(tenant_id, action, **args)

    def set_sync_faults(self, **fields: Any) -> SyncFaults:
        """429 storms / 5xx shares for Partner Center and the directory endpoints."""
        return self._core.tenants.set_faults(**fields)

    def sync_stats(self) -> dict[str, int]:
        """Counters of the Partner Center and directory endpoints."""
        return self._core.tenants.stats()
