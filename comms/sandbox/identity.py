"""The Microsoft identity platform (v2.0 endpoints) as the sandbox serves it.

- ``GET {authority}/v2.0/.well-known/openid-configuration`` (what msal reads with
  ``instance_discovery=False``) and ``{authority}/.well-known/openid-configuration`` (the same
  document, for ``oidc_authority`` clients), and the JWKS.
- ``POST {authority}/oauth2/v2.0/token``: ``client_credentials`` with ``client_secret``
  (form or HTTP Basic) or a certificate ``client_assertion``; the device-code grant; and
  ``refresh_token``. Errors are AADSTS-style JSON.
- ``POST {authority}/oauth2/v2.0/devicecode``, plus ``/devicelogin`` (a small HTML form where a
  person "signs in" as a sandbox user) for interactive use of ``comms sandbox``.

``authority`` is ``{base_url}/{tenant_id}``; ``organizations`` and ``common`` name the same
single tenant.
"""

from __future__ import annotations

import base64
import html
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, unquote

from comms.sandbox.core import Core
from comms.sandbox.state import App
from comms.sandbox.tokens import (
    ASSERTION_TYPE,
    GRAPH_APP_ID,
    GRAPH_RESOURCE,
    OIDC_SCOPES,
    PARTNER_CENTER_RESOURCE,
    DeviceCode,
    OAuthError,
)
from comms.sandbox.web import Request, Response, json_response

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ23456789"
DEFAULT_DELEGATED = ("User.Read",)
# Application permissions an admin of a customer tenant consents the partner's app to.
CUSTOMER_TENANT_ROLES = frozenset({"Organization.Read.All", "Directory.Read.All"})


def handle(core: Core, req: Request) -> Response | None:
    """Answer an identity request, or None when the path is not an identity endpoint."""
    segs = req.segments
    if segs and segs[0].lower() == "devicelogin":
        return _device_login(core, req)
    if len(segs) < 2:
        return None
    tenant, rest = segs[0], "/".join(s.lower() for s in segs[1:])
    if rest not in (
        "v2.0/.well-known/openid-configuration",
        ".well-known/openid-configuration",
        "discovery/v2.0/keys",
        "discovery/keys",
        "oauth2/v2.0/token",
        "oauth2/v2.0/devicecode",
        "oauth2/v2.0/authorize",
    ):
        return None
    core.state.count("token_requests")
    if not core.is_tenant(tenant):
        return json_response(
            400,
            OAuthError(
                400, "invalid_tenant", 90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant "
                "ID and are signing into the correct cloud.",
            ).body(),
        )
    if rest.endswith("openid-configuration"):
        return json_response(200, openid_configuration(core, tenant))
    if rest.endswith("keys"):
        return json_response(200, core.tokens.jwks())
    if rest == "oauth2/v2.0/authorize":
        return Response(
            400,
            b"The comms sandbox supports client credentials and the device code flow only; "
            b"interactive browser sign-in is not emulated.",
            content_type="text/plain; charset=utf-8",
        )
    if req.method != "POST":
        return json_response(
            405, OAuthError(405, "invalid_request", 900561,
                            "The endpoint only accepts POST requests.").body()
        )
    form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
    if rest == "oauth2/v2.0/token":
        stall = core.state.token_stall()
        if stall:
            time.sleep(stall)  # a slow authority: the client may give up before the answer
    try:
        if rest == "oauth2/v2.0/devicecode":
            return json_response(200, _device_code(core, form))
        return json_response(200, _token(core, req, form, tenant))
    except OAuthError as exc:
        return json_response(exc.status, exc.body())


def _customer_tenant(core: Core, tenant: str) -> str | None:
    """The customer tenant id an authority names, or None for the partner tenant (and aliases)."""
    low = tenant.lower()
    if low in (core.tenant_id.lower(), "organizations", "common"):
        return None
    return low


