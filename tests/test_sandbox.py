"""The sandbox must behave like Microsoft Graph and the identity platform, driven by the real
msal and requests over HTTPS (trusting only the sandbox's throwaway CA)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import msal
import pytest
import requests

from comms.config import Settings, load_settings
from comms.delivery.base import SEND_ID_HEADER, SEND_ID_PROPERTY_ID
from comms.sandbox import Faults, Sandbox
from comms.sandbox.state import retry_after_text

SENDER = "transition@fabrikam.example"
OTHER = "billing@fabrikam.example"
CLIENT_ID = "aaaaaaaa-0000-4000-8000-000000000001"
SECRET = "correct-horse-battery-staple"
GRAPH_SCOPE = ["https://graph.microsoft.com/.default"]


def new_session(sb: Sandbox) -> requests.Session:
    s = requests.Session()
    # These machines set REQUESTS_CA_BUNDLE, which wins over Session.verify unless trust_env
    # is off.
    s.trust_env = False
    s.verify = str(sb.ca_file)
    return s


@pytest.fixture
def sb(sandbox: Sandbox) -> Sandbox:
    sandbox.add_mailbox(OTHER)
    sandbox.register_app(CLIENT_ID, secret=SECRET)
    return sandbox


@pytest.fixture
def http(sb: Sandbox) -> Iterator[requests.Session]:
    s = new_session(sb)
    yield s
    s.close()


def confidential(sb: Sandbox, http: requests.Session, credential: Any,
                 client_id: str = CLIENT_ID) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id, authority=sb.authority, client_credential=credential,
        instance_discovery=False, http_client=http,
    )


def app_token(sb: Sandbox, http: requests.Session, client_id: str = CLIENT_ID,
              secret: str = SECRET) -> str:
    result = confidential(sb, http, secret, client_id).acquire_token_for_client(GRAPH_SCOPE)
    assert "access_token" in result, result
    return str(result["access_token"])


def claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def message(send_id: str = "S-1", **overrides: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "subject": "Your move to Fabrikam",
        "body": {"contentType": "HTML", "content": "<p>Hello <b>Contoso</b></p>"},
        "toRecipients": [{"emailAddress": {"address": "it@contoso.example", "name": "IT"}}],
        "ccRecipients": [{"emailAddress": {"address": "am@fabrikam.example"}}],
        "replyTo": [{"emailAddress": {"address": "transition@fabrikam.example"}}],
        "internetMessageHeaders": [{"name": SEND_ID_HEADER, "value": send_id}],
        "singleValueExtendedProperties": [{"id": SEND_ID_PROPERTY_ID, "value": send_id}],
    }
    msg.update(overrides)
    return msg


def send(http: requests.Session, sb: Sandbox, token: str, payload: Any = None,
         mailbox: str = SENDER, **kwargs: Any) -> requests.Response:
    if payload is None:
        payload = {"message": message(), "saveToSentItems": True}
    url = f"{sb.graph_url}/users/{quote(mailbox)}/sendMail"
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    if isinstance(payload, bytes):
        return http.post(url, data=payload, headers=headers, **kwargs)
    return http.post(url, json=payload, headers=headers, **kwargs)


def error_of(resp: requests.Response) -> tuple[int, str, str]:
    err = resp.json()["error"]
    return resp.status_code, err["code"], err["message"]


def send_id_filter(send_id: str) -> str:
    return (
        f"singleValueExtendedProperties/Any(ep: ep/id eq '{SEND_ID_PROPERTY_ID}' "
        f"and ep/value eq '{send_id}')"
    )


# -- identity: discovery, secrets, certificates ------------------------------------------


def test_discovery_documents_name_the_endpoints_msal_needs(sb: Sandbox,
                                                           http: requests.Session) -> None:
    for url in (f"{sb.authority}/v2.0/.well-known/openid-configuration",
                f"{sb.authority}/.well-known/openid-configuration"):
        doc = http.get(url).json()
        assert doc["issuer"] == f"{sb.authority}/v2.0"
        assert doc["token_endpoint"] == f"{sb.authority}/oauth2/v2.0/token"
        assert doc["authorization_endpoint"] == f"{sb.authority}/oauth2/v2.0/authorize"
        assert doc["device_authorization_endpoint"] == f"{sb.authority}/oauth2/v2.0/devicecode"
    keys = http.get(doc["jwks_uri"]).json()["keys"]
    assert keys[0]["kty"] == "RSA"
    bad = http.get(f"{sb.authority_host}/not-our-tenant/v2.0/.well-known/openid-configuration")
    assert bad.status_code == 400
    assert bad.json()["error_codes"] == [90002]


def test_secret_token_via_msal_is_a_signed_graph_app_token_served_from_cache_next(
    sb: Sandbox, http: requests.Session
) -> None:
    app = confidential(sb, http, SECRET)
    first = app.acquire_token_for_client(GRAPH_SCOPE)
    assert first["token_type"] == "Bearer"
    assert first["token_source"] == "identity_provider"
    # The signature checks out against the published key.
    key = http.get(f"{sb.authority}/discovery/v2.0/keys").json()["keys"][0]
    public = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(key))
    c = jwt.decode(first["access_token"], public, algorithms=["RS256"],  # type: ignore[arg-type]
                   audience="https://graph.microsoft.com")
    assert c["tid"] == sb.tenant_id
    assert c["appid"] == CLIENT_ID
    assert sorted(c["roles"]) == ["Mail.Read", "Mail.Send"]
    assert 3590 <= c["exp"] - c["iat"] <= 3601
    again = app.acquire_token_for_client(GRAPH_SCOPE)
    assert again["token_source"] == "cache"
    assert sb.stats()["token_requests"] == 3  # discovery, one token, the keys: no second token


def test_wrong_secret_is_refused_with_aadsts7000215(sb: Sandbox, http: requests.Session) -> None:
    result = confidential(sb, http, "not-the-secret").acquire_token_for_client(GRAPH_SCOPE)
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret provided")


def test_unknown_client_is_refused_with_aadsts700016(sb: Sandbox, http: requests.Session) -> None:
    result = confidential(sb, http, SECRET, "bbbbbbbb-0000-4000-8000-000000000009"
                          ).acquire_token_for_client(GRAPH_SCOPE)
    assert result["error"] == "unauthorized_client"
    assert result["error_codes"] == [700016]


def test_client_credentials_need_a_default_scope(sb: Sandbox, http: requests.Session) -> None:
    result = confidential(sb, http, SECRET).acquire_token_for_client(
        ["https://graph.microsoft.com/Mail.Send"])
    assert result["error"] == "invalid_scope"
    assert result["error_codes"] == [1002012]


def test_certificate_assertion_via_msal_is_accepted(sb: Sandbox, http: requests.Session) -> None:
    cert, key, thumbprint = sb.make_certificate("comms-cert")
    sb.register_app(CLIENT_ID, certificate_pem=cert)
    result = confidential(sb, http, {"private_key": key.decode(), "thumbprint": thumbprint}
                          ).acquire_token_for_client(GRAPH_SCOPE)
    assert "access_token" in result, result
    assert claims(result["access_token"])["appidacr"] == "2"
    # msal's SHA-256 / PS256 variant (public_certificate given, no thumbprint) works too.
    http2 = new_session(sb)
    result = confidential(sb, http2, {"private_key": key.decode(),
                                      "public_certificate": cert.decode()}
                          ).acquire_token_for_client(GRAPH_SCOPE)
    http2.close()
    assert "access_token" in result, result


def test_certificate_assertion_signed_with_a_wrong_key_is_refused(
    sb: Sandbox, http: requests.Session
) -> None:
    cert, _key, thumbprint = sb.make_certificate("registered")
    _other_cert, other_key, _ = sb.make_certificate("stolen-thumbprint")
    sb.register_app(CLIENT_ID, certificate_pem=cert)
    result = confidential(sb, http, {"private_key": other_key.decode(), "thumbprint": thumbprint}
                          ).acquire_token_for_client(GRAPH_SCOPE)
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]
    assert "signature validation" in result["error_description"]


def test_certificate_not_registered_is_refused(sb: Sandbox, http: requests.Session) -> None:
    _cert, key, thumbprint = sb.make_certificate("never-uploaded")
    result = confidential(sb, http, {"private_key": key.decode(), "thumbprint": thumbprint}
                          ).acquire_token_for_client(GRAPH_SCOPE)
    assert result["error_codes"] == [700027]
    assert thumbprint in result["error_description"]


def _assertion(key: bytes, thumbprint: str, **claim_overrides: Any) -> str:
    import base64

    now = time.time()
    payload = {"aud": "", "iss": CLIENT_ID, "sub": CLIENT_ID, "exp": now + 600, "iat": now,
               "jti": str(now)}
    payload.update(claim_overrides)
    x5t = base64.urlsafe_b64encode(bytes.fromhex(thumbprint)).decode()
    return jwt.encode(payload, key, algorithm="RS256", headers={"x5t": x5t})


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"aud": "https://login.microsoftonline.com/other/oauth2/v2.0/token"}, 700212),
        ({"exp": time.time() - 10}, 700024),
        ({"iss": "someone-else"}, 700023),
    ],
)
def test_client_assertion_claims_are_checked(
    sb: Sandbox, http: requests.Session, overrides: dict[str, Any], code: int
) -> None:
    cert, key, thumbprint = sb.make_certificate()
    sb.register_app(CLIENT_ID, certificate_pem=cert)
    claims_ = {"aud": f"{sb.authority}/oauth2/v2.0/token", **overrides}
    resp = http.post(f"{sb.authority}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": CLIENT_ID,
        "scope": "https://graph.microsoft.com/.default",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": _assertion(key, thumbprint, **claims_),
    })
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_client"
    assert resp.json()["error_codes"] == [code]


# -- identity: device code ---------------------------------------------------------------


def _public(sb: Sandbox, http: requests.Session) -> msal.PublicClientApplication:
    return msal.PublicClientApplication(CLIENT_ID, authority=sb.authority,
                                        instance_discovery=False, http_client=http)


def test_device_flow_via_msal_signs_in_and_caches_the_account(
    sb: Sandbox, http: requests.Session
) -> None:
    app = _public(sb, http)
    flow = app.initiate_device_flow(scopes=["Mail.Send", "Mail.Read"])
    assert flow["verification_uri"] == f"{sb.base_url}/devicelogin"
    assert flow["user_code"] in flow["message"]
    pending = app.acquire_token_by_device_flow(dict(flow), exit_condition=lambda f: True)
    assert pending["error"] == "authorization_pending"
    sb.approve_device_code(flow["user_code"], SENDER)
    result = app.acquire_token_by_device_flow(flow)
    assert "access_token" in result, result
    assert result["id_token_claims"]["preferred_username"] == SENDER
    assert result["id_token_claims"]["tid"] == sb.tenant_id
    c = claims(result["access_token"])
    assert c["upn"] == SENDER
    assert set(c["scp"].split()) == {"Mail.Send", "Mail.Read"}
    accounts = app.get_accounts()
    assert [a["username"] for a in accounts] == [SENDER]
    cached = app.acquire_token_silent(["Mail.Send"], account=accounts[0])
    assert cached is not None and cached["token_source"] == "cache"
    refreshed = app.acquire_token_silent(["Mail.Send"], account=accounts[0], force_refresh=True)
    assert refreshed is not None and refreshed["token_source"] == "identity_provider"
    token = refreshed["access_token"]
    me = http.post(f"{sb.graph_url}/me/sendMail", json={"message": message("D-1")},
                   headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 202
    assert sb.sent()[-1]["user"] == SENDER
    # A delegated token sends as its own user only.
    other = send(http, sb, token, mailbox=OTHER)
    assert error_of(other)[:2] == (403, "ErrorAccessDenied")
    assert http.get(f"{sb.graph_url}/me", headers={"Authorization": f"Bearer {token}"}
                    ).json()["userPrincipalName"] == SENDER


@pytest.mark.sandbox(auto_approve_device_codes=True)
def test_device_codes_can_be_auto_approved_as_the_first_mailbox(
    sb: Sandbox, http: requests.Session
) -> None:
    app = _public(sb, http)
    result = app.acquire_token_by_device_flow(app.initiate_device_flow(scopes=["Mail.Send"]))
    assert result["id_token_claims"]["preferred_username"] == SENDER


def test_device_flow_asking_for_unconsented_permissions_is_refused(
    sb: Sandbox, http: requests.Session
) -> None:
    app = _public(sb, http)
    flow = app.initiate_device_flow(scopes=["Calendars.ReadWrite"])
    sb.approve_device_code(flow["user_code"], SENDER)
    result = app.acquire_token_by_device_flow(flow)
    assert result["error"] == "invalid_grant"
    assert result["error_codes"] == [65001]


# -- Graph: sendMail ---------------------------------------------------------------------


def test_send_mail_is_accepted_with_202_and_recorded(sb: Sandbox, http: requests.Session) -> None:
    token = app_token(sb, http)
    resp = send(http, sb, token, headers={"client-request-id": "cr-1"})
    assert resp.status_code == 202
    assert resp.content == b""
    assert resp.headers["request-id"]
    assert resp.headers["client-request-id"] == "cr-1"
    [rec] = sb.sent()
    assert rec["send_id"] == "S-1"
    assert rec["header_send_id"] == "S-1"
    assert rec["sender"] == SENDER
    assert rec["to"] == ["it@contoso.example"]
    assert rec["cc"] == ["am@fabrikam.example"]
    assert rec["reply_to"] == ["transition@fabrikam.example"]
    assert rec["subject"] == "Your move to Fabrikam"
    assert rec["html"] == "<p>Hello <b>Contoso</b></p>"
    assert rec["received_at"].endswith("Z")
    assert rec["id"]
    eml = (sb.state_dir / rec["eml"]).read_text()
    assert "Subject: Your move to Fabrikam" in eml
    assert f"{SEND_ID_HEADER}: S-1" in eml
    assert "multipart/alternative" in eml
    line = (sb.state_dir / "sent.jsonl").read_text().splitlines()
    assert json.loads(line[0])["send_id"] == "S-1"
    assert sb.stats()["accepted"] == 1


def test_text_body_is_recorded_as_text(sb: Sandbox, http: requests.Session) -> None:
    token = app_token(sb, http)
    body = {"message": message(body={"contentType": "Text", "content": "plain words"})}
    assert send(http, sb, token, body).status_code == 202
    assert sb.sent()[0]["text"] == "plain words"


def _bad(n: int, **overrides: Any) -> dict[str, Any]:
    return {"message": message(**overrides)}


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"", 400, "BadRequest"),
        (b"{not json", 400, "BadRequest"),
        ({"saveToSentItems": True}, 400, "ErrorInvalidParameter"),
        ({"message": message(), "sendNow": True}, 400, "RequestBodyRead"),
        (_bad(0, subjet="typo"), 400, "RequestBodyRead"),
        (_bad(0, subject=42), 400, "RequestBodyRead"),
        (_bad(0, body={"contentType": "Markdown", "content": "x"}), 400, "RequestBodyRead"),
        (_bad(0, toRecipients=[], ccRecipients=None), 400, "ErrorInvalidRecipients"),
        (_bad(0, toRecipients=["it@contoso.example"]), 400, "ErrorInvalidRecipients"),
        (_bad(0, toRecipients=[{"address": "it@contoso.example"}]), 400,
         "ErrorInvalidRecipients"),
        (_bad(0, toRecipients=[{"emailAddress": {"address": "not an address"}}]), 400,
         "ErrorInvalidRecipients"),
        (_bad(0, toRecipients=[{"emailAddress": {"address": f"u{i}@contoso.example"}}
                               for i in range(501)]), 400, "ErrorInvalidRecipients"),
        (_bad(0, internetMessageHeaders=[{"name": "Comms-Send-Id", "value": "1"}]), 400,
         "InvalidInternetMessageHeaderCollection"),
        (_bad(0, internetMessageHeaders=[{"name": f"x-h{i}", "value": "1"} for i in range(6)]),
         400, "InvalidInternetMessageHeaderCollection"),
        (_bad(0, singleValueExtendedProperties=[{"id": "CommsSendId", "value": "1"}]), 400,
         "ErrorInvalidProperty"),
        (_bad(0, singleValueExtendedProperties=[{"id": SEND_ID_PROPERTY_ID}]), 400,
         "RequestBodyRead"),
        (_bad(0, **{"from": {"emailAddress": {"address": OTHER}}}), 403, "ErrorSendAsDenied"),
    ],
)
def test_send_mail_validation_errors_match_graph(
    sb: Sandbox, http: requests.Session, payload: Any, status: int, code: str
) -> None:
    resp = send(http, sb, app_token(sb, http), payload)
    assert error_of(resp)[:2] == (status, code)
    assert sb.sent() == []


def test_header_errors_carry_graphs_messages(sb: Sandbox, http: requests.Session) -> None:
    token = app_token(sb, http)
    six = _bad(0, internetMessageHeaders=[{"name": f"x-h{i}", "value": "1"} for i in range(6)])
    assert error_of(send(http, sb, token, six))[2] == (
        "Maximum number of headers in one message should be less than or equal to 5.")
    named = _bad(0, internetMessageHeaders=[{"name": "Comms", "value": "1"}])
    assert error_of(send(http, sb, token, named))[2] == (
        "The internet message header name 'Comms' should start with 'x-' or 'X-'.")


def test_request_over_4_mb_is_refused_with_413(sb: Sandbox, http: requests.Session) -> None:
    big = _bad(0, body={"contentType": "HTML", "content": "x" * (4 * 1024 * 1024 + 1)})
    resp = send(http, sb, app_token(sb, http), big)
    assert resp.status_code == 413
    assert sb.sent() == []
    # The connection stays usable after the refusal.
    assert send(http, sb, app_token(sb, http)).status_code == 202


# -- Graph: 401 / 403 / 404 --------------------------------------------------------------


def test_missing_or_forged_token_is_401(sb: Sandbox, http: requests.Session) -> None:
    url = f"{sb.graph_url}/users/{SENDER}/sendMail"
    resp = http.post(url, json={"message": message()})
    assert error_of(resp)[:2] == (401, "InvalidAuthenticationToken")
    assert "Bearer" in resp.headers["WWW-Authenticate"]
    forged = jwt.encode({"tid": "x"}, "a-forger-s-key-that-is-long-enough-for-hs256",
                        algorithm="HS256")
    resp = http.post(url, json={"message": message()},
                     headers={"Authorization": f"Bearer {forged}"})
    assert error_of(resp)[:2] == (401, "InvalidAuthenticationToken")
    assert sb.stats()["unauthorized"] == 2


@pytest.mark.sandbox(token_lifetime=0.5)
def test_expired_token_is_401(sb: Sandbox, http: requests.Session) -> None:
    token = app_token(sb, http)
    time.sleep(0.7)
    status, code, text = error_of(send(http, sb, token))
    assert (status, code) == (401, "InvalidAuthenticationToken")
    assert "expired" in text


def test_revoked_tokens_are_401_and_a_new_token_works(sb: Sandbox,
                                                      http: requests.Session) -> None:
    token = app_token(sb, http)
    sb.revoke_tokens()
    assert error_of(send(http, sb, token))[:2] == (401, "InvalidAuthenticationToken")
    assert send(http, sb, app_token(sb, new_session(sb))).status_code == 202


def test_app_without_mail_send_gets_403(sb: Sandbox, http: requests.Session) -> None:
    sb.register_app("cccccccc-0000-4000-8000-000000000003", secret=SECRET, roles=["Mail.Read"])
    token = app_token(sb, http, "cccccccc-0000-4000-8000-000000000003")
    status, code, text = error_of(send(http, sb, token))
    assert (status, code) == (403, "ErrorAccessDenied")
    assert text == "Access is denied. Check credentials and try again."


def test_mailbox_outside_the_access_policy_gets_403(sb: Sandbox,
                                                    http: requests.Session) -> None:
    sb.register_app(CLIENT_ID, roles=["Mail.Send", "Mail.Read"], mailboxes=[OTHER])
    token = app_token(sb, http)
    status, code, text = error_of(send(http, sb, token, mailbox=SENDER))
    assert (status, code) == (403, "ErrorAccessDenied")
    assert text.startswith("Access to OData is disabled")
    assert send(http, sb, token, mailbox=OTHER).status_code == 202


def test_unknown_mailbox_is_404_error_invalid_user(sb: Sandbox, http: requests.Session) -> None:
    token = app_token(sb, http)
    status, code, text = error_of(send(http, sb, token, mailbox="nobody@fabrikam.example"))
    assert (status, code) == (404, "ErrorInvalidUser")
    assert "nobody@fabrikam.example" in text


def test_users_endpoint_reports_existence_and_me_needs_a_user(
    sb: Sandbox, http: requests.Session
) -> None:
    sb.register_app("dddddddd-0000-4000-8000-000000000004", secret=SECRET, roles=["Mail.Send"])
    token = app_token(sb, http, "dddddddd-0000-4000-8000-000000000004")
    auth = {"Authorization": f"Bearer {token}"}
    user = http.get(f"{sb.graph_url}/users/{SENDER}", headers=auth)
    assert user.status_code == 200
    assert user.json()["userPrincipalName"] == SENDER
    by_id = http.get(f"{sb.graph_url}/users/{user.json()['id']}", headers=auth)
    assert by_id.json()["mail"] == SENDER
    missing = http.get(f"{sb.graph_url}/users/ghost@fabrikam.example", headers=auth)
    assert error_of(missing)[:2] == (404, "ErrorInvalidUser")
    me = http.get(f"{sb.graph_url}/me", headers=auth)
    assert error_of(me) == (400, "BadRequest",
                            "/me request is only valid with delegated authentication flow.")


# -- Graph: Exchange limits --------------------------------------------------------------


@pytest.mark.sandbox(time_scale=0.04, messages_per_minute=5)
def test_rate_limit_answers_429_with_fractional_retry_after_that_works(
    sb: Sandbox, http: requests.Session
) -> None:
    token = app_token(sb, http)
    for i in range(5):
        assert send(http, sb, token, {"message": message(f"R-{i}")}).status_code == 202
    resp = send(http, sb, token, {"message": message("R-5")})
    status, code, _ = error_of(resp)
    assert (status, code) == (429, "TooManyRequests")
    retry = resp.headers["Retry-After"]
    # Seconds to the millisecond, as Graph may send; "2" when the wait happens to be whole.
    assert re.fullmatch(r"\d+(\.\d{1,3})?", retry), retry
    assert 0 < float(retry) <= 60 * 0.04
    time.sleep(float(retry))
    assert send(http, sb, token, {"message": message("R-5")}).status_code == 202
    assert [r["send_id"] for r in sb.sent()] == [f"R-{i}" for i in range(6)]
    assert sb.stats()["throttled_rate"] == 1


@pytest.mark.parametrize(("seconds", "text"), [
    (2.1281, "2.129"), (2.0, "2"), (1.9999, "2"), (0.25, "0.25"), (0.0, "0.001"), (-1.0, "0.001"),
])
def test_retry_after_is_rounded_up_to_the_millisecond(seconds: float, text: str) -> None:
    """Waiting the written time is never shorter than the true wait, and never zero."""
    assert retry_after_text(seconds) == text


@pytest.mark.sandbox(time_scale=0.001, recipients_per_day=3)
def test_recipients_per_day_limit_answers_429(sb: Sandbox, http: requests.Session) -> None:
    token = app_token(sb, http)
    two = {"message": message("P-1")}  # to + cc = 2 recipients
    assert send(http, sb, token, two).status_code == 202
    resp = send(http, sb, token, {"message": message("P-2")})
    assert error_of(resp)[:2] == (429, "ErrorExceededMessageLimit")
    assert 0 < float(resp.headers["Retry-After"]) <= 86400 * 0.001
    assert sb.stats()["throttled_recipients"] == 1


def test_more_than_four_in_flight_gets_mailbox_concurrency_429(
    sb: Sandbox, http: requests.Session
) -> None:
    token = app_token(sb, http)
    sb.set_faults(latency=1.0)
    n = 6
    barrier = threading.Barrier(n)
    results: list[requests.Response] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        s = new_session(sb)
        barrier.wait()
        r = send(s, sb, token, {"message": message(f"C-{i}")})
        s.close()
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses == [202] * 4 + [429] * 2
    refused = [r for r in results if r.status_code == 429]
    for r in refused:
        assert error_of(r)[1:] == ("ApplicationThrottled",
                                   "Application is over its MailboxConcurrency limit.")
        assert float(r.headers["Retry-After"]) > 0
    stats = sb.stats()
    assert stats["max_in_flight_per_mailbox"][SENDER] == 5  # the limit, and one over it
    assert stats["throttled_concurrency"] == 2
    assert len(sb.sent()) == 4


# -- faults ------------------------------------------------------------------------------


def test_error_rate_answers_503_or_504_and_accepts_nothing(sb: Sandbox,
                                                           http: requests.Session) -> None:
    token = app_token(sb, http)
    sb.set_faults(error_rate=1.0, seed=7)
    codes = {send(http, sb, token).status_code for _ in range(8)}
    assert codes <= {503, 504} and codes
    assert sb.sent() == []
    assert sb.stats()["errors_injected"] == 8


def test_drop_after_accept_records_the_message_but_gives_no_answer(
    sb: Sandbox, http: requests.Session
) -> None:
    token = app_token(sb, http)
    sb.set_faults(drop_after_accept_rate=1.0)
    with pytest.raises(requests.ConnectionError):
        send(http, sb, token, {"message": message("DROP-1")})
    assert [r["send_id"] for r in sb.sent()] == ["DROP-1"]
    assert sb.stats()["dropped"] == 1
    sb.set_faults(drop_after_accept_rate=0.0)
    assert send(http, sb, token, {"message": message("AFTER")}).status_code == 202


def test_throttle_rate_answers_429_without_accepting(sb: Sandbox, http: requests.Session) -> None:
    token = app_token(sb, http)
    sb.set_faults(throttle_rate=1.0)
    resp = send(http, sb, token)
    assert error_of(resp)[:2] == (429, "TooManyRequests")
    assert float(resp.headers["Retry-After"]) > 0
    assert sb.sent() == []


def test_faults_are_validated_and_readable(sb: Sandbox) -> None:
    assert sb.set_faults(latency=0.25) == Faults(latency=0.25)
    assert sb.faults.latency == 0.25
    with pytest.raises(TypeError, match="unknown fault"):
        sb.set_faults(error_rat=1.0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        sb.set_faults(error_rate=2.0)


# -- Sent Items --------------------------------------------------------------------------


def test_sent_items_filter_finds_a_message_by_send_id(sb: Sandbox,
                                                      http: requests.Session) -> None:
    token = app_token(sb, http)
    auth = {"Authorization": f"Bearer {token}"}
    for sid in ("A-1", "B-2", "it's"):
        assert send(http, sb, token, {"message": message(sid)}).status_code == 202
    assert send(http, sb, token, {"message": message("UNSAVED"), "saveToSentItems": False}
                ).status_code == 202
    url = f"{sb.graph_url}/users/{SENDER}/mailFolders/sentitems/messages"
    found = http.get(url, params={"$filter": send_id_filter("B-2"), "$select": "id,subject",
                                  "$top": "5"}, headers=auth)
    assert found.status_code == 200
    [item] = found.json()["value"]
    assert set(item) == {"@odata.etag", "id", "subject"}
    assert item["id"] == sb.sent()[1]["id"]
    quoted = http.get(url, params={"$filter": send_id_filter("it''s")}, headers=auth).json()
    assert len(quoted["value"]) == 1
    assert http.get(url, params={"$filter": send_id_filter("UNSAVED")},
                    headers=auth).json()["value"] == []
    assert http.get(url, params={"$filter": send_id_filter("NOPE")},
                    headers=auth).json()["value"] == []
    everything = http.get(url, params={"$top": "2"}, headers=auth).json()
    assert len(everything["value"]) == 2
    assert "@odata.nextLink" in everything
    expanded = http.get(url, params={
        "$filter": send_id_filter("A-1"),
        "$expand": f"singleValueExtendedProperties($filter=id eq '{SEND_ID_PROPERTY_ID}')",
    }, headers=auth).json()["value"][0]
    assert expanded["singleValueExtendedProperties"][0]["value"] == "A-1"
    bad = http.get(url, params={"$filter": "subject eq 'x'"}, headers=auth)
    assert error_of(bad)[:2] == (400, "BadRequest")


def test_sent_items_need_mail_read(sb: Sandbox, http: requests.Session) -> None:
    sb.register_app("eeeeeeee-0000-4000-8000-000000000005", secret=SECRET, roles=["Mail.Send"])
    token = app_token(sb, http, "eeeeeeee-0000-4000-8000-000000000005")
    resp = http.get(f"{sb.graph_url}/users/{SENDER}/mailFolders/sentitems/messages",
                    params={"$filter": send_id_filter("A-1")},
                    headers={"Authorization": f"Bearer {token}"})
    assert error_of(resp)[:2] == (403, "ErrorAccessDenied")


def test_restart_on_the_same_state_dir_keeps_sent_items_and_tokens(
    sb: Sandbox, http: requests.Session
) -> None:
    token = app_token(sb, http)
    assert send(http, sb, token, {"message": message("KEEP")}).status_code == 202
    sb.stop()
    with Sandbox(sb.state_dir, time_scale=sb.time_scale) as again:
        again.add_mailbox(SENDER)
        again.register_app(CLIENT_ID, secret=SECRET)
        s = new_session(again)
        url = f"{again.graph_url}/users/{SENDER}/mailFolders/sentitems/messages"
        found = s.get(url, params={"$filter": send_id_filter("KEEP")},
                      headers={"Authorization": f"Bearer {token}"})
        s.close()
        assert found.status_code == 200
        assert len(found.json()["value"]) == 1
        assert [r["send_id"] for r in again.sent()] == ["KEEP"]
        assert again.sent()[0]["eml"] == "eml/000001.eml"


# -- server behaviour and admin endpoints ------------------------------------------------


def test_keep_alive_reuses_one_connection_and_20_clients_are_served_at_once(
    sb: Sandbox, http: requests.Session
) -> None:
    token = app_token(sb, new_session(sb))
    auth = {"Authorization": f"Bearer {token}"}
    before = sb.stats()["connections"]
    for _ in range(10):
        assert http.get(f"{sb.graph_url}/users/{SENDER}", headers=auth).status_code == 200
    assert sb.stats()["connections"] == before + 1
    sb.set_faults(latency=0.3)
    barrier = threading.Barrier(20)
    codes: list[int] = []

    def worker() -> None:
        s = new_session(sb)
        barrier.wait()
        codes.append(s.get(f"{sb.graph_url}/users/{SENDER}", headers=auth).status_code)
        s.close()

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 20


def test_admin_endpoints_drive_and_show_the_sandbox(sb: Sandbox, http: requests.Session) -> None:
    token = app_token(sb, http)
    assert send(http, sb, token, {"message": message("ADM-1")}).status_code == 202
    base = f"{sb.base_url}/_sandbox"
    assert [r["send_id"] for r in http.get(f"{base}/sent").json()] == ["ADM-1"]
    assert http.get(f"{base}/stats").json()["accepted"] == 1
    faults = http.post(f"{base}/faults", json={"error_rate": 1.0}).json()
    assert faults["error_rate"] == 1.0
    assert sb.faults.error_rate == 1.0
    assert http.post(f"{base}/faults", json={"nonsense": 1}).status_code == 400
    http.post(f"{base}/faults", json={"error_rate": 0.0})
    app = _public(sb, http)
    flow = app.initiate_device_flow(scopes=["Mail.Send"])
    approved = http.post(f"{base}/device/approve",
                         json={"user_code": flow["user_code"], "user": SENDER})
    assert approved.status_code == 200
    assert "access_token" in app.acquire_token_by_device_flow(flow)
    assert http.post(f"{base}/device/approve",
                     json={"user_code": "NOSUCHCODE", "user": SENDER}).status_code == 404
    assert http.post(f"{base}/revoke").status_code == 200
    assert send(http, sb, token).status_code == 401


def test_stop_is_prompt_even_with_requests_held_by_latency(sandbox_factory: Any) -> None:
    sb = sandbox_factory("slow")
    sb.add_mailbox(SENDER)
    sb.register_app(CLIENT_ID, secret=SECRET)
    s = new_session(sb)
    token = app_token(sb, s)
    sb.set_faults(latency=30.0)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            send(s, sb, token, timeout=20)
        except requests.RequestException as exc:
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    while sb.stats()["requests"] == 0:
        time.sleep(0.01)
    sb.stop()
    t.join(timeout=10)
    assert not t.is_alive()
    s.close()


def test_sandbox_fixture_files(sandbox: Sandbox) -> None:
    assert Path(sandbox.ca_file).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert sandbox.base_url.startswith("https://127.0.0.1:")
    assert sandbox.graph_url == f"{sandbox.base_url}/v1.0"
    assert sandbox.authority_host == sandbox.base_url


def test_sandbox_settings_point_comms_at_the_sandbox(sandbox: Sandbox,
                                                    sandbox_settings: Settings) -> None:
    g = sandbox_settings.graph
    assert g.base_url == sandbox.graph_url
    assert os.environ["COMMS_GRAPH_BASE_URL"] == sandbox.graph_url
    assert sandbox_settings.delivery.time_scale == sandbox.time_scale
    s = requests.Session()
    s.trust_env = False
    s.verify = g.ca_file
    app = msal.ConfidentialClientApplication(
        g.client_id, authority=g.authority, client_credential=g.client_secret,
        instance_discovery=False, http_client=s)
    token = app.acquire_token_for_client(GRAPH_SCOPE)["access_token"]
    sender = sandbox_settings.senders[0].address
    assert send(s, sandbox, token, mailbox=sender).status_code == 202
    s.close()


# -- the command -------------------------------------------------------------------------


def test_sandbox_command_prints_the_environment_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "comms", "sandbox", "--port", "0", "--state-dir",
         str(tmp_path / "sb"), "--time-scale", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    env: dict[str, str] = {}
    try:
        for line in proc.stdout:
            if line.startswith("export "):
                name, _, value = line[len("export "):].strip().partition("=")
                env[name] = value
            if line.startswith("# Running"):
                break
        assert env["COMMS_GRAPH_AUTH"] == "secret"
        assert env["COMMS_DELIVERY_TIME_SCALE"] == "0.05"
        settings = load_settings(env=env)
        g = settings.graph
        s = requests.Session()
        s.trust_env = False
        s.verify = g.ca_file
        app = msal.ConfidentialClientApplication(
            g.client_id, authority=g.authority, client_credential=g.client_secret,
            instance_discovery=False, http_client=s)
        token = app.acquire_token_for_client(GRAPH_SCOPE)["access_token"]
        resp = s.post(f"{g.base_url}/users/{SENDER}/sendMail", json={"message": message("CLI")},
                      headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 202
        s.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.strip().endswith("# comms sandbox stopped.")
    sent = (tmp_path / "sb" / "sent.jsonl").read_text().splitlines()
    assert json.loads(sent[0])["send_id"] == "CLI"


def test_sandbox_command_refuses_an_unknown_auth(cli: Any) -> None:
    result = cli("sandbox", "--auth", "magic", "--port", "0")
    assert result.exit_code == 2
    assert "Error: --auth must be one of secret, certificate, delegated, got 'magic'." in (
        result.output)


def test_device_login_page_signs_a_person_in(sb: Sandbox, http: requests.Session) -> None:
    app = _public(sb, http)
    flow = app.initiate_device_flow(scopes=["Mail.Send"])
    page = http.get(flow["verification_uri"])
    assert page.status_code == 200
    assert 'name="user_code"' in page.text
    done = http.post(flow["verification_uri"],
                     data={"user_code": flow["user_code"], "user": OTHER})
    assert f"Signed in as {OTHER}" in done.text
    result = app.acquire_token_by_device_flow(flow)
    assert result["id_token_claims"]["preferred_username"] == OTHER
