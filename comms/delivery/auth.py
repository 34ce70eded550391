"""Tokens for Microsoft Graph, obtained with msal; msal and requests errors become ``AuthError``.

Three ways to sign in, chosen by ``[graph] auth``:

- ``certificate`` (preferred): app-only, a client assertion signed with the private key of the
  certificate uploaded to the app registration (``graph.certificate_file`` holds the public PEM,
  ``COMMS_GRAPH_PRIVATE_KEY_FILE`` points to the key).
- ``secret``: app-only with ``COMMS_GRAPH_CLIENT_SECRET``.
- ``delegated``: a user signs in once with the device code flow (``comms auth login``); the token
  cache (refresh token) is kept in a file only that user can read.

The app-only credential (secret, or certificate + key) is built in ``comms.delivery.credentials``.

msal serves tokens from its in-memory cache and asks the authority only when they expire, so one
msal application object is kept per process (``token_provider_for``). Every HTTP call (msal's
included) goes through ``make_session``, so the authority and Graph are trusted the same way.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import msal
import requests
from requests.adapters import HTTPAdapter

from comms.config import GraphSettings, Settings
from comms.delivery.credentials import app_credential
from comms.delivery.msal_errors import call_msal as _call_msal
from comms.delivery.msal_errors import error_from_result
from comms.errors import AuthError
from comms.fileio import write_atomic
from comms.paths import home_dir

# msal asks Microsoft's instance-discovery endpoint about any authority host it does not know;
# for these hosts (public and national clouds) that check is harmless, for any other host (a
# private emulator, the local sandbox) it would leave the machine, so it is turned off.
MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.microsoftonline.us",
        "login-us.microsoftonline.com",
        "login.usgovcloudapi.net",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.de",
    }
)

PUBLIC_GRAPH_RESOURCE = "https://graph.microsoft.com"
MICROSOFT_GRAPH_HOSTS = frozenset(
    {
        "graph.microsoft.com",
        "graph.microsoft.us",
        "dod-graph.microsoft.us",
        "microsoftgraph.chinacloudapi.cn",
        "graph.microsoft.de",
    }
)

# Delegated permissions asked for at sign-in (msal adds openid, profile and offline_access).
DELEGATED_PERMISSIONS = ("Mail.Send", "Mail.Read", "User.Read")

# A TCP connection that takes longer than this will not come; reads get graph.timeout_seconds.
MAX_CONNECT_TIMEOUT = 10.0


class TokenProvider(Protocol):
    """Gives a bearer token for Graph; raises ``AuthError`` when none can be had."""

    @property
    def delegated(self) -> bool:
        """True when tokens act for a signed-in user (send with ``/me``)."""
        ...

    def token(self) -> str:
        """A valid access token (from the cache when it still has one)."""
        ...

    def refresh(self, stale: str) -> str:
        """Forget ``stale`` (Graph answered 401 to it) and get a fresh token from the authority."""
        ...


class GraphSession(requests.Session):
    """A pooled session whose requests carry a (connect, read) timeout unless given one.

    msal calls ``post``/``get`` without a timeout; the default here keeps a silent authority from
    hanging a dispatcher. No retries are mounted: a POST to ``sendMail`` must go out exactly once
    per ``send()``.
    """

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self.default_timeout = timeout
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(method, url, *args, **kwargs)


def make_session(graph: GraphSettings) -> GraphSession:
    """The HTTP session for Graph and the authority: pooled, with timeouts and explicit trust."""
    connect = min(MAX_CONNECT_TIMEOUT, graph.timeout_seconds)
    session = GraphSession((connect, graph.timeout_seconds))
    if graph.ca_file:
        if not Path(graph.ca_file).is_file():
            raise AuthError(
                f"[graph] ca_file {graph.ca_file} does not exist: point it at a PEM CA bundle "
                "or leave it empty to use the system CAs"
            )
        # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment would otherwise win over
        # Session.verify. The configured CA is then the only trust source; proxy variables from
        # the environment are not read either, on purpose: trust here is explicit.
        session.trust_env = False
        session.verify = graph.ca_file
    return session


def graph_resource(graph: GraphSettings) -> str:
    """The Graph resource the token is for, from ``graph.base_url``.

    Microsoft's Graph hosts are their own resource (``https://graph.microsoft.us`` for US
    Government), so national clouds need no extra setting. Any other host is an emulator of
    Graph (the local sandbox) and stands in for the public cloud's ``graph.microsoft.com``.
    """
    parts = urlsplit(graph.base_url)
    if (parts.hostname or "").lower() in MICROSOFT_GRAPH_HOSTS:
        return f"{parts.scheme}://{parts.netloc}"
    return PUBLIC_GRAPH_RESOURCE


def authority_is_microsoft(graph: GraphSettings) -> bool:
    host = (urlsplit(graph.authority_host).hostname or "").lower()
    return host in MICROSOFT_AUTHORITY_HOSTS


def token_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT access token, decoded WITHOUT verifying it: for display only."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _error_from_result(result: Mapping[str, Any], graph: GraphSettings, doing: str) -> AuthError:
    return error_from_result(result, graph, doing, resource=graph_resource(graph))


# --- app-only ---------------------------------------------------------------------------------


class AppTokenProvider:
    """App-only tokens (client credentials) from one msal ConfidentialClientApplication."""

    delegated = False

    def __init__(
        self,
        graph: GraphSettings,
        session: requests.Session,
        *,
        resource: str | None = None,
        credential: str | dict[str, Any] | None = None,
    ) -> None:
        """``resource``: another API than Graph (e.g. Partner Center) for the same app.
        ``credential``: ``app_credential(graph)`` made once by a caller that builds many
        applications (default: made here)."""
        if credential is None:
            credential = app_credential(graph)
        self._graph = graph
        self._scopes = [f"{resource or graph_resource(graph)}/.default"]
        self._lock = threading.Lock()
        # Creating the app fetches the authority's OpenID configuration.
        self._app: Any = _call_msal(
            graph,
            "Connecting to the authority",
            lambda: msal.ConfidentialClientApplication(
                graph.client_id,
                authority=graph.authority,
                client_credential=credential,
                http_client=session,
                instance_discovery=None if authority_is_microsoft(graph) else False,
            ),
        )

    def token(self) -> str:
        result = _call_msal(
            self._graph,
            "Getting a token",
            lambda: self._app.acquire_token_for_client(self._scopes),
        )
        if not isinstance(result, dict) or "access_token" not in result:
            raise _error_from_result(result or {}, self._graph, "Getting a token")
        return str(result["access_token"])

    def refresh(self, stale: str) -> str:
        # acquire_token_for_client has no force_refresh: drop the refused token from msal's
        # cache, so the next call has to ask the authority.
        with self._lock:
            _forget_access_token(self._app, stale)
        return self.token()


def _forget_access_token(app: Any, stale: str) -> None:
    cache = app.token_cache
    kind = msal.TokenCache.CredentialType.ACCESS_TOKEN
    for entry in list(cache.search(kind)):
        if entry.get("secret") == stale:
            cache.remove_at(entry)


# --- delegated --------------------------------------------------------------------------------


def token_cache_path(graph: GraphSettings) -> Path:
    return Path(graph.token_cache_file) if graph.token_cache_file else home_dir() / (
        "token_cache.json"
    )


class DelegatedTokenProvider:
    """Tokens for a signed-in user: device code sign-in, refresh tokens in a 0600 cache file."""

    delegated = True

    def __init__(self, graph: GraphSettings, session: requests.Session) -> None:
        self._graph = graph
        self._resource = graph_resource(graph)
        self._scopes = [f"{self._resource}/{p}" for p in DELEGATED_PERMISSIONS]
        self._lock = threading.Lock()
        self.cache_path = token_cache_path(graph)
        self._cache = msal.SerializableTokenCache()
        if self.cache_path.exists():
            try:
                self._cache.deserialize(self.cache_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise AuthError(
                    f"the token cache {self.cache_path} cannot be read ({exc}); delete it and run "
                    "`comms auth login`"
                ) from exc
        self._app: Any = _call_msal(
            graph,
            "Connecting to the authority",
            lambda: msal.PublicClientApplication(
                graph.client_id,
                authority=graph.authority,
                token_cache=self._cache,
                http_client=session,
                instance_discovery=None if authority_is_microsoft(graph) else False,
            ),
        )

    def _save(self) -> None:
        if self._cache.has_state_changed:
            # Owner-only: the cache holds refresh tokens.
            write_atomic(self.cache_path, self._cache.serialize(), mode=0o600, make_parents=True)
            self._cache.has_state_changed = False

    def login(self, show: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Device code sign-in: ``show`` gets msal's flow (``message``, ``user_code``,
        ``verification_uri``) to tell the user; blocks until signed in; returns the token claims.
        """
        doing = "Signing in"
        flow = _call_msal(self._graph, doing, lambda: self._app.initiate_device_flow(self._scopes))
        if "user_code" not in flow:
            raise _error_from_result(flow, self._graph, doing)
        show(flow)
        result = _call_msal(
            self._graph, doing, lambda: self._app.acquire_token_by_device_flow(flow)
        )
        if "access_token" not in result:
            raise _error_from_result(result, self._graph, doing)
        with self._lock:
            self._save()
        return token_claims(str(result["access_token"]))

    def logout(self) -> bool:
        """Forget every signed-in account and delete the cache file; False if none was there."""
        with self._lock:
            existed = self.cache_path.exists()
            for account in self._app.get_accounts():
                self._app.remove_account(account)
            with contextlib.suppress(FileNotFoundError):
                self.cache_path.unlink()
            self._cache.has_state_changed = False
        return existed

    def token(self) -> str:
        doing = "Getting a token"
        with self._lock:
            accounts = self._app.get_accounts()
            if not accounts:
                raise AuthError(
                    f"nobody is signed in (no account in {self.cache_path}): run "
                    "`comms auth login`"
                )
            result = _call_msal(
                self._graph,
                doing,
                lambda: self._app.acquire_token_silent_with_error(self._scopes, accounts[0]),
            )
            if not result or "access_token" not in result:
                if not result:
                    raise AuthError(
                        f"{doing} failed: the sign-in in {self.cache_path} has expired: run "
                        "`comms auth login` again"
                    )
                raise _error_from_result(result, self._graph, doing)
            self._save()
            return str(result["access_token"])

    def refresh(self, stale: str) -> str:
        with self._lock:
            _forget_access_token(self._app, stale)
        return self.token()