def openid_configuration(core: Core, tenant: str = "") -> dict[str, Any]:
    customer = _customer_tenant(core, tenant) if tenant else None
    auth = core.authority if customer is None else f"{core.base_url}/{customer}"
    issuer = core.issuer if customer is None else f"{auth}/v2.0"
    return {
        "token_endpoint": f"{auth}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post", "private_key_jwt", "client_secret_basic",
        ],
        "jwks_uri": f"{auth}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": issuer,
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": f"{core.graph_url}/oidc/userinfo",
        "authorization_endpoint": f"{auth}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{auth}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{auth}/oauth2/v2.0/logout",
        "claims_supported": [
            "sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce",
            "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email",
        ],
        "kerberos_endpoint": f"{auth}/kerberos",
        "tenant_region_scope": "EU",
        "cloud_instance_name": core.base_url.removeprefix("https://"),
        "cloud_graph_host_name": core.base_url.removeprefix("https://"),
        "msgraph_host": core.base_url.removeprefix("https://"),
        "rbac_url": core.base_url,
    }


# -- helpers -----------------------------------------------------------------------------


def _app(core: Core, client_id: str) -> App:
    app = core.state.apps.get(client_id)
    if app is None:
        raise OAuthError(
            400, "unauthorized_client", 700016,
            f"Application with identifier '{client_id}' was not found in the directory "
            f"'{core.tenant_id}'. This can happen if the application has not been installed "
            "by the administrator of the tenant or consented to by any user in the tenant. "
            "You may have sent your authentication request to the wrong tenant.",
        )
    return app


def _client_auth(
    core: Core, req: Request, form: dict[str, str], *, required: bool, tenant: str = ""
) -> str:
    """Authenticate a confidential client; return ``appidacr`` ("1" secret, "2" certificate,
    "0" public client)."""
    client_id = form.get("client_id", "")
    secret = form.get("client_secret")
    basic = req.header("authorization")
    if basic.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(basic[6:].strip()).decode("utf-8")
        except ValueError:
            decoded = ":"
        user, _, password = decoded.partition(":")
        client_id = client_id or unquote(user.replace("+", " "))
        secret = unquote(password.replace("+", " "))
    app = _app(core, client_id)
    assertion = form.get("client_assertion")
    if assertion:
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError(
                400, "invalid_request", 50027,
                f"client_assertion_type must be '{ASSERTION_TYPE}'.",
            )
        core.tokens.verify_client_assertion(
            assertion,
            client_id=client_id,
            certificates=app.certificates,
            audiences=core.token_endpoints(tenant or None),
        )
        return "2"
    if secret is not None:
        if any(secrets.compare_digest(secret, s) for s in app.expired):
            raise OAuthError(
                401, "invalid_client", 7000222,
                f"The provided client secret keys for app '{client_id}' are expired. Visit the "
                "Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, "
                "or consider using certificate credentials for added security: "
                "https://aka.ms/certCreds.",
            )
        if not any(secrets.compare_digest(secret, s) for s in app.secrets):
            raise OAuthError(
                401, "invalid_client", 7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request "
                "is the client secret value, not the client secret ID, for a secret added to "
                f"app '{client_id}'.",
            )
        return "1"
    if required:
        raise OAuthError(
            401, "invalid_client", 7000218,
            "The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'.",
        )
    return "0"


def _split_scopes(core: Core, raw: str) -> tuple[list[str], list[str]]:
    """(graph permission names, the scopes as requested) of a delegated request."""
    names: list[str] = []
    requested: list[str] = []
    resources = core.graph_resources()
    for scope in raw.split():
        if scope in OIDC_SCOPES:
            continue
        resource, sep, name = scope.rpartition("/")
        if sep and resource.rstrip("/") not in resources:
            raise OAuthError(
                400, "invalid_resource", 500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{core.tenant_id}.",
            )
        requested.append(scope)
        names.append(name)
    return names, requested


# -- grants ------------------------------------------------------------------------------


def _token(core: Core, req: Request, form: dict[str, str], tenant: str = "") -> dict[str, Any]:
    grant = form.get("grant_type", "")
    if grant == "client_credentials":
        return _client_credentials(core, req, form, tenant)
    if grant == DEVICE_GRANT:
        return _device_grant(core, req, form)
    if grant == "refresh_token":
        return _refresh(core, req, form)
    raise OAuthError(
        400, "unsupported_grant_type", 70003,
        f"The app requested an unsupported grant type '{grant}'.",
    )


