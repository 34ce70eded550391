"""The project's exceptions: one type per thing a user can fix, each message naming the fix.

Errors from msal, requests and SQLAlchemy are translated into these at their boundary; the CLI
turns any ``CommsError`` into one clear line on stderr and the exit code it carries.

    CommsError                      exit 1 unless stated
    ├── ConfigError                 exit 3: bad or missing configuration (lists every problem)
    │   └── ClockSkewed             exit 3: this host's clock disagrees with the database
    │                               server's (workers on several hosts: a message could be sent
    │                               twice); synchronise the clocks (NTP)
    ├── CampaignError               exit 3: bad campaign definition
    ├── DatabaseError               the database cannot be opened or migrated
    ├── NotFound                    no such customer / message / outbox row
    ├── StageMoveRefused            a stage move the campaign does not allow (names allowed ones)
    ├── ImportRejected              a CSV with invalid rows (lists every problem)
    ├── TemplateError               a template cannot be rendered (names file and line)
    ├── RenderWorkerFailed          a render worker process died while a run was queueing
    ├── SyncWorkerFailed            a sync worker process died while reading customers
    ├── AuthError                   exit 3: no token could be obtained (names the setting to fix)
    │   └── CredentialRejected      exit 3: the authority refused the app's own credential
    │                               (client secret wrong or expired, certificate not
    │                               uploaded): nothing can be read or sent with it
    ├── DeliveryError               a transport cannot be used at all (not one message's outcome)
    ├── AlreadySent                 a message was already sent; resending needs --resend --note
    ├── UsageError                  exit 2: a bad argument or option value (like click)
    ├── RequestRefused              exit 2: a command asks for something that cannot be done
    │                               as given (missing --note, both keys and --where-stage,
    │                               no terminal to confirm without --yes): usage, like click
    ├── StateConflict               the ledger is not in a state that allows this (names why)
    ├── OutputError                 a file cannot be written (names the path and the fix)
    ├── UnknownTimeZone             exit 3: not an IANA time zone (suggests the closest one)
    └── RunLocked                   exit 4: another `comms run` holds this database

Exit codes of every command, distinct for cron: 0 done; 1 some work failed or the command ran
into something a user must act on (a message failed, no such customer, a refused move...);
2 usage: a bad argument or option (click's own usage errors exit 2 as well); 3 configuration or
credentials (config, campaign, sign-in, permissions, time zones); 4 locked: another run holds
the database. Product
code raises a specific class, never ``CommsError`` itself (tests/test_errors.py checks).
"""

from __future__ import annotations

from typing import Any


class CommsError(Exception):
    """Base of every error a user can act on."""

    exit_code: int = 1

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems: list[str] = list(problems or [])

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        return self.message + "\n" + "\n".join(f"  - {p}" for p in self.problems)

    def __reduce__(self) -> tuple[Any, ...]:
        # An error raised in a worker process (a template that fails to render) reaches the
        # caller whole: its class, message, problems and attributes, whatever its __init__.
        return (_restore, (type(self), self.message, self.__dict__))


def _restore(cls: type[CommsError], message: str, state: dict[str, Any]) -> CommsError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class ConfigError(CommsError):
    exit_code = 3


class CampaignError(ConfigError):
    pass


class ClockSkewed(ConfigError):
    """The host's clock is too far from the database server's to dispatch safely."""


class DatabaseError(CommsError):
    pass


class NotFound(CommsError):
    pass


class StageMoveRefused(CommsError):
    pass


class ImportRejected(CommsError):
    pass


class TemplateError(CommsError):
    pass


class RenderWorkerFailed(CommsError):
    pass


class SyncWorkerFailed(CommsError):
    pass


class AuthError(CommsError):
    exit_code = 3  # a credential or permission problem is a configuration problem


class CredentialRejected(AuthError):
    """``invalid_client``: the app's secret or certificate itself, whatever the tenant."""


class DeliveryError(CommsError):
    pass


class AlreadySent(CommsError):
    pass


class RunLocked(CommsError):
    exit_code = 4


class UsageError(CommsError):
    exit_code = 2


class RequestRefused(UsageError):
    """A usage-type refusal (options that need or exclude each other): exit 2 like click."""


class StateConflict(CommsError):
    pass


class OutputError(CommsError):
    pass


class UnknownTimeZone(CommsError):
    exit_code = 3
