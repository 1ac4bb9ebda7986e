"""The JSON API over HTTP against a real cluster (``tests.cluster.Cluster``), with
``http.client`` on one side and, where both protocols meet, a line-protocol client.

A few connection-level cases (the request deadline, keep-alive idle, the 429 hook) run the
HTTP adapter in-process with shortened limits instead, so that no test waits 10 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import re
import signal
import socket
import threading
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import pytest

from common import errors
from common.errors import Refusal
from common.hashing import room_to_shard
from common.limits import (
    HISTORY_SIZE,
    MAX_POLLS_PER_SESSION,
    MAX_ROOMS_PER_CLIENT,
    MAX_TEXT_CHARS,
)
from router import http as http_adapter
from router.http_api import HttpApi, failure_error
from router.http_static import StaticFiles
from router.hub import Hub
from router.policy import ConnectionLimiter
from router.settings import Settings
from tests.cluster import Cluster, LineClient
from web import WEB_ROOT

pytestmark = pytest.mark.timeout(60)

# The main cluster's --poll-timeout: long, so that a poll that was not woken by news hangs
# (and the test fails) instead of timing out and then finding the news anyway.
POLL_TIMEOUT = 30.0
SHARDS = 2


class Reply(NamedTuple):
    status: int
    headers: Any  # http.client.HTTPMessage
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """A browser stand-in: one keep-alive connection and one session cookie."""

    def __init__(self, cluster: Cluster, timeout: float = 10.0) -> None:
        self.port = cluster.http_port
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        self.cookie: Optional[str] = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Optional[Dict[str, str]] = None,
        raw: Optional[bytes] = None,
    ) -> Reply:
        sent = dict(headers or {})
        data = raw
        if body is not None:
            sent.setdefault("Content-Type", "application/json")
            data = json.dumps(body).encode()
        if self.cookie:
            sent.setdefault("Cookie", f"sc_session={self.cookie}")
        self.conn.request(method, path, body=data, headers=sent)
        response = self.conn.getresponse()
        reply = Reply(response.status, response.headers, response.read())
        cookie = response.headers.get("Set-Cookie")
        if cookie:
            value = cookie.split(";")[0].split("=", 1)[1]
            self.cookie = value or None
        return reply

    def post(self, path: str, body: Any, **kwargs: Any) -> Reply:
        return self.request("POST", path, body, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def join(self, room: str, username: str) -> Dict[str, Any]:
        reply = self.post("/api/join", {"room": room, "username": username})
        assert reply.status == 200, reply
        return reply.json

    def send(self, room: str, text: str) -> int:
        reply = self.post("/api/send", {"room": room, "text": text})
        assert reply.status == 200, reply
        return reply.json["id"]

    def poll(self, query: str) -> Dict[str, Any]:
        reply = self.get("/api/poll?" + query)
        assert reply.status == 200, reply
        return reply.json

    def close(self) -> None:
        self.conn.close()


def assert_error(reply: Reply, status: int, code: str) -> Dict[str, Any]:
    assert reply.status == status, reply
    assert reply.headers["Content-Type"].startswith("application/json")
    error = reply.json["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send *data* on a fresh connection; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def texts(payload: Dict[str, Any]) -> List[str]:
    return [message["text"] for message in payload["messages"]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    args = ["--poll-timeout", str(POLL_TIMEOUT), "--session-ttl", "30", "--rate-limit", "0"]
    with Cluster(shards=SHARDS, extra_args=args) as running:
        yield running


@pytest.fixture
def api(cluster: Cluster) -> Iterator[Api]:
    client = Api(cluster)
    yield client
    client.close()


@pytest.fixture
def tcp(cluster: Cluster) -> Iterator[LineClient]:
    client = cluster.connect()
    yield client
    client.close()


def unique(prefix: str, _counter: List[int] = [0]) -> str:  # noqa: B006
    _counter[0] += 1
    return f"{prefix}{_counter[0]}"


# --- health, static files, routing -------------------------------------------------------


def test_healthz(api: Api) -> None:
    reply = api.get("/healthz")
    assert reply.status == 200
    body = reply.json
    assert body["ok"] is True and body["shards"] == SHARDS and body["shards_alive"] == SHARDS
    assert reply.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "path, content_type",
    [
        ("/", "text/html"),
        ("/index.html", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/favicon.svg", "image/svg+xml"),
    ],
    ids=["root", "index", "js", "css", "icon"],
)
def test_static_files(api: Api, path: str, content_type: str) -> None:
    reply = api.get(path)
    assert reply.status == 200 and reply.body
    assert reply.headers["Content-Type"].startswith(content_type)
    policy = reply.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    etag = reply.headers["ETag"]
    assert etag and reply.headers["Cache-Control"] == "no-cache"
    again = api.get(path, headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b""


def test_head_has_headers_but_no_body(api: Api) -> None:
    full = api.get("/")
    head = api.request("HEAD", "/")
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == str(len(full.body))


def test_page_has_no_inline_script_or_style() -> None:
    html = (WEB_ROOT / "index.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "<style" not in html and "style=" not in html
    script = (WEB_ROOT / "app.js").read_text(encoding="utf-8")
    assert not re.search(r"\.(innerHTML|outerHTML|insertAdjacentHTML)\b|document\.write", script)


@pytest.mark.parametrize("path", ["/nope", "/api/nope", "/../README.md", "/web/app.js"])
def test_not_found(api: Api, path: str) -> None:
    assert_error(api.get(path), 404, "not_found")


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("GET", "/api/join", "POST"),
        ("GET", "/api/send", "POST"),
        ("DELETE", "/api/leave", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/api/rooms", "GET, HEAD"),
        ("POST", "/", "GET, HEAD"),
    ],
)
def test_method_not_allowed(api: Api, method: str, path: str, allowed: str) -> None:
    reply = api.request(method, path, body={} if method != "GET" else None)
    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers["Allow"] == allowed


# --- join --------------------------------------------------------------------------------


def test_join_sets_a_strict_http_only_cookie(api: Api) -> None:
    room = unique("room")
    reply = api.post("/api/join", {"room": room, "username": "alice"})
    assert reply.status == 200
    body = reply.json
    assert body["ok"] is True and body["room"] == room and body["username"] == "alice"
    assert body["id"] == 1 and body["epoch"] >= 1
    cookie = reply.headers["Set-Cookie"]
    assert cookie.startswith("sc_session=")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert flag in cookie
    assert len(api.cookie or "") >= 32


def test_join_adds_rooms_to_the_same_session(api: Api) -> None:
    first, second = unique("room"), unique("room")
    api.join(first, "alice")
    token = api.cookie
    api.join(second, "alice")
    assert api.cookie == token
    info = api.get("/api/session").json
    assert info["username"] == "alice" and info["rooms"] == sorted([first, second])


def test_session_endpoint_without_a_session(api: Api) -> None:
    assert api.get("/api/session").json == {"username": None, "rooms": [], "epochs": {}}


@pytest.mark.parametrize(
    "body, code",
    [
        ({"room": "bad room", "username": "alice"}, "invalid_room"),
        ({"room": "x" * 65, "username": "alice"}, "invalid_room"),
        ({"room": 5, "username": "alice"}, "invalid_room"),
        ({"username": "alice"}, "invalid_room"),
        ({"room": "lobby", "username": "al ice"}, "invalid_username"),
        ({"room": "lobby", "username": "a" * 33}, "invalid_username"),
        ({"room": "lobby", "username": "\ud800"}, "invalid_username"),
        ({"room": "lobby"}, "invalid_username"),
        ([1, 2], "invalid_json"),
    ],
    ids=[
        "space-in-room",
        "room-too-long",
        "room-not-string",
        "no-room",
        "space-in-name",
        "name-too-long",
        "lone-surrogate",
        "no-name",
        "not-an-object",
    ],
)
def test_join_bad_input(api: Api, body: Any, code: str) -> None:
    assert_error(api.post("/api/join", body), 400, code)
    assert api.cookie is None


@pytest.mark.parametrize(
    "raw",
    [b"{", b"\xff\xfe", b"[" * 50_00 + b"]" * 50_00, b""],
    ids=["truncated", "not-utf8", "deeply-nested", "empty"],
)
def test_join_invalid_json(api: Api, raw: bytes) -> None:
    reply = api.request("POST", "/api/join", raw=raw, headers={"Content-Type": "application/json"})
    assert_error(reply, 400, "invalid_json")


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"],
)
def test_posts_need_json_content_type(api: Api, content_type: Optional[str]) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    raw = b'{"room": "lobby", "username": "alice"}'
    reply = api.request("POST", "/api/join", raw=raw, headers=headers)
    assert_error(reply, 415, "unsupported_media_type")


def test_json_content_type_with_charset_is_fine(api: Api) -> None:
    raw = json.dumps({"room": unique("room"), "username": "alice"}).encode()
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert api.request("POST", "/api/join", raw=raw, headers=headers).status == 200


def test_cross_origin_posts_are_refused(api: Api) -> None:
    body = {"room": unique("room"), "username": "alice"}
    reply = api.post("/api/join", body, headers={"Origin": "http://evil.example"})
    assert_error(reply, 403, "bad_origin")
    same = api.post("/api/join", body, headers={"Origin": f"http://127.0.0.1:{api.port}"})
    assert same.status == 200


def test_name_taken_by_tcp_user(api: Api, tcp: LineClient) -> None:
    room = unique("room")
    tcp.join(room, "alice")
    for name in ("alice", "ALICE"):
        reply = api.post("/api/join", {"room": room, "username": name})
        assert assert_error(reply, 409, "name_taken")["room"] == room
        assert api.cookie is None  # no session was left behind
    api.join(room, "bob")


def test_name_taken_by_browser_user(api: Api, tcp: LineClient) -> None:
    room = unique("room")
    api.join(room, "bob")
    tcp.send(f"JOIN {room} Bob")
    tcp.expect(f"ERROR name taken in {room}")


def test_already_in_room(api: Api) -> None:
    room = unique("room")
    api.join(room, "alice")
    assert_error(api.post("/api/join", {"room": room, "username": "alice"}), 409, "already_in_room")


def test_concurrent_joins_of_one_room_get_one_answer_each(cluster: Cluster) -> None:
    tabs = [Api(cluster), Api(cluster)]
    tabs[0].join(unique("room"), "alice")
    tabs[1].cookie = tabs[0].cookie
    room = unique("room")
    body = {"room": room, "username": "alice"}
    replies: List[Reply] = []
    threads = [
        threading.Thread(target=lambda tab=tab: replies.append(tab.post("/api/join", body)))
        for tab in tabs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert sorted(reply.status for reply in replies) == [200, 409]
    for tab in tabs:
        tab.close()


def test_session_username_is_fixed(api: Api) -> None:
    api.join(unique("room"), "alice")
    reply = api.post("/api/join", {"room": unique("room"), "username": "mallory"})
    assert_error(reply, 403, "wrong_username")


def test_a_session_in_no_room_may_start_over_with_another_name(api: Api) -> None:
    room = unique("room")
    api.join(room, "alice")
    old = api.cookie
    assert api.post("/api/leave", {"room": room}).status == 200
    assert api.join(room, "alicia")["username"] == "alicia"
    assert api.cookie != old


def test_too_many_rooms(api: Api) -> None:
    prefix = unique("many")
    for i in range(MAX_ROOMS_PER_CLIENT):
        api.join(f"{prefix}-{i}", "alice")
    reply = api.post("/api/join", {"room": f"{prefix}-x", "username": "alice"})
    assert_error(reply, 400, "too_many_rooms")


# --- send --------------------------------------------------------------------------------


def test_send_reaches_tcp_members(api: Api, tcp: LineClient) -> None:
    room = unique("room")
    api.join(room, "alice")
    tcp.join(room, "bob")
    reply = api.post("/api/send", {"room": room, "text": "hi bob  <b>x</b>\t!"})
    assert reply.status == 200 and reply.json == {"ok": True, "room": room, "id": 3}
    tcp.expect(f"MSG {room} alice hi bob  <b>x</b>\t!")


def test_send_with_matching_username(api: Api) -> None:
    room = unique("room")
    api.join(room, "alice")
    reply = api.post("/api/send", {"room": room, "text": "x", "username": "Alice"})
    assert reply.status == 200


def test_cannot_post_as_someone_else(api: Api, tcp: LineClient) -> None:
    room = unique("room")
    api.join(room, "alice")
    tcp.join(room, "bob")
    reply = api.post("/api/send", {"room": room, "text": "hi", "username": "bob"})
    assert_error(reply, 403, "wrong_username")
    tcp.no_line()


@pytest.mark.parametrize(
    "text, status, code",
    [
        ("", 400, "invalid_text"),
        (None, 400, "invalid_text"),
        (7, 400, "invalid_text"),
        ("two\nlines", 400, "invalid_text"),
        ("nul\x00", 400, "invalid_text"),
        ("\udc80", 400, "invalid_text"),
        ("x" * (MAX_TEXT_CHARS + 1), 413, "text_too_long"),
        ("\U0001f600" * 1100, 413, "text_too_long"),  # fits in characters, not in one line
    ],
    ids=["empty", "null", "number", "newline", "nul", "surrogate", "too-long", "line-too-long"],
)
def test_send_bad_text(api: Api, text: Any, status: int, code: str) -> None:
    room = unique("room")
    api.join(room, "alice")
    assert_error(api.post("/api/send", {"room": room, "text": text}), status, code)


def test_send_longest_text(api: Api) -> None:
    room = unique("room")
    api.join(room, "alice")
    assert api.post("/api/send", {"room": room, "text": "x" * MAX_TEXT_CHARS}).status == 200


def test_send_to_a_room_not_joined(api: Api) -> None:
    api.join(unique("room"), "alice")
    error = assert_error(
        api.post("/api/send", {"room": "elsewhere", "text": "x"}), 403, "not_in_room"
    )
    assert error["room"] == "elsewhere"


@pytest.mark.parametrize("cookie", [None, "sc_session=forged", "other=1"])
def test_no_session(api: Api, cookie: Optional[str]) -> None:
    headers = {"Cookie": cookie} if cookie else {}
    reply = api.post("/api/send", {"room": "lobby", "text": "x"}, headers=headers)
    assert_error(reply, 401, "no_session")
    assert_error(api.get("/api/poll?room=lobby&after=0", headers=headers), 401, "no_session")
    assert_error(api.post("/api/leave", {"room": "lobby"}, headers=headers), 401, "no_session")


# --- poll --------------------------------------------------------------------------------


def test_poll_after_zero_returns_the_history(api: Api, tcp: LineClient) -> None:
    room = unique("room")
    tcp.join(room, "carol")
    tcp.send(f"MSG {room} before you came")
    tcp.expect(f"MSG {room} carol before you came")
    api.join(room, "alice")
    api.send(room, "hello")
    payload = api.poll(f"room={room}&after=0")
    messages = payload["messages"]
    assert [message["id"] for message in messages] == [1, 2, 3, 4]
    assert texts(payload) == [
        f"carol joined {room}",
        "before you came",
        f"alice joined {room}",
        "hello",
    ]
    assert [message["type"] for message in messages] == ["info", "chat", "info", "chat"]
    assert [message["kind"] for message in messages] == ["join", "chat", "join", "chat"]
    assert messages[1]["username"] == "carol" and messages[1]["room"] == room
    assert isinstance(messages[1]["ts"], float)
    epoch = payload["epoch"]
    assert payload["missed"] is False
    assert payload["rooms"][room] == {"after": 4, "epoch": epoch, "missed": False, "first": 1}
    assert payload["cursors"] == f"{room}:4:{epoch}"


def wait_for_waiting_polls(api: Api, count: int) -> None:
    """Until the router reports *count* polls waiting (a long poll is parked)."""
    probe = Api.__new__(Api)
    probe.conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
    probe.cookie = None
    try:
        for _ in range(200):
            if probe.get("/healthz").json["polls_waiting"] >= count:
                return
            threading.Event().wait(0.01)
        raise AssertionError("the poll never started waiting")
    finally:
        probe.close()


class Background:
    """A poll run on a thread (it blocks until news or the timeout)."""

    def __init__(self, api: Api, query: str) -> None:
        self.result: Optional[Reply] = None
        self._thread = threading.Thread(target=self._run, args=(api, query), daemon=True)
        self._thread.start()

    def _run(self, api: Api, query: str) -> None:
        self.result = api.get("/api/poll?" + query)

    def join(self) -> Reply:
        self._thread.join(15)
        assert self.result is not None
        return self.result


def test_long_poll_wakes_up_on_a_message(cluster: Cluster, tcp: LineClient) -> None:
    room = unique("room")
    poller = Api(cluster, timeout=15)
    poller.join(room, "alice")
    tcp.join(room, "bob")
    # After the join entries (1: alice, 2: bob) nothing: the poll must wait.
    background = Background(poller, f"room={room}&after=2")
    wait_for_waiting_polls(poller, 1)
    tcp.send(f"MSG {room} wake up")
    reply = background.join()
    assert reply.status == 200
    assert texts(reply.json) == ["wake up"] and reply.json["rooms"][room]["after"] == 3
    poller.close()


def test_one_poll_for_several_rooms(cluster: Cluster, tcp: LineClient) -> None:
    first, second = unique("room"), unique("room")
    poller = Api(cluster, timeout=15)
    poller.join(first, "alice")
    poller.join(second, "alice")
    tcp.join(second, "bob")
    start = poller.poll(f"cursors={first}:0,{second}:0")
    assert {message["room"] for message in start["messages"]} == {first, second}
    background = Background(poller, "cursors=" + start["cursors"])
    wait_for_waiting_polls(poller, 1)
    tcp.send(f"MSG {second} news in the second room")
    reply = background.join().json
    assert [(message["room"], message["text"]) for message in reply["messages"]] == [
        (second, "news in the second room")
    ]
    assert "epoch" not in reply  # only single-room polls have a top-level epoch
    assert set(reply["rooms"]) == {first, second}
    poller.close()


def test_a_leave_wakes_the_poll(cluster: Cluster) -> None:
    room = unique("room")
    poller = Api(cluster, timeout=15)
    poller.join(room, "alice")
    background = Background(poller, f"room={room}&after=1")
    wait_for_waiting_polls(poller, 1)
    other = Api(cluster)
    other.cookie = poller.cookie  # a second tab of the same session
    assert other.post("/api/leave", {"room": room}).status == 200
    reply = background.join().json
    assert reply["rooms"][room]["left"] is True and reply["cursors"] == ""
    other.close()
    poller.close()


def test_a_fifth_waiting_poll_answers_the_oldest(cluster: Cluster) -> None:
    room = unique("room")
    first = Api(cluster, timeout=15)
    first.join(room, "alice")
    tabs = [first] + [Api(cluster, timeout=15) for _ in range(MAX_POLLS_PER_SESSION)]
    for tab in tabs[1:]:
        tab.cookie = first.cookie  # more tabs of the same session
    polls = []
    for count, tab in enumerate(tabs[:MAX_POLLS_PER_SESSION], start=1):
        polls.append(Background(tab, f"room={room}&after=1"))
        wait_for_waiting_polls(first, count)
    polls.append(Background(tabs[-1], f"room={room}&after=1"))
    oldest = polls[0].join()
    assert oldest.status == 200 and oldest.json["messages"] == []
    first.send(room, "for everyone still waiting")
    for poll in polls[1:]:
        assert texts(poll.join().json) == ["for everyone still waiting"]
    for tab in tabs:
        tab.close()


@pytest.mark.parametrize(
    "query",
    [
        "",
        "after=0",
        "room=lobby&cursors=lobby:0",
        "room=bad%20room&after=0",
        "room=lobby&after=-1",
        "room=lobby&after=x",
        "room=lobby&after=0&epoch=x",
        "room=lobby&room=dev",
        "cursors=",
        "cursors=lobby:0,lobby:1",
        "cursors=lobby:0:1:2",
        "cursors=" + ",".join(f"r{i}:0" for i in range(MAX_ROOMS_PER_CLIENT + 1)),
    ],
    ids=[
        "nothing",
        "no-room",
        "both-forms",
        "bad-room",
        "negative",
        "not-a-number",
        "bad-epoch",
        "two-rooms",
        "empty-cursors",
        "duplicate",
        "too-many-parts",
        "too-many-cursors",
    ],
)
def test_poll_bad_cursors(api: Api, query: str) -> None:
    api.join(unique("room"), "alice")
    assert_error(api.get("/api/poll?" + query), 400, "invalid_cursor")


def test_poll_a_room_not_joined(api: Api) -> None:
    room = unique("room")
    api.join(room, "alice")
    error = assert_error(api.get(f"/api/poll?cursors={room}:0,other:0"), 403, "not_in_room")
    assert error["room"] == "other"


# --- gaps: old cursors, other epochs, restarts ---------------------------------------------


@pytest.fixture(scope="module")
def busy_room(cluster: Cluster) -> Iterator[tuple]:
    """A room with more events than the history holds, and a session that joined first."""
    room = unique("busy")
    watcher = Api(cluster, timeout=15)
    watcher.join(room, "watcher")
    talker = cluster.connect()
    talker.join(room, "talker")
    count = HISTORY_SIZE + 20
    talker.send_raw("".join(f"MSG {room} line {i}\n" for i in range(count)).encode())
    talker.read_until(lambda line: line == f"MSG {room} talker line {count - 1}")
    yield room, watcher, count + 2  # + the two joins
    talker.close()
    watcher.close()


def test_cursor_older_than_the_history_is_flagged(busy_room: tuple) -> None:
    room, watcher, last = busy_room
    payload = watcher.poll(f"room={room}&after=1")
    state = payload["rooms"][room]
    assert payload["missed"] is True and state["missed"] is True
    ids = [message["id"] for message in payload["messages"]]
    assert ids == list(range(last - HISTORY_SIZE + 1, last + 1))
    assert state["first"] == ids[0] and state["after"] == last


def test_history_longer_than_kept_is_flagged_from_zero(busy_room: tuple) -> None:
    room, watcher, last = busy_room
    payload = watcher.poll(f"room={room}&after=0")
    assert payload["missed"] is True and len(payload["messages"]) == HISTORY_SIZE


def test_cursor_inside_the_history_is_not_flagged(busy_room: tuple) -> None:
    room, watcher, last = busy_room
    payload = watcher.poll(f"room={room}&after={last - 5}")
    assert payload["missed"] is False
    assert [message["id"] for message in payload["messages"]] == list(range(last - 4, last + 1))


@pytest.mark.parametrize("cursor", ["after=3&epoch=999", "after=999999"], ids=["epoch", "future"])
def test_cursor_from_another_epoch_gets_the_whole_history(busy_room: tuple, cursor: str) -> None:
    room, watcher, last = busy_room
    payload = watcher.poll(f"room={room}&{cursor}")
    assert payload["missed"] is True
    assert len(payload["messages"]) == HISTORY_SIZE and payload["rooms"][room]["after"] == last
    assert payload["epoch"] != 999


def test_shard_restart_bumps_the_epoch_and_flags_the_gap(cluster: Cluster) -> None:
    room = unique("restart")
    index = room_to_shard(room, SHARDS)
    client = Api(cluster, timeout=15)
    client.join(room, "alice")
    client.send(room, "before the crash")
    before = client.poll(f"room={room}&after=0")
    epoch = before["epoch"]
    pids = cluster.shard_pids()
    mark = cluster.log_mark()
    os.kill(pids[index], signal.SIGKILL)
    cluster.wait_for_log(f"shard {index} restarted", since=mark)
    after = client.poll("cursors=" + before["cursors"])
    # Epochs are opaque (PROTOCOL.md): only "another one" is promised.
    assert after["missed"] is True and after["epoch"] != epoch
    assert "before the crash" not in texts(after)
    # Still a member (the router put the session back): the new epoch's stream starts over.
    new_id = client.send(room, "after the crash")
    payload = client.poll("cursors=" + after["cursors"])
    assert payload["missed"] is False and payload["messages"][-1]["id"] == new_id
    assert texts(payload)[-1] == "after the crash"
    client.close()


# --- leave, rooms, members -----------------------------------------------------------------


def test_leave(api: Api, tcp: LineClient) -> None:
    room = unique("room")
    tcp.join(room, "bob")
    api.join(room, "alice")
    tcp.expect(f"INFO alice joined {room}")
    assert api.post("/api/leave", {"room": room}).json == {"ok": True, "room": room}
    tcp.expect(f"INFO alice left {room}")
    assert_error(api.post("/api/send", {"room": room, "text": "x"}), 403, "not_in_room")
    assert_error(api.post("/api/leave", {"room": room}), 403, "not_in_room")
    assert_error(api.post("/api/leave", {"room": "bad room"}), 400, "invalid_room")


def test_leave_without_a_room_ends_the_session(api: Api, tcp: LineClient) -> None:
    room = unique("room")
    tcp.join(room, "bob")
    api.join(room, "alice")
    tcp.expect(f"INFO alice joined {room}")
    reply = api.post("/api/leave", {})
    assert reply.json == {"ok": True, "ended": True}
    assert "Max-Age=0" in reply.headers["Set-Cookie"]
    tcp.expect(f"INFO alice left {room}")
    assert api.cookie is None


def test_rooms_and_members(api: Api, tcp: LineClient) -> None:
    room = unique("zoë-")  # not ASCII: percent-encoded in the members path
    tcp.join(room, "bob")
    api.join(room, "alice")
    rooms = api.get("/api/rooms").json["rooms"]
    assert {"room": room, "members": 2} in rooms
    assert [entry["room"] for entry in rooms] == sorted(entry["room"] for entry in rooms)
    path = "/api/rooms/" + room.replace("ë", "%C3%AB") + "/members"
    assert api.get(path).json == {"room": room, "members": ["alice", "bob"]}
    assert api.get("/api/rooms/nobody-here/members").json["members"] == []
    assert_error(api.get("/api/rooms/bad%20room/members"), 400, "invalid_room")
    assert_error(api.get("/api/rooms/%FF/members"), 400, "invalid_room")


# --- HTTP framing against the real server --------------------------------------------------


def test_keep_alive_reuses_the_connection(api: Api) -> None:
    api.get("/healthz")
    sock = api.conn.sock
    api.get("/healthz")
    assert api.conn.sock is sock


def test_pipelined_requests_are_answered_in_order(cluster: Cluster) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    closing = b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    raw = raw_exchange(cluster.http_port, request * 2 + closing)
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.rindex(b"HTTP/1.1 404") > raw.rindex(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "data, status, code",
    [
        (
            b"POST /api/send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999\r\n\r\n",
            413,
            b"body_too_large",
        ),
        (
            b"POST /api/send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n{}",
            400,
            b"bad_request",
        ),
        (
            b"POST /api/send HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            411,
            b"length_required",
        ),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, b"uri_too_long"),
        (
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",
            431,
            b"headers_too_large",
        ),
        (b"GET / HTTP/3.0\r\n\r\n", 505, b"http_version_not_supported"),
        (b"NOT HTTP\r\n\r\n", 400, b"bad_request"),
    ],
    ids=["413", "cl-and-te", "411", "414", "431", "505", "garbage"],
)
def test_protocol_errors_answer_and_close(
    cluster: Cluster, data: bytes, status: int, code: bytes
) -> None:
    raw = raw_exchange(cluster.http_port, data)  # returns only once the server closed
    assert status_of(raw) == status and b"Connection: close" in raw and code in raw


# --- session expiry and shutdown (their own clusters) ---------------------------------------


@pytest.fixture(scope="module")
def quick() -> Iterator[Cluster]:
    """A cluster with very short poll timeout and session lifetime."""
    with Cluster(shards=1, extra_args=["--session-ttl", "0.5", "--poll-timeout", "0.3"]) as small:
        yield small


def test_poll_times_out_with_an_empty_list(quick: Cluster) -> None:
    api = Api(quick)
    api.join("timeouts", "alice")
    payload = api.poll("room=timeouts&after=1")
    assert payload["messages"] == [] and payload["rooms"]["timeouts"]["after"] == 1
    assert payload["missed"] is False
    api.close()


def test_idle_session_expires_and_members_hear_it_left(quick: Cluster) -> None:
    api, keeper = Api(quick), Api(quick)
    tcp = quick.connect()
    try:
        tcp.join("lobby", "bob")
        api.join("lobby", "alice")
        keeper.join("lobby", "kept")
        tcp.expect("INFO alice joined lobby")
        tcp.expect("INFO kept joined lobby")
        # "kept" polls all along (each poll waits up to 0.3 s); "alice" never polls again.
        cursors = keeper.poll("room=lobby&after=0")["cursors"]
        lines: List[str] = []
        for _ in range(40):
            cursors = keeper.poll("cursors=" + cursors)["cursors"]
            try:
                lines.append(tcp.readline(0.01))
            except (socket.timeout, TimeoutError):
                pass
            if lines:
                break
        assert lines == ["INFO alice left lobby"]
        assert_error(api.get("/api/poll?room=lobby&after=0"), 401, "no_session")
        assert keeper.poll("room=lobby&after=0")["rooms"]["lobby"]["missed"] is False
    finally:
        tcp.close()
        api.close()
        keeper.close()


def test_waiting_polls_hear_the_server_shut_down() -> None:
    small = Cluster(shards=1, extra_args=["--poll-timeout", "20"]).start()
    try:
        api = Api(small, timeout=15)
        api.join("lobby", "alice")
        background = Background(api, "room=lobby&after=1")
        wait_for_waiting_polls(api, 1)
        small.stop()
        assert_error(background.join(), 503, "shutting_down")
    finally:
        small.stop()


# --- in-process: deadlines and hooks with short limits ---------------------------------------


def run_in_process(
    monkeypatch: pytest.MonkeyPatch,
    body: Any,
    admit: Any = None,
    max_connections: int = 10,
    settings: Optional[Settings] = None,
) -> Any:
    """Run coroutine function *body(port, api)* against an in-process HTTP adapter (no
    shards) with the request deadline and keep-alive idle shortened to 0.3 s."""
    settings = dataclasses.replace(
        settings or Settings(), http_request_timeout=0.3, http_keepalive_idle=0.3
    )

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        limiter = ConnectionLimiter(max_connections, max_connections)
        api = HttpApi(Hub(loop, settings, limiter=limiter), StaticFiles(WEB_ROOT))
        if admit is not None:
            api.admit = admit
        connections: set = set()
        server = await loop.create_server(
            lambda: http_adapter.HttpConnection(api, connections), "127.0.0.1", 0
        )
        try:
            return await body(server.sockets[0].getsockname()[1], api)
        finally:
            server.close()
            api.close()

    return asyncio.run(main())


async def read_all(port: int, data: bytes, trickle: bool = False) -> bytes:
    """Send *data* (with *trickle*, one byte every 20 ms) and read until the server closes.
    Fails after 5 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def trickle_bytes() -> None:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await asyncio.sleep(0.02)

    sender = asyncio.ensure_future(trickle_bytes()) if trickle else None
    if not trickle:
        writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        if sender is not None:
            sender.cancel()
        writer.close()


