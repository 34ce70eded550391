"""Before a run queues anything: can it get a token and reach each sender mailbox?

A run with broken sign-in (the starter config's certificate settings left empty, a wrong
secret) used to plan and queue every due message and then fail them one by one at dispatch.
The preflight asks Graph the same cheap questions as ``comms auth check`` (a token, its
permissions, ``GET /users/{mailbox}``) and stops the run with the configuration exit code (3)
before a single row is written. Sending nothing, it cannot send anything twice.
"""

from __future__ import annotations

from comms.config import Settings
from comms.config import partner_problem as config_partner_problem
from comms.delivery.base import Transport
from comms.delivery.graph import GraphTransport
from comms.errors import AuthError, ConfigError
from comms.services.auth_check import inspect_access
from comms.wording import plural

__all__ = ["before_run", "partner_problem", "require_partner"]


def partner_problem(settings: Settings) -> str | None:
    """``config.partner_problem`` with where to look for the others."""
    problem = config_partner_problem(settings)
    return f"{problem}; `comms config check` lists every problem." if problem else None


def require_partner(settings: Settings) -> None:
    """Raise ``ConfigError`` (exit 3) before anything is queued or sent when the partner id is
    unset, or the branding is the starter config's (see ``partner_problem``)."""
    problem = partner_problem(settings)
    if problem:
        raise ConfigError(f"Nothing was queued or sent: {problem}")


def before_run(settings: Settings, transport: Transport | None) -> None:
    """Raise ``AuthError`` (exit 3) listing what stops ``transport`` from sending.

    A dry run (no transport) is not checked. Any other run stops first on an unset
    ``[partner] id`` (``ConfigError``, exit 3), whatever its transport; the outbox-folder
    transport is not checked further (nothing to sign in to; a folder it cannot write is
    reported by the first write). A mailbox lookup Graph cannot answer now (403 without
    User.Read.All, a timeout, a 5xx) does not stop the run: only what is certainly wrong does.
    """
    if transport is None:
        return
    require_partner(settings)
    if not isinstance(transport, GraphTransport):
        return
    report = inspect_access(transport, settings)  # AuthError here: no token at all
    if report.problems:
        raise AuthError(
            "The run stopped before queueing anything: the check of Graph access found "
            f"{plural(len(report.problems), 'problem')} (`comms auth check` shows the details):",
            problems=report.problems,
        )
