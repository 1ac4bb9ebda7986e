"""Robustness of the line-protocol side on a real cluster: hostile and broken clients.

Everything here runs the real router and shard processes (``tests/cluster.py``) on
loopback sockets: over-long lines and broken bytes, floods, clients that never read, keep-
alive and join deadlines, connection caps, and connections that vanish (RST) mid-line or
mid-broadcast. Each test checks that the misbehaving client gets what docs/PROTOCOL.md and
common/limits.py promise while everyone else keeps being served.

Small limits are set with the cluster's flags so that things happen in seconds. Timing
bounds are generous correctness bounds ("arrives within 2 s"), never benchmarks. Memory is
the router's resident set size from ``/proc`` (Linux only; those checks skip elsewhere).
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import sys
import threading
import time
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

from common.limits import MAX_LINE_BYTES
from tests.cluster import Cluster, LineClient, router_rss_kb

LINUX = sys.platform.startswith("linux")
needs_proc = pytest.mark.skipif(not LINUX, reason="reads /proc/<pid>/status")

#: Generous slack on the router's memory growth (the issue's "memory flat").
RSS_SLACK_KB = 20 * 1024
#: A promptness bound for other clients while one misbehaves: correctness, not speed.
PROMPT = 2.0


# --- helpers -----------------------------------------------------------------------------


class TunedClient(LineClient):
    """A :class:`LineClient` whose socket is set up before connecting: a small receive
    buffer (a client that reads slowly or never), a source address (connection caps per
    IP), no Nagle (byte-by-byte writes go out as written)."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 5.0,
        welcome: bool = True,
        rcvbuf: Optional[int] = None,
        source: Optional[str] = None,
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            sock.bind((source, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect((host, port))
        # The attributes LineClient's methods use.
        self.sock = sock
        self.timeout = timeout
        self._buffer = b""
        if welcome:
            line = self.readline()
            assert line.startswith("INFO welcome"), line


def client(cluster: Cluster, **kwargs: object) -> TunedClient:
    return TunedClient(cluster.host, cluster.tcp_port, **kwargs)  # type: ignore[arg-type]


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_until_closed(c: LineClient, timeout: float = 5.0) -> List[str]:
    """Every line until the server closes (EOF or reset). Fails if it is still open after
    *timeout* seconds."""
    lines: List[str] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"connection still open after {timeout}s; read {lines[-5:]}")
        try:
            lines.append(c.readline(remaining))
        except (EOFError, ConnectionResetError):
            return lines
        except (socket.timeout, TimeoutError):
            raise AssertionError(
                f"connection still open after {timeout}s; read {lines[-5:]}"
            ) from None


def drain_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Raw bytes until the server closes (EOF or reset); fails after *timeout* seconds."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"still open after {timeout}s ({len(data)} bytes read)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(data)
        except (socket.timeout, TimeoutError):
            raise AssertionError(f"still open after {timeout}s ({len(data)} bytes read)") from None
        if not chunk:
            return bytes(data)
        data += chunk


def ping_round_trip(c: LineClient, token: str, timeout: float = PROMPT) -> Tuple[float, List[str]]:
    """Send ``PING token``; return the seconds until ``PONG token`` and the lines before."""
    start = time.monotonic()
    c.send(f"PING {token}")
    lines = c.read_until(lambda line: line == f"PONG {token}", timeout=timeout)
    return time.monotonic() - start, lines[:-1]


def names_of(c: LineClient, room: str) -> List[str]:
    c.send(f"NAMES {room}")
    line = c.read_until(lambda line: line.startswith(f"NAMES {room}"))[-1]
    return line.split()[2:]


def wait_names(c: LineClient, room: str, expected: List[str], timeout: float = 5.0) -> None:
    """Poll NAMES until it equals *expected* (a dropped connection's leave is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        got = names_of(c, room)
        if got == expected or time.monotonic() > deadline:
            assert got == expected
            return
        time.sleep(0.05)


def no_traceback(cluster: Cluster) -> None:
    assert "Traceback" not in cluster.log, cluster.log[-4000:]


def msg_line_of_bytes(room: str, n: int, last: str = "x") -> bytes:
    """A ``MSG`` line (without ending) of exactly *n* bytes of 3-byte characters padded
    with ASCII, its last character *last*."""
    head = f"MSG {room} ".encode()
    body = n - len(head) - len(last.encode())
    euros, ascii_ = divmod(body, 3)
    return head + b"x" * ascii_ + "€".encode() * euros + last.encode()


class Collector:
    """Reads a socket in a thread and keeps the lines (for a client that must keep reading
    while the test does something else). ``closed`` is set on EOF or reset."""

    def __init__(self, c: LineClient, answer_pings: bool = False) -> None:
        self.client = c
        self.answer_pings = answer_pings
        self.lines: List[str] = []
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                line = self.client.readline(30.0)
                self.lines.append(line)
                if self.answer_pings and line.startswith("PING "):
                    self.client.send("PONG " + line[len("PING ") :])
        except (EOFError, OSError):
            pass
        finally:
            self.closed.set()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(line) for line in list(self.lines)):
                return True
            time.sleep(0.01)
        return False


def start_cluster(*flags: str) -> Iterator[Cluster]:
    with Cluster(shards=2, extra_args=list(flags)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def default_cluster() -> Iterator[Cluster]:
    """Every limit at its default (flood control on)."""
    yield from start_cluster()


@pytest.fixture(scope="module")
def unthrottled_cluster() -> Iterator[Cluster]:
    """Default output limits, flood control off: for heavy traffic from one sender."""
    yield from start_cluster("--rate-limit", "0")


# --- line framing ------------------------------------------------------------------------


@needs_proc
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "connections, megabytes", [(1, 1), (8, 4)], ids=["one-1MB", "eight-parallel-4MB"]
)
def test_endless_line_is_refused_closed_and_costs_no_memory(
    default_cluster: Cluster, connections: int, megabytes: int
) -> None:
    """Megabytes with no newline, in 1 KiB writes: ``ERROR line too long``, the connection
    is closed, and the router's memory stays flat (it never buffers past the cap)."""
    before = router_rss_kb(default_cluster)
    clients = [client(default_cluster) for _ in range(connections)]
    chunk = b"A" * 1024

    def stream(c: LineClient) -> None:
        try:
            for _ in range(megabytes * 1024):
                c.sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # aborted by the router after its grace period: fine

    threads = [threading.Thread(target=stream, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for c in clients:
        assert read_until_closed(c) == ["ERROR line too long"]
        c.close()
    growth = router_rss_kb(default_cluster) - before
    assert growth < RSS_SLACK_KB, f"router RSS grew by {growth} KiB"
    # The router still serves.
    other = client(default_cluster)
    assert ping_round_trip(other, "alive")[1] == []
    other.close()
    no_traceback(default_cluster)


def send_in(c: LineClient, data: bytes, chunking: str) -> None:
    if chunking == "whole":
        c.send_raw(data)
    elif chunking == "bytewise":
        for i in range(len(data)):
            c.send_raw(data[i : i + 1])
    else:  # "split-last-char": the last character's bytes in two writes, apart in time
        cut = len(data.rstrip(b"\r\n")) - 2
        c.send_raw(data[:cut])
        time.sleep(0.1)
        c.send_raw(data[cut:])


CHUNKINGS = ["whole", "bytewise", "split-last-char"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=CHUNKINGS)
def test_line_at_the_cap_is_accepted(
    default_cluster: Cluster, chunking: str, ending: bytes
) -> None:
    line = msg_line_of_bytes("cap", MAX_LINE_BYTES, last="€")
    assert len(line) == MAX_LINE_BYTES
    c = client(default_cluster)
    c.join("cap", "capper")
    send_in(c, line + ending, chunking)
    echo = c.readline()
    assert echo.encode() == b"MSG cap capper " + line[len(b"MSG cap ") :]
    assert ping_round_trip(c, "after")[1] == []  # still open
    c.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=CHUNKINGS)
def test_line_one_byte_over_the_cap_is_fatal(
    default_cluster: Cluster, chunking: str, ending: bytes
) -> None:
    line = msg_line_of_bytes("cap1", MAX_LINE_BYTES + 1, last="€")
    watcher = client(default_cluster)
    watcher.join("cap1", "watcher")
    c = client(default_cluster)
    c.join("cap1", "overflow")
    assert watcher.readline() == "INFO overflow joined cap1"
    send_in(c, line + ending, chunking)
    assert read_until_closed(c) == ["ERROR line too long"]
    c.close()
    # Nothing of the line reached the room; the closed connection left it.
    assert watcher.readline() == "INFO overflow left cap1"
    assert names_of(watcher, "cap1") == ["watcher"]
    watcher.close()


@pytest.mark.timeout(20)
def test_multibyte_character_split_across_writes(default_cluster: Cluster) -> None:
    c = client(default_cluster)
    c.join("mb", "splitter")
    data = "MSG mb zoë 日本 €\n".encode()
    for cut in (len(b"MSG mb zo") + 1, len(data) - 2, len(data) - 3):
        c.send_raw(data[:cut])
        time.sleep(0.05)  # a separate read on the server
        c.send_raw(data[cut:])
        assert c.readline() == "MSG mb splitter zoë 日本 €"
    c.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "bad, error",
    [
        (b"\xff", "ERROR invalid UTF-8"),
        (b"\xc0\xaf", "ERROR invalid UTF-8"),
        (b"\xed\xa0\x80", "ERROR invalid UTF-8"),
        (b"\xe2\x82", "ERROR invalid UTF-8"),
        (b"\x00", "ERROR control characters are not allowed"),
        (b"\x1b[2J", "ERROR control characters are not allowed"),
        (b"\x7f", "ERROR control characters are not allowed"),
        ("\u0085".encode(), "ERROR control characters are not allowed"),
    ],
    ids=["ff-byte", "overlong", "surrogate", "truncated", "nul", "esc", "del", "c1-nel"],
)
def test_broken_bytes_are_refused_and_the_connection_stays(
    default_cluster: Cluster, bad: bytes, error: str
) -> None:
    c = client(default_cluster)
    c.join("bytes", "careful")
    c.send_raw(b"MSG bytes a" + bad + b"b\n")
    assert c.readline() == error
    # Still connected, still in the room.
    c.send("MSG bytes fine")
    assert c.readline() == "MSG bytes careful fine"
    c.close()


# --- names and command order -------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "line, reply",
    [
        ("JOIN lobby", "ERROR usage: JOIN <room> <username>"),
        ("JOIN", "ERROR usage: JOIN <room> <username>"),
        ("JOIN lobby alice smith", "ERROR usage: JOIN <room> <username>"),
        ("JOIN lobby " + "a" * 33, "ERROR invalid username: 1-32 letters, digits, _ - ."),
        ("JOIN " + "r" * 65 + " alice", "ERROR invalid room name: 1-64 letters, digits, _ - ."),
        ("JOIN lobby al!ce", "ERROR invalid username: 1-32 letters, digits, _ - ."),
        ("JOIN lob/by alice", "ERROR invalid room name: 1-64 letters, digits, _ - ."),
        ("JOIN lobby al\tice", "ERROR usage: JOIN <room> <username>"),
    ],
    ids=[
        "no-username",
        "no-args",
        "space-in-name",
        "username-33",
        "room-65",
        "username-punct",
        "room-slash",
        "tab-in-name",
    ],
)
def test_bad_names_are_refused_and_the_connection_can_still_join(
    default_cluster: Cluster, line: str, reply: str
) -> None:
    c = client(default_cluster)
    c.send(line)
    assert c.readline() == reply
    c.join("names-ok", "a" * 32)  # the longest valid name; the refusal fixed no name
    c.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "first, second",
    [("alice", "ALICE"), ("zoë", "ZOË"), ("zoë", "zoe\u0308")],
    ids=["ascii-case", "unicode-case", "nfd-form"],
)
def test_usernames_collide_ignoring_case(default_cluster: Cluster, first: str, second: str) -> None:
    room = f"case-{len(second)}-{second.isupper()}"
    a = client(default_cluster)
    a.join(room, first)
    b = client(default_cluster)
    b.send(f"JOIN {room} {second}")
    assert b.readline() == f"ERROR name taken in {room}"
    # The failed JOIN did not fix b's name; rooms are case-sensitive, so the other-case room
    # is free for the same name.
    b.join(room.upper(), second)
    b.send(f"JOIN {room} bob")
    assert b.readline().startswith("ERROR username is ")
    assert names_of(a, room) == [first]
    a.close()
    b.close()


