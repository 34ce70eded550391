"""The one retry policy for idempotent reads (Graph and Partner Center GETs, Graph ``$batch`` of
GETs), shared by the inbox reader (``comms.inbox.reader``) and stage sync's sources
(``comms.sync.clients``). Unlike ``sendMail``, a read can always be repeated:

- 429 and the ``retried`` statuses (503/504; sync adds 500/502) wait ``Retry-After`` when the
  server sends one (in the server's own time: not scaled) or back off exponentially (scaled by
  ``[delivery] time_scale`` for the sandbox), then try again;
- a dropped connection backs off the same way;
- a 429 for a read with a throttling ``scope`` (the budget the server counts it against; today
  only Partner Center's, one budget per partner: each customer tenant's Graph reads are
  throttled on their own, and their 429s wait per request) holds every read of that scope in
  this process, on every thread, until the ``Retry-After`` has passed: one throttled answer
  instead of one per thread, and the server's budget is not spent on requests bound to be
  refused;
- 401 gets one fresh token (``refresh(stale)``), then counts like any other answer;
- at most ``max_attempts`` attempts.

What is left after that is the caller's to explain: ``send`` returns the last answer (a 2xx, or
an error status the caller maps to its own error naming the fix), or raises ``ReadsExhausted``
(the connection kept failing, or the last attempt was a 401 refresh) or ``UntrustedServer``
(certificate verification failed: a retry cannot fix it; a TLS stream that breaks
otherwise is a dropped connection). Both carry what the caller's message needs.

``batch_get`` sends GETs through Graph JSON batching (``POST /$batch``) with the same policy,
read by read: a read answered 429 or a ``retried`` status inside a batch is asked again in a
later batch. The caller posts each batch (its own transport and error mapping) and makes the
exceptions for the reads that fail (``fail``) or stay throttled (``exhausted``).
"""

from __future__ import annotations

import base64
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from comms.delivery.failures import certificate_refused
from comms.delivery.graph import parse_retry_after

BATCH_LIMIT = 20  # Graph's limit of requests in one JSON batch
FAILED_DEPENDENCY = 424  # a chained read in a batch not run because the one before it failed
# A read the batch's answer leaves out: failed (not retried) with this body, as HTTP 502.
_MISSING = {"error": {"code": "BatchAnswerMissing", "message": "no answer for this read"}}


class ReadsExhausted(Exception):
    """Every attempt failed; ``last`` says how (an exception name or ``HTTP 503``)."""

    def __init__(self, url: str, attempts: int, last: str) -> None:
        super().__init__(f"{url}: {attempts} attempts, last {last}")
        self.url, self.attempts, self.last = url, attempts, last


class UntrustedServer(Exception):
    """The server's TLS certificate is not trusted (``[graph] ca_file``)."""

    def __init__(self, host: str, detail: str) -> None:
        super().__init__(f"{host}: {detail}")
        self.host, self.detail = host, detail


def doubling(base: float, *, cap: float = 30.0, jitter: bool = False) -> Callable[[int], float]:
    """Backoff before attempt ``n + 1`` after ``n`` failed: ``base * 2 ** (n - 1)`` up to
    ``cap``; with ``jitter`` times 0.5-1.5, so that concurrent readers do not retry in step."""

    def wait(attempt: int) -> float:
        seconds: float = min(cap, base * 2.0 ** (attempt - 1))
        return seconds * (0.5 + random.random()) if jitter else seconds

    return wait


@dataclass(frozen=True)
class ReadPolicy:
    max_attempts: int = 8
    retried: frozenset[int] = frozenset({429, 503, 504})
    backoff: Callable[[int], float] = field(default_factory=lambda: doubling(0.5, jitter=True))
    # A Retry-After that cannot be read waits the backoff (True) or parse_retry_after's default.
    backoff_when_unreadable: bool = False
    time_scale: float = 1.0
    request_ids: bool = False  # a fresh client-request-id header per attempt (Graph's tracing)
    follow_redirects: bool = False


