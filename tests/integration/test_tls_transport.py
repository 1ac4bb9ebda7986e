"""A TLS transport in the loop turn between its socket's loss and its protocol's
``connection_lost`` (router/tls.py ``settled``): before Python 3.11 asyncio's raises
AttributeError there from the calls a connection makes when another client's message or a
shard's answer arrives (flush, pause or resume reading). Real TLS over loopback, with a
self-signed certificate made by ``openssl``: the wrapper itself, and both listeners'
connections, which must take their transport through it."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path
from typing import Callable, List, Optional, Set

import pytest

from router.http import HttpConnection
from router.http_api import HttpApi
from router.http_static import StaticFiles
from router.hub import Hub
from router.tcp import TcpListener
from router.tls import create_listener, settled
from tests.integration.test_tls import make_certificate
from web import WEB_ROOT

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


class Server(asyncio.Protocol):
    def __init__(self, made: asyncio.Future[asyncio.Transport]) -> None:
        self.made = made
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.made.set_result(settled(transport))

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.lost = True


async def use_until_lost(cert: Path, key: Path) -> List[int]:
    """Every loop turn from the peer's leaving until ``connection_lost``: write, measure
    the buffer, pause and resume reading, as a connection would. Returns the sizes seen."""
    loop = asyncio.get_running_loop()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(cert), str(key))
    made: asyncio.Future[asyncio.Transport] = loop.create_future()
    protocol = Server(made)
    server = await loop.create_server(lambda: protocol, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    client_context = ssl.create_default_context(cafile=str(cert))
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
    )
    transport = await asyncio.wait_for(made, 10)
    writer.transport.abort()  # the peer vanishes
    sizes = []
    for _ in range(10_000):
        if protocol.lost:
            break
        transport.write(b"a line for a client who has gone\n")
        sizes.append(transport.get_write_buffer_size())
        transport.pause_reading()
        transport.resume_reading()
        transport.is_reading()
        await asyncio.sleep(0)
    server.close()
    await server.wait_closed()
    assert protocol.lost
    return sizes


def test_a_tls_transport_can_be_used_until_its_protocol_hears_it_is_lost(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    sizes = asyncio.run(use_until_lost(cert, key))
    assert sizes and all(size >= 0 for size in sizes)


def connections_of(kind: str, hub: Hub) -> Callable[[], asyncio.Protocol]:
    """The factory of *kind*'s connections, as the router's listener makes them."""
    if kind == "tcp":
        return TcpListener(hub, hub.loop).new_connection
    api, connections = HttpApi(hub, StaticFiles(WEB_ROOT)), set()  # type: ignore[var-annotated]
    return lambda: HttpConnection(api, connections)


async def use_connection_until_lost(kind: str, cert: Path, key: Path) -> int:
    """A router connection of *kind* over TLS whose client vanishes: every loop turn until
    its ``connection_lost``, what a message for it or a shard's answer would do to its
    transport. Returns the number of turns."""
    loop = asyncio.get_running_loop()
    hub = Hub(loop)
    made: List[asyncio.Protocol] = []
    lost: Set[int] = set()
    factory = connections_of(kind, hub)

    def new_connection() -> asyncio.Protocol:
        connection = factory()
        made.append(connection)
        original = connection.connection_lost

        def connection_lost(exc: Optional[Exception]) -> None:
            lost.add(id(connection))
            original(exc)

        connection.connection_lost = connection_lost  # type: ignore[method-assign]
        return connection

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(cert), str(key))
    server = await create_listener(
        loop, new_connection, "127.0.0.1", 0, context=server_context, settings=hub.settings,
        limiter=hub.limiter, start_serving=True, backlog=16,
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    client_context = ssl.create_default_context(cafile=str(cert))
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
    )
    for _ in range(1000):
        if made and getattr(made[0], "transport", None) is not None:
            break
        await asyncio.sleep(0.01)
    connection = made[0]
    transport = connection.transport  # type: ignore[attr-defined]
    writer.transport.abort()  # the client vanishes
    turns = 0
    while id(connection) not in lost and turns < 10_000:
        transport.write(b"a line for a client who has gone\n")
        assert transport.get_write_buffer_size() >= 0
        transport.pause_reading()
        transport.resume_reading()
        turns += 1
        await asyncio.sleep(0)
    server.close()
    await server.wait_closed()
    assert id(connection) in lost
    return turns


@pytest.mark.parametrize("kind", ["tcp", "http"])
def test_a_router_connection_over_tls_is_usable_until_it_hears_it_is_lost(
    kind: str, tmp_path: Path
) -> None:
    cert, key = make_certificate(tmp_path)
    assert asyncio.run(use_connection_until_lost(kind, cert, key)) > 0
