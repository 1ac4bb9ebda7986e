"""Every line of docs/PROTOCOL.md's line protocol, on a real cluster over loopback TCP.

One cluster (3 shards, default start method) serves the whole module. Each test uses its
own room and user names, so tests do not see each other's traffic.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import struct
import time
from typing import Callable, Dict, Iterator, List

import pytest

from common.hashing import room_to_shard
from common.limits import MAX_LINE_BYTES, MAX_TEXT_CHARS
from common.protocol import WELCOME
from tests.cluster import Cluster, LineClient

pytestmark = pytest.mark.timeout(60)

SHARDS = 3
UNKNOWN_TAIL = "; commands: JOIN MSG LEAVE QUIT NAMES ROOMS HISTORY PING"
HISTORY_LINE = re.compile(
    r"HISTORY (?P<room>\S+) (?P<seq>\d+) "
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<user>\S+) (?P<text>.*)\Z"
)

_serial = itertools.count(1)


def uniq(base: str) -> str:
    """A name no other test uses (valid as a room and as a username)."""
    return f"{base}{next(_serial)}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(shards=SHARDS) as running:
        yield running


Connect = Callable[[], LineClient]


@pytest.fixture
def connect(cluster: Cluster) -> Iterator[Connect]:
    """Open line clients (welcome already read); all are closed after the test."""
    clients: List[LineClient] = []

    def make() -> LineClient:
        client = cluster.connect()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def rooms_on_shards(count: int, per_shard: int = 1) -> Dict[int, List[str]]:
    """Fresh room names, *per_shard* for each of *count* shards (by the real hash)."""
    found: Dict[int, List[str]] = {i: [] for i in range(count)}
    while any(len(names) < per_shard for names in found.values()):
        room = uniq("x")
        names = found[room_to_shard(room, count)]
        if len(names) < per_shard:
            names.append(room)
    return found


# --- connect, join, msg ------------------------------------------------------------------


def test_welcome_is_the_first_line_and_comes_once(cluster: Cluster) -> None:
    client = LineClient(cluster.host, cluster.tcp_port, welcome=False)
    try:
        assert client.readline() == WELCOME.decode().rstrip("\n")
        client.no_line(0.2)
    finally:
        client.close()


def test_join_tells_the_joiner_and_the_others(connect: Connect) -> None:
    room, alice, bob = uniq("lobby"), uniq("alice"), uniq("bob")
    a, b = connect(), connect()
    a.send(f"JOIN {room} {alice}")
    a.expect(f"INFO joined room {room}")
    b.send(f"JOIN {room} {bob}")
    b.expect(f"INFO joined room {room}")
    a.expect(f"INFO {bob} joined {room}")
    a.no_line(0.2)
    b.no_line(0.01)


def test_msg_reaches_every_member_including_the_sender(connect: Connect) -> None:
    room, other = uniq("lobby"), uniq("other")
    a, b, c = connect(), connect(), connect()
    a.join(room, "alice")
    b.join(room, "bob")
    a.expect(f"INFO bob joined {room}")
    c.join(other, "carol")
    a.send(f"MSG {room}  hello   world ")  # text kept as sent
    for member in (a, b):
        member.expect(f"MSG {room} alice  hello   world ")
    b.send(f"MSG {room} zoë says 日本 😀")
    for member in (a, b):
        member.expect(f"MSG {room} bob zoë says 日本 😀")
    c.no_line(0.2)


def test_msg_when_not_a_member(connect: Connect) -> None:
    room = uniq("lobby")
    a, b = connect(), connect()
    b.join(room, "bob")
    a.send(f"MSG {room} hi")
    a.expect(f"ERROR not in room {room}")
    a.send(f"MSG {uniq('nowhere')} hi")
    assert a.readline().startswith("ERROR not in room nowhere")
    b.no_line(0.2)


def test_msg_text_limit(connect: Connect) -> None:
    room = uniq("lobby")
    a = connect()
    a.join(room, "alice")
    text = "é" * MAX_TEXT_CHARS
    a.send(f"MSG {room} {text}")
    a.expect(f"MSG {room} alice {text}")
    a.send(f"MSG {room} {text}é")
    a.expect("ERROR message too long")


# --- leave, quit, drop -------------------------------------------------------------------


def test_leave(connect: Connect) -> None:
    room = uniq("lobby")
    a, b = connect(), connect()
    a.join(room, "alice")
    b.join(room, "bob")
    a.expect(f"INFO bob joined {room}")
    a.send(f"LEAVE {room}")
    a.expect(f"INFO left room {room}")
    b.expect(f"INFO alice left {room}")
    a.send(f"MSG {room} still here?")
    a.expect(f"ERROR not in room {room}")
    a.send(f"LEAVE {room}")
    a.expect(f"ERROR not in room {room}")
    b.no_line(0.2)


def test_leave_a_room_never_joined(connect: Connect) -> None:
    room = uniq("lobby")
    a = connect()
    a.send(f"LEAVE {room}")
    a.expect(f"ERROR not in room {room}")


def test_quit_says_bye_closes_and_the_others_hear_it(connect: Connect) -> None:
    rooms = rooms_on_shards(SHARDS)
    first, second = rooms[0][0], rooms[1][0]  # on two different shards
    a, b, c = connect(), connect(), connect()
    a.join(first, "alice")
    a.join(second, "alice")
    b.join(first, "bob")
    c.join(second, "carol")
    a.expect(f"INFO bob joined {first}")
    a.expect(f"INFO carol joined {second}")
    a.send("QUIT")
    assert a.read_all_until_closed() == ["INFO bye"]
    b.expect(f"INFO alice left {first}")
    c.expect(f"INFO alice left {second}")
    b.no_line(0.2)
    c.no_line(0.01)


def test_quit_without_rooms(connect: Connect) -> None:
    a = connect()
    a.send("quit")
    assert a.read_all_until_closed() == ["INFO bye"]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_dropped_connection_is_a_leave_for_the_others(connect: Connect, how: str) -> None:
    rooms = rooms_on_shards(SHARDS)
    first, second = rooms[1][0], rooms[2][0]
    a, b = connect(), connect()
    a.join(first, "alice")
    a.join(second, "alice")
    b.join(first, "bob")
    b.join(second, "bob")
    a.read_lines(2)  # bob joined both
    if how == "reset":  # abortive close: RST instead of FIN
        a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    assert sorted(b.read_lines(2)) == sorted(
        [f"INFO alice left {first}", f"INFO alice left {second}"]
    )
    b.send(f"NAMES {first}")
    b.expect(f"NAMES {first} bob")


# --- framing -----------------------------------------------------------------------------


def test_case_insensitive_verbs_crlf_and_blank_lines(connect: Connect) -> None:
    room = uniq("lobby")
    a = connect()
    a.send_raw(
        f"\r\n  \t\r\n\njoin {room} alice\r\n\r\nmSg {room} hi there \r\nNaMeS {room}\r\n"
        "ping\r\n".encode()
    )
    lines = a.read_lines(4)
    # PONG is a local reply: it may overtake the shard's answers (docs/PROTOCOL.md).
    assert "PONG" in lines
    assert [line for line in lines if line != "PONG"] == [
        f"INFO joined room {room}",
        f"MSG {room} alice hi there ",
        f"NAMES {room} alice",
    ]
    a.no_line(0.2)


def test_line_split_across_packets(connect: Connect) -> None:
    room = uniq("日本")
    a = connect()
    data = f"JOIN {room} zoë\nMSG {room} héllo\n".encode()
    for i in range(len(data)):
        a.send_raw(data[i : i + 1])
        if i % 7 == 0:
            time.sleep(0.001)
    a.expect(f"INFO joined room {room}")
    a.expect(f"MSG {room} zoë héllo")


ERRORS = [
    ("FOO bar", "ERROR unknown command FOO" + UNKNOWN_TAIL),
    ("hello", "ERROR unknown command HELLO" + UNKNOWN_TAIL),
    ("JOIN lobby", "ERROR usage: JOIN <room> <username>"),
    ("JOIN a b c", "ERROR usage: JOIN <room> <username>"),
    ("MSG lobby", "ERROR usage: MSG <room> <text>"),
    ("MSG", "ERROR usage: MSG <room> <text>"),
    ("LEAVE", "ERROR usage: LEAVE <room>"),
    ("LEAVE a b", "ERROR usage: LEAVE <room>"),
    ("NAMES", "ERROR usage: NAMES <room>"),
    ("ROOMS all", "ERROR usage: ROOMS"),
    ("QUIT now", "ERROR usage: QUIT"),
    ("JOIN a*b alice", "ERROR invalid room name: 1-64 letters, digits, _ - ."),
    ("JOIN " + "r" * 65 + " alice", "ERROR invalid room name: 1-64 letters, digits, _ - ."),
    ("NAMES a:b", "ERROR invalid room name: 1-64 letters, digits, _ - ."),
    ("JOIN lobby al*ce", "ERROR invalid username: 1-32 letters, digits, _ - ."),
    ("JOIN lobby " + "u" * 33, "ERROR invalid username: 1-32 letters, digits, _ - ."),
    ("JOIN lobby 😀", "ERROR invalid username: 1-32 letters, digits, _ - ."),
    ("MSG lobby " + "x" * (MAX_TEXT_CHARS + 1), "ERROR message too long"),
    (b"MSG lobby \xff\xfe", "ERROR invalid UTF-8"),
    (b"MSG lobby a\x00b", "ERROR control characters are not allowed"),
    (b"MSG lobby \x1b[31mred", "ERROR control characters are not allowed"),
    (b"MSG lobby a\x7fb", "ERROR control characters are not allowed"),
    ("MSG lobby a\x85b", "ERROR control characters are not allowed"),
]


def _error_id(case: tuple) -> str:
    line = case[0]
    return (
        (line.decode("latin-1") if isinstance(line, bytes) else line)[:24]
        .encode("unicode_escape")
        .decode()
    )


@pytest.mark.parametrize(("line", "error"), ERRORS, ids=[_error_id(c) for c in ERRORS])
def test_error_line_and_the_connection_stays(connect: Connect, line: object, error: str) -> None:
    a = connect()
    a.send_raw((line if isinstance(line, bytes) else line.encode()) + b"\n")
    a.expect(error)
    a.send("PING still-open")
    a.expect("PONG still-open")


def test_history_usage_error(connect: Connect) -> None:
    a = connect()
    for arg in ("", " lobby 0", " lobby 501", " lobby x", " lobby 1 2"):
        a.send(f"HISTORY{arg}")
        assert a.readline().startswith("ERROR usage: HISTORY <room> [n]")
    a.send("PING")
    a.expect("PONG")


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_line_at_the_limit_is_accepted(connect: Connect, ending: bytes) -> None:
    room = "r" + uniq("")
    a = connect()
    a.join(room, "alice")
    prefix = f"MSG {room} ".encode()
    count, tail = divmod(MAX_LINE_BYTES - len(prefix), 3)
    text = "日" * count + "a" * tail
    line = prefix + text.encode()
    assert len(line) == MAX_LINE_BYTES
    a.send_raw(line + ending)
    a.expect(f"MSG {room} alice {text}")


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""], ids=["LF", "CRLF", "unterminated"])
def test_line_too_long_closes_the_connection(connect: Connect, ending: bytes) -> None:
    room = uniq("lobby")
    a, b = connect(), connect()
    a.join(room, "alice")
    b.join(room, "bob")
    a.expect(f"INFO bob joined {room}")
    a.send_raw(b"PING x" + b"x" * (MAX_LINE_BYTES - 5) + ending)
    assert a.read_all_until_closed() == ["ERROR line too long"]
    b.expect(f"INFO alice left {room}")


# --- usernames ---------------------------------------------------------------------------


def test_username_is_fixed_by_the_first_join(connect: Connect) -> None:
    first, second = uniq("one"), uniq("two")
    a = connect()
    a.join(first, "alice")
    a.send(f"JOIN {second} bob")
    a.expect("ERROR username is alice on this connection")
    a.send(f"JOIN {second} ALICE")  # a different name, even if only by case
    a.expect("ERROR username is alice on this connection")
    a.join(second, "alice")
    a.send(f"NAMES {second}")
    a.expect(f"NAMES {second} alice")


def test_username_stays_fixed_after_leaving_every_room(connect: Connect) -> None:
    first, second = uniq("one"), uniq("two")
    a = connect()
    a.join(first, "alice")
    a.send(f"LEAVE {first}")
    a.expect(f"INFO left room {first}")
    a.send(f"JOIN {second} bob")
    a.expect("ERROR username is alice on this connection")


def test_a_failed_first_join_does_not_fix_the_username(connect: Connect) -> None:
    room, other = uniq("lobby"), uniq("other")
    a, b = connect(), connect()
    b.join(room, "alice")
    a.send(f"JOIN {room} Alice")
    a.expect(f"ERROR name taken in {room}")
    a.send(f"JOIN {room} bad*name")
    a.expect("ERROR invalid username: 1-32 letters, digits, _ - .")
    a.join(other, "carol")
    a.send(f"JOIN {room} carol")
    a.expect(f"INFO joined room {room}")
    b.expect(f"INFO carol joined {room}")


@pytest.mark.parametrize(
    ("taken", "wanted"), [("alice", "alice"), ("alice", "ALICE"), ("ZOË", "zoë")]
)
def test_name_taken_ignoring_case(connect: Connect, taken: str, wanted: str) -> None:
    room = uniq("lobby")
    a, b = connect(), connect()
    a.join(room, taken)
    b.send(f"JOIN {room} {wanted}")
    b.expect(f"ERROR name taken in {room}")
    a.no_line(0.2)


def test_already_in_room(connect: Connect) -> None:
    room = uniq("lobby")
    a = connect()
    a.join(room, "alice")
    a.send(f"JOIN {room} alice")
    a.expect(f"ERROR already in room {room}")


# Pipelined commands (one send, as a paste or `printf ... | nc` does): "Replies to commands
# for one room come back in the order the commands were sent" (docs/PROTOCOL.md).


def test_pipelined_join_twice_answers_in_order(connect: Connect) -> None:
    room = uniq("lobby")
    a = connect()
    a.send_raw(f"JOIN {room} alice\nJOIN {room} alice\n".encode())
    assert a.read_lines(2) == [f"INFO joined room {room}", f"ERROR already in room {room}"]


def test_pipelined_leave_then_join(connect: Connect) -> None:
    room = uniq("lobby")
    a = connect()
    a.join(room, "alice")
    a.send_raw(f"LEAVE {room}\nJOIN {room} alice\n".encode())
    assert a.read_lines(2) == [f"INFO left room {room}", f"INFO joined room {room}"]


def test_pipelined_join_behind_a_failing_first_join(connect: Connect) -> None:
    taken, free = uniq("taken"), uniq("free")
    a, b = connect(), connect()
    b.join(taken, "alice")
    a.send_raw(f"JOIN {taken} alice\nJOIN {free} bob\n".encode())
    assert sorted(a.read_lines(2)) == sorted(
        [f"ERROR name taken in {taken}", f"INFO joined room {free}"]
    )


def test_pipelined_join_and_msg(connect: Connect) -> None:
    room = uniq("lobby")
    a = connect()
    a.send_raw(f"JOIN {room} alice\nMSG {room} at once\nLEAVE {room}\n".encode())
    assert a.read_lines(3) == [
        f"INFO joined room {room}",
        f"MSG {room} alice at once",
        f"INFO left room {room}",
    ]


def test_room_names_are_case_sensitive(connect: Connect) -> None:
    room = uniq("lobby")
    a, b = connect(), connect()
    a.join(room, "alice")
    b.join(room.upper(), "alice")
    a.send(f"MSG {room} lower")
    a.expect(f"MSG {room} alice lower")
    b.no_line(0.2)


def test_decomposed_names_are_normalised(connect: Connect) -> None:
    room = uniq("r") + "zoe\u0308"
    nfc = room.replace("e\u0308", "ë")
    a, b = connect(), connect()
    a.send(f"JOIN {room} zoe\u0308")
    a.expect(f"INFO joined room {nfc}")
    b.send(f"JOIN {nfc} ZOË")  # the same room; the same name ignoring case
    b.expect(f"ERROR name taken in {nfc}")
    b.send(f"NAMES {room}")
    b.expect(f"NAMES {nfc} zoë")


# --- queries -----------------------------------------------------------------------------


def test_names(connect: Connect) -> None:
    room = uniq("lobby")
    a, b, c, d = connect(), connect(), connect(), connect()
    for client, name in ((a, "carol"), (b, "Bob"), (c, "alice")):
        client.join(room, name)
    d.send(f"NAMES {room}")  # a non-member may ask
    d.expect(f"NAMES {room} alice Bob carol")
    d.send(f"NAMES {uniq('empty')}")
    assert re.fullmatch(r"NAMES empty\d+", d.readline())


def test_rooms(connect: Connect) -> None:
    rooms = rooms_on_shards(SHARDS)
    big, small, gone = rooms[0][0], rooms[1][0], rooms[2][0]
    a, b, c = connect(), connect(), connect()
    a.join(big, "alice")
    a.join(small, "alice")
    b.join(big, "bob")
    c.join(gone, "carol")
    c.send(f"LEAVE {gone}")
    c.expect(f"INFO left room {gone}")
    c.send("ROOMS")
    lines = c.read_until(lambda line: line.startswith("END ROOMS"))
    listing = [line.split(" ") for line in lines[:-1]]
    assert all(parts[0] == "ROOM" and len(parts) == 3 for parts in listing), lines
    assert lines[-1] == f"END ROOMS {len(listing)}"
    names = [parts[1] for parts in listing]
    assert names == sorted(names)
    counts = {parts[1]: int(parts[2]) for parts in listing}
    assert counts[big] == 2 and counts[small] == 1
    assert gone not in counts
    assert all(count > 0 for count in counts.values())


def test_history(connect: Connect) -> None:
    room = uniq("lobby")
    a, b = connect(), connect()
    a.join(room, "alice")
    b.join(room, "bob")
    a.send(f"MSG {room}  spaced  text ")
    a.send(f"LEAVE {room}")
    a.expect(f"INFO bob joined {room}")
    a.expect(f"MSG {room} alice  spaced  text ")
    a.expect(f"INFO left room {room}")
    b.send(f"HISTORY {room}")
    lines = b.read_until(lambda line: line.startswith("END HISTORY"))
    lines = [line for line in lines if not line.startswith(("MSG", "INFO"))]
    assert lines[-1] == f"END HISTORY {room} 4"
    parsed = [HISTORY_LINE.match(line) for line in lines[:-1]]
    assert all(parsed), lines
    assert [(h["room"], h["user"], h["text"]) for h in parsed] == [  # type: ignore[index]
        (room, "*", f"alice joined {room}"),
        (room, "*", f"bob joined {room}"),
        (room, "alice", " spaced  text "),
        (room, "*", f"alice left {room}"),
    ]
    seqs = [int(h["seq"]) for h in parsed]  # type: ignore[index]
    assert seqs == list(range(seqs[0], seqs[0] + 4))
    b.send(f"HISTORY {room} 2")
    lines = b.read_lines(3)
    assert [HISTORY_LINE.match(line)["seq"] for line in lines[:2]] == [  # type: ignore[index]
        str(seqs[2]),
        str(seqs[3]),
    ]
    assert lines[2] == f"END HISTORY {room} 2"


def test_history_when_not_a_member(connect: Connect) -> None:
    room = uniq("lobby")
    a, b = connect(), connect()
    b.join(room, "bob")
    a.send(f"HISTORY {room}")
    a.expect(f"ERROR not in room {room}")


def test_ping_pong(connect: Connect) -> None:
    a = connect()
    a.send("PING")
    a.expect("PONG")
    a.send("ping abc-123")
    a.expect("PONG abc-123")
    a.send("PONG whatever")  # an answer to a server PING: ignored
    a.send("PONG")
    a.no_line(0.2)


# --- half-close (printf '...' | nc -N) ---------------------------------------------------


def test_half_close_gets_every_reply_before_the_close(connect: Connect) -> None:
    room = uniq("lobby")
    a = connect()
    a.send_raw(f"JOIN {room} bob\nMSG {room} hi\nNAMES {room}\nHISTORY {room} 1\n".encode())
    a.half_close()
    lines = a.read_all_until_closed()
    assert lines[:3] == [f"INFO joined room {room}", f"MSG {room} bob hi", f"NAMES {room} bob"]
    assert HISTORY_LINE.match(lines[3]) and lines[3].endswith(" bob hi")
    assert lines[4:] == [f"END HISTORY {room} 1"]


def test_half_close_with_an_unterminated_quit(connect: Connect) -> None:
    room = uniq("lobby")
    a = connect()
    a.send_raw(f"JOIN {room} bob\nQUIT".encode())
    a.half_close()
    assert a.read_all_until_closed() == [f"INFO joined room {room}", "INFO bye"]


def test_half_close_over_several_shards(connect: Connect) -> None:
    rooms = [names[0] for names in rooms_on_shards(SHARDS).values()]
    a = connect()
    a.send_raw("".join(f"JOIN {r} bob\nMSG {r} hi\n" for r in rooms).encode())
    a.half_close()
    lines = a.read_all_until_closed()
    assert len(lines) == 2 * len(rooms), lines
    # In order per room; rooms on different shards may interleave.
    for room in rooms:
        expected = [f"INFO joined room {room}", f"MSG {room} bob hi"]
        assert [line for line in lines if line in expected] == expected


@pytest.mark.parametrize("ending", ["half-close", "quit"])
def test_rooms_answer_comes_before_the_close(
    cluster: Cluster, connect: Connect, ending: str
) -> None:
    """Holding one shard (SIGSTOP) for half a second makes the ROOMS answer slow; the
    router must still wait for it before it closes."""
    a = connect()
    shard = cluster.shard_pids()[0]
    os.kill(shard, signal.SIGSTOP)
    try:
        if ending == "quit":
            a.send_raw(b"ROOMS\nQUIT\n")
        else:
            a.send_raw(b"ROOMS\n")
            a.half_close()
        time.sleep(0.5)
    finally:
        os.kill(shard, signal.SIGCONT)
    lines = a.read_all_until_closed()
    tail = ["INFO bye"] if ending == "quit" else []
    assert len(lines) > len(tail), lines
    assert lines[-1 - len(tail)].startswith("END ROOMS "), lines
    assert lines[len(lines) - len(tail) :] == tail


# --- rooms on several shards -------------------------------------------------------------


def test_no_cross_room_leak_over_several_shards(connect: Connect) -> None:
    """Two rooms per shard, two members per room and one member in a room on each of two
    shards: everyone sees exactly their rooms' lines, in order, and nothing else."""
    by_shard = rooms_on_shards(SHARDS, per_shard=2)
    rooms = [room for names in by_shard.values() for room in names]
    members = {room: (connect(), connect()) for room in rooms}
    for room, (first, second) in members.items():
        first.join(room, "first")
        second.join(room, "second")
        first.expect(f"INFO second joined {room}")
    both = connect()
    shared = [by_shard[0][0], by_shard[1][0]]
    for room in shared:
        both.join(room, "both")
        for member in members[room]:
            member.expect(f"INFO both joined {room}")
    for room in rooms:
        first, second = members[room]
        first.send(f"MSG {room} from first in {room}")
        listeners = [first, second] + ([both] if room in shared else [])
        for listener in listeners:
            listener.expect(f"MSG {room} first from first in {room}")
    both.send(f"MSG {shared[1]} from both")
    for listener in (*members[shared[1]], both):
        listener.expect(f"MSG {shared[1]} both from both")
    time.sleep(0.3)  # let any stray line arrive
    for client in (both, *(c for pair in members.values() for c in pair)):
        client.no_line(0.01)
