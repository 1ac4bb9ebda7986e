"""shard.redis_node.RedisShard in this process against a real redis-server: one order for
every node (seq order), completions in command order, a lost echo read back from the
Stream, and the router tier's targets."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Awaitable, Callable, Iterator, List, Optional, Tuple

import pytest

from common import messages as m
from shard.redis_node import RedisShard
from shard.redis_rooms import RedisRooms
from shard.redis_sub import Subscriber
from tests.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(60)

Sent = List[Tuple[m.Event, int, Tuple[int, ...]]]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    yield from redis_server()


def run(server: RedisServer, body: Callable[..., Awaitable[Any]], nodes: int = 2,
        routers: int = 1, monotonic: Callable[[], float] = time.monotonic,
        timeout: Optional[float] = None) -> Any:  # fmt: skip
    import redis.asyncio as aioredis

    async def main() -> Any:
        flush = aioredis.from_url(server.url)
        await flush.flushall()
        await flush.aclose()
        shards, sent, clients = [], [], []
        for i in range(nodes):
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            client = aioredis.from_url(  # (no retries: a timeout is Redis lost, at once)
                server.url, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
            )
            clients.append(client)
            out: Sent = []
            subscriber = functools.partial(Subscriber, server.url, f"n{i}-sub")
            shard = RedisShard(RedisRooms(client, f"n{i}"), subscriber, out.extend,
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


def drop_on_channel(shard: RedisShard, word: bytes, dropped: List[Any]) -> None:
    """Make pub/sub lose, for *shard*, every message on a room's channel with *word* in it."""
    real = shard._on_message

    def lossy(kind: bytes, channel: bytes, data: Any) -> None:
        if kind == b"message" and word in data:
            dropped.append(data)
            return
        real(kind, channel, data)

    shard._on_message = lossy  # type: ignore[method-assign]


async def both_in_lobby(a: RedisShard, b: RedisShard, sent: List[Sent]) -> None:
    a.submit([m.join(1, 0, 1, "lobby", "ann")], [0])
    await settle(a)
    b.submit([m.join(1, 0, 1, "lobby", "bob")], [0])
    await until(lambda: any(e[0] == m.JOINED and e[3] == -1 for e, _, _ in sent[0]), a, b)


async def lose_a_line_of_b(a: RedisShard, b: RedisShard, text: str) -> None:
    """b says *text* in lobby and pub/sub loses it on its way to a (drops every later
    message with *text* in it too)."""
    dropped: List[Any] = []
    drop_on_channel(a, text.encode(), dropped)
    b.submit([m.msg(2, 0, 1, "lobby", text)], [0])
    await until(lambda: bool(dropped), a, b)


def test_a_lost_entry_of_another_node_is_read_back_after_the_gap_time(
    server: RedisServer,
) -> None:
    """Node a never gets b's line (pub/sub lost it), then says one of its own: a's line is
    ahead of the next entry a expects, so its completion (and the NAMES behind it) waits;
    once the gap time passes a reads the Stream and delivers both, in seq order."""
    clock = [1000.0]  # a's monotonic clock: the gap time passes when the test says

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        a, b = shards
        await both_in_lobby(a, b, sent)
        await lose_a_line_of_b(a, b, "lost")
        a.submit([m.msg(2, 0, 1, "lobby", "mine"), m.names(3, 0, 1, "lobby")], [0, 0])
        await settle(a, b)
        assert not chats(sent[0])  # held: the completion waits for the entry before it
        assert completions(sent[0]) == [1]  # and the NAMES behind it too
        clock[0] += 0.5  # past REDIS_GAP_SECONDS (here 0.3)
        await until(lambda: len(chats(sent[0])) == 2, a)
        assert chats(sent[0]) == [(3, "lost"), (4, "mine")] and a.refilled >= 1
        assert completions(sent[0]) == [1, 2, 3]  # still in command order
        assert chats(sent[1]) == [(3, "lost"), (4, "mine")]  # (b lost nothing)

    run(server, body, monotonic=lambda: clock[0])


