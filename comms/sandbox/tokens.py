"""Tokens of the sandbox's identity platform: signing, issuing, verifying.

Access tokens are RS256 JWTs signed by the sandbox's own key (published at the JWKS endpoint),
shaped like Microsoft Graph's v1 access tokens: ``tid``, ``appid``, ``roles`` (app-only) or
``scp`` (delegated) plus ``upn``, ``exp = now + token_lifetime``. Refresh tokens are JWTs too
(signed, self-contained), so they survive a restart of a sandbox that reuses its state dir.
Client assertions (certificate credentials) are verified against the registered certificate's
public key, found by the ``x5t`` (SHA-1) or ``x5t#S256`` header, as Microsoft Entra ID does.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from comms.sandbox.certs import ClientCertificate

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_RESOURCE = "https://graph.microsoft.com"
# Graph in each national cloud; a token for any of them is accepted (national-cloud configs).
KNOWN_GRAPH_RESOURCES = (
    GRAPH_RESOURCE,
    "https://graph.microsoft.us",
    "https://dod-graph.microsoft.us",
    "https://microsoftgraph.chinacloudapi.cn",
)
PARTNER_CENTER_RESOURCE = "https://api.partnercenter.microsoft.com"
OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
REFRESH_AUDIENCE = "urn:comms-sandbox:refresh-token"
# Microsoft Entra ID tolerates this much clock skew on client assertions.
CLOCK_SKEW = 300.0


class OAuthError(Exception):
    """An error answer of the token or device-code endpoint, AADSTS style."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(f"AADSTS{code}: {description}")
        self.status = status
        self.error = error
        self.code = code
        self.description = description

    def body(self) -> dict[str, Any]:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": self.error,
            "error_description": (
                f"AADSTS{self.code}: {self.description} Trace ID: {trace} "
                f"Correlation ID: {correlation} Timestamp: {stamp}"
            ),
            "error_codes": [self.code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"https://login.microsoftonline.com/error?code={self.code}",
        }


class InvalidToken(Exception):
    """A bearer token Graph refuses (401 InvalidAuthenticationToken); the message is Graph's."""


@dataclass(frozen=True)
class Principal:
    """Who a valid access token speaks for."""

    app_id: str
    tenant_id: str
    roles: frozenset[str]
    scopes: frozenset[str]
    user: str | None  # signed-in user (delegated tokens)
    token_id: str

    @property
    def delegated(self) -> bool:
        return self.user is not None


@dataclass
class DeviceCode:
    device_code: str
    user_code: str
    client_id: str
    scopes: list[str]
    expires_at: float
    approved_user: str | None = None
    redeemed: bool = False