@pytest.mark.timeout(20)
def test_msg_before_join_double_join_and_other_username(default_cluster: Cluster) -> None:
    c = client(default_cluster)
    c.send("MSG order hello")
    assert c.readline() == "ERROR not in room order"
    c.join("order", "orderly")
    c.send("JOIN order orderly")
    assert c.readline() == "ERROR already in room order"
    c.send("JOIN order2 someoneelse")
    assert c.readline() == "ERROR username is orderly on this connection"
    # A second JOIN of a room while the first is still on its way to the shard: replies
    # about one room come back in command order.
    c.send_raw(b"JOIN order3 orderly\nJOIN order3 orderly\n")
    assert c.read_lines(2) == ["INFO joined room order3", "ERROR already in room order3"]
    assert names_of(c, "order") == ["orderly"]
    c.close()


@pytest.mark.timeout(20)
def test_data_after_quit_is_ignored(default_cluster: Cluster) -> None:
    watcher = client(default_cluster)
    watcher.join("quit", "watcher")
    c = client(default_cluster)
    c.send_raw(b"JOIN quit quitter\nQUIT\nMSG quit after-quit\nJOIN other quitter\nPING x\n")
    lines = read_until_closed(c)
    assert lines == ["INFO joined room quit", "INFO bye"]
    c.close()
    assert watcher.readline() == "INFO quitter joined quit"
    assert watcher.readline() == "INFO quitter left quit"
    assert ping_round_trip(watcher, "w")[1] == []  # no "after-quit" message in between
    assert names_of(watcher, "quit") == ["watcher"]
    watcher.close()


