"""shard.redis_node.RedisShard in this process against a real redis-server: one order for
every node (seq order), completions in command order, a lost echo read back from the
Stream, and the router tier's targets."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Tuple

import pytest

from common import messages as m
from shard.redis_node import RedisShard
from shard.redis_rooms import RedisRooms
from tests.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(60)

Sent = List[Tuple[m.Event, int, Tuple[int, ...]]]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    yield from redis_server()


def run(server: RedisServer, body: Callable[..., Awaitable[Any]], nodes: int = 2,
        routers: int = 1, monotonic: Callable[[], float] = time.monotonic) -> Any:  # fmt: skip
    import redis.asyncio as aioredis

    async def main() -> Any:
        flush = aioredis.from_url(server.url)
        await flush.flushall()
        await flush.aclose()
        shards, sent, clients = [], [], []
        for i in range(nodes):
            client, listener = aioredis.from_url(server.url), aioredis.from_url(server.url)
            clients += [client, listener]
            out: Sent = []
            shard = RedisShard(RedisRooms(client, f"n{i}"), listener.pubsub, out.extend,
                               routers=routers, gap_seconds=0.3,
                               monotonic=monotonic)  # fmt: skip
            await shard.start()
            shards.append(shard)
            sent.append(out)
        try:
            return await body(shards, sent)
        finally:
            for shard in shards:
                await shard.stop()
            for client in clients:
                await client.aclose()

    return asyncio.run(main())


async def settle(*shards: RedisShard, wait: float = 0.1) -> None:
    for _ in range(3):
        await asyncio.sleep(wait)
        for shard in shards:
            await shard.settled()


async def until(done: Callable[[], bool], *shards: RedisShard, timeout: float = 15.0) -> None:
    """Settle until *done* (a loaded machine delays the channel, never the outcome)."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await settle(*shards)


def chats(sent: Sent, room: str = "lobby") -> List[Tuple[int, str]]:
    return [(e[3][0], e[3][4]) for e, _, _ in sent if e[0] == m.CHAT and e[2] == room]


def test_every_node_delivers_one_order_and_completes_in_command_order(
    server: RedisServer,
) -> None:
    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        a, b = shards
        a.submit([m.join(1, 0, 1, "lobby", "ann")], [0])
        await settle(a)
        b.submit([m.join(1, 0, 1, "lobby", "bob")], [0])
        await until(lambda: any(e[0] == m.JOINED and e[3] == -1 for e, _, _ in sent[0]), a, b)
        for i in range(40):  # interleaved, several batches in flight at once
            a.submit([m.msg(10 + i, 0, 1, "lobby", f"a{i}"), m.names(100 + i, 0, 1, "lobby")],
                     [0, 0])  # fmt: skip
            b.submit([m.msg(10 + i, 0, 1, "lobby", f"b{i}")], [0])
        await until(lambda: all(len(chats(out)) >= 80 for out in sent), a, b)
        await settle(a, b)
        for out in sent:
            seqs = [seq for seq, _ in chats(out)]
            assert seqs == list(range(3, 83))  # every chat line once, in seq order
        assert chats(sent[0]) == chats(sent[1])
        completed = [e[1] for e, _, _ in sent[0] if e[1]]
        assert completed == [1] + [x for i in range(40) for x in (10 + i, 100 + i)]

    run(server, body)


def test_a_lost_echo_is_read_back_after_the_gap_time(server: RedisServer) -> None:
    clock = [1000.0]  # the shard's monotonic clock: the gap time passes when the test says

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        (a,) = shards
        a.submit([m.join(1, 0, 1, "lobby", "ann")], [0])
        await settle(a)
        real = a._on_message
        dropped: List[Dict[str, Any]] = []

        def lossy(message: Dict[str, Any]) -> None:  # pub/sub drops this one
            if message.get("type") == "message" and b"lost" in message["data"]:
                dropped.append(message)
                return
            real(message)

        a._on_message = lossy  # type: ignore[method-assign]
        a.submit([m.msg(2, 0, 1, "lobby", "lost"), m.names(3, 0, 1, "lobby")], [0, 0])
        await settle(a)
        assert dropped and not chats(sent[0])  # held: the completion waits for its entry
        assert [e[1] for e, _, _ in sent[0]] == [1]  # and the NAMES behind it too
        clock[0] += 0.5  # past REDIS_GAP_SECONDS (here 0.3)
        await until(lambda: bool(chats(sent[0])), a)
        assert chats(sent[0]) == [(2, "lost")] and a.refilled == 1
        assert [e[1] for e, _, _ in sent[0]] == [1, 2, 3]  # still in command order

    run(server, body, nodes=1, monotonic=lambda: clock[0])


def test_a_tier_shard_sends_each_event_once_to_each_router_with_members(
    server: RedisServer,
) -> None:
    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        (a,) = shards
        a.submit([m.join(1, 0, 4, "lobby", "ann"), m.join(1, 0, 5, "lobby", "bob")], [0, 1])
        await settle(a)
        a.submit([m.msg(2, 0, 5, "lobby", "hi")], [1])
        await until(lambda: bool(chats(sent[0])), a)
        (chat,) = [(e, source, targets) for e, source, targets in sent[0] if e[0] == m.CHAT]
        assert chat[1:] == (1, (0, 1))  # from router 1, to both routers
        dones = [(e, targets) for e, _, targets in sent[0] if e[0] == m.JOINED]
        assert 0 in dones[0][1] and dones[1][1] == (0, 1)  # ann's router hears bob join
        copies = [e for e, source, targets in sent[0] if e[0] == m.JOINED and source == 1]
        assert copies and copies[0][1] == 1  # (the send side gives router 0 a req-0 copy)

    run(server, body, nodes=1, routers=2)