@dataclass
class TokenService:
    """Signs and checks every token; remembers issued token ids so they can be revoked."""

    state_dir: Path
    tenant_id: str
    issuer: str
    token_lifetime: float
    key: rsa.RSAPrivateKey = field(init=False)
    kid: str = field(init=False)
    _issued: set[str] = field(default_factory=set, init=False)
    _revoked: set[str] = field(default_factory=set, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.key = _load_or_create_key(self.state_dir / "signing-key.pem")
        public_der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = _b64url(hashlib.sha256(public_der).digest()[:15])

    # -- publishing ---------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "alg": "RS256",
                    "kid": self.kid,
                    "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
                    "e": _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
                    "issuer": self.issuer,
                }
            ]
        }

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    # -- issuing ------------------------------------------------------------------------

    def access_token(
        self,
        *,
        audience: str,
        app_id: str,
        app_name: str,
        roles: list[str] | None = None,
        scopes: list[str] | None = None,
        user: str | None = None,
        user_oid: str | None = None,
        app_auth: str = "1",
        tenant_id: str | None = None,
    ) -> str:
        """An access token; ``tenant_id`` names a customer tenant (default: the partner's)."""
        tid = tenant_id or self.tenant_id
        now = time.time()
        uti = _b64url(os.urandom(16))
        with self._lock:
            self._issued.add(uti)
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{tid}/",
            "iat": int(now),
            "nbf": int(now),
            "exp": now + self.token_lifetime,
            "appid": app_id,
            "app_displayname": app_name,
            "appidacr": app_auth,
            "idp": f"https://sts.windows.net/{tid}/",
            "tid": tid,
            "uti": uti,
            "ver": "1.0",
        }
        if user is None:
            sp_oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{app_id}"))
            claims.update(idtyp="app", oid=sp_oid, sub=sp_oid, roles=sorted(roles or []))
        else:
            claims.update(
                idtyp="user",
                oid=user_oid,
                sub=user_oid,
                upn=user,
                unique_name=user,
                name=user.partition("@")[0],
                amr=["pwd"],
                scp=" ".join(scopes or []),
            )
        return self._sign(claims)

    def id_token(self, *, client_id: str, user: str, user_oid: str, name: str) -> str:
        now = int(time.time())
        return self._sign(
            {
                "aud": client_id,
                "iss": self.issuer,
                "iat": now,
                "nbf": now,
                "exp": now + 3600,
                "name": name,
                "oid": user_oid,
                "preferred_username": user,
                "sub": _b64url(hashlib.sha256(f"{user_oid}:{client_id}".encode()).digest()),
                "tid": self.tenant_id,
                "ver": "2.0",
            }
        )

    def client_info(self, user_oid: str) -> str:
        raw = json.dumps({"uid": user_oid, "utid": self.tenant_id}).encode()
        return _b64url(raw)

    def refresh_token(self, *, client_id: str, user: str, scopes: list[str]) -> str:
        now = int(time.time())
        return self._sign(
            {
                "aud": REFRESH_AUDIENCE,
                "iss": self.issuer,
                "iat": now,
                "exp": now + 90 * 86400,
                "cid": client_id,
                "upn": user,
                "scp": scopes,
                "jti": str(uuid.uuid4()),
            }
        )

    def read_refresh_token(self, token: str, client_id: str) -> tuple[str, list[str]]:
        """The user and scopes a refresh token grants, or ``OAuthError`` invalid_grant."""
        try:
            claims = jwt.decode(
                token, self.key.public_key(), algorithms=["RS256"], audience=REFRESH_AUDIENCE
            )
        except jwt.ExpiredSignatureError as exc:
            raise OAuthError(
                400, "invalid_grant", 700082,
                "The refresh token has expired due to inactivity.",
            ) from exc
        except jwt.PyJWTError as exc:
            raise OAuthError(
                400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid."
            ) from exc
        if claims.get("cid") != client_id:
            raise OAuthError(
                400, "invalid_grant", 700005,
                "Provided Authorization Code is intended to use against other tenant or "
                "application, thus rejected.",
            )
        return str(claims["upn"]), [str(s) for s in claims.get("scp", [])]

    # -- checking -----------------------------------------------------------------------

    def revoke_all(self) -> None:
        with self._lock:
            self._revoked |= self._issued
            self._issued = set()

    def verify_access_token(
        self, token: str, audiences: list[str], tenants: frozenset[str] = frozenset()
    ) -> Principal:
        """The principal of a valid token issued in the partner tenant or one of ``tenants``."""
        if not token:
            raise InvalidToken("Access token is empty.")
        if token.count(".") != 2:
            raise InvalidToken(
                "IDX14100: JWT is not well formed, there are no dots (.). The token needs to "
                "be in JWS or JWE Compact Serialization Format."
            )
        try:
            claims = jwt.decode(
                token,
                self.key.public_key(),
                algorithms=["RS256"],
                audience=audiences,
                options={"require": ["exp", "iat", "tid"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("Lifetime validation failed, the token is expired.") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("Access token validation failure. Invalid audience.") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("Access token validation failure. Invalid signature.") from exc
        if claims.get("tid") != self.tenant_id and str(claims.get("tid")) not in tenants:
            raise InvalidToken("Access token validation failure. Invalid issuer.")
        uti = str(claims.get("uti", ""))
        with self._lock:
            revoked = uti in self._revoked
        if revoked:
            raise InvalidToken(
                "Access token validation failure: the token has been revoked. Sign in again "
                "or get a new token."
            )
        roles = frozenset(str(r) for r in claims.get("roles", []))
        scopes = frozenset(str(claims.get("scp", "")).split())
        user = claims.get("upn") if claims.get("idtyp") == "user" else None
        return Principal(
            app_id=str(claims.get("appid", "")),
            tenant_id=str(claims["tid"]),
            roles=roles,
            scopes=scopes,
            user=str(user).lower() if user else None,
            token_id=uti,
        )

    def verify_client_assertion(
        self,
        assertion: str,
        *,
        client_id: str,
        certificates: list[ClientCertificate],
        audiences: list[str],
    ) -> None:
        """Check a certificate credential (RFC 7523 client assertion) as Entra ID does."""
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise OAuthError(
                400, "invalid_client", 50027,
                "JWT token is invalid or malformed.",
            ) from exc
        # msal pads its base64url thumbprints; the JWS spec does not. Accept both.
        x5t = str(header.get("x5t") or "").rstrip("=")
        x5t_s256 = str(header.get("x5t#S256") or "").rstrip("=")
        cert = next(
            (
                c
                for c in certificates
                if (x5t_s256 and c.x5t_s256 == x5t_s256) or (x5t and c.x5t == x5t)
            ),
            None,
        )
        if cert is None:
            shown = _thumb_hex(x5t) if x5t else (x5t_s256 or "(none)")
            raise OAuthError(
                401, "invalid_client", 700027,
                "The certificate with identifier used to sign the client assertion is not "
                f"registered on application. [Reason - The key was not found., Thumbprint of "
                f"key used by client: '{shown}'. Please visit the Azure Portal, Graph Explorer "
                f"or directly use MS Graph to see configured keys for app Id '{client_id}'.]",
            )
        if cert.not_after < dt.datetime.now(dt.UTC):
            raise OAuthError(
                401, "invalid_client", 700027,
                f"Client assertion contains an invalid signature. [Reason - The key used is "
                f"expired., Thumbprint of key used by client: '{cert.sha1_hex}']",
            )
        alg = header.get("alg")
        if alg not in ("RS256", "PS256"):
            raise OAuthError(
                401, "invalid_client", 5002738,
                f"Invalid JWT token. '{alg}' is not a supported signature algorithm.",
            )
        try:
            claims = jwt.decode(
                assertion,
                cert.public_key,  # type: ignore[arg-type]
                algorithms=[alg],
                options={"verify_aud": False, "verify_exp": False, "verify_iat": False,
                         "verify_nbf": False},
            )
        except jwt.PyJWTError as exc:
            raise OAuthError(
                401, "invalid_client", 700027,
                "Client assertion failed signature validation. [Reason - The provided "
                f"signature value did not match the expected signature value., Thumbprint of "
                f"key used by client: '{cert.sha1_hex}']",
            ) from exc
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if not any(a in audiences for a in auds):
            raise OAuthError(
                401, "invalid_client", 700212,
                f"No matching federated identity record found for presented assertion "
                f"audience '{aud}'. The audience must be the token endpoint "
                f"'{audiences[0]}'.",
            )
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise OAuthError(
                401, "invalid_client", 700023,
                "Client assertion audience claim does not match Realm issuer: the 'iss' and "
                f"'sub' claims must both be the application id '{client_id}'.",
            )
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float) or exp < now:
            raise OAuthError(
                401, "invalid_client", 700024,
                "Client assertion is not within its valid time range (it has expired or "
                "carries no 'exp').",
            )
        if isinstance(nbf, int | float) and nbf > now + CLOCK_SKEW:
            raise OAuthError(
                401, "invalid_client", 700024,
                "Client assertion is not within its valid time range (not yet valid).",
            )


def _thumb_hex(x5t: str) -> str:
    try:
        return base64.urlsafe_b64decode(x5t + "=" * (-len(x5t) % 4)).hex().upper()
    except ValueError:
        return x5t


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


_KEY_CACHE: list[bytes] = []
_KEY_LOCK = threading.Lock()


def _new_key_pem() -> bytes:
    # One signing key per process is enough for throwaway sandboxes; RSA generation is the
    # slowest part of starting one, and tests start many.
    with _KEY_LOCK:
        if not _KEY_CACHE:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _KEY_CACHE.append(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return _KEY_CACHE[0]


def _load_or_create_key(path: Path) -> rsa.RSAPrivateKey:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(_new_key_pem())
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} does not hold an RSA private key; delete it to get a new one")
    return key
