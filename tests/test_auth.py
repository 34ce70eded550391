"""Tokens from the sandbox's identity platform through the real msal, and `comms auth`.

Certificate and secret credentials, the device code flow with its 0600 token cache, token reuse
from msal's cache, and error messages that name the setting to fix. MSAL caches identical
failing token responses for a while, so each failure test uses its own app or secret.
"""

from __future__ import annotations

import json
import stat
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from comms.config import GraphSettings, SenderSettings, Settings
from comms.delivery.auth import (
    AppTokenProvider,
    DelegatedTokenProvider,
    authority_is_microsoft,
    forget_token_providers,
    graph_resource,
    new_token_provider,
    token_cache_path,
    token_claims,
    token_provider_for,
)
from comms.delivery.base import Address, Outcome, OutgoingEmail
from comms.delivery.credentials import certificate_credential
from comms.delivery.graph import GraphTransport
from comms.errors import AuthError

SENDER = "transition@fabrikam.example"
USER = "operator@fabrikam.example"


@pytest.fixture(autouse=True)
def _fresh_providers() -> Any:
    forget_token_providers()
    yield
    forget_token_providers()


def _graph(sandbox: Any, **kw: Any) -> GraphSettings:
    values: dict[str, Any] = {
        "base_url": sandbox.graph_url,
        "authority_host": sandbox.authority_host,
        "tenant_id": sandbox.tenant_id,
        "ca_file": str(sandbox.ca_file),
        "timeout_seconds": 10.0,
    }
    values.update(kw)
    return GraphSettings(**values)


def _secret_app(sandbox: Any, **kw: Any) -> tuple[str, str]:
    client_id, secret = str(uuid.uuid4()), f"secret-{uuid.uuid4().hex}"
    sandbox.register_app(client_id, secret=secret, **kw)
    return client_id, secret


def _cert_files(sandbox: Any, tmp_path: Path) -> tuple[Path, Path, str]:
    cert_pem, key_pem, thumbprint = sandbox.make_certificate()
    name = uuid.uuid4().hex[:8]
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    return cert_file, key_file, thumbprint


def _token_requests(sandbox: Any) -> int:
    return int(sandbox.stats()["token_requests"])


# --- pure helpers -------------------------------------------------------------------------------


def test_graph_resource_follows_the_cloud() -> None:
    assert graph_resource(GraphSettings()) == "https://graph.microsoft.com"
    us = GraphSettings(base_url="https://graph.microsoft.us/v1.0")
    assert graph_resource(us) == "https://graph.microsoft.us"
    emulator = GraphSettings(base_url="https://127.0.0.1:8443/v1.0")
    assert graph_resource(emulator) == "https://graph.microsoft.com"


def test_instance_discovery_only_for_microsoft_hosts() -> None:
    assert authority_is_microsoft(GraphSettings())
    assert authority_is_microsoft(GraphSettings(authority_host="https://login.microsoftonline.us"))
    assert not authority_is_microsoft(GraphSettings(authority_host="https://127.0.0.1:9000"))


def test_token_claims_decodes_without_verifying() -> None:
    # header {"alg":"none"} . {"tid":"t1","roles":["Mail.Send"]} . (no signature check)
    token = "eyJhbGciOiJub25lIn0.eyJ0aWQiOiJ0MSIsInJvbGVzIjpbIk1haWwuU2VuZCJdfQ.sig"
    assert token_claims(token) == {"tid": "t1", "roles": ["Mail.Send"]}
    assert token_claims("opaque-token") == {}


# --- app-only -----------------------------------------------------------------------------------


def test_secret_auth_gets_a_graph_token(sandbox: Any) -> None:
    client_id, secret = _secret_app(sandbox)
    provider = new_token_provider(_graph(sandbox, client_id=client_id, auth="secret",
                                         client_secret=secret))
    assert isinstance(provider, AppTokenProvider) and not provider.delegated
    claims = token_claims(provider.token())
    assert claims["tid"] == sandbox.tenant_id
    assert claims["appid"] == client_id
    assert set(claims["roles"]) == {"Mail.Send", "Mail.Read"}