# --- flood control -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_flood_is_cut_off_while_others_stay_prompt(default_cluster: Cluster) -> None:
    """10,000 MSG lines in one write with default flood control: the flooder gets
    ``ERROR excess flood`` and is closed; another member's PING round trip and a third
    member's messages stay prompt throughout."""
    pinger = client(default_cluster)
    pinger.join("flood", "pinger")
    talker = client(default_cluster)
    talker.join("flood", "talker")
    flooder = client(default_cluster)
    flooder.join("flood", "flooder")
    flooder_lines = Collector(flooder)
    spam = b"".join(b"MSG flood spam %d\n" % i for i in range(10_000))

    def flood() -> None:
        try:
            flooder.sock.sendall(spam)
        except (BrokenPipeError, ConnectionResetError):
            pass

    sender = threading.Thread(target=flood)
    sender.start()
    seen_by_pinger: List[str] = []
    for round_ in range(5):
        rtt, lines = ping_round_trip(pinger, f"p{round_}")
        seen_by_pinger += lines
        assert rtt < PROMPT
        start = time.monotonic()
        talker.send(f"MSG flood still here {round_}")
        seen_by_pinger += pinger.read_until(
            lambda line, r=round_: line == f"MSG flood talker still here {r}", timeout=PROMPT
        )
        talker.read_until(lambda line, r=round_: line == f"MSG flood talker still here {r}")
        assert time.monotonic() - start < PROMPT
        time.sleep(0.1)
    sender.join(10)
    assert flooder_lines.closed.wait(5), "the flooder was not disconnected"
    assert "ERROR excess flood" in flooder_lines.lines
    # Throttled, then cut off: the room saw a burst's worth, not ten thousand.
    spam_seen = [line for line in seen_by_pinger if line.startswith("MSG flood flooder spam")]
    assert len(spam_seen) <= 100
    assert spam_seen == [f"MSG flood flooder spam {i}" for i in range(len(spam_seen))]
    wait_names(pinger, "flood", ["pinger", "talker"])
    assert "excess flood" in default_cluster.log
    for c in (pinger, talker, flooder):
        c.close()