@pytest.mark.parametrize(
    "data",
    [b"", b"GET / HTTP/1.1\r\nHost:"],
    ids=["nothing-sent", "unfinished-headers"],
)
def test_request_deadline_answers_408(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    async def body(port: int, api: HttpApi) -> bytes:
        return await read_all(port, data)

    raw = run_in_process(monkeypatch, body)
    assert status_of(raw) == 408 and b"request_timeout" in raw


def test_trickling_bytes_does_not_extend_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"z" * 100 + b"\r\n\r\n"
    )

    async def body(port: int, api: HttpApi) -> bytes:
        return await read_all(port, request, trickle=True)

    raw = run_in_process(monkeypatch, body)
    assert status_of(raw) == 408


def test_idle_keep_alive_connection_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(port: int, api: HttpApi) -> bytes:
        return await read_all(port, b"GET /style.css HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

    raw = run_in_process(monkeypatch, body)
    assert status_of(raw) == 200 and b"request_timeout" not in raw  # closed silently


def test_admission_hook_answers_429(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def admit(session: Any, action: str) -> float:
        seen.append(action)
        return 2.5

    async def body(port: int, api: HttpApi) -> bytes:
        payload = b'{"room":"lobby","username":"alice"}'
        request = (
            b"POST /api/join HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        return await read_all(port, request)

    raw = run_in_process(monkeypatch, body, admit)
    assert status_of(raw) == 429 and b"rate_limited" in raw and b"Retry-After: 3" in raw
    assert seen == ["join"]


def test_session_cap_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:

    async def body(port: int, api: HttpApi) -> bytes:
        payload = b'{"room":"lobby","username":"alice"}'
        request = (
            b"POST /api/join HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        return await read_all(port, request)

    raw = run_in_process(monkeypatch, body, settings=Settings(max_sessions=0))
    assert status_of(raw) == 503 and b"too_many_sessions" in raw


def test_connection_cap_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(port: int, api: HttpApi) -> bytes:
        return await read_all(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

    raw = run_in_process(monkeypatch, body, max_connections=0)
    assert status_of(raw) == 503 and b"server_full" in raw


@pytest.mark.parametrize(
    "code, status",
    [
        (errors.NAME_TAKEN, 409),
        (errors.ALREADY_IN_ROOM, 409),
        (errors.TOO_MANY_ROOMS, 400),
        (errors.WRONG_USERNAME, 403),
        (errors.NOT_IN_ROOM, 403),
        (errors.SHARD_TIMEOUT, 503),
        (errors.ROOM_UNAVAILABLE, 503),
        (errors.NOT_DELIVERED, 503),
        (errors.RATE_LIMITED, 429),
    ],
    ids=lambda value: str(value),
)
def test_every_refusal_has_a_status(code: str, status: int) -> None:
    error = failure_error(Refusal(code, "lobby"))
    assert (error.status, error.code) == (status, code)
    assert error.response().status == status


def test_every_catalogued_code_renders_on_both_protocols() -> None:
    for code in errors.CATALOGUE:
        refusal = Refusal(code, "lobby", username="alice")
        assert refusal.error_line().startswith(b"ERROR ") and b"{" not in refusal.error_line()
        assert 400 <= refusal.status < 600 and "{" not in refusal.message


def test_cursor_from_another_router_run_is_flagged(cluster: Cluster, quick: Cluster) -> None:
    """Shard restart counts start over with the router; the API's epochs do not."""
    first, second = Api(cluster), Api(quick)
    first.join("twin", "alice")
    first.send("twin", "said to the first router")
    old = first.poll("room=twin&after=0")
    second.join("twin", "alice")
    payload = second.poll("cursors=" + old["cursors"])
    assert payload["missed"] is True and payload["epoch"] != old["epoch"]
    assert texts(payload) == ["alice joined twin"]
    first.close()
    second.close()
