"""The router under a low open-file limit (``ulimit -n 256``), on a real cluster.

Connections are opened until the router refuses one; then refused connections must be
closed at once (their one line, then end-of-file, well under a second, for TCP and HTTP)
and must not pile up; shards killed with ``kill -9`` while a flood of refused connections
goes on must come back (their rooms answer again, ``/healthz`` is 200 again, the log says
restarted and holds no traceback); and a shard that cannot start at boot is one log line
and exit code 1. Both start methods.

Linux only: the limit is set with ``preexec_fn`` and descriptors are counted in ``/proc``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import pytest

from common.hashing import room_to_shard
from tests.cluster import (
    MARKER_ENV,
    ROOT,
    START_CLUSTER,
    Cluster,
    LineClient,
    limit_open_files,
    open_fd_count,
    pid_alive,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE via preexec_fn, /proc"
)

FD_LIMIT = 256
SHARDS = 2
START_METHODS = ["spawn", "fork"]
#: Everything the cluster may use to its limit; no flood control, one IP may fill it.
FLAGS = ["--max-connections-per-ip", "100000", "--rate-limit", "0"]
HTTP_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
#: A refused socket must read end-of-file within this (the old lingering close took 2 s).
CLOSED_WITHIN = 1.0


def room_on(shard: int, prefix: str) -> str:
    for i in range(1000):
        room = f"{prefix}{i}"
        if room_to_shard(room, SHARDS) == shard:
            return room
    raise AssertionError("no room found")


def read_to_eof(sock: socket.socket, timeout: float) -> bytes:
    """Everything until the peer closes. Raises ``socket.timeout`` if it does not close
    within *timeout* seconds and ``ConnectionResetError`` if it resets."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def refused_over_tcp(cluster: Cluster) -> socket.socket:
    """Connect, read ``ERROR server full`` and end-of-file; the socket is left open."""
    sock = socket.create_connection((cluster.host, cluster.tcp_port), timeout=5)
    assert read_to_eof(sock, CLOSED_WITHIN) == b"ERROR server full\n"
    return sock


def refused_over_http(cluster: Cluster) -> socket.socket:
    """Connect, send a request, read ``503 server_full`` and end-of-file (never a reset:
    the request was sent before the router read it); the socket is left open."""
    sock = socket.create_connection((cluster.host, cluster.http_port), timeout=5)
    sock.sendall(HTTP_REQUEST)
    answer = read_to_eof(sock, CLOSED_WITHIN)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in head, answer
    assert json.loads(body)["error"]["code"] == "server_full"
    return sock


def fill_to_the_cap(cluster: Cluster) -> List[LineClient]:
    """Open line-protocol connections until one is refused; return the accepted ones."""
    held: List[LineClient] = []
    while True:
        c = LineClient(cluster.host, cluster.tcp_port, welcome=False)
        first = c.readline()
        if first == "ERROR server full":
            assert c.read_all_until_closed(timeout=CLOSED_WITHIN) == []
            c.close()
            return held
        assert first.startswith("INFO welcome"), first
        held.append(c)
        assert len(held) < FD_LIMIT, "never refused"


def healthz(monitor: http.client.HTTPConnection) -> Tuple[int, Dict[str, Any]]:
    """Ask /healthz on a kept-alive connection (a new one would be refused at the cap)."""
    monitor.request("GET", "/healthz")
    response = monitor.getresponse()
    return response.status, json.loads(response.read())