def test_certificate_auth_gets_a_graph_token(sandbox: Any, tmp_path: Path) -> None:
    cert_file, key_file, thumbprint = _cert_files(sandbox, tmp_path)
    client_id = str(uuid.uuid4())
    sandbox.register_app(client_id, certificate_pem=cert_file.read_bytes())
    graph = _graph(sandbox, client_id=client_id, auth="certificate",
                   certificate_file=str(cert_file), private_key_file=str(key_file))
    credential = certificate_credential(graph)
    assert credential["thumbprint"] == thumbprint.replace(":", "").upper()
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert credential["thumbprint"] == cert.fingerprint(hashes.SHA1()).hex().upper()
    claims = token_claims(new_token_provider(graph).token())
    assert claims["appid"] == client_id
    assert "Mail.Send" in claims["roles"]


def test_tokens_are_reused_from_msals_cache(sandbox: Any) -> None:
    client_id, secret = _secret_app(sandbox)
    settings = Settings(graph=_graph(sandbox, client_id=client_id, auth="secret",
                                     client_secret=secret))
    provider = token_provider_for(settings)
    before = _token_requests(sandbox)
    first = provider.token()
    assert _token_requests(sandbox) == before + 1
    assert provider.token() == first
    # One msal application per process: the same settings give the same provider.
    assert token_provider_for(settings.model_copy(deep=True)) is provider
    assert token_provider_for(settings).token() == first
    assert _token_requests(sandbox) == before + 1
    # A refused token is dropped from the cache and a new one fetched.
    fresh = provider.refresh(first)
    assert fresh != first
    assert _token_requests(sandbox) == before + 2
    assert provider.token() == fresh


def test_wrong_secret_names_the_variable(sandbox: Any) -> None:
    client_id, _ = _secret_app(sandbox)
    graph = _graph(sandbox, client_id=client_id, auth="secret", client_secret="wrong-" + client_id)
    with pytest.raises(AuthError) as info:
        new_token_provider(graph).token()
    assert str(info.value).startswith(
        "Getting a token failed: the client secret is wrong: check COMMS_GRAPH_CLIENT_SECRET "
        "(the secret's value, not its id) (AADSTS7000215: "
    )


def test_unknown_app_names_client_id_and_tenant(sandbox: Any) -> None:
    client_id = str(uuid.uuid4())
    graph = _graph(sandbox, client_id=client_id, auth="secret", client_secret="s-" + client_id)
    with pytest.raises(AuthError) as info:
        new_token_provider(graph).token()
    assert str(info.value).startswith(
        f"Getting a token failed: no application {client_id} in tenant {sandbox.tenant_id}: "
        "check [graph] client_id and [graph] tenant_id (AADSTS700016: "
    )


def test_unregistered_certificate_says_to_upload_it(sandbox: Any, tmp_path: Path) -> None:
    registered, _, _ = _cert_files(sandbox, tmp_path)
    other_cert, other_key, _ = _cert_files(sandbox, tmp_path)
    client_id = str(uuid.uuid4())
    sandbox.register_app(client_id, certificate_pem=registered.read_bytes())
    graph = _graph(sandbox, client_id=client_id, auth="certificate",
                   certificate_file=str(other_cert), private_key_file=str(other_key))
    with pytest.raises(AuthError) as info:
        new_token_provider(graph).token()
    assert str(info.value).startswith(
        "Getting a token failed: the client assertion was refused: upload the certificate in "
        "[graph] certificate_file to the app registration and check that "
        "COMMS_GRAPH_PRIVATE_KEY_FILE is its key (AADSTS700027: "
    )


