"""Fixtures that start the local Graph sandbox (a pytest plugin, registered by conftest.py).

- ``sandbox``: a started ``Sandbox`` in ``tmp_path/sandbox`` with the default sender mailbox,
  stopped after the test. Options via a marker, e.g.
  ``@pytest.mark.sandbox(time_scale=0.02, messages_per_minute=5)``; the default time scale is
  ``SANDBOX_TIME_SCALE`` (a "minute" of 3 s) so limit tests stay short.
- ``sandbox_app``: an app registered on it with a client secret and a client certificate
  (files in ``tmp_path/sandbox-app``), and the ``COMMS_*`` environment that points comms at it.
- ``sandbox_settings``: a ``Settings`` for it with secret auth; the same variables are exported
  (monkeypatch) so CLI commands and subprocesses use the sandbox too. Every configured sender
  mailbox is registered on the sandbox.
- ``sandbox_factory``: make more sandboxes (e.g. a second one), all stopped after the test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from comms.config import Settings, load_settings
from comms.sandbox import Sandbox

SANDBOX_TIME_SCALE = 0.05
DEFAULT_SENDER = "transition@fabrikam.example"
SANDBOX_CLIENT_ID = "c0a1b2c3-0000-4000-8000-00000000c0de"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sandbox(**options): keyword arguments for the `sandbox` fixture's Sandbox"
    )


@dataclass
class SandboxApp:
    """The app registered on the sandbox and the environment that points comms at it."""

    client_id: str
    secret: str
    certificate_file: Path
    private_key_file: Path
    thumbprint: str
    env: dict[str, str] = field(default_factory=dict)

    def certificate_env(self) -> dict[str, str]:
        """The environment for certificate auth instead of the secret."""
        env = {k: v for k, v in self.env.items() if k != "COMMS_GRAPH_CLIENT_SECRET"}
        env["COMMS_GRAPH_AUTH"] = "certificate"
        env["COMMS_GRAPH_PRIVATE_KEY_FILE"] = str(self.private_key_file)
        return env


@pytest.fixture
def sandbox_factory(tmp_path: Path) -> Iterator[Callable[..., Sandbox]]:
    started: list[Sandbox] = []

    def make(name: str = "sandbox", **options: Any) -> Sandbox:
        options.setdefault("time_scale", SANDBOX_TIME_SCALE)
        sb = Sandbox(tmp_path / name, **options)
        sb.start()
        started.append(sb)
        return sb

    yield make
    for sb in started:
        sb.stop()


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, sandbox_factory: Callable[..., Sandbox]) -> Sandbox:
    marker = request.node.get_closest_marker("sandbox")
    options = dict(marker.kwargs) if marker else {}
    sb = sandbox_factory(**options)
    sb.add_mailbox(DEFAULT_SENDER)
    return sb


@pytest.fixture
def sandbox_app(sandbox: Sandbox, tmp_path: Path) -> SandboxApp:
    folder = tmp_path / "sandbox-app"
    folder.mkdir()
    cert_pem, key_pem, thumbprint = sandbox.make_certificate("comms-tests")
    cert_file, key_file = folder / "app-cert.pem", folder / "app-key.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    key_file.chmod(0o600)
    secret = "sandbox-secret-" + os.urandom(8).hex()
    sandbox.register_app(SANDBOX_CLIENT_ID, secret=secret, certificate_pem=cert_pem)
    env = {
        "COMMS_GRAPH_BASE_URL": sandbox.graph_url,
        "COMMS_GRAPH_AUTHORITY_HOST": sandbox.authority_host,
        "COMMS_GRAPH_CA_FILE": str(sandbox.ca_file),
        "COMMS_GRAPH_TENANT_ID": sandbox.tenant_id,
        "COMMS_GRAPH_CLIENT_ID": SANDBOX_CLIENT_ID,
        "COMMS_GRAPH_AUTH": "secret",
        "COMMS_GRAPH_CLIENT_SECRET": secret,
        "COMMS_GRAPH_CERTIFICATE_FILE": str(cert_file),
        "COMMS_DELIVERY_TIME_SCALE": repr(sandbox.time_scale),
    }
    return SandboxApp(SANDBOX_CLIENT_ID, secret, cert_file, key_file, thumbprint, env)


@pytest.fixture
def sandbox_settings(
    sandbox: Sandbox, sandbox_app: SandboxApp, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    for name, value in sandbox_app.env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(env=dict(os.environ))
    for sender in settings.senders:
        sandbox.add_mailbox(sender.address)
    return settings