@pytest.fixture(scope="module")
def throttled_cluster() -> Iterator[Cluster]:
    yield from start_cluster("--rate-limit", "5", "--rate-burst", "5")


@pytest.mark.timeout(30)
def test_flood_control_throttles_rather_than_drops(throttled_cluster: Cluster) -> None:
    """12 MSGs at once with 5/s and a burst of 5 (under the penalty): every one arrives, in
    order, the later ones spread out by the rate."""
    observer = client(throttled_cluster)
    observer.join("slow", "observer")
    c = client(throttled_cluster)
    c.join("slow", "burster")
    assert observer.readline() == "INFO burster joined slow"
    c.send_raw(b"".join(b"MSG slow m%d\n" % i for i in range(12)))
    arrivals = []
    for i in range(12):
        assert c.readline(5.0) == f"MSG slow burster m{i}"
        arrivals.append(time.monotonic())
    # 5 tokens at once (minus the JOIN's), then 5 per second: at least ~1.4 s in all.
    assert arrivals[-1] - arrivals[0] >= 1.0, arrivals
    assert observer.read_lines(12, timeout=5.0) == [f"MSG slow burster m{i}" for i in range(12)]
    assert ping_round_trip(c, "not-cut", timeout=5.0)[1] == []
    assert "excess flood" not in throttled_cluster.log
    c.close()
    observer.close()


