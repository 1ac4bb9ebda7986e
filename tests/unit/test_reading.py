"""The shared read buffer: what a connection reads reaches ``data_received`` byte for byte,
on real loopback sockets, however reads of several connections interleave."""

from __future__ import annotations

import asyncio
import os
from typing import Dict, List

from common.limits import READ_CHUNK_BYTES
from router.reading import SharedBufferReading, reading_class


class Collecting(asyncio.Protocol):
    def __init__(self, store: Dict[int, List[bytes]], done: asyncio.Event) -> None:
        self.store = store
        self.done = done
        self.key = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.key = len(self.store)
        self.store[self.key] = []

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.store[self.key].append(data)

    def eof_received(self) -> None:
        self.done.set()


class BufferedCollecting(Collecting, SharedBufferReading):
    pass


def test_the_protocol_keeps_its_own_end_of_input() -> None:
    # asyncio.BufferedProtocol has an eof_received stub: the mixin must not hide the real one
    from router.http import BufferedHttpConnection, HttpConnection
    from router.tcp import BufferedTcpConnection, TcpConnection

    for buffered, plain in ((BufferedTcpConnection, TcpConnection),
                            (BufferedHttpConnection, HttpConnection)):  # fmt: skip
        assert isinstance(buffered.__new__(buffered), asyncio.BufferedProtocol)
        for name in ("data_received", "eof_received", "connection_lost", "connection_made"):
            assert getattr(buffered, name) is getattr(plain, name), name


def test_buffered_class_only_where_reads_are_synchronous() -> None:
    loop = asyncio.SelectorEventLoop()
    try:
        assert reading_class(loop, Collecting, BufferedCollecting) is BufferedCollecting
    finally:
        loop.close()
    other = asyncio.AbstractEventLoop()  # stands for the proactor loop
    assert reading_class(other, Collecting, BufferedCollecting) is Collecting


def test_interleaved_reads_of_many_connections_arrive_intact() -> None:
    async def run() -> None:
        store: Dict[int, List[bytes]] = {}
        events: List[asyncio.Event] = []

        def factory() -> asyncio.Protocol:
            event = asyncio.Event()
            events.append(event)
            return BufferedCollecting(store, event)

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        payloads = [os.urandom(3 * READ_CHUNK_BYTES + 17 * i) for i in range(6)]
        writers = []
        for _ in payloads:
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
        # in small pieces, round robin, so reads of all connections interleave
        step = 1000
        for offset in range(0, max(map(len, payloads)), step):
            for writer, payload in zip(writers, payloads):
                writer.write(payload[offset : offset + step])
            await asyncio.sleep(0)
        for writer in writers:
            writer.write_eof()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
        # connections are keyed in accept order, which is the order they were opened
        received = [b"".join(store[key]) for key in sorted(store)]
        assert sorted(received) == sorted(payloads)
        assert all(len(chunk) <= READ_CHUNK_BYTES for chunks in store.values() for chunk in chunks)

    loop = asyncio.SelectorEventLoop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
