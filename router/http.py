"""The HTTP transport (first cut: ``GET /healthz`` only; the JSON API follows)."""

from __future__ import annotations

import asyncio

from router.hub import Hub


class _MinimalHttp(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 16384:
                self.transport.close()
            return
        line = self.buffer.split(b"\r\n", 1)[0]
        if line.startswith(b"GET /healthz "):
            status, body = b"200 OK", b'{"ok": true}'
        else:
            status, body = b"404 Not Found", b'{"error": {"code": "not_found"}}'
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        self.transport.close()


async def start_http_server(
    hub: Hub, host: str, port: int, start_serving: bool = False
) -> asyncio.AbstractServer:
    """Bind the HTTP listener (not yet accepting unless *start_serving*)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(_MinimalHttp, host, port, start_serving=start_serving)