class Flood:
    """Threads that keep connecting to both listeners while the router is full. Holders
    read their refusal and keep their end open (the last HOLD of them): the router must
    close its end by itself. Resetters vanish at once with a reset, so the router writes
    to, reads from and closes sockets whose peer is gone."""

    HOLD = 150

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.attempts = 0
        self._stop = threading.Event()
        ports = [cluster.tcp_port, cluster.http_port]
        self._threads = [
            threading.Thread(target=self._run, args=(port, hold), daemon=True)
            for port in ports
            for hold in (True, False)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, port: int, hold: bool) -> None:
        held: Deque[socket.socket] = deque()
        while not self._stop.is_set():
            try:
                sock = socket.create_connection((self.cluster.host, port), timeout=5)
            except OSError:
                continue  # the accept queue is full for a moment: try again
            held.append(sock)
            try:
                if hold:
                    if port == self.cluster.http_port:
                        sock.sendall(HTTP_REQUEST)
                    read_to_eof(sock, 5.0)
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # a reset while reading: allowed under a flood
            self.attempts += 1
            while len(held) > (self.HOLD if hold else 0):
                held.popleft().close()
        for sock in held:
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def settled_fd_count(pid: int) -> int:
    """The descriptor count of *pid* once it reads the same three times in a row."""
    counts = [open_fd_count(pid)]
    while len(counts) < 3 or len(set(counts[-3:])) > 1:
        assert len(counts) < 200, counts
        time.sleep(0.05)
        counts.append(open_fd_count(pid))
    return counts[-1]


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "start_method, pipe_io, victims",
    [
        ("spawn", "selector", [0]),
        ("spawn", "selector", [0, 1]),
        ("fork", "selector", [0]),
        ("fork", "selector", [0, 1]),
        ("spawn", "threads", [0, 1]),
        ("fork", "threads", [0]),
    ],
    ids=lambda value: "-".join(map(str, value)) if isinstance(value, list) else str(value),
)
def test_shards_killed_at_the_descriptor_limit_come_back(
    start_method: str, pipe_io: str, victims: List[int]
) -> None:
    flags = [*FLAGS, "--pipe-io", pipe_io]
    with Cluster(
        shards=SHARDS, start_method=start_method, fd_limit=FD_LIMIT, extra_args=flags
    ) as cluster:
        assert cluster.proc is not None
        router = cluster.proc.pid
        rooms = {index: room_on(index, "tight") for index in range(SHARDS)}
        monitor = http.client.HTTPConnection(cluster.host, cluster.http_port, timeout=10)
        assert healthz(monitor)[0] == 200
        members = {index: cluster.connect() for index in range(SHARDS)}
        for index, c in members.items():
            c.join(rooms[index], f"member{index}")
        held = fill_to_the_cap(cluster)
        assert held, "the limit left no room for any connection"

        # At the cap: every refusal is its line and end-of-file at once, over both
        # protocols, and the router closes its end by itself: with the refused peers all
        # still connected, its descriptors are back to where they were at once.
        baseline = settled_fd_count(router)
        refused = [refused_over_tcp(cluster) for _ in range(30)]
        refused += [refused_over_http(cluster) for _ in range(30)]
        wait_for(lambda: open_fd_count(router) == baseline, CLOSED_WITHIN, "refusals linger")
        for sock in refused:
            sock.close()

        flood = Flood(cluster)
        wait_for(lambda: flood.attempts > 500, 20, "the flood does not get going")
        pids = cluster.shard_pids()
        for index in victims:
            os.kill(pids[index], signal.SIGKILL)
        for index in victims:
            members[index].read_until(
                lambda line, room=rooms[index]: line == f"INFO room {room} restarted, history lost",
                timeout=15,
            )
        flood.stop()

        # The rooms of the killed shards answer again: MSG echoed, JOIN answered.
        for index in victims:
            room = rooms[index]
            members[index].send(f"MSG {room} back")
            assert members[index].readline(5.0) == f"MSG {room} member{index} back"
            newcomer = held[index]
            newcomer.send(f"JOIN {room} newcomer{index}")
            assert newcomer.readline(5.0) == f"INFO joined room {room}"
            assert members[index].readline(5.0) == f"INFO newcomer{index} joined {room}"
        status, payload = healthz(monitor)
        assert status == 200, payload
        assert payload["ok"] is True and payload["shards_alive"] == SHARDS
        assert payload["shards_restarting"] == [] and payload["shards_given_up"] == []
        assert payload["fd_limit"] == FD_LIMIT
        assert payload["connections"] == len(held) + len(members) + 1  # + the monitor
        assert payload["connections_refused"] >= 50
        assert payload["fds_in_use"] <= FD_LIMIT

        # Nothing left over from the flood, and refusals are still immediate.
        wait_for(lambda: open_fd_count(router) == baseline, 10, "refused sockets linger")
        refused_over_tcp(cluster).close()
        refused_over_http(cluster).close()
        for index in victims:
            cluster.wait_for_log(rf"shard {index} restarted \(pid \d+", timeout=5)
        log = cluster.log
        assert "Traceback" not in log, log[-4000:]
        assert "could not be restarted" not in log  # the reserve held: no failed attempt
        assert "cannot accept" not in log, log[-4000:]  # accept() never hit the limit
        assert "allows only about" in log  # the start-up warning about the small limit
        monitor.close()
        for c in [*held, *members.values()]:
            c.close()


