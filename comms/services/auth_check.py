"""`comms auth login|logout|check`: delegated sign-in and what the app may do in Graph.

The check reads the token's claims, looks each sender mailbox up and (on request) sends a test
message from each mailbox to itself; the transport only answers the questions, this module
interprets them for the operator.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comms.config import Settings
from comms.delivery.auth import (
    DelegatedTokenProvider,
    forget_token_providers,
    token_cache_path,
    token_provider_for,
)
from comms.delivery.base import Address, Outcome, OutgoingEmail, SendResult
from comms.delivery.graph import GraphTransport
from comms.errors import AuthError, DeliveryError
from comms.wording import plural

__all__ = ["AccessReport", "MailboxCheck", "check_access", "inspect_access", "login",
           "logout", "self_test_message"]


@dataclass
class MailboxCheck:
    """What ``comms auth check`` found for one sender mailbox."""

    address: str
    exists: bool | None  # None: cannot tell (no permission to read users)
    detail: str = ""
    test: SendResult | None = None

    @property
    def test_accepted(self) -> bool:
        return self.test is not None and self.test.outcome is Outcome.SENT


@dataclass
class AccessReport:
    """What ``comms auth check`` reports: who the token is for, and each sender mailbox."""

    auth: str
    tenant: str
    app_id: str
    app_name: str
    user: str
    permissions: list[str]
    reconcile: bool = True
    mailboxes: list[MailboxCheck] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        if self.reconcile and not {"Mail.Read", "Mail.ReadWrite"} & set(self.permissions):
            return [
                "no Mail.Read: ambiguous sends cannot be looked up in Sent Items and wait for an "
                "operator; grant Mail.Read on the sender mailboxes, or set [graph] reconcile = "
                "false"
            ]
        return []

    @property
    def problems(self) -> list[str]:
        out: list[str] = []
        if not {"Mail.Send", "Mail.Send.Shared"} & set(self.permissions):
            out.append(
                "the token carries no Mail.Send permission: grant Mail.Send to the app "
                "registration (application permission with admin consent for app-only auth)"
            )
        for m in self.mailboxes:
            if m.exists is False:
                out.append(f"{m.address}: {m.detail}")
            if m.test is not None and m.test.outcome is not Outcome.SENT:
                out.append(f"{m.address}: test message {m.test.outcome}: {m.test.message}")
        return out

    def raise_problems(self) -> None:
        if self.problems:
            raise DeliveryError(
                f"{plural(len(self.problems), 'problem')} found by `comms auth check`:",
                problems=self.problems,
            )



def self_test_message(address: str, name: str = "") -> OutgoingEmail:
    """A short message from a sender mailbox to itself (``comms auth check --send-test``)."""
    send_id = f"auth-check-{uuid.uuid4().hex}"
    return OutgoingEmail(
        send_id=send_id,
        sender=address,
        to=(Address(address, name),),
        subject="comms auth check: test message",
        html="<p>This mailbox can send through Microsoft Graph with comms. "
        "You can delete this message.</p>",
        text="This mailbox can send through Microsoft Graph with comms. "
        "You can delete this message.",
    )



def login(settings: Settings, show: Callable[[dict[str, Any]], None]) -> tuple[str, Path]:
    """Device-code sign-in; (who signed in, token cache path). ``show`` shows the code."""
    if settings.graph.auth != "delegated":
        raise AuthError(
            f"`comms auth login` is for delegated sign-in, but [graph] auth is "
            f"{settings.graph.auth!r} (app-only, no sign-in needed): run `comms auth check`, "
            'or set [graph] auth = "delegated"'
        )
    provider = token_provider_for(settings)
    assert isinstance(provider, DelegatedTokenProvider)
    claims = provider.login(show)
    who = claims.get("upn") or claims.get("preferred_username") or claims.get("oid") or "?"
    return str(who), provider.cache_path


def logout(settings: Settings) -> tuple[bool, Path]:
    """Delete the delegated token cache; (whether there was one, its path)."""
    path = token_cache_path(settings.graph)
    forget_token_providers()
    if path.exists():
        path.unlink()
        return True, path
    return False, path


def _mailbox(transport: GraphTransport, settings: Settings, address: str) -> MailboxCheck:
    """Whether ``address`` is a user in the tenant."""
    status, code, text = transport.user_lookup(address)
    if status is None:
        return MailboxCheck(address, None, f"cannot tell: {code}")
    if status == 200:
        return MailboxCheck(address, True, "exists")
    if status == 404:
        return MailboxCheck(address, False, (
            f"does not exist in tenant {settings.graph.tenant_id} "
            f"(404 {code}): check the [[senders]] address"
        ))
    if status == 403:
        return MailboxCheck(address, None, (
            f"cannot tell (403 {code}: the app may not read users; User.Read.All would "
            "allow it, --send-test checks the mailbox instead)"
        ))
    return MailboxCheck(address, None, f"cannot tell ({status} {code}: {text})")


def check_access(settings: Settings, *, send_test: bool = False,
                 transport: GraphTransport | None = None) -> AccessReport:
    """Token, permissions and sender mailboxes. Raises ``DeliveryError`` listing the problems
    only after the report is complete (call ``AccessReport.raise_problems``)."""
    with closing(transport or GraphTransport(settings)) as graph:
        return inspect_access(graph, settings, send_test=send_test)


def inspect_access(graph: GraphTransport, settings: Settings, *,
                   send_test: bool = False) -> AccessReport:
    """What ``check_access`` does, on a transport the caller keeps open (the run's preflight
    goes on to send with it)."""
    claims = graph.token_claims()
    permissions = list(claims.get("roles") or []) + str(claims.get("scp") or "").split()
    g = settings.graph
    report = AccessReport(
        auth=g.auth,
        tenant=str(claims.get("tid") or g.tenant_id),
        app_id=str(claims.get("appid") or claims.get("azp") or g.client_id),
        app_name=str(claims.get("app_displayname") or ""),
        user=str(claims.get("upn") or claims.get("preferred_username") or ""),
        permissions=sorted(set(permissions)),
        reconcile=g.reconcile,
    )
    for sender in settings.senders:
        check = _mailbox(graph, settings, sender.address)
        if send_test:
            check.test = graph.send(self_test_message(sender.address, sender.name))
        report.mailboxes.append(check)
    return report
