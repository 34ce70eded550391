"""The sandbox's Inbox as Graph serves it, read by the product's reader over HTTPS with the real
msal + requests: delta paging (nextLink, then deltaLink), $select honoured, Prefer:
odata.maxpagesize, rounds that return only what is new, attachments, throttled reads retried,
and reads counted toward the mailbox concurrency limit."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from comms.config import Settings
from comms.inbox.reader import InboxError, InboxReader
from comms.sandbox import Sandbox
from comms.sandbox.inbox import InboxAdmin

BOX = "transition@fabrikam.example"


def _fill(sb: Sandbox, n: int) -> None:
    admin = InboxAdmin(sb)
    for i in range(n):
        admin.inject(kind="reply", mailbox=BOX, **{"from": f"c{i}@x.example"}, body=f"n{i}")


def test_delta_pages_then_delta_link_returns_only_new(
    sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    _fill(sandbox, 23)
    reader = InboxReader(sandbox_settings, page_size=10)
    pages = list(reader.pages(BOX, None))
    assert [len(p.messages) for p in pages] == [10, 10, 3]
    assert all(p.next_link and not p.delta_link for p in pages[:-1])
    assert pages[-1].delta_link and not pages[-1].next_link
    first = pages[0].messages[0]
    # $select honoured: the selected fields, headers included, nothing else.
    assert "internetMessageHeaders" in first and "body" in first
    assert "isRead" not in first and "parentFolderId" not in first
    seen = [m["id"] for p in pages for m in p.messages]
    assert len(set(seen)) == 23
    again = list(reader.pages(BOX, pages[-1].delta_link))
    assert [len(p.messages) for p in again] == [0]
    _fill(sandbox, 2)
    newer = list(reader.pages(BOX, again[-1].delta_link))
    assert [m["body"]["content"] for p in newer for m in p.messages] == ["n0", "n1"]
    reader.close()


def test_page_size_preference_is_applied_and_headers_only_select(
    sandbox: Sandbox, sandbox_settings: Settings, sandbox_app: Any
) -> None:
    _fill(sandbox, 3)
    reader = InboxReader(sandbox_settings, read_body=False, page_size=2)
    url = reader.first_url(BOX)
    response = reader.get(url, prefer="odata.maxpagesize=2")
    assert response.headers["Preference-Applied"] == "odata.maxpagesize=2"
    body = response.json()
    assert len(body["value"]) == 2 and "@odata.nextLink" in body
    assert "body" not in body["value"][0] and "bodyPreview" not in body["value"][0]
    bad = requests.get(f"{sandbox.graph_url}/users/{BOX}/mailFolders/inbox/messages/delta"
                       "?$select=nope", verify=str(sandbox.ca_file),
                       headers={"Authorization": f"Bearer {reader.tokens.token()}"})
    assert bad.status_code == 400
    reader.close()


def test_ndr_attachments_item_and_file(sandbox: Sandbox, sandbox_settings: Settings) -> None:
    from comms.sandbox import inbox as sandbox_inbox

    core = sandbox._core
    original = {"subject": "Hi", "internetMessageId": "<o1@f.example>", "conversationId": "c1",
                "toRecipients": [{"emailAddress": {"address": "a@x.example"}}],
                "internetMessageHeaders": [{"name": "x-comms-send-id", "value": "abc123"}],
                "body": {"contentType": "text", "content": "hello"}}
    item = sandbox_inbox.ndr(core, BOX, recipient="a@x.example", original=original)
    file = sandbox_inbox.ndr(core, BOX, recipient="a@x.example", original=original,
                             attach="file", status="4.4.7")
    reader = InboxReader(sandbox_settings)
    for message in (item, file):
        found = reader.attachments(BOX, message["id"])
        kinds = [a.content_type for a in found]
        assert kinds == ["message/delivery-status", "message/rfc822"]
        assert "x-comms-send-id: abc123" in found[1].text
        assert "Message-ID: <o1@f.example>" in found[1].text
    reader.close()


def test_throttled_and_failing_reads_are_retried_then_give_up(
    sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    _fill(sandbox, 5)
    sandbox.set_faults(seed=3)  # seeded dice: a random run fails 8 reads in a row ~1 in 10
    admin = InboxAdmin(sandbox)
    admin.set_faults(read_throttle_rate=0.5, read_error_rate=0.2)
    reader = InboxReader(sandbox_settings, page_size=1, sleep=lambda s: None)
    pages = list(reader.pages(BOX, None))
    assert sum(len(p.messages) for p in pages) == 5
    assert reader.retries > 0 and admin.stats()["read_throttled"] > 0
    admin.set_faults(read_throttle_rate=1.0)
    with pytest.raises(InboxError, match=r"throttled|failed"):
        list(reader.pages(BOX, None))
    reader.close()


@pytest.mark.sandbox(max_concurrent=1)
def test_reads_count_toward_the_mailbox_concurrency_limit(
    sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    _fill(sandbox, 1)
    sandbox.set_faults(latency=0.3)
    reader = InboxReader(sandbox_settings, sleep=lambda s: None)
    token = reader.tokens.token()
    import threading

    statuses: list[int] = []

    def read() -> None:
        r = requests.get(reader.first_url(BOX), verify=str(sandbox.ca_file),
                         headers={"Authorization": f"Bearer {token}"})
        statuses.append(r.status_code)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 429 in statuses and 200 in statuses
    reader.close()


def test_no_read_permission_names_the_fix(sandbox: Sandbox, sandbox_settings: Settings,
                                          sandbox_app: Any) -> None:
    sandbox.register_app(sandbox_app.client_id, roles=("Mail.Send",))
    reader = InboxReader(sandbox_settings)
    with pytest.raises(InboxError, match=r"Mail\.Read"):
        list(reader.pages(BOX, None))
    reader.close()


def test_the_inbox_dates_what_arrives_on_a_simulated_clock(
    sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    """A simulation (the demo) sets the Inbox's clock: injected replies are dated on it, and an
    NDR produced by a send arrives ``ndr_delay`` after the send on it; the admin endpoint sets
    a clock that runs on from a given time."""
    import datetime as dt

    from comms.sandbox import inbox as sandbox_inbox

    simulated = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
    admin = InboxAdmin(sandbox)
    admin.set_clock(lambda: simulated, ndr_delay=dt.timedelta(minutes=2))
    reply = admin.inject(kind="reply", mailbox=BOX, body="done", **{"from": "c@x.example"})
    assert reply["receivedDateTime"] == "2026-11-30T08:00:00Z"
    admin.set_dead("dead@x.example")
    sandbox_inbox.after_accept(sandbox._core, BOX, {
        "id": "AAMkADsim0001", "send_id": "s1", "to": ["dead@x.example"], "cc": [],
        "subject": "Hi", "internet_message_id": "<s1@f.example>",
        "received_at": "2026-11-30T08:00:00+00:00", "text": "hello"})
    bounce = admin.messages(BOX)[-1]
    assert bounce["subject"].startswith("Undeliverable")
    assert bounce["receivedDateTime"] == "2026-11-30T08:02:00Z"

    base = f"{sandbox.base_url}/_sandbox/inbox/clock"
    answer = requests.post(base, json={"now": "2026-12-24T18:00:00Z"},
                           verify=str(sandbox.ca_file))
    assert answer.status_code == 200 and answer.json()["now"].startswith("2026-12-24T18:0")
    later = admin.inject(kind="reply", mailbox=BOX, body="x", **{"from": "c@x.example"})
    assert later["receivedDateTime"].startswith("2026-12-24T18:0")
    assert requests.post(base, json={"now": "2026-12-24T18:00:00"},
                         verify=str(sandbox.ca_file)).status_code == 400
    requests.post(base, json={"now": None}, verify=str(sandbox.ca_file))
    now = admin.inject(kind="reply", mailbox=BOX, body="y", **{"from": "c@x.example"})
    real = dt.datetime.fromisoformat(now["receivedDateTime"].replace("Z", "+00:00"))
    assert abs(real - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)


def test_ndr_attachments_read_through_json_batching(
    sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    """``attachments_many``: the same attachments as one read per NDR, in $batch requests of
    20 reads (the lists, then the attached items' MIME); reads throttled inside a batch are sent
    again, an error inside a batch names the fix."""
    from comms.sandbox import inbox as sandbox_inbox

    core = sandbox._core
    ids = []
    for n in range(25):
        original = {"subject": f"Hi {n}", "internetMessageId": f"<o{n}@f.example>",
                    "toRecipients": [{"emailAddress": {"address": f"a{n}@x.example"}}],
                    "internetMessageHeaders": [{"name": "x-comms-send-id", "value": f"sid{n}"}]}
        ids.append(sandbox_inbox.ndr(core, BOX, recipient=f"a{n}@x.example", original=original,
                                     attach="item" if n % 2 else "file")["id"])
    reader = InboxReader(sandbox_settings, sleep=lambda s: None)
    found = reader.attachments_many(BOX, ids)
    assert reader.requests == 3  # 25 lists in 2 batches, the 12 items' MIME in 1
    for n, mid in enumerate(ids):
        assert found[mid] == reader.attachments(BOX, mid)
        assert f"x-comms-send-id: sid{n}" in found[mid][1].text
    sandbox.set_faults(seed=5)
    InboxAdmin(sandbox).set_faults(read_throttle_rate=0.4)
    assert reader.attachments_many(BOX, ids) == found
    assert reader.retries > 0
    InboxAdmin(sandbox).set_faults()
    with pytest.raises(InboxError, match="not found"):
        reader.attachments_many(BOX, [ids[0], "AAMkADnosuchmessage"])
    reader.close()


def test_inbox_and_sync_reads_share_one_retry_policy(
    sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    """``comms.delivery.reads`` under both clients: a read throttled every time is tried
    ``max_attempts`` times with a wait between attempts (none after the last), then each client
    gives up with its own error naming the fix."""
    from comms.sync.clients import Reader, SourceFailed

    _fill(sandbox, 1)
    InboxAdmin(sandbox).set_faults(read_throttle_rate=1.0)
    inbox = InboxReader(sandbox_settings, sleep=lambda s: None)
    with pytest.raises(InboxError, match=r"failed \(429 ApplicationThrottled"):
        inbox.get(inbox.first_url(BOX))
    assert (inbox.requests, inbox.retries) == (8, 7)
    waits: list[float] = []
    sync = Reader(inbox.session, max_attempts=3, sleep=waits.append)
    tokens = inbox.tokens
    with pytest.raises(SourceFailed, match=r"still failing after 3 attempts \(HTTP 429\); run "
                                           r"`comms sync` again later"):
        sync.get_json(inbox.first_url(BOX), tokens.token, tokens.refresh, None, "the Inbox")
    assert sync.retries == 2 and len(waits) == 2
    InboxAdmin(sandbox).set_faults()
    assert "value" in sync.get_json(inbox.first_url(BOX), tokens.token, tokens.refresh)
    inbox.close()


def _ndrs(sandbox: Sandbox, n: int) -> list[str]:
    """``n`` NDRs in the Inbox, odd ones with the original as an item (a second read for its
    MIME), even ones as a file; their message ids."""
    from comms.sandbox import inbox as sandbox_inbox

    ids = []
    for k in range(n):
        original = {"subject": f"Hi {k}", "internetMessageId": f"<o{k}@f.example>",
                    "toRecipients": [{"emailAddress": {"address": f"a{k}@x.example"}}],
                    "internetMessageHeaders": [{"name": "x-comms-send-id", "value": f"sid{k}"}]}
        ids.append(sandbox_inbox.ndr(sandbox._core, BOX, recipient=f"a{k}@x.example",
                                     original=original, attach="item" if k % 2 else "file")["id"])
    return ids


def _post_batch(sandbox: Sandbox, token: str, ids: list[str], *, chained: bool,
                extra: dict[int, dict[str, Any]] | None = None) -> requests.Response:
    """One ``$batch`` of attachment-list reads of ``ids``; ``chained``: read n depends on
    n-1; ``extra`` adds or replaces fields of request n."""
    reqs = [{"id": str(n), "method": "GET", "url": f"/users/{BOX}/messages/{mid}/attachments",
             **({"dependsOn": [str(n - 1)]} if chained and n else {}),
             **(extra or {}).get(n, {})} for n, mid in enumerate(ids)]
    return requests.post(f"{sandbox.graph_url}/$batch", json={"requests": reqs},
                         verify=str(sandbox.ca_file), headers={"Authorization": f"Bearer {token}"})


def test_batch_of_independent_reads_meets_the_mailbox_limit_and_a_chain_does_not(
    sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    """Graph runs a batch's independent requests in parallel: 20 reads to one mailbox get 4
    through and 16 ``MailboxConcurrency`` 429s (3 when the mailbox already has one in flight);
    chained with ``dependsOn`` they run one at a time and all succeed."""
    ids = _ndrs(sandbox, 20)
    reader = InboxReader(sandbox_settings)
    token = reader.tokens.token()
    answer = _post_batch(sandbox, token, ids, chained=False)
    assert answer.status_code == 200
    statuses = [r["status"] for r in answer.json()["responses"]]
    assert statuses == [200] * 4 + [429] * 16
    refused = answer.json()["responses"][4]
    assert refused["body"]["error"]["code"] == "ApplicationThrottled"
    assert "MailboxConcurrency" in refused["body"]["error"]["message"]
    assert float(refused["headers"]["Retry-After"]) > 0
    stats = sandbox.stats()
    assert stats["throttled_concurrency"] == 16
    assert stats["max_in_flight_per_mailbox"][BOX] == 5  # the limit, and one over it
    assert stats["in_flight_per_mailbox"][BOX] == 0  # every slot given back

    state = sandbox._core.state
    assert state.begin_request(BOX) is None  # another request of the app, in flight meanwhile
    try:
        busy = _post_batch(sandbox, token, ids, chained=False)
    finally:
        state.end_request(BOX)
    assert [r["status"] for r in busy.json()["responses"]].count(200) == 3

    chained = _post_batch(sandbox, token, ids, chained=True)
    assert [r["status"] for r in chained.json()["responses"]] == [200] * 20
    assert sandbox.stats()["throttled_concurrency"] == 16 + 17  # none more
    reader.close()


def test_chained_batch_stops_at_a_failed_request_and_bad_dependencies_are_refused(
    sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    """A request whose dependency failed is answered 424 and not run; ``dependsOn`` naming
    an id that is not an earlier request's, or a batch mixing chained and independent
    requests, is refused whole with 400."""
    ids = _ndrs(sandbox, 8)
    ids[2] = "AAMkADnosuchmessage"
    reader = InboxReader(sandbox_settings)
    token = reader.tokens.token()
    before = InboxAdmin(sandbox).stats()["attachment_requests"]
    answers = _post_batch(sandbox, token, ids, chained=True).json()["responses"]
    assert [r["status"] for r in answers] == [200, 200, 404] + [424] * 5
    assert [r["id"] for r in answers] == [str(n) for n in range(8)]
    assert answers[3]["body"]["error"]["code"] == "FailedDependency"
    assert InboxAdmin(sandbox).stats()["attachment_requests"] == before + 3  # 4.. never ran

    for extra in ({3: {"dependsOn": ["nope"]}}, {3: {"dependsOn": ["5"]}},
                  {3: {"dependsOn": "2"}}, {0: {"dependsOn": ["0"]}}):
        bad = _post_batch(sandbox, token, ids[:6], chained=True, extra=extra)
        assert bad.status_code == 400, extra
        assert bad.json()["error"]["code"] == "BadRequest"
    mixed = _post_batch(sandbox, token, ids[:6], chained=True, extra={4: {"dependsOn": None}})
    assert mixed.status_code == 400 and "fully sequential" in mixed.json()["error"]["message"]
    reader.close()


def test_reader_retries_a_throttled_read_of_a_chain_with_the_reads_after_it(
    sandbox: Sandbox, sandbox_settings: Settings
) -> None:
    """One read throttled in the middle of a chained batch: it and the reads after it (424,
    not run) go into the next batch; every attachment is read exactly once, in order, and the
    mailbox never has more than one of the reader's reads in flight."""
    ids = _ndrs(sandbox, 25)
    reader = InboxReader(sandbox_settings, sleep=lambda s: None)
    expected = {mid: reader.attachments(BOX, mid) for mid in ids}  # one read at a time
    reader.close()
    reader = InboxReader(sandbox_settings, sleep=lambda s: None)
    admin = InboxAdmin(sandbox)
    before = admin.stats()
    admin.set_faults(read_throttle_at=(3,))
    found = reader.attachments_many(BOX, ids)
    after = admin.stats()
    assert list(found) == ids and found == expected
    assert after["read_throttled"] - before["read_throttled"] == 1
    # 25 lists and 12 items' MIME, each run once: the throttled read never reached its route
    # and the 17 answered 424 were not run.
    assert after["attachment_requests"] - before["attachment_requests"] == 25 + 12
    # 25 lists in 2 batches, the 18 left from the first (the throttled read and the 17 after
    # it) in a third, the 12 items' MIME in a fourth.
    assert (reader.requests, reader.retries) == (4, 1)
    stats = sandbox.stats()
    assert stats["throttled_concurrency"] == 0 and stats["max_in_flight_per_mailbox"][BOX] == 1
    reader.close()
