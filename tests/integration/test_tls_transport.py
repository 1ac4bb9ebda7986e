"""A TLS transport in the loop turn between its socket's loss and its protocol's
``connection_lost`` (router/tls.py ``settled``): before Python 3.11 asyncio's raises
AttributeError there from the calls a connection makes when another client's message or a
shard's answer arrives (flush, pause or resume reading). Real TLS over loopback, with a
self-signed certificate made by ``openssl``."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path
from typing import List, Optional

import pytest

from router.tls import settled
from tests.integration.test_tls import make_certificate

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