# --- clients that do not read --------------------------------------------------------------


def fill_room(
    cluster: Cluster,
    talker: LineClient,
    readers: List[LineClient],
    room: str,
    stop: Callable[[], bool],
    max_batches: int = 200,
    extra_batches: int = 5,
) -> int:
    """The talker sends batches of 50 long messages (reading its echoes, as do *readers*)
    until *stop()* is true, then *extra_batches* more. Returns how many it sent; checks that
    every reader got every one of them, in order."""
    text = "y" * 1990
    sent = 0
    remaining_extra: Optional[int] = None
    for batch in range(max_batches):
        lines = [f"MSG {room} {sent + i} {text}".encode() + b"\n" for i in range(50)]
        talker.send_raw(b"".join(lines))
        sent += 50
        for c in [talker, *readers]:
            got = [c.readline(3.0) for _ in range(50)]
            got = [line for line in got if line.startswith("MSG ")]
            while len(got) < 50:  # an INFO (someone left) was in between
                line = c.readline(3.0)
                if line.startswith("MSG "):
                    got.append(line)
            numbers = [int(line.split()[3]) for line in got]
            assert numbers == list(range(sent - 50, sent)), (batch, numbers[:3])
        if remaining_extra is None and stop():
            remaining_extra = extra_batches
        if remaining_extra is not None:
            if remaining_extra == 0:
                return sent
            remaining_extra -= 1
    raise AssertionError(f"stop condition never met after {sent} messages:\n{cluster.log[-2000:]}")


@pytest.fixture
def small_output_cluster() -> Iterator[Cluster]:
    """Small output limits, no flood control. Function-scoped: a cut-off that goes wrong
    must not leave a broken router to the next test."""
    yield from start_cluster(
        "--rate-limit", "0", "--output-hard-limit", "65536", "--output-soft-limit", "32768"
    )


@needs_proc
@pytest.mark.timeout(90)
def test_member_that_never_reads_is_cut_off_and_readers_lose_nothing(
    small_output_cluster: Cluster,
) -> None:
    cluster = small_output_cluster
    sleeper = socket.create_connection((cluster.host, cluster.tcp_port))
    sleeper.sendall(b"JOIN busy sleeper\n")  # and never reads a byte
    talker = client(cluster)
    talker.join("busy", "talker")
    readers = [client(cluster) for _ in range(2)]
    for i, reader in enumerate(readers):
        reader.join("busy", f"reader{i}")
    wait_names(talker, "busy", ["reader0", "reader1", "sleeper", "talker"])
    before = router_rss_kb(cluster)

    sent = fill_room(cluster, talker, readers, "busy", stop=lambda: "slow consumer" in cluster.log)

    assert sent >= 100
    cluster.wait_for_log(r"cutting off .*slow consumer")
    drain_until_closed(sleeper, timeout=5.0)  # EOF or reset, after its grace period
    sleeper.close()
    wait_names(talker, "busy", ["reader0", "reader1", "talker"])
    growth = router_rss_kb(cluster) - before
    assert growth < RSS_SLACK_KB, f"router RSS grew by {growth} KiB"
    no_traceback(cluster)


@pytest.fixture
def soft_limit_cluster() -> Iterator[Cluster]:
    """Only the soft limit can trip (the hard one is out of reach), after 1 s."""
    yield from start_cluster(
        "--rate-limit",
        "0",
        "--output-hard-limit",
        str(1 << 30),
        "--output-soft-limit",
        "16384",
        "--output-soft-seconds",
        "1",
    )


@pytest.mark.timeout(90)
def test_soft_limit_held_too_long_cuts_off(soft_limit_cluster: Cluster) -> None:
    cluster = soft_limit_cluster
    sleeper = socket.create_connection((cluster.host, cluster.tcp_port))
    sleeper.sendall(b"JOIN soft sleeper\n")
    talker = client(cluster)
    talker.join("soft", "talker")
    reader = client(cluster)
    reader.join("soft", "reader")
    wait_names(talker, "soft", ["reader", "sleeper", "talker"])

    def over_soft() -> bool:
        time.sleep(0.05)  # let the once-a-second sweep see it
        return "over the soft limit" in cluster.log

    fill_room(cluster, talker, [reader], "soft", stop=over_soft, max_batches=400)
    assert "bytes unread" not in cluster.log  # not the hard limit
    drain_until_closed(sleeper, timeout=5.0)
    sleeper.close()
    wait_names(talker, "soft", ["reader", "talker"])
    no_traceback(cluster)