def _client_credentials(
    core: Core, req: Request, form: dict[str, str], tenant: str = ""
) -> dict[str, Any]:
    app_auth = _client_auth(core, req, form, required=True, tenant=tenant)
    customer = _customer_tenant(core, tenant) if tenant else None
    app = _app(core, form.get("client_id") or _basic_client_id(req))
    scope = form.get("scope", "").strip()
    resource = scope[: -len("/.default")] if scope.endswith("/.default") else ""
    if not resource or " " in scope:
        raise OAuthError(
            400, "invalid_scope", 1002012,
            f"The provided value for scope {scope or '(none)'} is not valid. Client credential "
            "flows must have a scope value with /.default suffixed to the resource identifier "
            "(application ID URI).",
        )
    partner_center = resource.rstrip("/") == PARTNER_CENTER_RESOURCE and customer is None
    if resource.rstrip("/") not in core.graph_resources() and not partner_center:
        raise OAuthError(
            400, "invalid_resource", 500011,
            f"The resource principal named {resource} was not found in the tenant named "
            f"{customer or core.tenant_id}.",
        )
    audience = GRAPH_RESOURCE if resource == GRAPH_APP_ID else resource.rstrip("/")
    roles = sorted(app.roles)
    if customer is not None:
        # The multi-tenant app holds in a customer tenant only what an admin there consented
        # to; without consent the token carries no roles and Graph answers 403.
        consented = core.tenants.get(customer).consented
        roles = sorted(r for r in app.roles if r in CUSTOMER_TENANT_ROLES) if consented else []
    token = core.tokens.access_token(
        audience=audience, app_id=app.client_id, app_name=app.name,
        roles=roles, app_auth=app_auth, tenant_id=customer,
    )
    lifetime = int(core.tokens.token_lifetime)
    return {
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": token,
    }


def _basic_client_id(req: Request) -> str:
    basic = req.header("authorization")
    try:
        decoded = base64.b64decode(basic[6:].strip()).decode("utf-8")
    except ValueError:
        return ""
    return unquote(decoded.partition(":")[0])


def _delegated_response(
    core: Core, app: App, user: str, names: list[str], requested: list[str]
) -> dict[str, Any]:
    allowed = set(app.roles) | set(DEFAULT_DELEGATED)
    granted = sorted(allowed) if (not names or ".default" in names) else names
    missing = [n for n in granted if n not in allowed]
    if missing:
        raise OAuthError(
            400, "invalid_grant", 65001,
            f"The user or administrator has not consented to use the application with ID "
            f"'{app.client_id}' named '{app.name}' for {', '.join(missing)}. Send an "
            "interactive authorization request for this user and resource.",
        )
    account = core.state.add_user(user, mailbox=False)
    tokens = core.tokens
    access = tokens.access_token(
        audience=GRAPH_RESOURCE, app_id=app.client_id, app_name=app.name,
        scopes=granted, user=account.address, user_oid=account.oid, app_auth="0",
    )
    lifetime = int(tokens.token_lifetime)
    # Echo the scopes as requested so msal finds the token in its cache under them.
    scope_text = " ".join([*(requested or granted), "openid", "profile", "offline_access"])
    return {
        "token_type": "Bearer",
        "scope": scope_text,
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": access,
        "refresh_token": tokens.refresh_token(
            client_id=app.client_id, user=account.address, scopes=requested or granted
        ),
        "id_token": tokens.id_token(
            client_id=app.client_id, user=account.address, user_oid=account.oid,
            name=account.display_name,
        ),
        "client_info": tokens.client_info(account.oid),
    }


