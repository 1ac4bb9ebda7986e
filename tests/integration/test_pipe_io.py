"""Both ways the router drives shard pipes (router.pipes): the selector (POSIX default) and
the reader/writer threads (Windows default), on a real cluster: chat across two shards,
then a shard killed and restarted."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from common.hashing import room_to_shard
from tests.cluster import Cluster

pytestmark = pytest.mark.timeout(60)


def room_on(shard: int, shards: int = 2) -> str:
    return next(f"r{i}" for i in range(1000) if room_to_shard(f"r{i}", shards) == shard)


@pytest.mark.parametrize(
    "pipe_io",
    [
        pytest.param(
            "selector",
            marks=pytest.mark.skipif(sys.platform == "win32", reason="POSIX only"),
        ),
        "threads",
    ],
)
def test_chat_and_restart(pipe_io: str) -> None:
    with Cluster(shards=2, extra_args=["--pipe-io", pipe_io]) as cluster:
        rooms = [room_on(0), room_on(1)]
        a, b = cluster.connect(), cluster.connect()
        for room in rooms:
            a.join(room, "alice")
            b.join(room, "bob")
            a.expect(f"INFO bob joined {room}")
        for room in rooms:
            b.send(f"MSG {room} hi in {room}")
            a.expect(f"MSG {room} bob hi in {room}")
            b.expect(f"MSG {room} bob hi in {room}")
        if sys.platform == "win32":
            return
        os.kill(cluster.shard_pids()[0], signal.SIGKILL)
        a.expect(f"INFO room {rooms[0]} restarted, history lost", timeout=10)
        b.expect(f"INFO room {rooms[0]} restarted, history lost", timeout=10)
        b.send(f"MSG {rooms[0]} back again")
        a.expect(f"MSG {rooms[0]} bob back again")
        a.send("QUIT")
        assert a.read_all_until_closed() == ["INFO bye"]