@pytest.mark.timeout(60)
def test_full_history_reply_does_not_trip_the_cut_off(unthrottled_cluster: Cluster) -> None:
    """A member that has not read the room's last 500 long messages asks for HISTORY 500
    on top: what it asked for is allowed on top of the output limits (default limits)."""
    cluster = unthrottled_cluster
    # Reads nothing until the end, with a small receive buffer.
    reader = client(cluster, rcvbuf=4096)
    reader.join("hist", "reader")
    talker = client(cluster)
    talker.join("hist", "talker")
    text = "é" * 1995  # with "NN ": about 4000 bytes, near the longest lines allowed
    for batch in range(10):
        talker.send_raw(b"".join(f"MSG hist {batch:02d} {text}\n".encode() for _ in range(50)))
        echoes = talker.read_lines(50, timeout=10.0)
        assert echoes == [f"MSG hist talker {batch:02d} {text}"] * 50
    reader.send("HISTORY hist 500")
    time.sleep(1.0)  # the reply sits in the router's buffer: the reader still reads nothing
    assert "cutting off" not in cluster.log
    lines = reader.read_lines(1 + 500 + 500 + 1, timeout=10.0)
    assert lines[0] == "INFO talker joined hist"
    assert all(line.startswith("MSG hist talker ") for line in lines[1:501])
    history = lines[501:1001]
    assert all(line.startswith("HISTORY hist ") and line.endswith(text) for line in history)
    seqs = [int(line.split()[2]) for line in history]
    assert seqs == list(range(seqs[0], seqs[0] + 500))
    assert lines[-1] == "END HISTORY hist 500"
    assert "cutting off" not in cluster.log
    assert ping_round_trip(reader, "ok")[1] == []
    reader.close()
    talker.close()


# --- keepalive and join deadline -----------------------------------------------------------


@pytest.fixture(scope="module")
def keepalive_cluster() -> Iterator[Cluster]:
    yield from start_cluster("--idle-ping", "1", "--ping-timeout", "1", "--join-timeout", "1")


@pytest.mark.timeout(30)
def test_answering_pings_keeps_a_silent_client_open(keepalive_cluster: Cluster) -> None:
    c = client(keepalive_cluster)
    c.join("keep", "awake")
    start = time.monotonic()
    tokens = []
    for _ in range(3):
        line = c.readline(5.0)
        assert line.startswith("PING "), line
        token = line.split(" ", 1)[1]
        assert token
        tokens.append(token)
        c.send(f"PONG {token}")
    # Three rounds of idle-ping (1 s) + answer: well past the 1 s ping timeout.
    assert time.monotonic() - start > 2.0
    c.send("MSG keep alive")
    assert c.read_until(lambda line: not line.startswith(("PING ", "PONG ")))[-1] == (
        "MSG keep awake alive"
    )
    c.close()


@pytest.mark.timeout(30)
def test_silent_client_is_closed_with_ping_timeout(keepalive_cluster: Cluster) -> None:
    watcher = client(keepalive_cluster)
    watcher.join("silent", "watcher")
    c = client(keepalive_cluster)
    c.join("silent", "mute")
    watcher_lines = Collector(watcher, answer_pings=True)
    lines = read_until_closed(c, timeout=8.0)
    assert lines[0].startswith("PING ")
    assert lines[-1] == "ERROR ping timeout"
    c.close()
    # Meanwhile the watcher answered its pings: it is still here, and heard mute leave.
    assert watcher_lines.wait_for(lambda line: line == "INFO mute left silent", timeout=5.0)
    assert any(line.startswith("PING ") for line in watcher_lines.lines)
    watcher.send("NAMES silent")
    assert watcher_lines.wait_for(lambda line: line == "NAMES silent watcher", timeout=5.0)
    assert not watcher_lines.closed.is_set()
    watcher.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chatty", [False, True], ids=["silent", "pings-but-never-joins"])