class RetryingReads:
    """Sends reads with ``ReadPolicy``; safe to share between threads. Counts every attempt
    (``requests``) and every wait (``retries``)."""

    def __init__(
        self, session: requests.Session, policy: ReadPolicy,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.policy = policy
        self.sleep = sleep
        self.clock = clock
        self.requests = 0
        self.retries = 0
        self._lock = threading.Lock()
        # Throttling scope -> the monotonic time before which no read of it is sent.
        self._held: dict[str, float] = {}

    def send(
        self, url: str, *, token: Callable[[], str], refresh: Callable[[str], str],
        headers: dict[str, str] | None = None, method: str = "GET", json: Any = None,
        scope: str | None = None,
    ) -> requests.Response:
        """The answer of the last attempt (see the module docstring); ``scope``: the throttling
        budget the read counts against, shared by every read of it in this process."""
        policy = self.policy
        bearer = token()
        refreshed = False
        last = ""
        for attempt in range(1, policy.max_attempts + 1):
            self._hold(scope)
            sent = {"Authorization": f"Bearer {bearer}", **(headers or {})}
            if policy.request_ids:
                sent["client-request-id"] = str(uuid.uuid4())
            with self._lock:
                self.requests += 1
            try:
                response = self.session.request(method, url, headers=sent, json=json,
                                                allow_redirects=policy.follow_redirects)
            except requests.exceptions.RequestException as exc:
                if certificate_refused(exc):
                    raise UntrustedServer(urlsplit(url).netloc, str(exc)) from exc
                # Any other TLS failure (a bad record MAC, an alert) is a dropped connection.
                last = type(exc).__name__
                if attempt == policy.max_attempts:
                    raise ReadsExhausted(url, attempt, last) from exc
                self._wait(policy.backoff(attempt) * policy.time_scale)
                continue
            status = response.status_code
            if status == 401 and not refreshed:
                bearer, refreshed = refresh(bearer), True
                last = "HTTP 401"
                continue
            if status in policy.retried and attempt < policy.max_attempts:
                wait = self.retry_wait(attempt, response.headers.get("Retry-After"))
                if status == 429 and scope is not None:
                    with self._lock:
                        until = self.clock() + wait
                        self._held[scope] = max(until, self._held.get(scope, 0.0))
                self._wait(wait)
                continue
            return response
        raise ReadsExhausted(url, policy.max_attempts, last)

    def _hold(self, scope: str | None) -> None:
        """Wait while ``scope`` is throttled (a 429 of another read of it said how long)."""
        if scope is None:
            return
        with self._lock:
            until = self._held.get(scope)
        if until is not None:
            delay = until - self.clock()
            if delay > 0:
                self.sleep(delay)

    def retry_wait(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait after failed ``attempt``: the server's Retry-After, else backoff."""
        policy = self.policy
        backoff = policy.backoff(attempt) * policy.time_scale
        if retry_after is None or not retry_after.strip():
            return backoff
        if policy.backoff_when_unreadable:
            return parse_retry_after(retry_after, backoff / policy.time_scale)
        return parse_retry_after(retry_after)

    def batch_get(
        self, urls: list[str], *, post: Callable[[dict[str, Any]], dict[str, Any]],
        fail: Callable[[int, int, Any], Exception], exhausted: Callable[[int], Exception],
        chained: bool = False, size: int = BATCH_LIMIT, headers: dict[str, str] | None = None,
        raw: bool = False,
    ) -> list[Any]:
        """GET ``urls`` (as the batch names them: relative to the service root) through JSON
        batching, ``size`` reads a batch; the bodies in order: parsed JSON (``{}`` for none),
        or with ``raw`` bytes (Graph sends a body that is not JSON base64-encoded).

        ``post(payload)`` sends one ``$batch`` and returns its parsed answer (``send`` with
        ``method="POST"``, so the batch request itself has the policy above); ``headers`` go
        on every read. ``chained``: read n of a batch depends on read n-1 (``dependsOn``), so
        Graph runs them one at a time; a read answered 424 was not run and is asked again
        without counting as an attempt. Each read counts its own attempts: answered 429 or a
        ``retried`` status, it goes into a later batch after the longest ``Retry-After`` (or
        the backoff) of the reads going again, up to ``max_attempts`` attempts. A read that is
        still throttled or failing then raises ``exhausted(index)``; any other answer, or none
        (as 502 ``BatchAnswerMissing``), raises ``fail(index, status, body)`` at once, before
        the reads of the same batch that are out of attempts. ``index`` is the read's place in
        ``urls``."""
        policy = self.policy
        out: list[Any] = [None] * len(urls)
        attempts = [0] * len(urls)
        todo = list(range(len(urls)))
        while todo:
            again: list[int] = []
            waits: list[float] = []
            for start in range(0, len(todo), size):
                part = todo[start:start + size]
                spent: int | None = None
                for i, answer in zip(part, _batch(post, [urls[i] for i in part], chained,
                                                  headers), strict=True):
                    if answer is None:
                        raise fail(i, 502, _MISSING)
                    status, retry_after, body = answer
                    if chained and status == FAILED_DEPENDENCY:  # not run: one before it failed
                        again.append(i)
                        continue
                    attempts[i] += 1
                    if 200 <= status < 300:
                        out[i] = _body(body, raw)
                    elif status not in policy.retried:
                        raise fail(i, status, body)
                    elif attempts[i] < policy.max_attempts:
                        again.append(i)
                        waits.append(self.retry_wait(attempts[i], retry_after))
                    elif spent is None:
                        spent = i
                if spent is not None:
                    raise exhausted(spent)
            if again:
                self._wait(max(waits, default=0.0))
            todo = again
        return out

    def _wait(self, seconds: float) -> None:
        with self._lock:
            self.retries += 1
        self.sleep(seconds)


def _batch(
    post: Callable[[dict[str, Any]], dict[str, Any]], urls: list[str], chained: bool,
    headers: dict[str, str] | None,
) -> list[tuple[int, str | None, Any] | None]:
    """One ``$batch`` of GETs of ``urls`` (request n depending on n-1 when ``chained``): each
    read's (status, Retry-After, body) in order, None for a read the answer leaves out."""
    payload = {"requests": [
        {"id": str(n), "method": "GET", "url": url,
         **({"headers": dict(headers)} if headers else {}),
         **({"dependsOn": [str(n - 1)]} if chained and n else {})}
        for n, url in enumerate(urls)]}
    by_id = {str(r.get("id")): r for r in post(payload).get("responses") or []}
    out: list[tuple[int, str | None, Any] | None] = []
    for n in range(len(urls)):
        answer = by_id.get(str(n))
        if answer is None:
            out.append(None)
            continue
        retry_after = next((str(v) for k, v in (answer.get("headers") or {}).items()
                            if str(k).lower() == "retry-after"), None)
        out.append((int(answer.get("status") or 0), retry_after, answer.get("body")))
    return out


def _body(body: Any, raw: bool) -> Any:
    """A 2xx read's body as ``batch_get`` returns it."""
    if raw and isinstance(body, str):
        return base64.b64decode(body)
    if body is None:
        return b"" if raw else {}
    return body
