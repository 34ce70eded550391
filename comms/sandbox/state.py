"""The sandbox's state: directory (users, mailboxes, app registrations), fault knobs, Exchange's
per-mailbox limits, counters, and the record of every accepted message.

Limits (per sender mailbox, windows scaled by ``time_scale``; a "minute" is ``60 * time_scale``
seconds, a "day" ``86400 * time_scale``):

- more than ``max_concurrent`` requests in flight for one mailbox: 429, code
  ``ApplicationThrottled``, "Application is over its MailboxConcurrency limit." (the code and
  text Exchange Online returns); the parallel requests of a JSON batch stay in flight together
  (``together``), so each one after the first sees the others;
- more than ``messages_per_minute`` accepted in a rolling minute: 429, code
  ``TooManyRequests``;
- more than ``recipients_per_day`` recipients (to + cc + bcc) in a rolling day: 429, code
  ``ErrorExceededMessageLimit``. Exchange blocks the mailbox until old recipients age out
  of the window; Graph's exact answer for this case is not documented, so the sandbox chose
  429 (retriable, "not accepted") with the time until enough recipients age out.

Every 429 carries ``Retry-After`` in seconds, fractional to the millisecond (e.g. ``2.128``),
computed so that a client which waits exactly that long is let through (for the rate and
recipient windows).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comms.sandbox.certs import ClientCertificate


@dataclass
class Faults:
    """Fault injection knobs (shares are probabilities between 0 and 1)."""

    error_rate: float = 0.0  # sendMail answered 503 or 504 WITHOUT accepting the message
    latency: float = 0.0  # seconds added to each Graph request
    latency_spike_rate: float = 0.0  # share of Graph requests that get latency_spike more
    latency_spike: float = 0.0
    drop_after_accept_rate: float = 0.0  # accepted and recorded, then connection closed
    throttle_rate: float = 0.0  # answered 429 with Retry-After, not accepted
    seed: int | None = None
    # The next ``token_stalls`` token requests wait ``token_stall`` seconds before answering
    # (an authority slow for a moment); each one stalled counts one down.
    token_stalls: int = 0
    token_stall: float = 0.0

    def validate(self) -> None:
        for name in ("error_rate", "latency_spike_rate", "drop_after_accept_rate",
                     "throttle_rate"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"fault {name} must be between 0 and 1, got {value!r}")
        for name in ("latency", "latency_spike", "token_stalls", "token_stall"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"fault {name} must not be negative")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FAULT_FIELDS = frozenset(f.name for f in dataclasses.fields(Faults))


@dataclass
class User:
    address: str
    oid: str
    display_name: str
    mailbox: bool


@dataclass
class App:
    client_id: str
    name: str
    secrets: list[str]
    certificates: list[ClientCertificate]
    roles: frozenset[str]
    mailboxes: frozenset[str] | None  # application access policy scope; None = all
    expired: set[str] = field(default_factory=set)  # secrets past their end date


@dataclass(frozen=True)
class Throttle:
    status: int
    code: str
    message: str
    retry_after: float
    kind: str  # stats key


@dataclass
class MailboxUsage:
    sends: deque[float] = field(default_factory=deque)
    recipients: deque[tuple[float, int]] = field(default_factory=deque)
    recipient_total: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    accepted: int = 0


def retry_after_text(seconds: float) -> str:
    """Seconds rounded up to the millisecond, as Graph writes fractional Retry-After."""
    value = max(math.ceil(seconds * 1000) / 1000, 0.001)
    return f"{value:.3f}".rstrip("0").rstrip(".")


def user_oid(address: str) -> str:
    """A stable object id per address, so ids survive restarts."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailto:{address.lower()}"))


