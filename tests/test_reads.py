"""``RetryingReads`` (``comms.delivery.reads``) on its own: ``batch_get``, against a fake ``post``
that answers each JSON batch as Graph would from a script per read: results in order, batches of
``size``, chained reads (``dependsOn``; 424 is no attempt), throttled reads asked again after
``Retry-After``, and the caller's ``fail`` / ``exhausted`` exceptions; and ``send``'s hold of
every read of a throttled scope (a fake session on a fake clock)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from comms.delivery.reads import ReadPolicy, RetryingReads, doubling

Answer = tuple[int | None, dict[str, str], Any]  # status (None: left out of the answer)


class FakeBatch:
    """``post`` for ``batch_get``: each read takes the next answer of its URL's script (200 with
    ``{"url": url}`` once the script has run out); a read depending on one that did not
    succeed is answered 424 and takes nothing. Answers come back in reverse order, as Graph
    may send them in any order."""

    def __init__(self, script: dict[str, list[Answer]] | None = None) -> None:
        self.script = {url: list(answers) for url, answers in (script or {}).items()}
        self.payloads: list[dict[str, Any]] = []

    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.payloads.append(payload)
        out: list[dict[str, Any]] = []
        failed: set[str] = set()
        for req in payload["requests"]:
            if any(d in failed for d in req.get("dependsOn", [])):
                failed.add(req["id"])
                out.append({"id": req["id"], "status": 424,
                            "body": {"error": {"code": "FailedDependency", "message": "-"}}})
                continue
            queue = self.script.get(req["url"]) or []
            status, headers, body = queue.pop(0) if queue else (200, {}, {"url": req["url"]})
            if status is None:
                continue
            if not 200 <= status < 300:
                failed.add(req["id"])
            out.append({"id": req["id"], "status": status, "headers": headers, "body": body})
        return {"responses": out[::-1]}

    def urls(self, n: int) -> list[str]:
        """The URLs of batch ``n``, in the order sent."""
        return [r["url"] for r in self.payloads[n]["requests"]]


class Failed(Exception):
    pass


class Spent(Exception):
    pass


def _fail(i: int, status: int, body: Any) -> Exception:
    return Failed(i, status, body)


def _spent(i: int) -> Exception:
    return Spent(i)


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def reads(waits: list[float]) -> Iterator[RetryingReads]:
    session = requests.Session()  # never used: the fake posts
    yield RetryingReads(session, ReadPolicy(
        max_attempts=3, retried=frozenset({429, 502, 503}), backoff=doubling(1.0),
        time_scale=1.0), sleep=waits.append)
    session.close()


def _error(code: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": "m"}}


def test_results_in_order_in_batches_of_size(reads: RetryingReads, waits: list[float]) -> None:
    post = FakeBatch()
    urls = [f"/r{n}" for n in range(5)]
    got = reads.batch_get(urls, post=post, fail=_fail, exhausted=_spent, size=2,
                          headers={"Accept": "application/json"})
    assert got == [{"url": u} for u in urls]
    assert [post.urls(n) for n in range(3)] == [urls[:2], urls[2:4], urls[4:]]
    first = post.payloads[0]["requests"]
    assert [r["id"] for r in first] == ["0", "1"]
    assert all(r["method"] == "GET" and r["headers"] == {"Accept": "application/json"}
               and "dependsOn" not in r for r in first)
    assert waits == [] and reads.retries == 0


def test_throttled_read_is_asked_again_after_retry_after(
    reads: RetryingReads, waits: list[float]
) -> None:
    """Only the reads answered 429/503 go again, in one later batch, after the longest wait:
    the server's Retry-After (any case) or the backoff (1 s after a first attempt)."""
    post = FakeBatch({
        "/a": [(429, {"retry-after": "7"}, _error("TooManyRequests"))],
        "/c": [(503, {}, _error("ServiceUnavailable"))],
    })
    got = reads.batch_get(["/a", "/b", "/c"], post=post, fail=_fail, exhausted=_spent)
    assert got == [{"url": "/a"}, {"url": "/b"}, {"url": "/c"}]
    assert len(post.payloads) == 2 and post.urls(1) == ["/a", "/c"]
    assert waits == [7.0] and reads.retries == 1


def test_chained_reads_depend_on_the_one_before_and_424_is_no_attempt(
    reads: RetryingReads, waits: list[float]
) -> None:
    """With 3 attempts, /b is answered 424 three times (not run while /a is throttled), then
    503 twice, then succeeds: had the 424s counted, its first 503 would have been its last
    attempt."""
    post = FakeBatch({
        "/a": [(429, {"Retry-After": "2"}, None), (503, {}, None)],
        "/b": [(503, {}, None), (503, {}, None)],
    })
    got = reads.batch_get(["/a", "/b", "/c"], post=post, fail=_fail, exhausted=_spent,
                          chained=True)
    assert got == [{"url": "/a"}, {"url": "/b"}, {"url": "/c"}]
    assert [r.get("dependsOn") for r in post.payloads[0]["requests"]] == [None, ["0"], ["1"]]
    assert [post.urls(n) for n in range(5)] == [
        ["/a", "/b", "/c"], ["/a", "/b", "/c"], ["/a", "/b", "/c"], ["/b", "/c"], ["/b", "/c"]]
    # Each wait the backoff of the read's own attempt count (2 s after /b's second 503).
    assert waits == [2.0, 2.0, 1.0, 2.0]