def test_a_nodes_own_lines_come_from_the_answers_not_the_channel(server: RedisServer) -> None:
    """The channel's copies of a node's own entries are not needed: with every one of
    them lost, its members get its lines at once, in order, without a read of the
    Stream; a batch's lines for one room are one script call, each command still gets
    its own completion in command order, and a command on the room between two lines
    keeps its place."""

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        (a,) = shards
        a.submit([m.join(1, 0, 1, "lobby", "ann"), m.join(2, 0, 1, "other", "ann")], [0, 0])
        await until(lambda: completions(sent[0]) == [1, 2], a)
        dropped: List[Any] = []
        drop_on_channel(a, b"", dropped)  # every message
        before = await redis_info(server, "commandstats")
        a.submit([m.msg(3, 0, 1, "lobby", "l1"), m.names(4, 0, 1, "other"),
                  m.msg(5, 0, 1, "lobby", "l2"), m.history(6, 0, 1, "lobby", 10),
                  m.msg(7, 0, 1, "lobby", "l3"), m.msg(8, 0, 1, "other", "o1"),
                  m.msg(9, 0, 1, "lobby", "l4")], [0] * 7)  # fmt: skip
        await until(lambda: len(completions(sent[0])) == 9, a, timeout=5)
        after = await redis_info(server, "commandstats")
        assert dropped and a.refilled == 0 and a.gaps == 0
        assert completions(sent[0]) == list(range(1, 10))
        assert chats(sent[0]) == [(2, "l1"), (3, "l2"), (4, "l3"), (5, "l4")]
        assert chats(sent[0], "other") == [(2, "o1")]
        (read,) = [e for e, _, _ in sent[0] if e[1] == 6]  # (l1 l2 came live before it)
        assert [entry[4] for entry in read[2]] == ["ann joined lobby"]
        scripts = evalsha_calls(after) - evalsha_calls(before)
        assert scripts == 3  # lobby's l1 l2, lobby's l3 l4, other's o1

    run(server, body, nodes=1)


def evalsha_calls(info: Any) -> int:
    return int(info.get("cmdstat_evalsha", {}).get("calls", 0))


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


def completions(sent: Sent) -> List[int]:
    return [e[1] for e, _, _ in sent if e[1]]


async def who(server: RedisServer, room: str = "lobby") -> List[str]:
    import redis.asyncio as aioredis

    from shard.redis_rooms import names_of, room_keys

    direct = aioredis.from_url(server.url)
    try:
        return sorted(names_of(await direct.hvals(room_keys(room)[2])))
    finally:
        await direct.aclose()


async def redis_command(server: RedisServer, *args: Any) -> Any:
    import redis.asyncio as aioredis

    direct = aioredis.from_url(server.url)
    try:
        return await direct.execute_command(*args)
    finally:
        await direct.aclose()


async def redis_info(server: RedisServer, section: str) -> Any:
    import redis.asyncio as aioredis

    direct = aioredis.from_url(server.url)
    try:
        return await direct.info(section)
    finally:
        await direct.aclose()


def test_a_batch_cut_off_by_a_stalled_redis_completes_each_command_once(
    server: RedisServer,
) -> None:
    """Redis stalls past the socket timeout in the middle of a batch (it may have run part
    of it): every command still gets one outcome, in order; once it is back nobody is a
    member in Redis that the router was told is not one, and a retried JOIN works."""

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        (a,) = shards
        a.submit([m.join(1, 0, 1, "lobby", "ann")], [0])
        await until(lambda: completions(sent[0]) == [1], a)
        await redis_command(server, "CLIENT", "PAUSE", "700", "ALL")  # (others than this)
        a.submit([m.msg(2, 0, 1, "lobby", "hello"), m.join(3, 0, 2, "lobby", "bob"),
                  m.names(4, 0, 1, "lobby"), m.rejoin(5, 0, 7, "lobby", "cy")],
                 [0, 0, 0, 0])  # fmt: skip
        await until(lambda: len(completions(sent[0])) >= 5, a)
        assert completions(sent[0]) == [1, 2, 3, 4, 5]
        outcomes = {e[1]: e for e, _, _ in sent[0] if e[1]}
        assert outcomes[3][:3] == (m.FAIL, 3, "room_unavailable")  # bob: not joined
        assert outcomes[5][0] == m.DONE  # a REJOIN is put back, never refused
        assert any(e[0] == m.NOTICE and e[3] == "shared_lost" for e, _, _ in sent[0])
        await until(lambda: not a.down, a)
        await settle(a, wait=0.3)
        assert "bob" not in await who(server)  # no ghost
        assert "cy" in await who(server)  # put back once Redis was there
        a.submit([m.join(6, 0, 2, "lobby", "bob")], [0])
        await until(lambda: 6 in completions(sent[0]), a)
        assert [e[0] for e, _, _ in sent[0] if e[1] == 6] == [m.JOINED]
        assert completions(sent[0]).count(6) == 1

    run(server, body, nodes=1, timeout=0.3)