async def burst(host: str, port: int, count: int) -> List[str]:
    """Open *count* connections at once; the first line each gets ("" if none in 20 s).

    Every connection stays open until all have answered: a welcomed client that closed
    early would free its descriptor for a later one, and the count of welcomes under a
    limit would then depend on timing."""
    writers: List[asyncio.StreamWriter] = []

    async def one() -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 20)
        except (OSError, asyncio.TimeoutError) as error:
            return repr(error)
        writers.append(writer)
        try:
            return (await asyncio.wait_for(reader.readline(), 20)).decode().strip()
        except (OSError, asyncio.TimeoutError):
            return ""

    try:
        return await asyncio.gather(*[one() for _ in range(count)])
    finally:
        for writer in writers:
            writer.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fd_limit", [None, FD_LIMIT], ids=["no-limit", "limit-256"])
def test_a_burst_of_connects_gets_an_answer_each(fd_limit: Optional[int]) -> None:
    """1500 connects at once: with the accept batch small (under a limit) the kernel's
    queue must still hold the burst, so that every client gets its first line (welcome,
    or server full) instead of hanging on a handshake the server dropped."""
    with Cluster(shards=SHARDS, fd_limit=fd_limit, extra_args=FLAGS) as cluster:
        lines = asyncio.run(burst(cluster.host, cluster.tcp_port, 1500))
        welcomed = [line for line in lines if line.startswith("INFO welcome")]
        refused = [line for line in lines if line == "ERROR server full"]
        assert len(welcomed) + len(refused) == len(lines), sorted(set(lines))[:5]
        if fd_limit is None:
            assert not refused
        else:
            assert 0 < len(welcomed) < FD_LIMIT
        assert "Traceback" not in cluster.log and "cannot accept" not in cluster.log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_shard_that_cannot_start_at_boot_is_one_line_and_exit_1(start_method: str) -> None:
    """With room for only some of 8 shards, the router says which could not start and why
    in one line, stops the ones it started, and exits with 1."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{MARKER_ENV: marker})
    args = [sys.executable, str(START_CLUSTER), "--tcp-port", "0", "--http-port", "0"]
    args += ["--shards", "8", "--start-method", start_method, "--in-memory"]
    done = subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=40,
        preexec_fn=limit_open_files(40),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    assert "cannot start shard " in errors[0]
    assert "(EMFILE: Too many open files): raise the open-file limit (ulimit -n)" in errors[0]
    assert "Traceback" not in output and "listening" not in output, output
    needle = f"{MARKER_ENV}={marker}".encode()
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = open(f"/proc/{entry}/environ", "rb").read()
            except OSError:
                continue
            if needle in environ.split(b"\0") and pid_alive(int(entry)):
                left.append(int(entry))
    assert left == [], "processes left behind"
