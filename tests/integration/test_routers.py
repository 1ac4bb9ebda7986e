"""A router tier (``--routers 2``) on real processes and real loopback sockets.

Which router holds an accepted connection is read from ``/proc`` (the server side's socket
inode among the router's descriptors), so most of these run on Linux only; both ways of
sharing a port (``--listener reuseport`` and ``shared``) run here.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from tests.cluster import PROC, Cluster, LineClient, child_pids, pid_alive, wait_gone

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads which process holds a socket in /proc"
)

MODES = ["reuseport", "shared"]


def tier(mode: str = "reuseport", shards: int = 2, **kwargs: object) -> Cluster:
    extra = ["--routers", "2", "--listener", mode, "--rate-limit", "0"]
    return Cluster(shards=shards, extra_args=extra, **kwargs)  # type: ignore[arg-type]


def comm(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def children_named(cluster: Cluster, prefix: str) -> Dict[int, int]:
    """Index -> pid of the supervisor's children called *prefix* + index."""
    assert cluster.proc is not None
    found = {}
    for pid in child_pids(cluster.proc.pid):
        name = comm(pid)
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            found[int(name[len(prefix) :])] = pid
    return found


def routers(cluster: Cluster) -> Dict[int, int]:
    return children_named(cluster, "shardchat-r")


def shards_of(cluster: Cluster) -> Dict[int, int]:
    return children_named(cluster, "shardchat-sh")


def wait_for_router(cluster: Cluster, index: int, old: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = routers(cluster).get(index)
        if pid is not None and pid != old:
            return pid
        time.sleep(0.05)
    raise AssertionError(f"router {index} was not restarted:\n{cluster.log}")


def server_inode(client: LineClient, server_port: int) -> Optional[int]:
    """The inode of the server's end of *client*'s connection, from /proc/net/tcp."""
    local = client.sock.getsockname()[1]
    for line in (PROC / "net" / "tcp").read_text().splitlines()[1:]:
        fields = line.split()
        here, there = fields[1], fields[2]
        if int(here.split(":")[1], 16) == server_port and int(there.split(":")[1], 16) == local:
            return int(fields[9])
    return None


def holder(pids: Dict[int, int], inode: int) -> Optional[int]:
    """The index of the router whose descriptors include socket *inode*."""
    target = f"socket:[{inode}]"
    for index, pid in pids.items():
        fd_dir = PROC / str(pid) / "fd"
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) == target:
                    return index
            except OSError:
                continue
    return None


def on_router(cluster: Cluster, client: LineClient) -> int:
    inode = server_inode(client, cluster.tcp_port)
    assert inode is not None
    index = holder(routers(cluster), inode)
    assert index is not None, "no router holds the connection"
    return index


def one_on_each(cluster: Cluster, tries: int = 64) -> Tuple[LineClient, LineClient]:
    """A connection on router 0 and one on router 1 (the others are closed)."""
    found: Dict[int, LineClient] = {}
    spare: List[LineClient] = []
    for _ in range(tries):
        client = cluster.connect()
        index = on_router(cluster, client)
        if index in found:
            spare.append(client)
        else:
            found[index] = client
        if len(found) == 2:
            break
    for client in spare:
        client.close()
    if len(found) == 1:  # (the shared listener: the same router may win every accept)
        busy = next(iter(found))
        found[1 - busy] = connect_while_stopped(cluster, busy)
    assert len(found) == 2, f"every connection went to router {list(found)}"
    return found[0], found[1]


def connect_while_stopped(cluster: Cluster, busy: int) -> LineClient:
    """A connection taken by the router other than *busy*: with one shared listening
    socket, whichever router is free accepts (here: *busy* is stopped meanwhile)."""
    pid = routers(cluster)[busy]
    os.kill(pid, signal.SIGSTOP)
    try:
        client = cluster.connect()  # welcomed by the router that took it
    finally:
        os.kill(pid, signal.SIGCONT)
    assert on_router(cluster, client) == 1 - busy
    return client


