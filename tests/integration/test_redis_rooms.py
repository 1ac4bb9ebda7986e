"""shard.redis_rooms against a real redis-server: names unique across nodes, seq order and
history agreeing, retention, gaps read back from the Stream, dead nodes' members expiring."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterator, List

import pytest

from common.limits import PRESENCE_SECONDS
from common.names import name_keys
from shard.redis_rooms import (
    RedisRooms,
    channel_of,
    decode_published,
    room_keys,
)
from tests.redis_server import RedisServer, redis_server


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    yield from redis_server()


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(
    server: RedisServer, body: Callable[..., Awaitable[Any]], nodes: int = 2,
    presence: float = PRESENCE_SECONDS,
) -> Any:  # fmt: skip
    """Run *body(client, clock, node_a, node_b, ...)* on a flushed Redis."""
    import redis.asyncio as aioredis

    async def main() -> Any:
        client = aioredis.from_url(server.url)
        await client.flushall()
        clock = Clock()
        try:
            rooms = [RedisRooms(client, f"n{i}", clock, presence) for i in range(nodes)]
            for each in rooms:
                await each.load()
            return await body(client, clock, *rooms)
        finally:
            await client.aclose()

    return asyncio.run(main())


def keys(username: str) -> List[str]:
    return list(name_keys(username))


def test_a_username_is_unique_per_room_across_nodes(server: RedisServer) -> None:
    async def body(client: Any, clock: Clock, a: RedisRooms, b: RedisRooms) -> None:
        outcome, epoch, seq, members = await a.join("lobby", 1, "Alice", keys("Alice"))
        assert (outcome, seq, members) == ("joined", 1, 1) and epoch > 0
        assert (await b.join("lobby", 7, "alice", keys("alice")))[0] == "taken"
        assert (await b.join("lobby", 7, "ALİCE", keys("ALİCE")))[0] in ("taken", "joined")
        assert (await a.join("lobby", 1, "Alice", keys("Alice")))[0] == "member"
        assert (await b.join("other", 7, "alice", keys("alice")))[0] == "joined"
        assert (await a.leave("lobby", 1))[0] == "left"
        assert (await a.leave("lobby", 1))[0] == "absent"
        assert (await b.join("lobby", 8, "alice", keys("alice")))[0] == "joined"
        assert "alice" in await a.names("lobby")

    run(server, body)


def test_history_and_the_published_entries_agree_in_seq_order(server: RedisServer) -> None:
    async def body(client: Any, clock: Clock, a: RedisRooms, b: RedisRooms) -> None:
        sub = client.pubsub()
        await sub.subscribe(channel_of("lobby"))
        await sub.get_message(timeout=1)  # the subscribe confirmation
        await a.join("lobby", 1, "ann", keys("ann"))
        await b.join("lobby", 2, "bob", keys("bob"))
        for i in range(5):
            assert (await (a if i % 2 else b).say("lobby", 1 if i % 2 else 2, f"t{i}"))[0] == "said"
        assert (await a.say("lobby", 99, "not a member"))[0] == "absent"
        epoch, history = await b.history("lobby")
        published = []
        while len(published) < len(history):
            message = await sub.get_message(ignore_subscribe_messages=True, timeout=2)
            assert message is not None, f"only {len(published)} of {len(history)} published"
            epoch_of, node, entries = decode_published(message["data"])
            published += [(epoch_of, entry, node) for entry in entries]
        await sub.aclose()
        assert [seq for seq, *_ in history] == list(range(1, 8))
        assert [(e, entry) for e, entry, _node in published] == [(epoch, x) for x in history]
        assert [kind for _, _, kind, _, _ in history] == ["join", "join"] + ["chat"] * 5
        assert history[0][4] == "ann joined lobby"
        assert history[2][3:] == ("bob", "t0") and history[3][3:] == ("ann", "t1")
        assert [node for *_, node in published][:2] == ["n0", "n1"]

    run(server, body)


def test_the_last_500_are_kept_and_a_gap_is_read_back_or_reported(server: RedisServer) -> None:
    async def body(client: Any, clock: Clock, a: RedisRooms, b: RedisRooms) -> None:
        await a.join("big", 1, "ann", keys("ann"))
        for i in range(600):
            await a.say("big", 1, f"m{i}")
        epoch, history = await b.history("big")
        assert len(history) == 500 and await client.xlen(room_keys("big")[1]) == 500
        assert [x[0] for x in history] == list(range(102, 602))
        assert (await b.history("big", 3))[1] == history[-3:]
        assert await b.state("big") == (epoch, 601)
        # A node that saw up to 550 gets 551.. 601; one that saw up to 50 is told it missed.
        now, missed_range, missed = await b.since("big", epoch, 550)
        assert (now, missed) == (epoch, False)
        assert missed_range == history[-51:]
        assert (await b.since("big", epoch, 50))[2] is True
        assert (await b.since("big", epoch, 101))[2] is False
        assert (await b.since("big", epoch, 601))[1:] == ([], False)
        assert (await b.since("big", epoch + 1, 550))[2] is True

    run(server, body)


def test_a_room_redis_lost_starts_a_new_epoch(server: RedisServer) -> None:
    async def body(client: Any, clock: Clock, a: RedisRooms, b: RedisRooms) -> None:
        _, first, _, _ = await a.join("r", 1, "ann", keys("ann"))
        await a.say("r", 1, "hello")
        await client.flushall()
        clock.now += 1
        await asyncio.sleep(0.002)  # (an epoch is Redis's clock in ms: the next one)
        outcome, second, seq, _ = await b.join("r", 2, "bob", keys("bob"))
        assert (outcome, seq) == ("joined", 1) and second != first
        assert (await a.since("r", first, 2))[2] is True

    run(server, body)


def test_a_dead_nodes_members_expire_and_are_heard_leaving(server: RedisServer) -> None:
    """By Redis's clock (TIME), so the nodes' clocks need not agree: presence 3 s here
    (each check has over a second of slack either way)."""

    async def body(client: Any, clock: Clock, a: RedisRooms, b: RedisRooms) -> None:
        clock.now -= 3600  # node clocks an hour off change nothing
        await a.join("r", 1, "ann", keys("ann"))
        await b.join("r", 2, "bob", keys("bob"))
        assert await b.expire("r") == 0
        await asyncio.sleep(2.0)
        await b.refresh("r", [2])  # node b is alive; node a stopped refreshing
        assert await b.expire("r") == 0
        await asyncio.sleep(2.0)  # ann's presence is 1 s over, bob's has 1 s to go
        assert await b.expire("r") == 1
        assert await b.names("r") == ["bob"]
        _, history = await b.history("r")
        assert history[-1][2:] == ("leave", "ann", "ann left r")
        assert (await b.join("r", 3, "ann", keys("ann")))[0] == "joined"
        assert await b.expire("nowhere") == 0
        assert await client.exists(room_keys("nowhere")[0]) == 0

    run(server, body, presence=3.0)


def test_a_join_removes_expired_holders_of_the_name_first(server: RedisServer) -> None:
    async def body(client: Any, clock: Clock, a: RedisRooms, b: RedisRooms) -> None:
        await a.join("r", 1, "ann", keys("ann"))
        await asyncio.sleep(0.5)
        assert (await b.join("r", 5, "Ann", keys("Ann")))[0] == "joined"
        _, history = await b.history("r")
        assert [(kind, user) for _, _, kind, user, _ in history] == [
            ("join", "ann"),
            ("leave", "ann"),
            ("join", "Ann"),
        ]

    run(server, body, presence=0.4)


@pytest.mark.parametrize("room", ["{x}", "}{", "a{b}c", "κόσμος", "#general"])
def test_every_rooms_keys_share_one_hash_tag(room: str) -> None:
    names = room_keys(room)
    tags = {key[key.index("{") + 1 : key.index("}")] for key in names}
    assert len(tags) == 1 and all(key.count("{") == 1 == key.count("}") for key in names)


def test_a_chat_line_is_one_redis_command(server: RedisServer) -> None:
    async def body(client: Any, clock: Clock, a: RedisRooms, b: RedisRooms) -> None:
        await a.join("r", 1, "ann", keys("ann"))
        await a.say("r", 1, "warm")  # the script is loaded now
        await client.config_resetstat()
        for i in range(10):
            await a.say("r", 1, f"m{i}")
        stats = await client.info("commandstats")
        calls = {name: row["calls"] for name, row in stats.items()}
        calls.pop("cmdstat_config", None)
        calls.pop("cmdstat_info", None)
        top = {k: v for k, v in calls.items() if k in ("cmdstat_evalsha", "cmdstat_eval")}
        assert sum(top.values()) == 10, calls

    run(server, body)
