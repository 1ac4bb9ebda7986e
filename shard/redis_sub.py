"""A shard's Redis subscription, read in chunks (``--redis``).

One connection in pub/sub mode, spoken to directly: commands are packed with hiredis, and
whatever arrived at once is parsed in one go with ``hiredis.Reader``, so a busy room's
messages cost one ``read`` and one parse call per chunk, not a round through a client
library per message (redis-py's ``PubSub`` sets up a timeout per message). The shard
(:mod:`shard.redis_node`) reads the replies as ``(kind, channel, data)`` and the commands
it sends are only ``SUBSCRIBE`` and ``UNSUBSCRIBE``; the connection's set-up (``AUTH``,
``CLIENT SETNAME``) is done when it first connects.

A connection Redis closes (``client-output-buffer-limit pubsub``, a restart) is a
``ConnectionError`` from :meth:`Subscriber.read`: the shard treats it as Redis lost.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

#: Bytes asked of the socket per read (what the kernel holds is taken in one go).
READ_BYTES = 1 << 18

#: One pub/sub reply: ``(kind, channel, data)``: ``b"message"`` with the payload, or
#: ``b"subscribe"``/``b"unsubscribe"`` with the count of channels still subscribed.
Reply = Tuple[bytes, bytes, Any]


class Subscriber:
    """The subscription connection to the Redis at *url* (``redis://`` or ``rediss://``,
    with a password, and a user, in it if Redis wants them), named *name* in ``CLIENT
    LIST``. Connects on the first :meth:`subscribe`."""

    def __init__(self, url: str, name: str = "", timeout: float = 5.0) -> None:
        import hiredis

        self._pack = hiredis.pack_command
        self._reader = hiredis.Reader()
        self._url, self._name, self._timeout = url, name, timeout
        self._streams: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None
        self._connecting: Optional[asyncio.Future] = None

    async def subscribe(self, *channels: str) -> None:
        """Ask for *channels*; their confirmations come as replies."""
        writer = await self._connected()
        writer.write(self._pack(("SUBSCRIBE", *channels)))
        await writer.drain()

    async def unsubscribe(self, *channels: str) -> None:
        if self._streams is None:
            return
        writer = self._streams[1]
        writer.write(self._pack(("UNSUBSCRIBE", *channels)))
        await writer.drain()

    async def read(self) -> List[Reply]:
        """The next replies: at least one, as many as have arrived. Raises
        ``ConnectionError`` when the connection ends."""
        await self._connected()
        assert self._streams is not None
        stream = self._streams[0]
        replies: List[Reply] = []
        while not replies:
            data = await stream.read(READ_BYTES)
            if not data:
                raise ConnectionError("Redis closed the subscription connection")
            self._reader.feed(data)
            replies = self._take()
        return replies

    async def aclose(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()  # (its socket is closed as the set-up is cut off)
            try:
                await connecting
            except BaseException:  # noqa: BLE001 (cancelled, or failed: closing anyway)
                pass
        streams, self._streams = self._streams, None
        if streams is not None:
            streams[1].close()
            try:
                await streams[1].wait_closed()
            except (OSError, ConnectionError):
                pass  # (closing a connection that is gone)

    async def _ask(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: Tuple[str, ...]
    ) -> Optional[Exception]:
        """Send *command* (set-up, before any subscription) and read its one reply: the
        error Redis answered, or None."""
        writer.write(self._pack(command))
        await writer.drain()
        while True:
            reply = self._reader.gets()
            if reply is not False:
                return reply if isinstance(reply, Exception) else None
            data = await asyncio.wait_for(reader.read(READ_BYTES), self._timeout)
            if not data:
                raise ConnectionError("Redis closed the connection while it was set up")
            self._reader.feed(data)

    def _take(self) -> List[Reply]:
        replies: List[Reply] = []
        gets = self._reader.gets
        while True:
            reply = gets()
            if reply is False:
                return replies
            if isinstance(reply, Exception):  # (Redis refused a command: not ours to keep)
                raise ConnectionError(f"Redis refused the subscription: {reply}")
            if isinstance(reply, list) and len(reply) == 3:
                replies.append((reply[0], reply[1], reply[2]))

    async def _connected(self) -> asyncio.StreamWriter:
        if self._streams is not None:
            return self._streams[1]
        if self._connecting is None:  # (one connection, however many callers wait)
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None
        assert self._streams is not None
        return self._streams[1]

    async def _connect(self) -> None:
        parts = urlsplit(self._url)
        context = ssl.create_default_context() if parts.scheme == "rediss" else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, parts.port or 6379, ssl=context),
                self._timeout,
            )
        except (OSError, asyncio.TimeoutError) as error:
            raise ConnectionError(f"cannot reach Redis: {error}") from None
        try:
            if parts.password is not None:
                password = unquote(parts.password)
                user = unquote(parts.username or "")
                refused = await self._ask(reader, writer, ("AUTH", user, password) if user
                                          else ("AUTH", password))  # fmt: skip
                if refused is not None and user and "wrong number" in str(refused):
                    refused = await self._ask(reader, writer, ("AUTH", password))  # Redis < 6
                if refused is not None:
                    raise ConnectionError(f"Redis refused AUTH: {refused}")
            if self._name:
                refused = await self._ask(reader, writer, ("CLIENT", "SETNAME", self._name))
                if refused is not None:
                    raise ConnectionError(f"Redis refused CLIENT SETNAME: {refused}")
        except asyncio.TimeoutError:
            writer.close()
            raise ConnectionError("Redis did not answer the subscription's set-up") from None
        except BaseException:
            writer.close()
            raise
        self._streams = (reader, writer)