@pytest.fixture(params=MODES)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with tier(request.param) as running:
        yield running


def test_connections_are_served_by_both_routers(cluster: Cluster) -> None:
    """Each router holds some of the connections. With the shared listener the kernel
    wakes both routers and whichever accepts first takes it, so idle, the same one may
    take them all: then a connection is made while that one is stopped, and the other
    takes it."""
    clients: List[LineClient] = []
    held = set()
    try:
        while len(clients) < 24:
            clients.append(cluster.connect())
            held.add(on_router(cluster, clients[-1]))
        if len(held) == 1:
            busy = next(iter(held))
            clients.append(connect_while_stopped(cluster, busy))
            held.add(1 - busy)
        assert held == {0, 1}, f"{len(clients)} connections, all on router {held}"
    finally:
        for client in clients:
            client.close()


def test_one_room_across_two_routers_works_both_ways(cluster: Cluster) -> None:
    alice, bob = one_on_each(cluster)
    try:
        alice.join("lobby", "alice")
        bob.join("lobby", "bob")
        alice.expect("INFO bob joined lobby")
        alice.send("MSG lobby hello from router 0")
        bob.expect("MSG lobby alice hello from router 0")
        alice.expect("MSG lobby alice hello from router 0")
        bob.send("MSG lobby and back from router 1")
        alice.expect("MSG lobby bob and back from router 1")
        bob.expect("MSG lobby bob and back from router 1")
        for client in (alice, bob):
            client.send("NAMES lobby")
            client.expect("NAMES lobby alice bob")
            client.send("HISTORY lobby 2")
            client.read_until(lambda line: line.startswith("END HISTORY"))
        bob.send("PRIVMSG lobby alice just for you")
        alice.expect("PRIVMSG lobby bob alice just for you")
        bob.expect("PRIVMSG lobby bob alice just for you")
        bob.send("LEAVE lobby")
        alice.expect("INFO bob left lobby")
    finally:
        alice.close()
        bob.close()


def test_a_username_taken_on_the_other_router_is_refused(cluster: Cluster) -> None:
    first, second = one_on_each(cluster)
    try:
        first.join("lobby", "carol")
        second.send("JOIN lobby Carol")  # one spelling of the same name (PROTOCOL.md)
        second.expect("ERROR name taken in lobby")
        second.join("lobby", "dave")
        first.expect("INFO dave joined lobby")
    finally:
        first.close()
        second.close()