def test_connection_that_never_joins_is_closed(keepalive_cluster: Cluster, chatty: bool) -> None:
    c = client(keepalive_cluster)
    start = time.monotonic()
    lines: List[str] = []
    if chatty:
        # Busy, but never joins: activity does not extend the join deadline.
        for i in range(40):
            try:
                c.send(f"PING t{i}")
                lines.append(c.readline(1.0))
            except (OSError, EOFError):
                break
            if lines[-1].startswith("ERROR"):
                break
            time.sleep(0.1)
    lines += read_until_closed(c, timeout=5.0)
    errors = [line for line in lines if line.startswith("ERROR")]
    assert errors == ["ERROR no JOIN within 1 seconds"], lines
    assert time.monotonic() - start < 6.0
    c.close()


# --- connection caps ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped_cluster() -> Iterator[Cluster]:
    yield from start_cluster("--max-connections-per-ip", "10", "--max-connections", "15")


def open_many(cluster: Cluster, count: int, source: str = "127.0.0.1") -> List[TunedClient]:
    """Open *count* connections one after the other (each reads its first line)."""
    clients = []
    for _ in range(count):
        c = client(cluster, welcome=False, source=source)
        clients.append(c)
        c.first_line = c.readline()  # type: ignore[attr-defined]
    return clients


def split_accepted(clients: List[TunedClient]) -> Tuple[List[TunedClient], List[TunedClient]]:
    accepted = [c for c in clients if c.first_line.startswith("INFO welcome")]  # type: ignore[attr-defined]
    refused = [c for c in clients if c not in accepted]
    return accepted, refused


def expect_refused(refused: List[TunedClient]) -> None:
    for c in refused:
        assert c.first_line == "ERROR server full"  # type: ignore[attr-defined]
        assert read_until_closed(c, timeout=3.0) == []
        c.close()


def accepted_again(
    cluster: Cluster, source: str = "127.0.0.1", timeout: float = 5.0
) -> TunedClient:
    """A new connection, retried until the router has released the slot of one that
    closed (a refused attempt holds no slot)."""
    deadline = time.monotonic() + timeout
    while True:
        (c,) = open_many(cluster, 1, source)
        if c.first_line.startswith("INFO welcome") or time.monotonic() > deadline:  # type: ignore[attr-defined]
            assert c.first_line.startswith("INFO welcome"), c.first_line  # type: ignore[attr-defined]
            return c
        c.close()
        time.sleep(0.05)


def release(clients: List[TunedClient]) -> None:
    """Close with RST: the router releases each slot as soon as it sees the reset."""
    for c in clients:
        reset(c.sock)


def settle(cluster: Cluster, count: int = 10, source: str = "127.0.0.1") -> None:
    """Wait until *count* connections from *source* are accepted (earlier tests' slots are
    released), then release them."""
    release([accepted_again(cluster, source) for _ in range(count)])
    deadline = time.monotonic() + 10
    while slots_held(cluster) > 1 and time.monotonic() < deadline:  # (1: the probe itself)
        time.sleep(0.05)
    assert slots_held(cluster) <= 1, "the released slots were never freed"


def slots_held(cluster: Cluster) -> int:
    """The connection slots the router holds, from /healthz (its own probe included)."""
    connection = http.client.HTTPConnection(cluster.host, cluster.http_port, timeout=10)
    try:
        connection.request("GET", "/healthz", headers={"Connection": "close"})
        return int(json.loads(connection.getresponse().read())["connections"])
    finally:
        connection.close()


@pytest.mark.timeout(60)
def test_per_ip_cap(capped_cluster: Cluster) -> None:
    settle(capped_cluster)
    clients = open_many(capped_cluster, 10 + 50)
    accepted, refused = split_accepted(clients)
    assert accepted == clients[:10]
    expect_refused(refused)
    for i, c in enumerate(accepted):
        c.join("capped", f"user{i}")
    accepted[0].send("MSG capped hello")
    for c in accepted:
        c.read_until(lambda line: line == "MSG capped user0 hello")
    for c in accepted[:3]:
        c.close()  # a clean close
    again = [accepted_again(capped_cluster) for _ in range(3)]
    (extra,) = open_many(capped_cluster, 1)
    expect_refused([extra])
    again[0].join("capped", "again0")
    again[0].send("MSG capped back")
    for c in [again[0], *accepted[3:]]:
        c.read_until(lambda line: line == "MSG capped again0 back")
    release(again + accepted[3:])


