"""Starting and stopping the real cluster: both start methods, a port in use, Ctrl+C and
SIGTERM, and a router killed with SIGKILL. No process may ever be left behind.

Processes are found through ``/proc`` (Linux): every process a :class:`Cluster` starts
carries its marker in its environment (:meth:`Cluster.marked_pids`), so orphans are found
even after they were re-parented.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, List, Tuple

import pytest

from common.hashing import room_to_shard
from tests.cluster import ROOT, Cluster, LineClient, child_pids, pid_alive, wait_gone

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)"),
]

START_METHODS = [m for m in ("fork", "spawn") if m in multiprocessing.get_all_start_methods()]
SHARDS = 2
#: The issue's bounds: shutdown within 5 s; orphans gone within a few seconds.
SHUTDOWN_BOUND = 5.0
ORPHAN_BOUND = 5.0


def room_on(shard: int, prefix: str) -> str:
    """A room name that the real hash puts on *shard* (of SHARDS)."""
    return next(
        f"{prefix}{i}" for i in range(1000) if room_to_shard(f"{prefix}{i}", SHARDS) == shard
    )


@pytest.fixture
def started() -> Iterator[List[Cluster]]:
    """Clusters a test starts; each is killed at the end whatever happened."""
    clusters: List[Cluster] = []
    yield clusters
    for cluster in clusters:
        cluster.stop(signal.SIGKILL, timeout=5)


def start(started: List[Cluster], **kwargs: object) -> Cluster:
    cluster = Cluster(shards=SHARDS, **kwargs)  # type: ignore[arg-type]
    started.append(cluster)
    return cluster.start()


def two_members_on_each_shard(cluster: Cluster) -> List[LineClient]:
    """alice and bob in one room per shard; returns [alice, bob] with nothing left unread."""
    rooms = [room_on(shard, "room") for shard in range(SHARDS)]
    alice, bob = cluster.connect(), cluster.connect()
    for room in rooms:
        alice.join(room, "alice")
        bob.join(room, "bob")
        alice.expect(f"INFO bob joined {room}")
    return [alice, bob]


def core_scenario(cluster: Cluster) -> None:
    """Join, chat, names, history, leave and quit over rooms on every shard."""
    alice, bob = two_members_on_each_shard(cluster)
    for shard in range(SHARDS):
        room = room_on(shard, "room")
        alice.send(f"MSG {room} hello {shard}")
        for member in (alice, bob):
            member.expect(f"MSG {room} alice hello {shard}")
        bob.send(f"NAMES {room}")
        bob.expect(f"NAMES {room} alice bob")
        bob.send(f"HISTORY {room} 1")
        assert bob.readline().endswith(f" alice hello {shard}")
        bob.expect(f"END HISTORY {room} 1")
    first, second = (room_on(shard, "room") for shard in range(SHARDS))
    bob.send(f"LEAVE {first}")
    bob.expect(f"INFO left room {first}")
    alice.expect(f"INFO bob left {first}")
    bob.send("QUIT")
    assert bob.read_all_until_closed() == ["INFO bye"]
    alice.expect(f"INFO bob left {second}")
    alice.no_line(0.2)
    alice.send("QUIT")  # not close(): see test_shutdown_after_a_client_hung_up_unnoticed
    assert alice.read_all_until_closed() == ["INFO bye"]


# --- start methods -----------------------------------------------------------------------


@pytest.mark.parametrize("start_method", START_METHODS)
def test_core_scenario(started: List[Cluster], start_method: str) -> None:
    cluster = start(started, start_method=start_method)
    shard_pids = cluster.shard_pids()
    assert len(shard_pids) == SHARDS
    assert set(shard_pids) <= set(child_pids(cluster.proc.pid))  # type: ignore[union-attr]
    core_scenario(cluster)
    everyone = cluster.marked_pids()
    assert cluster.stop(signal.SIGTERM) == 0, cluster.log
    assert wait_gone(everyone, ORPHAN_BOUND) == []
    assert "Traceback" not in cluster.log, cluster.log


# --- port in use -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "http"])
def test_port_in_use(kind: str) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cluster = Cluster(shards=SHARDS, **{f"{kind}_port": port})  # type: ignore[arg-type]
        result, leftovers = run_to_exit(cluster)
    finally:
        busy.close()
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    (line,) = lines
    assert f":{port}" in line and "in use" in line
    assert f"lsof -nP -iTCP:{port}" in line or f"netstat -ano | findstr :{port}" in line
    assert f"--{kind}-port" in line
    assert leftovers == []


def run_to_exit(cluster: Cluster) -> Tuple[subprocess.CompletedProcess, List[int]]:
    """Run *cluster* in the foreground until it exits; its result and the processes of it
    still alive once it has (none, if it cleaned up)."""
    result = subprocess.run(
        cluster.args,
        env=cluster.env,
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result, wait_gone(cluster.marked_pids(), ORPHAN_BOUND)


def start_and_fail(*args: str) -> str:
    """Run the cluster with *args*; assert it exits 1 with one line and leaves no process;
    return the line."""
    result, leftovers = run_to_exit(Cluster(shards=SHARDS, extra_args=list(args)))
    assert leftovers == []
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    return lines[0]


def test_the_same_port_for_both_listeners_is_one_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # the later flags win: both listeners on one port
    line = start_and_fail("--tcp-port", str(port), "--http-port", str(port))
    assert f"--tcp-port and --http-port are both {port}" in line


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("nosuchhost.invalid", "does not resolve"),
        ("192.0.2.1", "is not an address of this machine"),  # TEST-NET-1, nobody's
    ],
)
def test_a_listen_error_that_is_not_a_busy_port_says_what_it_is(host: str, says: str) -> None:
    line = start_and_fail("--host", host)
    assert says in line and "--host" in line
    assert "lsof" not in line and "in use" not in line


# --- shutdown ----------------------------------------------------------------------------

SHUTDOWNS = [
    pytest.param(signal.SIGINT, "router", "spawn", id="SIGINT-spawn"),
    pytest.param(signal.SIGINT, "router", "fork", id="SIGINT-fork"),
    pytest.param(signal.SIGINT, "group", "spawn", id="Ctrl+C-to-process-group"),
    pytest.param(signal.SIGTERM, "router", "spawn", id="SIGTERM-spawn"),
    pytest.param(signal.SIGTERM, "router", "fork", id="SIGTERM-fork"),
]


@pytest.mark.parametrize(("sig", "target", "start_method"), SHUTDOWNS)
def test_shutdown_on_signal(
    started: List[Cluster], sig: int, target: str, start_method: str
) -> None:
    if start_method not in START_METHODS:
        pytest.skip(f"no {start_method} start method here")
    cluster = start(started, start_method=start_method, new_session=target == "group")
    members = two_members_on_each_shard(cluster)
    lurker = cluster.connect()  # connected, in no room: told as well
    shard_pids = cluster.shard_pids()
    everyone = cluster.marked_pids()
    assert len(shard_pids) == SHARDS and all(pid_alive(pid) for pid in shard_pids)
    assert cluster.proc is not None

    began = time.monotonic()
    if target == "group":
        cluster.signal_group(sig)
    else:
        cluster.proc.send_signal(sig)
    for client in (*members, lurker):
        assert client.read_all_until_closed(SHUTDOWN_BOUND) == ["INFO server shutting down"]
    code = cluster.proc.wait(max(0.1, SHUTDOWN_BOUND - (time.monotonic() - began)))
    assert code == 0, cluster.log
    assert wait_gone(shard_pids, 0.5) == []  # the router reaped them before it exited
    assert wait_gone(everyone, ORPHAN_BOUND) == []
    assert "Traceback" not in cluster.log, cluster.log


def test_shutdown_after_a_client_hung_up_unnoticed(started: List[Cluster]) -> None:
    """A client hung up but the router has not read its end-of-file yet when the signal
    comes. Flood control holds the router in exactly that state without any timing luck:
    past the burst, the connection is not read until its waiting commands are worked off
    (70 ignored PONGs at 10 per second: 7 s)."""
    cluster = start(started, extra_args=["--rate-limit", "10", "--rate-burst", "20"])
    room = room_on(0, "room")
    hung_up, bob = cluster.connect(), cluster.connect()  # hung_up is told first
    hung_up.join(room, "gone")
    bob.join(room, "bob")
    hung_up.expect(f"INFO bob joined {room}")
    hung_up.send_raw(b"PONG\n" * 90)  # answered with nothing, so nothing is left unread
    time.sleep(0.3)
    hung_up.close()
    time.sleep(0.2)
    assert cluster.proc is not None
    everyone = cluster.marked_pids()
    began = time.monotonic()
    cluster.proc.send_signal(signal.SIGTERM)
    assert bob.read_all_until_closed(SHUTDOWN_BOUND) == ["INFO server shutting down"]
    code = cluster.proc.wait(max(0.1, SHUTDOWN_BOUND - (time.monotonic() - began)))
    assert "Traceback" not in cluster.log, cluster.log
    assert code == 0, cluster.log
    assert wait_gone(everyone, ORPHAN_BOUND) == []


def test_new_connections_are_refused_after_shutdown(started: List[Cluster]) -> None:
    cluster = start(started)
    port = cluster.tcp_port
    assert cluster.stop(signal.SIGINT) == 0
    with pytest.raises(OSError):
        socket.create_connection((cluster.host, port), timeout=2).close()


# --- router killed -----------------------------------------------------------------------


@pytest.mark.parametrize("start_method", START_METHODS)
def test_router_sigkill_leaves_no_orphans(started: List[Cluster], start_method: str) -> None:
    cluster = start(started, start_method=start_method)
    members = two_members_on_each_shard(cluster)
    assert cluster.proc is not None
    router = cluster.proc.pid
    shard_pids = cluster.shard_pids()
    everyone = cluster.marked_pids()
    assert router in everyone and set(shard_pids) <= set(everyone)

    cluster.proc.kill()
    cluster.proc.wait(5)
    # Every shard (and any helper such as multiprocessing's resource tracker) exits by
    # itself: nobody is left to tell it to.
    others = [pid for pid in everyone if pid != router]
    assert wait_gone(others, ORPHAN_BOUND) == [], cluster.log
    assert cluster.marked_pids() == []
    # No shard kept a client's socket (or the listener) open: the clients see the close.
    for client in members:
        client.read_all_until_closed(2)
    with pytest.raises(OSError):
        socket.create_connection((cluster.host, cluster.tcp_port), timeout=2).close()


# --- names in ps ---------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/PID/comm is Linux's")
def test_processes_have_names_a_person_can_read() -> None:
    with Cluster(shards=SHARDS) as cluster:
        assert cluster.proc is not None
        with open(f"/proc/{cluster.proc.pid}/comm", encoding="ascii") as comm:
            assert comm.read().strip() == "shardchat"
        cluster.connect().close()  # the shards answered once: they are past their start
        for index, pid in enumerate(cluster.shard_pids()):
            deadline = time.monotonic() + 10
            while True:
                with open(f"/proc/{pid}/comm", encoding="ascii") as comm:
                    name = comm.read().strip()
                if name == f"shardchat-sh{index}" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert name == f"shardchat-sh{index}"


def test_help_names_the_program_it_was_started_as() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "start_cluster.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: start_cluster.py")
