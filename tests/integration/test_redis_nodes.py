"""Several nodes (start_cluster.py --redis) sharing rooms through a real redis-server:
members on every node hear each other, names are unique across nodes, history and the HTTP
poll's cursors are the same from every node; a node killed with -9 has its members removed
(heard leaving); Redis down and back; a lost pub/sub message read back from the Stream."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from scripts.nodes_experiment import CONFIGS
from tests.cluster import START_CLUSTER, Cluster, LineClient
from tests.integration.test_http_api import Api
from tests.redis_server import RedisServer, need_redis, redis_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    yield from redis_server()


def node(redis: RedisServer, *extra: str, shards: int = 2) -> Cluster:
    return Cluster(shards=shards, redis=redis.url, extra_args=list(extra))  # (with: starts it)


def history(client: LineClient, room: str) -> List[str]:
    client.send(f"HISTORY {room} 500")
    lines = client.read_until(lambda line: line.startswith(f"END HISTORY {room}"), timeout=10)
    return [line.split(" ", 4)[4] for line in lines if line.startswith("HISTORY ")]


def ann_and_bob(a: Cluster, b: Cluster) -> tuple[LineClient, LineClient]:
    """ann on node *a* and bob on node *b*, both in lobby (ann has heard bob join)."""
    ann, bob = a.connect(), b.connect()
    ann.join("lobby", "ann")
    bob.join("lobby", "bob")
    ann.expect("INFO bob joined lobby")
    return ann, bob


def test_two_nodes_share_a_room_both_ways(redis: RedisServer) -> None:
    with node(redis) as a, node(redis) as b:
        ann, bob = ann_and_bob(a, b)
        ann.send("MSG lobby hello from a")
        ann.expect("MSG lobby ann hello from a")
        bob.expect("MSG lobby ann hello from a")
        bob.send("MSG lobby hi from b")
        bob.expect("MSG lobby bob hi from b")
        ann.expect("MSG lobby bob hi from b")
        for client in (ann, bob):
            client.send("NAMES lobby")
            client.expect("NAMES lobby ann bob")
        assert history(ann, "lobby") == history(bob, "lobby")
        bob.send("QUIT")
        ann.expect("INFO bob left lobby")


def test_a_username_is_unique_per_room_across_nodes(redis: RedisServer) -> None:
    with node(redis) as a, node(redis) as b:
        first = a.connect()
        first.join("lobby", "Zoë")
        for spelling in ("zoë", "ZOË", "Zoë"):
            other = b.connect()
            other.send(f"JOIN lobby {spelling}")
            other.expect("ERROR name taken in lobby")
            other.close()
        elsewhere = b.connect()
        elsewhere.join("other", "zoë")  # names are per room
        first.send("LEAVE lobby")
        first.expect("INFO left room lobby")
        again = b.connect()
        again.join("lobby", "zoë")


def test_history_and_cursors_are_the_same_from_every_node(redis: RedisServer) -> None:
    with (
        node(redis, "--rate-limit", "0") as a,
        node(redis, shards=1) as b,
        node(redis, shards=3) as c,
    ):
        writer = a.connect()
        writer.join("big", "writer")
        for i in range(520):
            writer.send(f"MSG big m{i}")
        writer.read_until(lambda line: line == "MSG big writer m519", timeout=30)
        readers = [x.connect() for x in (b, c)]
        for i, reader in enumerate(readers):
            reader.join("big", f"reader{i}")
        readers[0].expect("INFO reader1 joined big")  # (a HISTORY holds what came so far)
        seen = [history(reader, "big") for reader in readers]
        assert seen[0] == seen[1] and len(seen[0]) == 500
        assert seen[0][-3:] == ["writer m519", "* reader0 joined big", "* reader1 joined big"]
        assert seen[0][0] == "writer m22"  # the last 500 of 523 entries
        # The HTTP poll's cursors (seq + epoch) from two other nodes agree.
        answers = []
        for cluster in (b, c):
            api = Api(cluster)
            joined = api.join("big", f"web{cluster.http_port}")
            payload = api.poll("room=big&after=100")
            answers.append(([m["id"] for m in payload["messages"]], joined["epoch"]))
            api.close()
        assert answers[0][1] == answers[1][1]
        assert answers[0][0][:400] == answers[1][0][:400] and answers[0][0][0] == 101


def test_a_killed_node_s_members_are_heard_leaving(redis: RedisServer) -> None:
    with node(redis, "--redis-presence", "3") as a, node(redis, "--redis-presence", "3") as b:
        ann, _ = ann_and_bob(a, b)
        _kill_all(b)
        started = time.monotonic()
        ann.expect("INFO bob left lobby", timeout=15)
        assert time.monotonic() - started < 3 + 3  # presence, plus one refresh's wait
        ann.send("NAMES lobby")
        ann.expect("NAMES lobby ann")
        fresh = a.connect()
        fresh.join("lobby", "bob")  # the name is free again


def _kill_all(cluster: Cluster) -> None:
    """kill -9 of the node: its router and every shard (what a power cut does to a host)."""
    assert cluster.proc is not None
    pids = [cluster.proc.pid, *_children(cluster.proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.proc.wait(timeout=10)


def _children(pid: int) -> List[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_redis_down_and_back(redis: RedisServer) -> None:
    with node(redis) as a, node(redis) as b:
        ann, bob = ann_and_bob(a, b)
        web = Api(a)
        joined = web.join("lobby", "webby")
        ann.expect("INFO webby joined lobby")
        bob.expect("INFO webby joined lobby")
        ann.send("MSG lobby before")
        ann.expect("MSG lobby ann before")
        bob.expect("MSG lobby ann before")
        port = redis.port
        redis.stop()
        ann.expect("INFO room lobby unavailable: the server lost its connection to Redis;"
                   " reconnecting", timeout=15)  # fmt: skip
        ann.send("MSG lobby while down")
        ann.expect("ERROR room unavailable", timeout=10)
        redis.start(port)  # an empty Redis: the rooms' history is gone, members put back
        for client in (ann, bob):
            told = client.read_until(lambda line: line == "INFO room lobby available again",
                                     timeout=20)  # fmt: skip
            assert "INFO room lobby restarted, history lost" in told  # (a new epoch)
        assert history(bob, "lobby") == []
        cursor = f"room=lobby&after={joined['id'] + 1}&epoch={joined['epoch']}"
        assert web.poll(cursor)["missed"] is True  # the browser is told too
        web.close()
        ann.send("NAMES lobby")
        ann.expect("NAMES lobby ann bob webby")  # put back, browser session included
        ann.send("MSG lobby after")
        lines = ann.read_until(lambda line: line == "MSG lobby ann after", timeout=10)
        assert lines[-1] == "MSG lobby ann after"
        bob.read_until(lambda line: line == "MSG lobby ann after", timeout=10)


def test_redis_unreachable_at_start_is_one_line_and_exit_1() -> None:
    need_redis()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, str(START_CLUSTER), "--redis", f"redis://127.0.0.1:{port}/0",
         "--tcp-port", "0", "--http-port", "0", "--redis-wait", "0.5"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0 (waited 0.5 s)" in done.stderr
    assert "--redis-wait SECONDS" in done.stderr


# An entry recorded as the publishing script does, but never published: a pub/sub message
# that was lost on its way to every node.
UNPUBLISHED = """
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', 500, seq .. '-1', 'ts', ARGV[1], 'k', 'chat',
           'u', 'ann', 't', ARGV[2])
