"""A ready-to-use tenant on a sandbox: the sender mailboxes and a demo app registration whose
credentials live in the state dir, plus the ``COMMS_*`` environment that points comms at it.

Used by ``comms sandbox`` and ``comms demo``. Credentials are kept across restarts (same
files), so a shell that exported the environment keeps working after the sandbox restarts.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from comms.sandbox.server import Sandbox

DEMO_CLIENT_ID = "c0ffee00-5a4d-4b0c-9e55-000000c0ffee"
AUTH_KINDS = ("secret", "certificate", "delegated")


@dataclass(frozen=True)
class DemoApp:
    client_id: str
    secret_file: Path
    certificate_file: Path
    private_key_file: Path
    env: dict[str, str] = field(default_factory=dict)


def _private_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def prepare_demo(sb: Sandbox, senders: Sequence[str], *, auth: str = "secret") -> DemoApp:
    """Register ``senders`` as mailboxes and the demo app (secret and certificate), and return
    the environment for ``auth`` (``secret``, ``certificate`` or ``delegated``)."""
    if auth not in AUTH_KINDS:
        raise ValueError(f"auth must be one of {', '.join(AUTH_KINDS)}, got {auth!r}")
    for address in senders:
        sb.add_mailbox(address)
    folder = sb.state_dir / "demo-app"
    folder.mkdir(parents=True, exist_ok=True)
    secret_file = folder / "client-secret.txt"
    cert_file, key_file = folder / "app-cert.pem", folder / "app-key.pem"
    if not secret_file.exists():
        _private_file(secret_file, secrets.token_urlsafe(32).encode())
    if not (cert_file.exists() and key_file.exists()):
        cert_pem, key_pem, _thumb = sb.make_certificate("comms demo app")
        cert_file.write_bytes(cert_pem)
        _private_file(key_file, key_pem)
    sb.register_app(
        DEMO_CLIENT_ID,
        secret=secret_file.read_text().strip(),
        certificate_pem=cert_file.read_bytes(),
        name="comms demo",
    )
    env = {
        "COMMS_GRAPH_BASE_URL": sb.graph_url,
        "COMMS_GRAPH_AUTHORITY_HOST": sb.authority_host,
        "COMMS_GRAPH_CA_FILE": str(sb.ca_file),
        "COMMS_GRAPH_TENANT_ID": sb.tenant_id,
        "COMMS_GRAPH_CLIENT_ID": DEMO_CLIENT_ID,
        "COMMS_GRAPH_AUTH": auth,
    }
    if auth == "secret":
        env["COMMS_GRAPH_CLIENT_SECRET_FILE"] = str(secret_file)
    elif auth == "certificate":
        env["COMMS_GRAPH_CERTIFICATE_FILE"] = str(cert_file)
        env["COMMS_GRAPH_PRIVATE_KEY_FILE"] = str(key_file)
    if sb.time_scale != 1.0:
        env["COMMS_DELIVERY_TIME_SCALE"] = repr(sb.time_scale)
    return DemoApp(DEMO_CLIENT_ID, secret_file, cert_file, key_file, env)