def test_424_of_an_independent_read_is_an_error(reads: RetryingReads) -> None:
    post = FakeBatch({"/a": [(424, {}, _error("FailedDependency"))]})
    with pytest.raises(Failed) as raised:
        reads.batch_get(["/a"], post=post, fail=_fail, exhausted=_spent)
    assert raised.value.args[:2] == (0, 424)


def test_a_read_still_throttled_after_max_attempts_calls_exhausted(
    reads: RetryingReads, waits: list[float]
) -> None:
    post = FakeBatch({"/b": [(503, {}, None)] * 5})
    with pytest.raises(Spent) as raised:
        reads.batch_get(["/a", "/b"], post=post, fail=_fail, exhausted=_spent)
    assert raised.value.args == (1,)
    assert len(post.payloads) == 3  # max_attempts, and no wait after the last
    assert waits == [1.0, 2.0]


def test_403_calls_fail_at_once_and_wins_over_exhaustion(
    reads: RetryingReads, waits: list[float]
) -> None:
    post = FakeBatch({"/b": [(403, {}, _error("Forbidden"))]})
    with pytest.raises(Failed) as raised:
        reads.batch_get(["/a", "/b", "/c"], post=post, fail=_fail, exhausted=_spent)
    assert raised.value.args == (1, 403, _error("Forbidden"))
    assert len(post.payloads) == 1 and waits == []

    # /a is out of attempts in the batch where /b is refused: the refusal is what is raised.
    post = FakeBatch({"/a": [(429, {}, None)] * 3, "/b": [(503, {}, None)] * 2 + [(403, {}, None)]})
    with pytest.raises(Failed) as raised:
        reads.batch_get(["/a", "/b"], post=post, fail=_fail, exhausted=_spent)
    assert raised.value.args[:2] == (1, 403)


def test_a_read_left_out_of_the_answer_fails_as_502_without_retry(
    reads: RetryingReads, waits: list[float]
) -> None:
    post = FakeBatch({"/b": [(None, {}, None)]})
    with pytest.raises(Failed) as raised:
        reads.batch_get(["/a", "/b"], post=post, fail=_fail, exhausted=_spent)
    index, status, body = raised.value.args
    assert (index, status, body["error"]["code"]) == (1, 502, "BatchAnswerMissing")
    assert len(post.payloads) == 1 and waits == []  # 502 is retried, a missing answer not


def test_raw_bodies_are_base64_decoded(reads: RetryingReads) -> None:
    mime = b"Subject: hi\r\n\r\nbody"
    post = FakeBatch({"/a": [(200, {}, base64.b64encode(mime).decode())],
                      "/b": [(204, {}, None)]})
    got = reads.batch_get(["/a", "/b"], post=post, fail=_fail, exhausted=_spent, raw=True)
    assert got == [mime, b""]
    assert reads.batch_get(["/b"], post=FakeBatch({"/b": [(204, {}, None)]}), fail=_fail,
                           exhausted=_spent) == [{}]


class _Answers(requests.Session):
    """A session whose requests are answered from a script per URL (200 once it has run out),
    noting the clock at which each was sent."""

    def __init__(self, clock: list[float], script: dict[str, list[Answer]]) -> None:
        super().__init__()
        self.clock, self.script = clock, script
        self.sent: list[tuple[str, float]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any,
                **kwargs: Any) -> requests.Response:
        self.sent.append((str(url), self.clock[0]))
        queue = self.script.get(str(url)) or []
        status, headers, _ = queue.pop(0) if queue else (200, {}, None)
        response = requests.Response()
        response.status_code = status or 200
        response.headers.update(headers)
        return response


def test_a_429_holds_every_read_of_its_scope_until_retry_after() -> None:
    """Partner Center counts every call of the partner against one budget: once one read is
    told to wait, the others of that scope (other threads) wait too instead of each spending
    a request on a refusal; reads of another scope, or of none, go on."""
    clock = [0.0]
    session = _Answers(clock, {"https://pc/a": [(429, {"Retry-After": "3"}, None)]})
    waits: list[float] = []

    def send(url: str, scope: str | None) -> int:
        return reads.send(url, token=lambda: "t", refresh=lambda s: "t",
                          scope=scope).status_code

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:  # while the throttled read waits, other threads read
            assert send("https://graph/c", "tenant-1") == 200
            assert send("https://graph/d", None) == 200
            assert send("https://pc/b", "pc") == 200
        clock[0] += seconds

    reads = RetryingReads(session, ReadPolicy(max_attempts=3, retried=frozenset({429})),
                          sleep=sleep, clock=lambda: clock[0])
    assert send("https://pc/a", "pc") == 200
    assert session.sent == [
        ("https://pc/a", 0.0),  # 429, Retry-After: 3
        ("https://graph/c", 0.0), ("https://graph/d", 0.0),  # other budgets: at once
        ("https://pc/b", 3.0),  # the same budget: held until the Retry-After has passed
        ("https://pc/a", 6.0),  # (its own wait, on this fake clock, after b's)
    ]
    assert waits == [3.0, 3.0]  # a's own wait, and b's hold inside it: b was never refused
    session.close()
