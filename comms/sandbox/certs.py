"""Certificates for the sandbox: its throwaway TLS CA and server certificate, and client
certificates for app registrations (certificate credentials).

The TLS material is kept in ``state_dir/tls`` and reused on the next start, so a client that
was told to trust ``ca.pem`` keeps trusting a restarted sandbox. Nothing is installed
system-wide: clients trust the CA explicitly (``verify=ca_file``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

SERVER_IDENTITIES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx


def tls_files(state_dir: Path) -> TlsFiles:
    """The CA and server certificate in ``state_dir/tls``, created on first use."""
    folder = state_dir / "tls"
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server-key.pem")
    if all(p.exists() for p in (files.ca_file, files.cert_file, files.key_file)):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    ca_pem, cert_pem, key_pem = _tls_material()
    _write_private(files.key_file, key_pem)
    files.cert_file.write_bytes(cert_pem)
    files.ca_file.write_bytes(ca_pem)
    return files


_TLS_CACHE: list[tuple[bytes, bytes, bytes]] = []
_TLS_LOCK = threading.Lock()


def _tls_material() -> tuple[bytes, bytes, bytes]:
    """(CA PEM, server chain PEM, server key PEM), made once per process: tests start many
    sandboxes, and a throwaway loopback CA need not differ between them."""
    with _TLS_LOCK:
        if not _TLS_CACHE:
            ca = trustme.CA(organization_name="comms sandbox")
            leaf = ca.issue_cert(*SERVER_IDENTITIES, common_name="comms sandbox")
            chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
            _TLS_CACHE.append((ca.cert_pem.bytes(), chain, leaf.private_key_pem.bytes()))
        return _TLS_CACHE[0]


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_certificate(common_name: str = "comms-test") -> tuple[bytes, bytes, str]:
    """A self-signed RSA certificate as an app registration would hold it.

    Returns ``(cert_pem, key_pem, sha1_thumbprint_hex)``; the thumbprint is upper-case hex as
    the Azure portal shows it (msal accepts either case).
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem, cert.fingerprint(hashes.SHA1()).hex().upper()


@dataclass(frozen=True)
class ClientCertificate:
    """A certificate registered on an app: looked up by the assertion's x5t / x5t#S256."""

    x5t: str  # base64url of the SHA-1 thumbprint (JWT header form)
    x5t_s256: str  # base64url of the SHA-256 thumbprint
    sha1_hex: str
    public_key: PublicKeyTypes
    not_after: dt.datetime


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def load_client_certificate(cert_pem: bytes) -> ClientCertificate:
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    sha1 = hashlib.sha1(der).digest()
    sha256 = hashlib.sha256(der).digest()
    return ClientCertificate(
        x5t=_b64url(sha1),
        x5t_s256=_b64url(sha256),
        sha1_hex=sha1.hex().upper(),
        public_key=cert.public_key(),
        not_after=cert.not_valid_after_utc,
    )
