"""Direct messages (``PRIVMSG`` / ``POST /api/privmsg``) on a real cluster with durable
history in real files: they reach their recipient and their sender over either protocol,
nobody else, never the room's history or its files; refusals say why; what waits for a
browser session is bounded."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from common.limits import MAX_PRIVATE_KEPT, MAX_PRIVATE_KEPT_CHARS, MAX_TEXT_CHARS
from tests.cluster import Cluster, LineClient
from tests.integration.test_http_api import Api, assert_error

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("history")


@pytest.fixture(scope="module")
def cluster(data_dir: Path) -> Iterator[Cluster]:
    # A long poll timeout: a poll that is not woken by a direct message hangs (and fails).
    args = ["--poll-timeout", "30", "--rate-limit", "0"]
    with Cluster(shards=2, extra_args=args, data_dir=data_dir) as running:
        yield running


@pytest.fixture
def room() -> str:
    return "dm" + uuid.uuid4().hex[:8]


@pytest.fixture
def clients(cluster: Cluster) -> Iterator[List[LineClient]]:
    opened: List[LineClient] = []
    yield opened
    for client in opened:
        client.close()


@pytest.fixture
def browsers(cluster: Cluster) -> Iterator[List[Api]]:
    opened: List[Api] = []
    yield opened
    for browser in opened:
        browser.close()


def line_member(cluster: Cluster, clients: List[LineClient], room: str, name: str) -> LineClient:
    client = cluster.connect()
    clients.append(client)
    client.join(room, name)
    return client


def browser_member(cluster: Cluster, browsers: List[Api], room: str, name: str) -> Api:
    browser = Api(cluster)
    browsers.append(browser)
    browser.join(room, name)
    return browser


def drain(client: LineClient) -> None:
    """Read what is waiting (others' joins) until the line is quiet."""
    while True:
        try:
            client.readline(0.3)
        except (TimeoutError, OSError):
            return


def alice_and_dave(
    cluster: Cluster, clients: List[LineClient], browsers: List[Api], room: str
) -> Tuple[LineClient, Api, str]:
    """alice on the line protocol and dave in a browser, both in *room*, with dave's
    cursors read and alice's lines about him read away."""
    alice = line_member(cluster, clients, room, "alice")
    dave = browser_member(cluster, browsers, room, "dave")
    cursors = dave.poll(f"room={room}&after=0")["cursors"]
    drain(alice)
    return alice, dave, cursors


def private_of(payload: dict) -> List[dict]:
    return payload["private"]


def texts(payload: dict) -> List[str]:
    return [message["text"] for message in payload["private"]]


def test_a_direct_message_reaches_its_recipient_and_its_sender_only(
    cluster: Cluster, clients: List[LineClient], browsers: List[Api], room: str
) -> None:
    alice = line_member(cluster, clients, room, "alice")
    bob = line_member(cluster, clients, room, "Bob")
    carol = line_member(cluster, clients, room, "carol")
    dave = browser_member(cluster, browsers, room, "dave")
    first = dave.poll(f"room={room}&after=0&private=0")
    cursors, mark = first["cursors"], first["private_after"]
    for client in (alice, bob, carol):
        drain(client)
    alice.send(f"PRIVMSG {room} BOB  just  for you ")
    expected = f"PRIVMSG {room} alice Bob  just  for you "
    alice.expect(expected)  # the echo, with the name as the room has it
    bob.expect(expected)
    # A room message after it, through the same shard: whoever got neither by then never will.
    alice.send(f"MSG {room} public")
    alice.expect(f"MSG {room} alice public")
    carol.expect(f"MSG {room} alice public")
    answer = dave.poll(f"cursors={cursors}&private={mark}")
    assert [message["text"] for message in answer["messages"]] == ["public"]
    assert private_of(answer) == [] and answer["private_after"] == mark


def test_direct_messages_cross_the_protocols(
    cluster: Cluster, clients: List[LineClient], browsers: List[Api], room: str
) -> None:
    alice, dave, cursors = alice_and_dave(cluster, clients, browsers, room)
    reply = dave.post("/api/privmsg", {"room": room, "to": "ALICE", "text": "from the web"})
    assert reply.status == 200 and reply.json == {"ok": True, "room": room, "to": "alice"}
    alice.expect(f"PRIVMSG {room} dave alice from the web")
    # The browser's own copy comes in its poll, like its chat messages do.
    mine = dave.poll(f"cursors={cursors}&private=0")
    cursors, mark = mine["cursors"], mine["private_after"]
    assert [(m["from"], m["to"], m["text"]) for m in private_of(mine)] == [
        ("dave", "alice", "from the web")
    ]
    # A waiting poll is woken by a direct message (the poll timeout is 30 s).
    started = time.monotonic()
    alice.send(f"PRIVMSG {room} dave back to you")
    alice.expect(f"PRIVMSG {room} alice dave back to you")
    answer = dave.poll(f"cursors={cursors}&private={mark}")
    assert time.monotonic() - started < 10
    (message,) = private_of(answer)
    assert message["id"] == mark + 1 == answer["private_after"]
    assert message["type"] == "private" and message["room"] == room
    assert (message["from"], message["to"], message["text"]) == ("alice", "dave", "back to you")
    assert isinstance(message["ts"], float)
    assert answer["messages"] == []  # not a room event: no id, nothing in the room's stream
    metrics = dave.get("/metrics").body.decode()
    (sample,) = [line for line in metrics.splitlines() if line.startswith("shardchat_private_")]
    assert sample.startswith("shardchat_private_messages_total ") and int(sample.split()[1]) >= 2


def test_direct_messages_are_refused_with_a_reason(
    cluster: Cluster, clients: List[LineClient], browsers: List[Api], room: str
) -> None:
    alice = line_member(cluster, clients, room, "alice")
    outsider = cluster.connect()
    clients.append(outsider)
    dave = browser_member(cluster, browsers, room, "dave")
    drain(alice)
    alice.send(f"PRIVMSG {room} zed hi")
    alice.expect(f"ERROR no member zed in {room}")
    alice.send(f"PRIVMSG {room}x dave hi")
    alice.expect(f"ERROR not in room {room}x")
    alice.send(f"PRIVMSG {room} dave")
    alice.expect("ERROR usage: PRIVMSG <room> <username> <text>")
    alice.send(f"PRIVMSG {room} d@ve hi")
    alice.expect("ERROR invalid username: 1-32 letters, digits, _ - .")
    outsider.send(f"PRIVMSG {room} alice hi")
    outsider.expect(f"ERROR not in room {room}")
    error = assert_error(
        dave.post("/api/privmsg", {"room": room, "to": "zed", "text": "hi"}), 404, "no_such_member"
    )
    assert error["message"] == f"no member zed in {room}"
    assert_error(dave.post("/api/privmsg", {"room": room + "x", "to": "alice", "text": "hi"}),
                 403, "not_in_room")  # fmt: skip
    assert_error(dave.post("/api/privmsg", {"room": room, "to": "d@ve", "text": "hi"}),
                 400, "invalid_username")  # fmt: skip
    assert_error(dave.post("/api/privmsg", {"room": room, "to": "alice", "text": " "}),
                 400, "invalid_text")  # fmt: skip
    too_long = "x" * (MAX_TEXT_CHARS + 1)
    assert_error(dave.post("/api/privmsg", {"room": room, "to": "alice", "text": too_long}),
                 413, "text_too_long")  # fmt: skip
    alice.no_line()  # none of those reached anyone


def test_direct_messages_are_not_in_history_nor_on_disk(
    cluster: Cluster, clients: List[LineClient], data_dir: Path, room: str
) -> None:
    alice = line_member(cluster, clients, room, "alice")
    bob = line_member(cluster, clients, room, "bob")
    drain(alice)
    alice.send(f"MSG {room} before")
    alice.expect(f"MSG {room} alice before")
    secret = "secret-" + uuid.uuid4().hex
    alice.send(f"PRIVMSG {room} bob {secret}")
    alice.expect(f"PRIVMSG {room} alice bob {secret}")
    alice.send(f"MSG {room} after")
    alice.expect(f"MSG {room} alice after")
    alice.send(f"HISTORY {room}")
    lines = alice.read_until(lambda line: line.startswith(f"END HISTORY {room} "))
    assert not any(secret in line for line in lines)
    seqs = [int(line.split(" ")[2]) for line in lines[:-1]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no seq taken by it
    assert lines[-2].endswith(" alice after") and lines[-3].endswith(" alice before")
    bob.read_until(lambda line: secret in line)
    # Nothing of it in any file of the data directory (slot files, their WALs).
    stored = b"".join(path.read_bytes() for path in data_dir.rglob("*") if path.is_file())
    assert b"before" in stored and secret.encode() not in stored


def test_direct_messages_waiting_for_a_session_are_bounded(
    cluster: Cluster, clients: List[LineClient], browsers: List[Api], room: str
) -> None:
    alice, dave, cursors = alice_and_dave(cluster, clients, browsers, room)
    extra = 5
    for number in range(MAX_PRIVATE_KEPT + extra):
        alice.send(f"PRIVMSG {room} dave n{number}")
    for number in range(MAX_PRIVATE_KEPT + extra):
        alice.expect(f"PRIVMSG {room} alice dave n{number}")
    answer = dave.poll(f"cursors={cursors}&private=0")
    assert texts(answer) == [f"n{number}" for number in range(extra, MAX_PRIVATE_KEPT + extra)]
    assert answer["private_missed"] is True  # the first five are gone, and it says so
    mark = answer["private_after"]
    # A cursor past the oldest one kept reads the rest, nothing missed.
    again = dave.poll(f"cursors={cursors}&private={mark - 3}")
    assert texts(again)[0] == f"n{MAX_PRIVATE_KEPT + extra - 3}" and not again["private_missed"]
    # The size bound: long texts push the oldest out before the count does.
    long_text = "y" * MAX_TEXT_CHARS
    fit = MAX_PRIVATE_KEPT_CHARS // MAX_TEXT_CHARS
    for number in range(fit + 2):
        alice.send(f"PRIVMSG {room} dave {number}{long_text[1:]}")
    for _ in range(fit + 2):
        alice.readline()
    answer = dave.poll(f"cursors={cursors}&private={mark}")
    assert [text[0] for text in texts(answer)] == [str(number) for number in range(2, fit + 2)]
    assert answer["private_missed"] is True


def test_every_tab_gets_each_direct_message_and_a_lost_answer_is_read_again(
    cluster: Cluster, clients: List[LineClient], browsers: List[Api], room: str
) -> None:
    alice = line_member(cluster, clients, room, "alice")
    tab = browser_member(cluster, browsers, room, "dave")
    other_tab = Api(cluster)  # the same session (cookie) on another connection
    browsers.append(other_tab)
    other_tab.cookie = tab.cookie
    cursors = tab.poll(f"room={room}&after=0")["cursors"]
    drain(alice)
    alice.send(f"PRIVMSG {room} dave to both tabs")
    alice.expect(f"PRIVMSG {room} alice dave to both tabs")
    for each in (tab, other_tab):
        assert texts(each.poll(f"cursors={cursors}&private=0")) == ["to both tabs"]
    # An answer the page never read (aborted, lost): the same cursor reads it again.
    assert texts(tab.poll(f"cursors={cursors}&private=0")) == ["to both tabs"]
    # A poll that asks for none gets none (and is not woken by them).
    alice.send(f"MSG {room} public")
    alice.expect(f"MSG {room} alice public")
    plain = tab.poll(f"cursors={cursors}")
    assert "private" not in plain and [m["text"] for m in plain["messages"]] == ["public"]
    bad = tab.get(f"/api/poll?cursors={cursors}&private=-1")
    assert_error(bad, 400, "invalid_cursor")


def test_direct_messages_take_flood_control_tokens_on_both_protocols() -> None:
    """Like MSG: on TCP a burst past the bucket is throttled, not dropped; over HTTP past
    it answers 429 with Retry-After."""
    with Cluster(shards=1, extra_args=["--rate-limit", "5", "--rate-burst", "5"]) as limited:
        alice = limited.connect(timeout=20)
        dave = Api(limited)
        try:
            alice.join("flood", "alice")
            dave.join("flood", "dave")
            for number in range(15):
                alice.send(f"PRIVMSG flood dave n{number}")
            for number in range(15):  # every one arrives, in order
                alice.read_until(lambda line, n=number: line == f"PRIVMSG flood alice dave n{n}")
            metrics = dave.get("/metrics").body.decode()
            assert 'shardchat_flood_throttles_total{transport="tcp"}' in metrics
            statuses = [
                dave.post("/api/privmsg", {"room": "flood", "to": "alice", "text": "x"}).status
                for _ in range(12)
            ]
            assert 200 in statuses and 429 in statuses, statuses
        finally:
            alice.close()
            dave.close()