def _device_code(core: Core, form: dict[str, str]) -> dict[str, Any]:
    app = _app(core, form.get("client_id", ""))
    names, requested = _split_scopes(core, form.get("scope", ""))
    del names
    user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(9))
    device_code = secrets.token_urlsafe(48)
    expires_in = 900
    interval = 1 if core.state.time_scale < 1 else 5
    with core.devices_lock:
        core.devices[device_code] = DeviceCode(
            device_code=device_code,
            user_code=user_code,
            client_id=app.client_id,
            scopes=requested,
            expires_at=time.time() + expires_in,
        )
    uri = f"{core.base_url}/devicelogin"
    return {
        "user_code": user_code,
        "device_code": device_code,
        "verification_uri": uri,
        "expires_in": expires_in,
        "interval": interval,
        "message": (
            f"To sign in, use a web browser to open the page {uri} and enter the code "
            f"{user_code} to authenticate."
        ),
    }


def approve_device_code(core: Core, user_code: str, user: str) -> None:
    """Sign ``user`` in on the device flow with this code (what the person does in a browser)."""
    code = user_code.strip().upper().replace("-", "")
    with core.devices_lock:
        flow = next((d for d in core.devices.values() if d.user_code == code), None)
        if flow is None or flow.expires_at < time.time():
            raise KeyError(f"no pending device code {user_code!r} (expired or never issued)")
        flow.approved_user = user.strip().lower()


def _device_grant(core: Core, req: Request, form: dict[str, str]) -> dict[str, Any]:
    _client_auth(core, req, form, required=False)
    device_code = form.get("device_code", "")
    with core.devices_lock:
        flow = core.devices.get(device_code)
        if flow is None or flow.client_id != form.get("client_id"):
            raise OAuthError(
                400, "invalid_grant", 70000,
                "The provided value for the input parameter 'device_code' is not valid.",
            )
        if flow.expires_at < time.time():
            raise OAuthError(
                400, "expired_token", 70020,
                "The provided value for the input parameter 'device_code' is not valid. This "
                "device code has expired.",
            )
        if flow.redeemed:
            raise OAuthError(
                400, "invalid_grant", 54005, "OAuth2 Authorization code was already redeemed."
            )
        if flow.approved_user is None and core.auto_approve_device_codes:
            flow.approved_user = _first_mailbox(core)
        if flow.approved_user is None:
            raise OAuthError(
                400, "authorization_pending", 70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
            )
        flow.redeemed = True
        user, requested = flow.approved_user, flow.scopes
    app = _app(core, flow.client_id)
    names = [s.rpartition("/")[2] for s in requested]
    return _delegated_response(core, app, user, names, requested)


def _first_mailbox(core: Core) -> str | None:
    with core.state.lock:
        return next((u.address for u in core.state.users.values() if u.mailbox), None)


def _refresh(core: Core, req: Request, form: dict[str, str]) -> dict[str, Any]:
    _client_auth(core, req, form, required=False)
    app = _app(core, form.get("client_id", ""))
    user, granted = core.tokens.read_refresh_token(form.get("refresh_token", ""), app.client_id)
    names, requested = _split_scopes(core, form.get("scope", ""))
    if not requested:
        requested = granted
        names = [s.rpartition("/")[2] for s in granted]
    return _delegated_response(core, app, user, names, requested)


# -- the page a person uses --------------------------------------------------------------

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>comms sandbox sign-in</title>
</head><body style="font-family:sans-serif;max-width:32rem;margin:3rem auto">
<h1>comms sandbox: device sign-in</h1><p>{note}</p>
<form method="post" action="/devicelogin">
<p><label>Code <input name="user_code" value="{code}" required></label></p>
<p><label>Sign in as <input name="user" value="{user}" required></label></p>
<p><button type="submit">Sign in</button></p></form></body></html>"""


def _device_login(core: Core, req: Request) -> Response:
    user = _first_mailbox(core) or ""
    note = "Enter the code shown by comms and the mailbox to sign in as."
    code = ""
    if req.method == "POST":
        form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        code, user = form.get("user_code", ""), form.get("user", user)
        try:
            approve_device_code(core, code, user)
            note = f"Signed in as {user}. You can close this page and return to comms."
        except KeyError as exc:
            note = str(exc.args[0])
    page = _PAGE.format(note=html.escape(note), code=html.escape(code), user=html.escape(user))
    return Response(200, page.encode("utf-8"), content_type="text/html; charset=utf-8")
