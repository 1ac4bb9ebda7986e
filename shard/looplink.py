"""A shard's pipe pair to one router, for the shards that run an event loop: a router
tier's (:class:`shard.process._TierLinks`) and a Redis node's (:mod:`shard.redis_node`).

Two interchangeable kinds, the same contract as :class:`shard.process._EventSender` for the
events (``send``, ``check``, ``stalled``, ``close``; what waits for a router is bounded the
same way) and a callback per message of commands:

:class:`LoopLink` (POSIX)
    Both ends non-blocking, watched by the loop's selector: events are written straight to
    the pipe from the loop (what does not fit waits in a buffer until the pipe has room),
    commands are read as they arrive. No thread hand-off per batch either way: with a
    thread per direction, each flush woke a thread that then had to win the GIL back.
:class:`ThreadLink` (everywhere; Windows' pipes cannot be watched by a loop)
    A reader thread handing commands to the loop, and an ``_EventSender`` thread.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, Callable, Deque

from common.framing import READ_SIZE, frame, unframe
from common.limits import MAX_ROUTER_BACKLOG_BYTES, MAX_SHARD_BACKLOG_BYTES, ROUTER_STALL_SECONDS

#: Takes one message of commands (a list, as the router sent it).
OnCommands = Callable[[Any], None]


class LoopLink:
    """Router *router*'s pipes (*commands* read, *events* written) on *loop*. *on_eof*:
    the commands pipe ended (the router is gone); *on_stall*: the router counts as stalled
    (see :class:`shard.process._EventSender`), called once; nothing more goes to it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        router: int,
        commands: Connection,
        events: Connection,
        on_commands: OnCommands,
        on_eof: Callable[[], None],
        on_stall: Callable[[int], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.commands = commands
        self._events = events
        self._loop = loop
        self._on_commands, self._on_eof, self._on_stall = on_commands, on_eof, on_stall
        self._monotonic = monotonic
        self._rfd, self._wfd = commands.fileno(), events.fileno()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._in = bytearray()  # bytes read, not yet a whole message
        self._out = bytearray()  # framed events the pipe had no room for yet
        self._sizes: Deque[int] = deque()  # of the frames in _out (the first: what is left)
        self._progress_at = monotonic()  # the last write, or when waiting began
        self.stalled = False
        self._closed = False
        loop.add_reader(self._rfd, self._readable)

    @property
    def waiting(self) -> int:
        """Bytes of events accepted and not yet written to the pipe."""
        return len(self._out)

    def send(self, data: bytes) -> None:
        if self.stalled or self._closed:
            return
        # (One message bigger than the bound still goes, if nothing waits before it.)
        if self._out and len(self._out) + len(data) > MAX_ROUTER_BACKLOG_BYTES:
            self._stall()
            return
        framed = frame(data)
        if self._out:
            self._out += framed
            self._sizes.append(len(framed))
            return
        try:
            written = os.write(self._wfd, framed)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # the router is gone; its commands pipe says so
        if written < len(framed):
            self._out += memoryview(framed)[written:]
            self._sizes.append(len(framed) - written)
            self._progress_at = self._monotonic()
            self._loop.add_writer(self._wfd, self._writable)

    def check(self) -> None:
        """Count the router as stalled if it is past the backlog bound and has taken
        nothing for ``ROUTER_STALL_SECONDS``."""
        if len(self._out) <= MAX_SHARD_BACKLOG_BYTES or self.stalled:
            return
        if self._monotonic() - self._progress_at >= ROUTER_STALL_SECONDS:
            self._stall()

    def close(self) -> None:
        """Stop reading and writing and close both ends (what waits is dropped: the router
        is gone, or the shard is stopping)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._rfd)
        self._loop.remove_writer(self._wfd)
        self._out.clear()
        self._sizes.clear()
        self.commands.close()
        self._events.close()

    def _stall(self) -> None:
        """Nothing more for this router: what waits is dropped, but for the rest of the
        frame at its head, which the pipe may have taken part of (what the router reads
        stays whole messages)."""
        self.stalled = True
        if self._sizes:
            del self._out[self._sizes[0] :]
            self._sizes = deque([self._sizes[0]])
        self._on_stall(self.router)

    def _writable(self) -> None:
        try:
            written = os.write(self._wfd, self._out)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._out)  # the router is gone: nothing more will be read
        if written:
            self._progress_at = self._monotonic()
            del self._out[:written]
            sizes = self._sizes
            while written and sizes:
                if written >= sizes[0]:
                    written -= sizes.popleft()
                else:
                    sizes[0] -= written
                    written = 0
        if not self._out:
            self._loop.remove_writer(self._wfd)

    def _readable(self) -> None:
        try:
            chunk = os.read(self._rfd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._loop.remove_reader(self._rfd)
            self._on_eof()
            return
        buffer = self._in
        buffer += chunk
        messages, used = unframe(buffer)
        if used:
            del buffer[:used]
        for message in messages:
            self._on_commands(pickle.loads(message))


class ThreadLink:
    """The same as :class:`LoopLink` with a reader thread and an ``_EventSender``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        router: int,
        commands: Connection,
        events: Connection,
        on_commands: OnCommands,
        on_eof: Callable[[], None],
        on_stall: Callable[[int], None],
    ) -> None:
        from shard.process import _EventSender

        self.router = router
        self.commands = commands
        self._sender = _EventSender(router, events, on_stall)
        self._loop = loop
        self._on_commands, self._on_eof = on_commands, on_eof
        threading.Thread(target=self._read, daemon=True, name=f"router-{router}-commands").start()

    @property
    def stalled(self) -> bool:
        return self._sender.stalled

    @property
    def waiting(self) -> int:
        return self._sender._waiting

    def send(self, data: bytes) -> None:
        self._sender.send(data)

    def check(self) -> None:
        self._sender.check()

    def close(self) -> None:
        self._sender.close()
        self.commands.close()

    def _read(self) -> None:
        try:
            while True:
                commands = pickle.loads(self.commands.recv_bytes())
                self._loop.call_soon_threadsafe(self._on_commands, commands)
        except (EOFError, OSError):
            pass
        except RuntimeError:
            return  # the loop is closed: stopping
        try:
            self._loop.call_soon_threadsafe(self._on_eof)
        except RuntimeError:
            pass


def link_class() -> type:
    """:class:`LoopLink` where the loop can watch pipes (POSIX), else :class:`ThreadLink`."""
    return ThreadLink if sys.platform == "win32" else LoopLink