return seq
"""


def node_name(cluster: Cluster) -> str:
    return re.search(r"as node (\S+)", cluster.log).group(1)  # type: ignore[union-attr]


def test_a_lost_pubsub_message_is_read_back_from_the_stream(redis: RedisServer) -> None:
    """An entry whose pub/sub message never came reaches every node's members anyway, in
    order: the next entry's seq shows the gap, and the node reads it from the Stream."""
    import redis as redis_py

    from shard.redis_rooms import room_keys

    with node(redis, shards=1) as a, node(redis, shards=1) as b:
        ann, bob = ann_and_bob(a, b)
        direct = redis_py.Redis.from_url(redis.url)
        keys = room_keys("lobby")
        direct.eval(UNPUBLISHED, 2, keys[0], keys[1], str(time.time()), "lost on the way")
        ann.send("MSG lobby after it")
        for client in (ann, bob):
            client.expect("MSG lobby ann lost on the way", timeout=10)
            client.expect("MSG lobby ann after it", timeout=10)
        # And one with nothing after it: the completion's wait runs out, the Stream says.
        direct.eval(UNPUBLISHED, 2, keys[0], keys[1], str(time.time()), "the last one")
        ann.send("MSG lobby x")  # (its own echo is published, so a gap again: read back)
        ann.expect("MSG lobby ann the last one", timeout=10)
        ann.expect("MSG lobby ann x", timeout=10)
        direct.close()


