"""msal's client credential for app-only sign-in: the client secret, or the certificate
(``[graph] certificate_file``) and its private key (``COMMS_GRAPH_PRIVATE_KEY_FILE``), checked
to belong together so a mismatch is named here rather than as an opaque AADSTS700027."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from comms.config import GraphSettings
from comms.errors import AuthError


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthError(f"cannot read {setting} {path}: {exc.strerror}") from exc


def certificate_credential(graph: GraphSettings) -> dict[str, str]:
    """msal's certificate credential: the private key PEM and the certificate's SHA-1 thumbprint.

    Checks that the key belongs to the certificate, so a mismatch is named here rather than as
    an opaque AADSTS700027 from the authority.
    """
    credential, _ = _certificate(graph)
    return credential


def _certificate(graph: GraphSettings) -> tuple[dict[str, str], Any]:
    """``certificate_credential`` and the private key it holds, already loaded."""
    if not graph.certificate_file:
        raise AuthError(
            "[graph] auth is 'certificate' but [graph] certificate_file is empty: set it to the "
            "public certificate (PEM) uploaded to the app registration"
        )
    if not graph.private_key_file:
        raise AuthError(
            "[graph] auth is 'certificate' but COMMS_GRAPH_PRIVATE_KEY_FILE is not set: point it "
            "at the certificate's private key (PEM)"
        )
    cert_pem = _read(graph.certificate_file, "[graph] certificate_file")
    key_pem = _read(graph.private_key_file, "COMMS_GRAPH_PRIVATE_KEY_FILE")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise AuthError(
            f"[graph] certificate_file {graph.certificate_file} is not a PEM certificate"
        ) from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise AuthError(
            "the private key in COMMS_GRAPH_PRIVATE_KEY_FILE is encrypted: comms needs an "
            "unencrypted PEM key in a file only you can read (openssl pkey -in KEY -out NEW)"
        ) from exc
    except ValueError as exc:
        raise AuthError(
            f"COMMS_GRAPH_PRIVATE_KEY_FILE {graph.private_key_file} is not a PEM private key"
        ) from exc
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise AuthError(
            "the private key in COMMS_GRAPH_PRIVATE_KEY_FILE does not belong to the certificate "
            f"in [graph] certificate_file {graph.certificate_file}"
        )
    return {
        "private_key": key_pem.decode("ascii"),
        "thumbprint": cert.fingerprint(hashes.SHA1()).hex().upper(),  # x5t is SHA-1 by definition
    }, key


def app_credential(graph: GraphSettings, *, loaded_key: bool = False) -> str | dict[str, Any]:
    """msal's client credential for ``[graph] auth`` (``secret`` or ``certificate``).

    ``loaded_key``: the certificate's private key as a loaded key object instead of PEM text,
    for callers that build many msal applications (stage sync: one per customer tenant). msal
    hands the key to PyJWT to sign each application's client assertion, and PyJWT parses and
    validates PEM text again every time (about 50 ms of CPU, as much as loading it here);
    msal's own encrypted-key path hands PyJWT a loaded key the same way.
    """
    if graph.auth == "certificate":
        credential, key = _certificate(graph)
        return {**credential, "private_key": key} if loaded_key else credential
    if graph.auth == "secret":
        if not graph.client_secret:
            raise AuthError(
                "[graph] auth is 'secret' but COMMS_GRAPH_CLIENT_SECRET (or "
                "COMMS_GRAPH_CLIENT_SECRET_FILE) is not set"
            )
        return graph.client_secret
    raise AuthError(f"[graph] auth {graph.auth!r} is not an app-only method")
