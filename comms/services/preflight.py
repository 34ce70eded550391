"""Before a run queues anything: can it get a token and reach each sender mailbox?

A run with broken sign-in (the starter config's certificate settings left empty, a wrong
secret) used to plan and queue every due message and then fail them one by one at dispatch.
The preflight asks Graph the same cheap questions as ``comms auth check`` (a token, its
permissions, ``GET /users/{mailbox}``) and stops the run with the configuration exit code (3)
before a single row is written. Sending nothing, it cannot send anything twice.
"""

from __future__ import annotations

from comms.config import Settings, is_zero_id
from comms.delivery.base import Transport
from comms.delivery.graph import GraphTransport
from comms.errors import AuthError, ConfigError
from comms.services.auth_check import inspect_access
from comms.wording import plural

__all__ = ["before_run", "partner_id_problem", "require_partner_id"]


def partner_id_problem(settings: Settings) -> str | None:
    """What is wrong with ``[partner] id`` for sending, or None: the starter config's all-zero
    id would put a link to no partner in every partner invitation."""
    if not is_zero_id(settings.partner.id):
        return None
    return (f"[partner] id is all zeros ({settings.partner.id}): every partner invitation "
            "would carry a link that invites the customer to no partner. Set it to your "
            "Partner Center id (Account settings > Identifiers) in comms.toml or "
            "COMMS_PARTNER_ID; `comms config check` lists every problem.")


def require_partner_id(settings: Settings) -> None:
    """Raise ``ConfigError`` (exit 3) before anything is queued or sent when the partner id is
    unset (see ``partner_id_problem``)."""
    problem = partner_id_problem(settings)
    if problem:
        raise ConfigError(f"Nothing was queued or sent: {problem}")


def before_run(settings: Settings, transport: Transport | None) -> None:
    """Raise ``AuthError`` (exit 3) listing what stops ``transport`` from sending.

    No transport (a dry run) and the outbox-folder transport (nothing to sign in to; a folder
    it cannot write is reported by the first write) are not checked. A mailbox lookup Graph
    cannot answer now (403 without User.Read.All, a timeout, a 5xx) does not stop the run:
    only what is certainly wrong does. Whatever the transport, an unset ``[partner] id`` stops
    the run (``ConfigError``, exit 3).
    """
    if transport is None:
        return
    require_partner_id(settings)
    if not isinstance(transport, GraphTransport):
        return
    report = inspect_access(transport, settings)  # AuthError here: no token at all
    if report.problems:
        raise AuthError(
            "The run stopped before queueing anything: the check of Graph access found "
            f"{plural(len(report.problems), 'problem')} (`comms auth check` shows the details):",
            problems=report.problems,
        )