# --- one provider per process -----------------------------------------------------------------

_providers: dict[tuple[str, ...], AppTokenProvider | DelegatedTokenProvider] = {}
_providers_lock = threading.Lock()


def _provider_key(graph: GraphSettings) -> tuple[str, ...]:
    secret = hashlib.sha256(graph.client_secret.encode()).hexdigest() if graph.client_secret else ""
    return (
        graph.auth,
        graph.authority,
        graph.client_id,
        graph.base_url,
        graph.ca_file,
        graph.certificate_file,
        graph.private_key_file,
        secret,
        str(token_cache_path(graph)) if graph.auth == "delegated" else "",
        repr(graph.timeout_seconds),
    )


def new_token_provider(
    graph: GraphSettings, session: requests.Session | None = None
) -> AppTokenProvider | DelegatedTokenProvider:
    """A fresh provider (its own msal application); most callers want ``token_provider_for``."""
    session = session or make_session(graph)
    if graph.auth == "delegated":
        return DelegatedTokenProvider(graph, session)
    return AppTokenProvider(graph, session)


def token_provider_for(settings: Settings) -> AppTokenProvider | DelegatedTokenProvider:
    """The process's token provider for these settings (one msal application per process)."""
    key = _provider_key(settings.graph)
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None:
            provider = new_token_provider(settings.graph)
            _providers[key] = provider
        return provider


def forget_token_providers() -> None:
    """Drop the per-process providers (after `comms auth logout`, and between tests)."""
    with _providers_lock:
        _providers.clear()