def test_key_that_does_not_match_the_certificate_is_named(sandbox: Any, tmp_path: Path) -> None:
    cert_file, _, _ = _cert_files(sandbox, tmp_path)
    _, other_key, _ = _cert_files(sandbox, tmp_path)
    graph = _graph(sandbox, client_id=str(uuid.uuid4()), auth="certificate",
                   certificate_file=str(cert_file), private_key_file=str(other_key))
    with pytest.raises(AuthError) as info:
        certificate_credential(graph)
    assert str(info.value) == (
        "the private key in COMMS_GRAPH_PRIVATE_KEY_FILE does not belong to the certificate "
        f"in [graph] certificate_file {cert_file}"
    )


def test_missing_private_key_setting_is_named(tmp_path: Path) -> None:
    graph = GraphSettings(auth="certificate", certificate_file=str(tmp_path / "app.crt"))
    with pytest.raises(AuthError, match="COMMS_GRAPH_PRIVATE_KEY_FILE is not set"):
        certificate_credential(graph)


def test_unreachable_authority_names_authority_host(sandbox: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    graph = _graph(sandbox, authority_host=f"https://127.0.0.1:{port}",
                   client_id=str(uuid.uuid4()), auth="secret", client_secret="x")
    with pytest.raises(AuthError) as info:
        new_token_provider(graph)
    assert str(info.value) == (
        f"Connecting to the authority failed: cannot reach the authority 127.0.0.1:{port} "
        "(ConnectionError); check [graph] authority_host and the network"
    )


def test_untrusted_authority_certificate_names_ca_file(sandbox: Any) -> None:
    # The sandbox's CA is not in the system bundle (REQUESTS_CA_BUNDLE is set on these machines).
    graph = _graph(sandbox, ca_file="", client_id=str(uuid.uuid4()), auth="secret",
                   client_secret="x")
    with pytest.raises(AuthError) as info:
        new_token_provider(graph)
    message = str(info.value)
    assert message.startswith("Connecting to the authority failed: the TLS certificate of ")
    assert message.endswith(
        "set [graph] ca_file to the CA bundle that signs it, or check [graph] authority_host"
    )


# --- delegated (device code) --------------------------------------------------------------------


def _delegated(sandbox: Any, tmp_path: Path, **kw: Any) -> GraphSettings:
    client_id = str(uuid.uuid4())
    sandbox.register_app(client_id)
    return _graph(sandbox, client_id=client_id, auth="delegated", **kw)


def test_device_code_sign_in_caches_tokens_in_a_private_file(
    sandbox: Any, tmp_path: Path
) -> None:
    sandbox.add_mailbox(USER)
    graph = _delegated(sandbox, tmp_path, token_cache_file=str(tmp_path / "cache" / "tc.json"))
    provider = new_token_provider(graph)
    assert isinstance(provider, DelegatedTokenProvider) and provider.delegated
    shown: list[dict[str, Any]] = []

    def approve(flow: dict[str, Any]) -> None:
        shown.append(flow)
        sandbox.approve_device_code(flow["user_code"], USER)

    claims = provider.login(approve)
    assert claims["upn"] == USER
    assert shown[0]["user_code"] in shown[0]["message"]
    cache = tmp_path / "cache" / "tc.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert json.loads(cache.read_text())["RefreshToken"]  # what lets the next run skip sign-in

    # A new process: the cache file signs it in without another device flow (which would wait
    # for an approval that never comes: the sandbox does not auto-approve here).
    again = new_token_provider(graph)
    token = again.token()
    assert token_claims(token)["upn"] == USER
    assert "Mail.Send" in token_claims(token)["scp"].split()
    # Sends go to /me/sendMail as the signed-in user.
    email = OutgoingEmail(send_id=f"s-{uuid.uuid4().hex}", sender=USER,
                          to=(Address("ada@contoso.example"),), subject="Hi", html="<p>Hi</p>",
                          text="Hi")
    transport = GraphTransport(Settings(graph=graph), token_provider=again)
    assert transport.send(email).outcome is Outcome.SENT
    assert [r["sender"] for r in sandbox.sent() if r["send_id"] == email.send_id] == [USER]
    assert transport.find_sent(USER, email.send_id) is True


def test_delegated_without_sign_in_says_run_login(sandbox: Any, tmp_path: Path) -> None:
    graph = _delegated(sandbox, tmp_path)
    with pytest.raises(AuthError) as info:
        new_token_provider(graph).token()
    assert str(info.value) == (
        f"nobody is signed in (no account in {token_cache_path(graph)}): run `comms auth login`"
    )


def test_default_token_cache_is_under_comms_home(comms_home: Path) -> None:
    assert token_cache_path(GraphSettings(auth="delegated")) == comms_home / "token_cache.json"


# --- comms auth (CLI) ---------------------------------------------------------------------------


def _write_config(path: Path, graph: GraphSettings, senders: tuple[str, ...]) -> None:
    lines = ["[graph]"]
    for key in ("base_url", "authority_host", "tenant_id", "client_id", "auth", "ca_file",
                "certificate_file", "token_cache_file"):
        lines.append(f'{key} = "{getattr(graph, key)}"')
    for address in senders:
        lines += ["", "[[senders]]", f'address = "{address}"']
    path.write_text("\n".join(lines) + "\n")


def test_auth_check_reports_token_and_mailboxes(
    sandbox: Any, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox.add_mailbox(SENDER)
    client_id, secret = _secret_app(sandbox, name="Fabrikam comms")
    graph = _graph(sandbox, client_id=client_id, auth="secret")
    _write_config(tmp_path / "comms.toml", graph, (SENDER,))
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET", secret)

    result = cli("auth", "check")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "Token OK (secret auth)",
        f"  tenant:      {sandbox.tenant_id}",
        f"  app:         {client_id} (Fabrikam comms)",
        "  permissions: Mail.Read, Mail.Send",
        "Sender mailboxes:",
        f"  {SENDER}: exists",
    ]
    assert sandbox.sent() == []


def test_auth_check_send_test_and_a_missing_mailbox(
    sandbox: Any, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox.add_mailbox(SENDER)
    client_id, secret = _secret_app(sandbox)
    graph = _graph(sandbox, client_id=client_id, auth="secret")
    _write_config(tmp_path / "comms.toml", graph, (SENDER, "ghost@fabrikam.example"))
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET", secret)

    result = cli("auth", "check", "--send-test")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[4:] == [
        "Sender mailboxes:",
        f"  {SENDER}: exists",
        "    test message: accepted (202)",
        f"  ghost@fabrikam.example: does not exist in tenant {sandbox.tenant_id} "
        "(404 ErrorInvalidUser): check the [[senders]] address",
        lines[-1],
    ]
    assert lines[-1].startswith("    test message: failed: mailbox ghost@fabrikam.example does "
                                "not exist in tenant")
    assert "Error: 2 problems found by `comms auth check`:" in result.stderr
    [record] = sandbox.sent()
    assert record["sender"] == SENDER
    assert SENDER in str(record["to"])
    assert record["subject"] == "comms auth check: test message"


def test_auth_check_with_a_wrong_secret_exits_with_the_fix(
    sandbox: Any, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_id, _ = _secret_app(sandbox)
    _write_config(tmp_path / "comms.toml", _graph(sandbox, client_id=client_id, auth="secret"),
                  (SENDER,))
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET", "nope-" + client_id)
    result = cli("auth", "check")
    assert result.exit_code == 3  # a credential problem is a configuration error
    assert "Error: Getting a token failed: the client secret is wrong: check " \
           "COMMS_GRAPH_CLIENT_SECRET" in result.stderr
    assert result.stdout == ""


def test_auth_login_and_logout(cli: Any, tmp_path: Path) -> None:
    from comms.sandbox import Sandbox

    with Sandbox(tmp_path / "sbx", auto_approve_device_codes=True) as sbx:
        sbx.add_mailbox(USER)
        client_id = str(uuid.uuid4())
        sbx.register_app(client_id)
        graph = _graph(sbx, client_id=client_id, auth="delegated")
        _write_config(tmp_path / "comms.toml", graph, (USER,))

        result = cli("auth", "login")
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert "enter the code" in lines[0]
        cache = token_cache_path(graph)
        assert lines[-1].startswith("Signed in as ")
        assert lines[-1].endswith(f"; token cache {cache} (readable only by you).")
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600

        forget_token_providers()  # as a new process: the cache file alone signs it in
        result = cli("auth", "check", "--send-test")
        assert result.exit_code == 0, result.output
        out = result.stdout.splitlines()
        assert out[0] == "Token OK (delegated auth)"
        assert f"  user:        {USER}" in out
        assert out[-3:] == ["Sender mailboxes:", f"  {USER}: exists",
                            "    test message: accepted (202)"]
        assert [r["sender"] for r in sbx.sent()] == [USER]

        result = cli("auth", "logout")
        assert (result.exit_code, result.stdout) == (
            0, f"Signed out: deleted the token cache {cache}.\n"
        )
        assert not cache.exists()
        result = cli("auth", "logout")
        assert result.stdout == f"Not signed in (no token cache at {cache}).\n"


def test_auth_login_refuses_app_only_config(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "comms.toml").write_text('[graph]\nauth = "secret"\n')
    result = cli("auth", "login")
    assert result.exit_code == 3
    assert result.stderr.startswith(
        "Error: `comms auth login` is for delegated sign-in, but [graph] auth is 'secret'"
    )


def test_threads_share_one_provider(sandbox: Any) -> None:
    client_id, secret = _secret_app(sandbox)
    settings = Settings(senders=[SenderSettings(address=SENDER)],
                        graph=_graph(sandbox, client_id=client_id, auth="secret",
                                     client_secret=secret))
    before = _token_requests(sandbox)
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(token_provider_for(settings)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in seen}) == 1
    # One msal application: the authority's OpenID configuration was fetched once, no token yet.
    assert _token_requests(sandbox) == before + 1


def test_auth_check_warns_without_mail_read_and_fails_without_mail_send(
    sandbox: Any, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox.add_mailbox(SENDER)
    client_id, secret = _secret_app(sandbox, roles=("Mail.Send",))
    _write_config(tmp_path / "comms.toml", _graph(sandbox, client_id=client_id, auth="secret"),
                  (SENDER,))
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET", secret)
    result = cli("auth", "check")
    assert result.exit_code == 0, result.output
    assert (
        "  warning:     no Mail.Read: ambiguous sends cannot be looked up in Sent Items and wait "
        "for an operator; grant Mail.Read on the sender mailboxes, or set [graph] reconcile = "
        "false"
    ) in result.stdout.splitlines()

    sandbox.register_app(client_id, roles=("Mail.Read",))
    forget_token_providers()  # a new process would get a token with the new roles
    result = cli("auth", "check")
    assert result.exit_code == 1
    assert "  permissions: Mail.Read" in result.stdout.splitlines()
    assert "warning" not in result.stdout
    assert result.stderr.splitlines() == [
        "Error: 1 problem found by `comms auth check`:",
        "  - the token carries no Mail.Send permission: grant Mail.Send to the app registration "
        "(application permission with admin consent for app-only auth)",
    ]


def test_delegated_user_cannot_silently_send_from_another_mailbox(
    sandbox: Any, tmp_path: Path
) -> None:
    sandbox.add_mailbox(USER)
    graph = _delegated(sandbox, tmp_path)
    provider = new_token_provider(graph)
    assert isinstance(provider, DelegatedTokenProvider)
    provider.login(lambda flow: sandbox.approve_device_code(flow["user_code"], USER))
    email = OutgoingEmail(send_id=f"s-{uuid.uuid4().hex}", sender=SENDER,
                          to=(Address("ada@contoso.example"),), subject="Hi", html="<p>Hi</p>",
                          text="Hi")
    result = GraphTransport(Settings(graph=graph), token_provider=provider).send(email)
    assert (result.outcome, result.status, result.error_code) == (
        Outcome.FAILED, 403, "ErrorAccessDenied"
    )
    assert result.message.startswith(f"the signed-in user may not send as {SENDER} (403 ")
    assert result.message.endswith(
        "sign in as that mailbox with `comms auth login`, or give the user Send As rights on it "
        "and the app the delegated Mail.Send.Shared permission"
    )
    assert sandbox.sent() == []


def test_sender_without_an_exchange_mailbox(sandbox: Any, tmp_path: Path) -> None:
    # Signing in creates a directory user; only add_mailbox gives it an Exchange mailbox.
    no_mailbox = "contractor@fabrikam.example"
    provider = new_token_provider(_delegated(sandbox, tmp_path))
    assert isinstance(provider, DelegatedTokenProvider)
    provider.login(lambda flow: sandbox.approve_device_code(flow["user_code"], no_mailbox))
    client_id, secret = _secret_app(sandbox)
    settings = Settings(graph=_graph(sandbox, client_id=client_id, auth="secret",
                                     client_secret=secret))
    email = OutgoingEmail(send_id=f"s-{uuid.uuid4().hex}", sender=no_mailbox,
                          to=(Address("ada@contoso.example"),), subject="Hi", html="<p>Hi</p>",
                          text="Hi")
    result = GraphTransport(settings).send(email)
    assert (result.outcome, result.status, result.error_code) == (
        Outcome.FAILED, 404, "MailboxNotEnabledForRESTAPI"
    )
    assert result.message.startswith(
        f"mailbox {no_mailbox} is not on Exchange Online or has no Exchange licence (404 "
    )
    assert result.message.endswith("use a licensed Exchange Online mailbox in [[senders]]")


def test_certificate_auth_from_the_environment_sends(
    sandbox: Any, sandbox_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comms.config import load_settings

    env = sandbox_app.certificate_env()
    settings = load_settings(env=env)
    assert settings.graph.auth == "certificate"
    email = OutgoingEmail(send_id=f"s-{uuid.uuid4().hex}", sender=SENDER,
                          to=(Address("ada@contoso.example"),), subject="Hi", html="<p>Hi</p>",
                          text="Hi")
    transport = GraphTransport(settings)
    assert transport.send(email).outcome is Outcome.SENT
    assert token_claims(transport.tokens.token())["appidacr"] == "2"  # certificate credential


def test_a_token_request_that_times_out_once_is_asked_again(sandbox: Any) -> None:
    """An authority slow for a moment does not stop a worker: the token request (idempotent)
    is asked again; one that stays silent is reported naming the authority."""
    client_id, secret = _secret_app(sandbox)
    graph = _graph(sandbox, client_id=client_id, auth="secret", client_secret=secret,
                   timeout_seconds=0.5)
    provider = new_token_provider(graph)  # discovery, before any stall
    before = sandbox.stats()["token_requests"]
    sandbox.set_faults(token_stalls=1, token_stall=1.5)
    assert provider.token()
    assert sandbox.stats()["token_requests"] - before == 2  # the stalled one, then a good one
    other_id, other_secret = _secret_app(sandbox)
    silent = new_token_provider(_graph(sandbox, client_id=other_id, auth="secret",
                                       client_secret=other_secret, timeout_seconds=0.5))
    sandbox.set_faults(token_stalls=3, token_stall=1.5)
    with pytest.raises(AuthError, match=r"did not answer within 0\.5 s"):
        silent.token()
    assert sandbox.faults.token_stalls == 0  # all three attempts were made