class State:
    """Everything mutable, behind one lock (operations are short; no I/O but the record)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        time_scale: float,
        messages_per_minute: int,
        max_concurrent: int,
        recipients_per_day: int,
        tenant_external_per_day: int = 0,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.state_dir = state_dir
        self.time_scale = time_scale
        self.messages_per_minute = messages_per_minute
        self.max_concurrent = max_concurrent
        self.recipients_per_day = recipients_per_day
        # Exchange's tenant external recipient rate limit (TERRL), 0: not enforced. Past it,
        # Exchange still answers 202 but blocks the tenant's external mail (the sender gets
        # NDRs): here such a message is counted as blocked and never delivered.
        self.tenant_external_per_day = tenant_external_per_day
        self.tenant_external: deque[tuple[float, int]] = deque()
        self.lock = threading.Lock()
        self._held = threading.local()  # per serving thread: slots ``together`` keeps taken
        self.users: dict[str, User] = {}
        self.apps: dict[str, App] = {}
        self.usage: dict[str, MailboxUsage] = {}
        self.sent_items: dict[str, list[dict[str, Any]]] = {}
        self.faults = Faults()
        self.rng = random.Random()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "requests", "token_requests", "accepted", "throttled_rate",
                "throttled_concurrency", "throttled_recipients", "throttled_injected",
                "errors_injected", "dropped", "rejected", "unauthorized", "connections",
                "terrl_blocked", "external_recipients", "batches",
            ),
            0,
        )
        self.sent_file = state_dir / "sent.jsonl"
        self.eml_dir = state_dir / "eml"
        self.eml_dir.mkdir(parents=True, exist_ok=True)
        self._records = 0
        self._load_records()

    # -- directory ----------------------------------------------------------------------

    def add_user(self, address: str, *, mailbox: bool) -> User:
        address = address.strip().lower()
        if "@" not in address:
            raise ValueError(f"{address!r} is not an address (name@domain)")
        with self.lock:
            user = self.users.get(address)
            if user is None:
                user = User(address, user_oid(address), address.partition("@")[0], mailbox)
                self.users[address] = user
            elif mailbox:
                user.mailbox = True
            return user

    def find_user(self, ident: str) -> User | None:
        """A user by address (UPN) or object id, case-insensitively."""
        key = ident.strip().lower()
        with self.lock:
            user = self.users.get(key)
            if user is None:
                user = next((u for u in self.users.values() if u.oid == key), None)
            return user

    # -- faults -------------------------------------------------------------------------

    def set_faults(self, **fields: Any) -> Faults:
        unknown = set(fields) - FAULT_FIELDS
        if unknown:
            raise TypeError(
                f"unknown fault field(s) {sorted(unknown)}; known: {sorted(FAULT_FIELDS)}"
            )
        with self.lock:
            faults = dataclasses.replace(self.faults, **fields)
            faults.validate()
            self.faults = faults
            if "seed" in fields:
                self.rng = random.Random(faults.seed)
            return faults

    def roll(self, share: float) -> bool:
        if share <= 0:
            return False
        with self.lock:
            return self.rng.random() < share

    def token_stall(self) -> float:
        """Seconds this token request stalls (``Faults.token_stalls``), counting one down."""
        with self.lock:
            if self.faults.token_stalls <= 0:
                return 0.0
            self.faults = dataclasses.replace(self.faults,
                                              token_stalls=self.faults.token_stalls - 1)
            return float(self.faults.token_stall)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + n

    # -- limits -------------------------------------------------------------------------

    def begin_request(self, mailbox: str) -> Throttle | None:
        """Count a request in flight for the mailbox, or refuse it (MailboxConcurrency)."""
        with self.lock:
            usage = self.usage.setdefault(mailbox, MailboxUsage())
            # The attempted concurrency is what clients must keep within the limit.
            usage.max_in_flight = max(usage.max_in_flight, usage.in_flight + 1)
            if usage.in_flight >= self.max_concurrent:
                self.counters["throttled_concurrency"] += 1
                return Throttle(
                    429, "ApplicationThrottled",
                    "Application is over its MailboxConcurrency limit.",
                    2.0 * self.time_scale,
                    "throttled_concurrency",
                )
            usage.in_flight += 1
            return None

    def end_request(self, mailbox: str) -> None:
        held: list[str] | None = getattr(self._held, "mailboxes", None)
        if held is not None:  # inside ``together``: the slot stays taken until the block ends
            held.append(mailbox)
            return
        with self.lock:
            self.usage[mailbox].in_flight -= 1

    @contextmanager
    def together(self) -> Iterator[None]:
        """Requests served on this thread inside the block stay in flight for their mailbox
        until the block ends, as if they had all run at once (a JSON batch's parallel requests:
        each one after the first to a mailbox sees the others in flight)."""
        held: list[str] = []
        self._held.mailboxes = held
        try:
            yield
        finally:
            self._held.mailboxes = None
            with self.lock:
                for mailbox in held:
                    self.usage[mailbox].in_flight -= 1

    def accept(
        self, mailbox: str, recipients: int, record: dict[str, Any], resource: dict[str, Any]
    ) -> Throttle | None:
        """Apply the rate and recipient windows; if within them, record the message."""
        now = time.monotonic()
        minute = 60.0 * self.time_scale
        day = 86400.0 * self.time_scale
        with self.lock:
            usage = self.usage.setdefault(mailbox, MailboxUsage())
            while usage.sends and usage.sends[0] <= now - minute:
                usage.sends.popleft()
            while usage.recipients and usage.recipients[0][0] <= now - day:
                usage.recipient_total -= usage.recipients.popleft()[1]
            if len(usage.sends) >= self.messages_per_minute:
                self.counters["throttled_rate"] += 1
                oldest = usage.sends[len(usage.sends) - self.messages_per_minute]
                return Throttle(
                    429, "TooManyRequests",
                    f"Too many requests: mailbox {mailbox} sent {self.messages_per_minute} "
                    f"messages in the last minute (limit {self.messages_per_minute} per "
                    "minute). Retry after the time in the Retry-After header.",
                    oldest + minute - now, "throttled_rate",
                )
            if usage.recipient_total + recipients > self.recipients_per_day:
                self.counters["throttled_recipients"] += 1
                freed, wait = 0, day
                for t, n in usage.recipients:
                    freed += n
                    if usage.recipient_total - freed + recipients <= self.recipients_per_day:
                        wait = t + day - now
                        break
                return Throttle(
                    429, "ErrorExceededMessageLimit",
                    f"Message rate limit exceeded: mailbox {mailbox} sent to "
                    f"{usage.recipient_total} recipients in the last 24 hours and this message "
                    f"adds {recipients} (limit {self.recipients_per_day} recipients per "
                    "rolling 24 hours).",
                    wait, "throttled_recipients",
                )
            if self._over_tenant_budget(record, now, day):
                self.counters["terrl_blocked"] += 1
                return None  # accepted by the API, never delivered (an NDR in real life)
            usage.sends.append(now)
            usage.recipients.append((now, recipients))
            usage.recipient_total += recipients
            usage.accepted += 1
            self.counters["accepted"] += 1
            self._write_record(record)
            if resource:
                self.sent_items.setdefault(mailbox, []).append(resource)
            return None

    def _over_tenant_budget(self, record: dict[str, Any], now: float, day: float) -> bool:
        """Count the message's external recipients against the tenant's rolling day."""
        internal = {u.address.rsplit("@", 1)[1] for u in self.users.values()}
        external = sum(1 for key in ("to", "cc", "bcc") for a in record.get(key, [])
                       if a.rsplit("@", 1)[-1].lower() not in internal)
        while self.tenant_external and self.tenant_external[0][0] <= now - day:
            self.tenant_external.popleft()
        used = sum(n for _, n in self.tenant_external)
        if self.tenant_external_per_day and used + external > self.tenant_external_per_day:
            return True
        if external:
            self.tenant_external.append((now, external))
            self.counters["external_recipients"] += external
        return False

    # -- record -------------------------------------------------------------------------

    def _write_record(self, record: dict[str, Any]) -> None:
        eml = record.pop("_eml_bytes", None)
        self._records += 1
        name = f"{self._records:06d}.eml"
        record["eml"] = f"eml/{name}"
        if isinstance(eml, bytes):
            (self.eml_dir / name).write_bytes(eml)
        with self.sent_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()

    def _load_records(self) -> None:
        # Sent Items are rebuilt from these records by the mail service (graph.restore_sent_items)
        # so this module needs nothing from the services it serves.
        self._records = len(read_records(self.sent_file))

    def records(self) -> list[dict[str, Any]]:
        with self.lock:
            return read_records(self.sent_file)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = dict(self.counters)
            out["max_in_flight_per_mailbox"] = {
                m: u.max_in_flight for m, u in sorted(self.usage.items())
            }
            out["accepted_per_mailbox"] = {m: u.accepted for m, u in sorted(self.usage.items())}
            out["in_flight_per_mailbox"] = {m: u.in_flight for m, u in sorted(self.usage.items())}
            return out


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill; everything before it is intact
    return out