def test_a_node_cut_off_its_subscription_catches_up_from_the_stream(redis: RedisServer) -> None:
    """Redis cuts a node's subscription (client-output-buffer-limit): the node's members
    are told, and get what was said meanwhile, in order, once it is back."""
    import redis as redis_py

    with node(redis, shards=1) as a, node(redis, shards=1) as b:
        ann, bob = ann_and_bob(a, b)
        direct = redis_py.Redis.from_url(redis.url)
        cut = f"shardchat-{node_name(b)}-sh0-sub"
        killed = [c for c in direct.client_list(_type="pubsub") if c["name"] == cut]
        assert killed, direct.client_list()
        direct.client_kill_filter(_id=killed[0]["id"])
        for i in range(5):
            ann.send(f"MSG lobby m{i}")
        for i in range(5):
            ann.expect(f"MSG lobby ann m{i}")
        # The node subscribes again, then reads what it missed from the Stream, then says
        # "available again"; ann's lines may land anywhere in that (the ones after the
        # subscription come by pub/sub, possibly after the notice).
        lines: List[str] = []
        while "MSG lobby ann m4" not in lines or "INFO room lobby available again" not in lines:
            lines.append(bob.readline(timeout=20))
        assert [line for line in lines if line.startswith("MSG ")] == [
            f"MSG lobby ann m{i}" for i in range(5)
        ]
        told = [line for line in lines if line.startswith("INFO room lobby")]
        assert told == [
            "INFO room lobby unavailable: the server lost its connection to Redis; reconnecting",
            "INFO room lobby available again",
        ]
        direct.close()


def test_browser_and_terminal_users_on_two_nodes_share_a_room(redis: RedisServer) -> None:
    with node(redis) as a, node(redis) as b:
        ann = a.connect()
        ann.join("lobby", "ann")
        web = Api(b)
        joined = web.join("lobby", "webby")
        ann.expect("INFO webby joined lobby")
        web.send("lobby", "from the browser")
        ann.expect("MSG lobby webby from the browser")
        ann.send("MSG lobby from the terminal")
        ann.expect("MSG lobby ann from the terminal")
        texts: List[str] = []
        after = joined["id"]
        deadline = time.monotonic() + 10
        while "from the terminal" not in texts and time.monotonic() < deadline:
            payload = web.poll(f"room=lobby&after={after}")
            texts += [message["text"] for message in payload["messages"]]
            after = payload["rooms"]["lobby"]["after"]
            assert payload["missed"] is False
        assert texts[-2:] == ["from the browser", "from the terminal"]
        web.close()


def test_a_node_with_a_router_tier_shares_rooms_too(redis: RedisServer) -> None:
    with node(redis, "--routers", "2") as a, node(redis, shards=1) as b:
        assert any(f"history kept in Redis at {redis.url}, shared as node" in line
                   for line in a.log_lines)  # fmt: skip
        here = [a.connect() for _ in range(4)]  # (spread over both routers by the kernel)
        there = b.connect()
        for i, client in enumerate([*here, there]):
            client.join("lobby", f"u{i}")
        here[0].send("MSG lobby from the tier")
        there.send("MSG lobby from the other node")
        wanted = {"MSG lobby u0 from the tier", "MSG lobby u4 from the other node"}
        orders = set()
        for client in [*here, there]:
            seen: List[str] = []
            while len(seen) < 2:
                line = client.readline()
                if line in wanted:
                    seen.append(line)
            orders.add(tuple(seen))
        assert len(orders) == 1  # one order on every connection of both nodes: seq order
        here[1].send("NAMES lobby")
        here[1].read_until(lambda line: line == "NAMES lobby u0 u1 u2 u3 u4")


def test_the_nodes_experiment_runs(tmp_path: Path) -> None:
    need_redis()
    done = subprocess.run(
        [sys.executable, str(START_CLUSTER.parent / "shard_experiment.py"), "--scenarios",
         "nodes", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((Path(tmp_path) / "nodes.json").read_text())
    assert [row["config"] for row in rows] == list(CONFIGS)
    for row in rows:
        assert row["status"] == "ok" and row["deliveries_per_s"] > 0
    for row in rows[:3]:
        assert row["lost"] == 0
    assert 0 < rows[1]["redis_sent_per_message"] < 1.5  # one EVALSHA a message, and joins
    assert "| 2 nodes, Redis |" in (Path(tmp_path) / "nodes.md").read_text()


def test_a_direct_message_reaches_a_member_on_the_other_node(redis: RedisServer) -> None:
    with node(redis) as a, node(redis) as b:
        ann, bob = ann_and_bob(a, b)
        ann.send("PRIVMSG lobby BOB psst")  # (any spelling of the name)
        ann.expect("PRIVMSG lobby ann bob psst")  # the echo
        bob.expect("PRIVMSG lobby ann bob psst")
        bob.send("PRIVMSG lobby nobody hi")
        bob.expect("ERROR no member nobody in lobby")