def test_a_failure_after_the_completions_does_not_complete_twice(server: RedisServer) -> None:
    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        (a,) = shards
        a.submit([m.join(1, 0, 1, "lobby", "ann")], [0])
        await until(lambda: completions(sent[0]) == [1], a)
        await redis_command(server, "SET", "sc:rooms", "not a sorted set")  # ROOMS' update fails
        a.submit([m.join(2, 0, 2, "lobby", "bob"), m.names(3, 0, 1, "lobby")], [0, 0])
        await until(lambda: len(completions(sent[0])) >= 3, a)
        await settle(a, wait=0.3)
        assert completions(sent[0]) == [1, 2, 3]
        assert [e[0] for e, _, _ in sent[0] if e[1] == 2] == [m.JOINED]

    run(server, body, nodes=1)


@pytest.mark.parametrize("junk", ["hello", "[1, 2]", '{"p": 5}', "[null,1,2,3,4,5,6]", "{"])
def test_junk_on_a_room_channel_changes_nothing(server: RedisServer, junk: str) -> None:
    """A message on a room's channel that is not one of ours (another program, another
    version) is ignored: the node goes on hearing the room (another node's lines come,
    with nothing of its own waiting that would make it read the Stream)."""
    from shard.redis_rooms import channel_of

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        a, b = shards
        a.submit([m.join(1, 0, 1, "lobby", "ann")], [0])
        await until(lambda: completions(sent[0]) == [1], a)
        b.submit([m.join(1, 0, 1, "lobby", "bob")], [0])
        await until(lambda: completions(sent[1]) == [1], b)
        await redis_command(server, "PUBLISH", channel_of("lobby"), junk)
        b.submit([m.msg(2, 0, 1, "lobby", "still here")], [0])
        await until(lambda: bool(chats(sent[0])), a, b, timeout=5)
        assert chats(sent[0]) == [(3, "still here")]
        a.submit([m.names(2, 0, 1, "lobby")], [0])
        await until(lambda: 2 in completions(sent[0]), a, timeout=5)

    run(server, body, monotonic=lambda: 1000.0)  # (no gap time: only the channel tells a)


def test_a_history_redis_lost_fails_what_waited_for_it(server: RedisServer) -> None:
    """Redis loses the room (FLUSHALL, eviction) while a completion waits for the entry
    before its own (lost on the channel): the new history reuses its seqs, so the
    completion is refused, never matched with another member's entry."""

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        a, b = shards
        await both_in_lobby(a, b, sent)
        await lose_a_line_of_b(a, b, "gone")
        a.submit([m.msg(2, 0, 1, "lobby", "mine")], [0])
        await settle(a)
        assert 2 not in completions(sent[0])  # waiting
        await redis_command(server, "FLUSHALL")
        b.submit([m.join(3, 0, 2, "lobby", "cy")], [0])  # seq 1 of a new history
        await until(lambda: 3 in completions(sent[1]), b)
        b.submit([m.msg(4, 0, 2, "lobby", "cy's")], [0])
        await until(lambda: 2 in completions(sent[0]), a, b)
        outcome = [e for e, _, _ in sent[0] if e[1] == 2]
        assert [e[0] for e in outcome] == [m.FAIL]  # not a CHAT made of cy's entry
        notices = [e for e, _, _ in sent[0] if e[0] == m.NOTICE]
        assert notices and notices[0][3] == "restarted"

    run(server, body, monotonic=lambda: 1000.0)  # (no gap time passes: the wait goes on)


def test_a_member_another_node_expired_is_let_go_here_too(server: RedisServer) -> None:
    """A node cut off longer than the presence time has its members removed by the others;
    when it hears their leaves it lets them go too (the router is told), instead of keeping
    members Redis no longer has."""

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        a, b = shards
        for shard in shards:
            shard.rooms.presence_seconds = 0.3
        a.submit([m.join(1, 0, 7, "lobby", "ann")], [0])
        await until(lambda: completions(sent[0]) == [1], a)
        b.submit([m.join(1, 0, 1, "lobby", "bob")], [0])
        await until(lambda: completions(sent[1]) == [1], b)
        await asyncio.sleep(0.5)  # ann's presence ran out (node a did not refresh it)
        b.submit([m.join(2, 0, 2, "lobby", "cy")], [0])  # the join expires her
        await until(lambda: 7 not in getattr(a.local.get("lobby"), "members", {}), a, b)
        left = [e for e, _, targets in sent[0] if e[0] == m.LEFT]
        assert left and left[-1][3] == 7 and left[-1][4][3] == "ann"

    run(server, body)


