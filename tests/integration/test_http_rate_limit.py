"""Flood control over HTTP on a real cluster: a session's commands past the token bucket
get ``429 rate_limited`` with ``Retry-After``; polls are not counted; TCP is unaffected."""

from __future__ import annotations

import time

import pytest

from router.policy import SessionRateLimit
from tests.cluster import Cluster
from tests.integration.test_http_api import Api, Background, assert_error

pytestmark = pytest.mark.timeout(60)


def test_session_rate_limit_unit() -> None:
    now = [100.0]
    admit = SessionRateLimit(rate=2.0, burst=3, clock=lambda: now[0])

    class Session:
        pass

    session = Session()
    assert admit(None, "join") is None  # creating a session is not throttled here
    assert [admit(session, "send") for _ in range(3)] == [None, None, None]
    assert admit(session, "send") == pytest.approx(0.5)
    assert admit(session, "poll") is None  # waiting for news is free
    now[0] += 0.5
    assert admit(session, "send") is None
    assert SessionRateLimit(rate=0, burst=0)(session, "send") is None  # 0 = off


def test_http_sends_past_the_burst_get_429_with_retry_after() -> None:
    with Cluster(shards=2, extra_args=["--rate-limit", "0.2", "--rate-burst", "3"]) as cluster:
        api = Api(cluster)
        api.join("flood", "alice")  # creates the session: not counted
        statuses = []
        for i in range(3):
            statuses.append(api.post("/api/send", {"room": "flood", "text": f"m{i}"}).status)
        assert statuses == [200, 200, 200]
        reply = api.post("/api/send", {"room": "flood", "text": "one too many"})
        assert_error(reply, 429, "rate_limited")
        assert int(reply.headers["Retry-After"]) >= 1
        # Polls are free: the session can still read everything it managed to send.
        poll = api.poll("room=flood&after=0")
        texts = [msg["text"] for msg in poll["messages"] if msg["type"] == "chat"]
        assert texts == ["m0", "m1", "m2"]
        time.sleep(float(reply.headers["Retry-After"]))
        assert api.post("/api/send", {"room": "flood", "text": "later"}).status == 200
        api.close()


def test_polls_answered_from_the_shards_at_once_take_a_token() -> None:
    """A poll whose cursor the session's feed does not cover (after=0 in a room with older
    history) is answered by the shards at once, however often it is asked: it takes a
    token. A poll that waits for news does not."""
    with Cluster(shards=1, extra_args=["--rate-limit", "0.2", "--rate-burst", "3"]) as cluster:
        bob = Api(cluster)
        bob.join("fetchy", "bob")  # creates the session: not counted
        bob.send("fetchy", "before alice")
        api = Api(cluster)
        joined = api.join("fetchy", "alice")
        statuses = [api.get("/api/poll?room=fetchy&after=0").status for _ in range(3)]
        assert statuses == [200, 200, 200]
        reply = api.get("/api/poll?room=fetchy&after=0")
        assert_error(reply, 429, "rate_limited")
        assert int(reply.headers["Retry-After"]) >= 1
        # A poll from the current cursor waits for news and costs nothing, even now.
        cursor = f"room=fetchy&after={joined['id']}&epoch={joined['epoch']}"
        waiting = Background(api, cursor)
        time.sleep(0.3)
        bob.send("fetchy", "news")
        answer = waiting.join()
        assert answer.status == 200
        assert [msg["text"] for msg in answer.json["messages"]] == ["news"]
        api.close()
        bob.close()