def request(
    port: int, method: str, path: str, body: Optional[dict] = None, cookie: str = ""
) -> Tuple[int, Dict[str, str], dict]:
    """One request on a fresh connection (``Connection: close``)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Connection": "close", "Content-Type": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    payload = json.dumps(body) if body is not None else None
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data or b"{}")
    finally:
        connection.close()


def test_one_browser_session_on_fresh_connections_works_20_times_in_a_row(
    cluster: Cluster,
) -> None:
    port = cluster.http_port
    status, headers, answer = request(port, "POST", "/api/join", {"room": "web", "username": "w"})
    assert status == 200, answer
    cookie = headers["Set-Cookie"].split(";")[0]
    after = answer["id"]
    listener = cluster.connect()
    try:
        listener.join("web", "listener")
        for i in range(20):
            status, _, answer = request(
                port, "POST", "/api/send", {"room": "web", "text": f"m{i}"}, cookie
            )
            assert status == 200, (i, answer)
            listener.expect(f"MSG web w m{i}")
            status, _, answer = request(
                port, "GET", f"/api/poll?room=web&after={after}&timeout=5", cookie=cookie
            )
            assert status == 200, (i, answer)
            texts = [message["text"] for message in answer["messages"]]
            assert f"m{i}" in texts, (i, answer)
            after = answer["messages"][-1]["id"]
    finally:
        listener.close()


def test_kill_9_of_a_router_drops_only_its_own_connections(cluster: Cluster) -> None:
    survivor, victim = one_on_each(cluster)  # survivor on router 0, victim on router 1
    try:
        survivor.join("lobby", "stays")
        victim.join("lobby", "goes")
        survivor.expect("INFO goes joined lobby")
        old = routers(cluster)[1]
        os.kill(old, signal.SIGKILL)
        survivor.expect("INFO goes left lobby")
        assert victim.read_all_until_closed() is not None
        survivor.send("MSG lobby still here")
        survivor.expect("MSG lobby stays still here")
        wait_for_router(cluster, 1, old)
        deadline = time.monotonic() + 5
        newcomer = None
        while newcomer is None:
            try:
                newcomer = cluster.connect()
            except OSError:
                assert time.monotonic() < deadline, "no new connection within 5 s"
                time.sleep(0.1)
        newcomer.join("lobby", "new")
        survivor.expect("INFO new joined lobby")
        newcomer.send("NAMES lobby")
        newcomer.expect("NAMES lobby new stays")
        newcomer.close()
        cluster.wait_for_log(r"router 1 restarted")
    finally:
        survivor.close()
        victim.close()


def test_a_shard_crash_is_handled_for_every_router(cluster: Cluster) -> None:
    first, second = one_on_each(cluster)
    try:
        first.join("lobby", "one")
        second.join("lobby", "two")
        first.expect("INFO two joined lobby")
        victim = shards_of(cluster)[cluster_shard_of("lobby")]
        os.kill(victim, signal.SIGKILL)
        for client in (first, second):
            client.expect("INFO room lobby restarted, history lost")
        second.send("MSG lobby after the crash")
        first.expect("MSG lobby two after the crash")
        first.send("NAMES lobby")
        first.expect("NAMES lobby one two")
    finally:
        first.close()
        second.close()


def cluster_shard_of(room: str, shards: int = 2) -> int:
    from common.hashing import room_to_shard

    return room_to_shard(room, shards)


def test_ctrl_c_stops_the_whole_tier_and_leaves_no_process() -> None:
    cluster = tier(new_session=True).start()
    everyone = cluster.marked_pids()
    assert len(everyone) >= 5  # supervisor, 2 routers, 2 shards
    client = cluster.connect()
    client.join("lobby", "x")
    cluster.signal_group(signal.SIGINT)
    assert cluster.proc is not None
    assert cluster.proc.wait(15) == 0
    assert "INFO server shutting down" in client.read_all_until_closed()
    assert wait_gone(everyone, 10) == []
    client.close()
    cluster.stop()


def test_kill_9_of_the_supervisor_ends_every_child() -> None:
    cluster = tier().start()
    try:
        everyone = [pid for pid in cluster.marked_pids() if pid != cluster.proc.pid]
        assert cluster.proc is not None
        os.kill(cluster.proc.pid, signal.SIGKILL)
        assert wait_gone(everyone, 15) == []
    finally:
        cluster.stop()


def test_durable_history_is_the_same_from_both_routers(tmp_path: Path) -> None:
    with tier(data_dir=tmp_path / "data") as cluster:
        first, second = one_on_each(cluster)
        try:
            first.join("kept", "a")
            for i in range(5):
                first.send(f"MSG kept line {i}")
                first.expect(f"MSG kept a line {i}")
            second.join("kept", "b")
            histories = []
            for client in (first, second):
                client.send("HISTORY kept 6")
                lines = client.read_until(lambda line: line.startswith("END HISTORY"))
                histories.append([line for line in lines if line.startswith("HISTORY kept")])
            assert histories[0] == histories[1] and len(histories[0]) == 6
        finally:
            first.close()
            second.close()


def test_routers_1_is_a_single_router_process() -> None:
    with Cluster(shards=1, extra_args=["--routers", "1"]) as cluster:
        assert cluster.proc is not None
        assert comm(cluster.proc.pid) == "shardchat"
        children = [comm(pid) for pid in child_pids(cluster.proc.pid)]
        assert not [name for name in children if name.startswith("shardchat-r")]
        assert pid_alive(cluster.proc.pid)


def test_metrics_from_any_router_cover_the_whole_tier(cluster: Cluster) -> None:
    first, second = one_on_each(cluster)
    try:
        first.join("m", "one")
        second.join("m", "two")
        first.expect("INFO two joined m")
        first.send("MSG m counted")
        second.expect("MSG m one counted")
        for _ in range(4):  # each scrape may land on either router
            connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=10)
            connection.request("GET", "/metrics", headers={"Connection": "close"})
            text = connection.getresponse().read().decode()
            connection.close()
            assert text.count("# TYPE shardchat_deliveries_total counter") == 1
            deliveries = {
                line.split('router="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("shardchat_deliveries_total")
            }
            assert set(deliveries) == {"0", "1"}
            assert sum(deliveries.values()) >= 2  # one to each router's member
    finally:
        first.close()
        second.close()


def test_a_session_whose_router_died_is_unknown_everywhere(cluster: Cluster) -> None:
    port = cluster.http_port
    status, headers, answer = request(port, "POST", "/api/join", {"room": "gone", "username": "g"})
    assert status == 200, answer
    cookie = headers["Set-Cookie"].split(";")[0]
    owner = int(cookie.split("=", 1)[1][1:].split(".", 1)[0])  # sc_session=r<owner>.<random>
    old = routers(cluster)[owner]
    os.kill(old, signal.SIGKILL)
    wait_for_router(cluster, owner, old)
    started = time.monotonic()
    for _ in range(6):  # fresh connections: they land on either router
        status, _, answer = request(
            port, "GET", "/api/poll?room=gone&after=0&timeout=1", cookie=cookie
        )
        assert status == 401 and answer["error"]["code"] == "no_session", answer
    assert time.monotonic() - started < 10


def open_descriptors(pid: int) -> int:
    return len(os.listdir(PROC / str(pid) / "fd"))


def test_pipes_handed_to_a_child_that_died_without_taking_them_leave_nothing_behind() -> None:
    """A router restarted while a shard is stopped: its new pipes wait, unread, in that
    shard's control pipe; the shard is then killed. The supervisor keeps no copy of them
    (multiprocessing's resource sharer would, for ever) and the new router sees the shard
    go and come back."""
    cluster = tier(shards=2).start()
    try:
        assert cluster.proc is not None
        supervisor = cluster.proc.pid
        before = open_descriptors(supervisor)
        shard = shards_of(cluster)[0]
        os.kill(shard, signal.SIGSTOP)
        old = routers(cluster)[0]
        os.kill(old, signal.SIGKILL)
        wait_for_router(cluster, 0, old)
        os.kill(shard, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and shards_of(cluster).get(0) in (None, shard):
            time.sleep(0.05)
        assert shards_of(cluster).get(0) not in (None, shard), cluster.log
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and open_descriptors(supervisor) != before:
            time.sleep(0.05)
        assert open_descriptors(supervisor) == before, sorted(
            os.readlink(PROC / str(supervisor) / "fd" / fd)
            for fd in os.listdir(PROC / str(supervisor) / "fd")
        )
        room = next(f"room{i}" for i in range(100) if cluster_shard_of(f"room{i}") == 0)
        first, second = one_on_each(cluster)
        try:
            first.join(room, "one")
            second.join(room, "two")
            first.expect(f"INFO two joined {room}")
            second.send(f"MSG {room} through the new pipes")
            first.expect(f"MSG {room} two through the new pipes")
        finally:
            first.close()
            second.close()
    finally:
        cluster.stop()


def scrape(cluster: Cluster) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=10)
    connection.request("GET", "/metrics", headers={"Connection": "close"})
    text = connection.getresponse().read().decode()
    connection.close()
    return text


def test_a_router_started_after_a_shard_was_given_up_knows_it() -> None:
    from common.limits import MAX_RESTARTS

    cluster = tier(shards=2).start()
    try:
        victim = None
        for _ in range(MAX_RESTARTS + 1):  # one death more than the policy restarts
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and shards_of(cluster).get(0) in (None, victim):
                time.sleep(0.05)  # (a new shard is named once it has started)
            victim = shards_of(cluster).get(0)
            assert victim is not None, cluster.log
            os.kill(victim, signal.SIGKILL)
        given_up = 'shardchat_shard_give_ups_total{router="%d",shard="0"} 1'
        old = routers(cluster)[0]
        os.kill(old, signal.SIGKILL)
        wait_for_router(cluster, 0, old)
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = scrape(cluster)
            if given_up % 0 in text and given_up % 1 in text:
                break
            time.sleep(0.2)
        assert given_up % 1 in text, text
        assert given_up % 0 in text, text  # the new router 0 was told too
    finally:
        cluster.stop()


def test_a_stopped_router_is_restarted_and_the_others_go_on() -> None:
    """Router 1 stops (SIGSTOP) with a member in a busy room: the shard's events for it pile
    up past the bound, it is reported stalled, the supervisor kills and restarts it, and
    router 0's member has chatted all along."""
    cluster = tier(shards=1).start()
    first, second = one_on_each(cluster)
    stop = threading.Event()
    try:
        first.join("busy", "one")
        second.join("busy", "two")
        first.expect("INFO two joined busy")
        stopped = routers(cluster)[1]
        os.kill(stopped, signal.SIGSTOP)
        received = [0]

        def drain() -> None:  # router 0's member takes its echoes all along
            first.sock.settimeout(0.5)
            echo, tail = b"MSG busy one ", b""
            while not stop.is_set():
                try:
                    data = tail + first.sock.recv(1 << 20)
                except socket.timeout:
                    continue
                except OSError:
                    return
                received[0] += data.count(echo)
                tail = data[-(len(echo) - 1) :]

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        line = ("MSG busy " + "x" * 900 + "\n").encode()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and routers(cluster).get(1) == stopped:
            first.send_raw(line * 200)
            time.sleep(0.01)
        assert routers(cluster).get(1) != stopped, cluster.log
        wait_for_router(cluster, 1, stopped)
        assert "router 1 takes no events" in cluster.log
        before = received[0]
        first.send_raw(line * 10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and received[0] < before + 10:
            time.sleep(0.05)
        assert received[0] >= before + 10  # router 0 still chats
    finally:
        stop.set()
        first.close()
        second.close()
        cluster.stop()


def poll_as(cluster: Cluster, token: str) -> Tuple[int, str, float]:
    """A poll with the session cookie *token* on a new connection: (status, code, seconds)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=60)
    headers = {"Cookie": f"sc_session={token}", "Connection": "close"}
    connection.request("GET", "/api/poll?room=lobby&after=0", headers=headers)
    response = connection.getresponse()
    body = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, body.get("error", {}).get("code", ""), time.monotonic() - started


def poll_once_listening(
    cluster: Cluster, token: str, timeout: float = 20.0
) -> Tuple[int, str, float]:
    """:func:`poll_as`, once the HTTP port is served again (a router that was just started
    may still be importing: its port refuses until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return poll_as(cluster, token)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_router_given_up_on_is_not_forwarded_to_even_by_a_router_started_later() -> None:
    from common.limits import MAX_RESTARTS

    cluster = tier(shards=1).start()
    try:
        victim = None
        for _ in range(MAX_RESTARTS + 1):  # router 1 dies once more than it is restarted
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and routers(cluster).get(1) in (None, victim):
                time.sleep(0.05)
            victim = routers(cluster).get(1)
            assert victim is not None, cluster.log
            os.kill(victim, signal.SIGKILL)
        cluster.wait_for_log("router 1 died", timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "giving up on it" not in cluster.log:
            time.sleep(0.05)
        old = routers(cluster)[0]
        os.kill(old, signal.SIGKILL)  # the router left is restarted: it is told too
        wait_for_router(cluster, 0, old)
        for _ in range(3):
            status, code, _seconds = poll_once_listening(cluster, "r1.no-such-session")
            # Answered as unknown where it landed, not forwarded to a port nobody serves
            # (that would be a 504 after the answer's deadline, a long-poll's wait).
            assert (status, code) == (401, "no_session"), cluster.log
    finally:
        cluster.stop()