def test_a_new_history_heard_while_a_batch_runs_leaves_no_completion_waiting(
    server: RedisServer,
) -> None:
    """Redis loses the room while node a's batch is out: b's entry of the new history
    reaches a before a reads its own answer (of the old one). a's completion is not made
    to wait for a seq of the new history (it would hold every later completion of the
    shard): the command is answered, and so is the one after it."""
    from shard.redis_rooms import room_keys

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        a, b = shards
        await both_in_lobby(a, b, sent)
        real = a._execute
        fired: List[int] = []

        async def execute(batch: Any, sources: Any, now: float) -> Any:
            plan, answers = await real(batch, sources, now)  # a's line said, old history
            if not fired:
                fired.append(1)
                await redis_command(server, "DEL", *room_keys("lobby")[:5])
                b.submit([m.join(7, 0, 2, "lobby", "carl")], [0])  # opens a new history
                await until(lambda: 7 in completions(sent[1]), b)
                await asyncio.sleep(0.2)  # (its entry is on a's subscription meanwhile)
            return plan, answers

        a._execute = execute  # type: ignore[method-assign]
        a.submit([m.msg(2, 0, 1, "lobby", "mine")], [0])
        await settle(a, b, wait=0.2)
        a.submit([m.names(3, 0, 1, "lobby")], [0])
        await until(lambda: 3 in completions(sent[0]), a, b, timeout=10)
        assert completions(sent[0])[-2:] == [2, 3]
        notices = [e for e, _, _ in sent[0] if e[0] == m.NOTICE]
        assert [n[3] for n in notices] == ["restarted"]

    run(server, body)


def test_an_own_entry_ahead_of_a_lost_one_gets_the_stream_read(server: RedisServer) -> None:
    """An entry of a's own that no completion waits for (the leave of a dead node's
    member, from a's presence job) comes right after b's line that pub/sub lost for a:
    a's timer sees the room's next entry missing for the gap time and reads the Stream, so
    a's members get b's line and the leave, in order."""
    import redis.asyncio as aioredis

    from common.names import name_keys

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        a, b = shards
        await both_in_lobby(a, b, sent)
        ghost_client = aioredis.from_url(server.url)
        try:
            ghost = RedisRooms(ghost_client, "dead-node", presence_seconds=0.05)
            await ghost.load()
            await ghost.join("lobby", 9, "zed", name_keys("zed"))  # seq 3, its node dies
        finally:
            await ghost_client.aclose()
        await until(lambda: len([e for e, _, _ in sent[0] if e[0] == m.JOINED]) >= 3, a, b)
        dropped: List[Any] = []
        drop_on_channel(a, b"lost", dropped)
        b.submit([m.msg(2, 0, 1, "lobby", "lost")], [0])  # seq 4, lost on a's channel
        await until(lambda: bool(dropped), a, b)
        await asyncio.sleep(0.2)  # zed's presence is over
        a._put(("presence",))  # a's expiry runs first: zed's leave (seq 5) is a's own
        await until(lambda: any(e[0] == m.LEFT for e, _, _ in sent[0]), a, b, timeout=10)
        assert chats(sent[0]) == [(4, "lost")] and a.refilled >= 1
        left = [e for e, _, _ in sent[0] if e[0] == m.LEFT]
        assert [e[4][0] for e in left] == [5]  # zed's leave, after the line

    run(server, body)


def test_a_rooms_lines_in_one_script_call_stay_within_the_size_bound(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past REDIS_SAY_MAX_BYTES of text, the next line of the room starts another script
    call (one published message each); every line is still said once, in order."""
    from common import limits

    monkeypatch.setattr(limits, "REDIS_SAY_MAX_BYTES", 1000)

    async def body(shards: List[RedisShard], sent: List[Sent]) -> None:
        (a,) = shards
        a.submit([m.join(1, 0, 1, "lobby", "ann")], [0])
        await until(lambda: completions(sent[0]) == [1], a)
        before = await redis_info(server, "commandstats")
        a.submit([m.msg(2 + i, 0, 1, "lobby", str(i) * 400) for i in range(6)], [0] * 6)
        await until(lambda: len(completions(sent[0])) == 7, a, timeout=5)
        after = await redis_info(server, "commandstats")
        assert evalsha_calls(after) - evalsha_calls(before) == 3  # 2 lines (800) a call
        assert [text[0] for _, text in chats(sent[0])] == [str(i) for i in range(6)]

    run(server, body, nodes=1)