@pytest.mark.skipif(not LINUX, reason="needs 127.0.0.x source addresses (Linux loopback)")
@pytest.mark.timeout(60)
def test_total_cap_across_addresses(capped_cluster: Cluster) -> None:
    settle(capped_cluster)
    first = open_many(capped_cluster, 10, "127.0.0.1")
    second = open_many(capped_cluster, 5 + 50, "127.0.0.2")
    accepted, refused = split_accepted(first + second)
    assert accepted == first + second[:5]  # 15 in total, 10 of them from one address
    expect_refused(refused)
    (third,) = open_many(capped_cluster, 1, "127.0.0.3")  # a fresh address, yet full
    expect_refused([third])
    second[0].join("total", "second0")
    second[0].close()
    newcomer = accepted_again(capped_cluster, "127.0.0.3")
    newcomer.join("total", "third")
    assert names_of(newcomer, "total") == ["third"]
    release(first + second[1:5] + [newcomer])


@pytest.mark.timeout(30)
def test_clean_close_frees_the_slot_promptly(capped_cluster: Cluster) -> None:
    settle(capped_cluster)
    clients = open_many(capped_cluster, 10)
    assert split_accepted(clients)[0] == clients
    clients[0].close()  # FIN, as nc or any client does on exit
    start = time.monotonic()
    newcomer = accepted_again(capped_cluster)
    waited = time.monotonic() - start
    release(clients[1:] + [newcomer])
    # (under the 1 s a lingering close would hold it, with room for a slow machine)
    assert waited < 0.9, f"slot held {waited:.2f}s after the client closed"


# --- vanishing clients -------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("moment", ["mid-line", "with-unread-output", "right-after-quit"], ids=str)
def test_reset_connection_is_cleaned_up(default_cluster: Cluster, moment: str) -> None:
    room = f"rst-{moment}"
    watcher = client(default_cluster)
    watcher.join(room, "watcher")
    victim = client(default_cluster)
    victim.join(room, "victim")
    assert watcher.readline() == f"INFO victim joined {room}"
    if moment == "mid-line":
        victim.send_raw(f"MSG {room} half a li".encode())
    elif moment == "with-unread-output":
        for i in range(5):
            watcher.send(f"MSG {room} unread {i}")
        watcher.read_lines(5)
    else:
        victim.send_raw(b"QUIT\n")
    time.sleep(0.1)
    reset(victim.sock)
    assert watcher.readline() == f"INFO victim left {room}"
    assert names_of(watcher, room) == ["watcher"]
    assert ping_round_trip(watcher, "alive")[1] == []
    no_traceback(default_cluster)
    watcher.close()


@pytest.mark.timeout(60)
def test_members_vanishing_mid_broadcast(unthrottled_cluster: Cluster) -> None:
    """Thirty members, a talker sending fast, twenty members reset while messages flow:
    the survivors get every message, NAMES forgets the vanished, no traceback."""
    cluster = unthrottled_cluster
    talker = client(cluster)
    talker.join("vanish", "talker")
    survivors = [client(cluster) for _ in range(10)]
    doomed = [client(cluster) for _ in range(20)]
    for i, c in enumerate(survivors):
        c.join("vanish", f"stay{i}")
    for i, c in enumerate(doomed):
        c.join("vanish", f"gone{i}")
    wait_names(
        talker,
        "vanish",
        sorted(
            ["talker"] + [f"stay{i}" for i in range(10)] + [f"gone{i}" for i in range(20)],
            key=str.casefold,
        ),
    )
    collectors = [Collector(c) for c in survivors]
    total = 3000

    def talk() -> None:
        for start in range(0, total, 100):
            talker.send_raw(b"".join(b"MSG vanish n%d\n" % i for i in range(start, start + 100)))
            time.sleep(0.01)

    sender = threading.Thread(target=talk)
    sender.start()
    time.sleep(0.05)
    for c in doomed:
        reset(c.sock)
        time.sleep(0.005)
    sender.join(30)
    expected = [f"MSG vanish talker n{i}" for i in range(total)]
    for collector in collectors:
        assert collector.wait_for(lambda line: line == expected[-1], timeout=15.0)
        assert [line for line in collector.lines if line.startswith("MSG ")] == expected
    wait_names(
        talker, "vanish", sorted(["talker"] + [f"stay{i}" for i in range(10)], key=str.casefold)
    )
    fresh = client(cluster)
    assert ping_round_trip(fresh, "alive")[1] == []
    fresh.close()
    no_traceback(cluster)
    for c in [talker, *survivors]:
        c.close()
