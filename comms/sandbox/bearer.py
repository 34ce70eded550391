"""Checking the bearer token of a request, shared by the services that need one."""

from __future__ import annotations

import jwt

from comms.sandbox.core import Core
from comms.sandbox.tokens import InvalidToken, Principal
from comms.sandbox.web import Request


def principal(
    core: Core, req: Request, audiences: list[str], *, customer_tenants: bool = False
) -> Principal:
    """Who the request's token speaks for; ``InvalidToken`` (401) when it is refused.

    With ``customer_tenants`` a token issued in any customer tenant the sandbox knows is
    accepted too (the partner's multi-tenant app reading a customer's directory).
    """
    auth = req.header("authorization")
    scheme, _, token = auth.partition(" ")
    if auth and scheme.lower() != "bearer":
        raise InvalidToken("Access token validation failure: the scheme must be Bearer.")
    claimed = _claimed_tenant(token.strip()) if customer_tenants else ""
    tenants = frozenset({claimed}) if claimed and core.tenants.known(claimed) else frozenset()
    return core.tokens.verify_access_token(token.strip(), audiences, tenants)


def _claimed_tenant(token: str) -> str:
    """The unverified ``tid`` of a token, only to choose which tenants to accept."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return ""
    return str(claims.get("tid", "")).lower()
