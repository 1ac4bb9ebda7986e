"""shard.redis_sub.Subscriber against a real redis-server: the set-up (a password, a user,
a wrong one), messages whatever their size and however they are cut into reads, and the
end of the connection."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator, List

import pytest

from shard.redis_sub import Subscriber
from tests.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    yield from redis_server()


async def command(server: RedisServer, *args: Any, password: str = "") -> Any:
    import redis.asyncio as aioredis

    direct = aioredis.from_url(server.url, password=password or None)
    try:
        return await direct.execute_command(*args)
    finally:
        await direct.aclose()


async def replies(sub: Subscriber, count: int) -> List[Any]:
    got: List[Any] = []
    while len(got) < count:
        got += await asyncio.wait_for(sub.read(), 5)
    return got


def test_messages_of_any_size_come_whole_and_in_order(server: RedisServer) -> None:
    async def main() -> None:
        sub = Subscriber(server.url, "t-sub")
        await sub.subscribe("c1", "c2")
        assert await replies(sub, 2) == [(b"subscribe", b"c1", 1), (b"subscribe", b"c2", 2)]
        big = b"x" * 700_000  # several reads of the socket
        for payload in (b"one", big, b"two"):
            await command(server, "PUBLISH", "c1", payload)
        await command(server, "PUBLISH", "c2", "three")
        got = await replies(sub, 4)
        assert [(kind, channel, len(data)) for kind, channel, data in got] == [
            (b"message", b"c1", 3), (b"message", b"c1", 700_000), (b"message", b"c1", 3),
            (b"message", b"c2", 5),
        ]  # fmt: skip
        assert got[1][2] == big
        clients = await command(server, "CLIENT", "LIST")
        assert b"name=t-sub" in clients  # (CLIENT LIST shows whose it is)
        await sub.unsubscribe("c1")
        assert await replies(sub, 1) == [(b"unsubscribe", b"c1", 1)]
        await sub.aclose()

    asyncio.run(main())


def test_a_password_a_user_and_a_wrong_password(server: RedisServer) -> None:
    async def main() -> None:
        await command(server, "CONFIG", "SET", "requirepass", "s3cret")
        try:
            host = f"127.0.0.1:{server.port}/0"
            for url in (f"redis://:s3cret@{host}", f"redis://default:s3cret@{host}"):
                sub = Subscriber(url, "t")
                await sub.subscribe("c")
                assert await replies(sub, 1) == [(b"subscribe", b"c", 1)]
                await sub.aclose()
            for url in (f"redis://:wrong@{host}", f"redis://{host}"):
                sub = Subscriber(url, "t")
                with pytest.raises(ConnectionError, match="refused"):
                    await sub.subscribe("c")
                await sub.aclose()
        finally:
            await command(server, "CONFIG", "SET", "requirepass", "", password="s3cret")

    asyncio.run(main())


def test_the_end_of_the_connection_is_a_connection_error(server: RedisServer) -> None:
    async def main() -> None:
        sub = Subscriber(server.url, "t-cut")
        await sub.subscribe("c")
        await replies(sub, 1)
        await command(server, "CLIENT", "KILL", "TYPE", "pubsub")
        with pytest.raises(ConnectionError):
            await replies(sub, 1)
        await sub.aclose()

    asyncio.run(main())


def test_closing_while_it_connects_leaves_nothing_behind() -> None:
    async def main() -> None:
        listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # never answers
        port = listener.sockets[0].getsockname()[1]
        sub = Subscriber(f"redis://:pw@127.0.0.1:{port}/0", "t", timeout=30)
        waiting = asyncio.ensure_future(sub.subscribe("c"))
        await asyncio.sleep(0.2)  # connected, its AUTH unanswered
        waiting.cancel()
        await sub.aclose()
        assert sub._streams is None and sub._connecting is None
        listener.close()
        await listener.wait_closed()

    asyncio.run(main())
