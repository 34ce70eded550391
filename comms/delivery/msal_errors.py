"""Entra ID sign-in failures translated into ``AuthError`` messages that name the fix.

msal reports failures as result dicts (AADSTS codes) or raises requests/ValueError exceptions;
the token providers in ``comms.delivery.auth`` route both through here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests

from comms.config import GraphSettings
from comms.delivery.failures import certificate_refused
from comms.errors import AuthError, CredentialRejected

# AADSTS codes worth their own fix; the rest are shown with the authority's own text.
_AADSTS_FIXES: dict[int, str] = {
    7000215: "the client secret is wrong: check COMMS_GRAPH_CLIENT_SECRET "
    "(the secret's value, not its id)",
    7000222: "the client secret has expired: create a new one in the app registration and set "
    "COMMS_GRAPH_CLIENT_SECRET",
    700016: "no application {client_id} in tenant {tenant}: check [graph] client_id and "
    "[graph] tenant_id",
    90002: "tenant {tenant} does not exist: check [graph] tenant_id",
    900023: "tenant {tenant} is not a valid tenant id: check [graph] tenant_id",
    700027: "the client assertion was refused: upload the certificate in [graph] "
    "certificate_file to the app registration and check that COMMS_GRAPH_PRIVATE_KEY_FILE "
    "is its key",
    700024: "the client assertion is outside its valid time range: check this machine's clock",
    7000218: "the app registration expects a credential comms did not send: set [graph] auth "
    "to certificate or secret and provide it",
    65001: "the app has no admin consent: grant admin consent for its API permissions",
    7000112: "application {client_id} is disabled in tenant {tenant}",
    500011: "the resource {resource} is not known to the tenant: check [graph] base_url",
    70011: "the requested scope is not valid for {resource}: check [graph] base_url",
    700082: "the sign-in has expired: run `comms auth login` again",
    50173: "the sign-in is no longer valid: run `comms auth login` again",
    70008: "the sign-in is no longer valid: run `comms auth login` again",
    70020: "the device code expired before sign-in completed: run `comms auth login` again",
    70000: "the sign-in was refused: run `comms auth login` again",
}
# The client secret wrong or expired, the client assertion refused: the app's own credential.
_CREDENTIAL = frozenset({7000215, 7000222, 700027})
_AADSTS = re.compile(r"AADSTS(\d+)")
_AADSTS_PREFIX = re.compile(r"^AADSTS\d+:\s*")


def error_from_result(
    result: Mapping[str, Any], graph: GraphSettings, doing: str, *, resource: str
) -> AuthError:
    """The AuthError for a failed msal result: a known AADSTS code gets its own fix."""
    codes: list[int] = [int(c) for c in result.get("error_codes") or [] if str(c).isdigit()]
    description = str(result.get("error_description") or "")
    codes += [int(c) for c in _AADSTS.findall(description)]
    error = str(result.get("error") or "unknown_error")
    # The authority's text, without its own code prefix and the trace/correlation ids.
    first_line = description.splitlines()[0] if description else error
    first_line = _AADSTS_PREFIX.sub("", first_line).split(" Trace ID:")[0].strip()
    # The app's own credential refused: the same in every tenant (``CredentialRejected``).
    own = error == "invalid_client" or bool(set(codes) & _CREDENTIAL)
    kind = CredentialRejected if own else AuthError
    for code in codes:
        fix = _AADSTS_FIXES.get(code)
        if fix:
            text = fix.format(
                client_id=graph.client_id, tenant=graph.tenant_id, resource=resource
            )
            return kind(f"{doing} failed: {text} (AADSTS{code}: {first_line})")
    if error == "invalid_client":
        return CredentialRejected(
            f"{doing} failed: the authority refused the app's credential ({first_line}); check "
            "[graph] client_id and the certificate/secret"
        )
    if error in ("expired_token", "authorization_declined", "invalid_grant"):
        return AuthError(f"{doing} failed ({error}: {first_line}): run `comms auth login` again")
    return AuthError(f"{doing} failed ({error}: {first_line})")


def error_from_exception(exc: Exception, graph: GraphSettings, doing: str) -> AuthError:
    host = urlsplit(graph.authority_host).netloc
    if isinstance(exc, requests.exceptions.SSLError) and certificate_refused(exc):
        return AuthError(
            f"{doing} failed: the TLS certificate of {host} is not trusted ({exc}); set [graph] "
            "ca_file to the CA bundle that signs it, or check [graph] authority_host"
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return AuthError(
            f"{doing} failed: the authority {host} did not answer within "
            f"{graph.timeout_seconds:g} s; check [graph] authority_host and the network"
        )
    if isinstance(exc, requests.exceptions.RequestException):
        return AuthError(
            f"{doing} failed: cannot reach the authority {host} ({type(exc).__name__}); check "
            "[graph] authority_host and the network"
        )
    if isinstance(exc, ValueError):
        # msal raises ValueError when the authority has no OpenID configuration for the tenant.
        return AuthError(
            f"{doing} failed: {graph.authority} is not a usable authority ({exc}); check "
            "[graph] authority_host and [graph] tenant_id"
        )
    return AuthError(f"{doing} failed: {type(exc).__name__}: {exc}")


AUTHORITY_ATTEMPTS = 3  # a token request or discovery that times out or loses its connection


def call_msal(graph: GraphSettings, doing: str, call: Callable[[], Any]) -> Any:
    """Run an msal call; network and authority failures become an AuthError naming the fix.

    Discovery and token requests are idempotent, so one that times out or loses its connection
    is tried again (``AUTHORITY_ATTEMPTS`` in all, 0.5 s then 1 s apart): a worker must not
    stop because the authority was slow for a moment. A certificate that does not verify is not
    retried; a TLS stream that breaks otherwise is a lost connection."""
    for attempt in range(1, AUTHORITY_ATTEMPTS + 1):
        try:
            return call()
        except AuthError:
            raise
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
            if certificate_refused(exc) or attempt == AUTHORITY_ATTEMPTS:
                raise error_from_exception(exc, graph, doing) from exc
            time.sleep(0.5 * attempt)
        except (requests.exceptions.RequestException, ValueError, RuntimeError, OSError) as exc:
            raise error_from_exception(exc, graph, doing) from exc
    raise AssertionError("unreachable")  # the loop returns or raises
