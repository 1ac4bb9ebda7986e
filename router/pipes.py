"""Moving bytes between the router's event loop and one shard's pipes, without ever
blocking the loop.

Two interchangeable implementations, chosen per platform (``pipe_io`` in the config):

:class:`SelectorPipes` (POSIX, the default there)
    Both pipe ends in non-blocking mode, watched by the loop's selector (``add_reader`` /
    ``add_writer``). A write goes straight to the pipe; what does not fit is kept in a
    buffer and written when the pipe has room. Reads are parsed into messages as they
    arrive. No threads, so no hand-off between threads and no GIL contention per batch.
:class:`ThreadedPipes` (everywhere, the default on Windows)
    A writer thread and a reader thread per shard, handing data to and from the loop with
    a queue and ``call_soon_threadsafe``. Windows' ``multiprocessing`` pipes have no
    non-blocking mode and Windows' proactor loop cannot watch them, so threads it is.

Both speak ``multiprocessing.Connection``'s framing (a 4-byte big-endian signed length,
or ``-1`` and an 8-byte length for messages over 2 GiB, then the bytes), because the shard
end is a plain ``Connection`` using ``recv_bytes`` / ``send_bytes``.
``tests/unit/test_pipes.py`` checks the framing against a real ``Connection``.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import queue
import sys
import threading
from multiprocessing.connection import Connection
from typing import Callable, List, Optional

from common.framing import READ_SIZE, frame, unframe

__all__ = ["READ_SIZE", "SelectorPipes", "ThreadedPipes", "default_pipe_io", "frame", "unframe"]

EventsCallback = Callable[[List[tuple]], None]
EofCallback = Callable[[], None]


def default_pipe_io() -> str:
    """``"selector"`` where the loop can watch pipes (POSIX), else ``"threads"``."""
    return "threads" if sys.platform == "win32" else "selector"


class SelectorPipes:
    """A shard's pipes driven by the event loop's selector (POSIX only)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        commands_out: Connection,
        events_in: Connection,
        on_events: EventsCallback,
        on_eof: EofCallback,
    ) -> None:
        self._loop = loop
        self._commands_out = commands_out
        self._events_in = events_in
        self._on_events = on_events
        self._on_eof = on_eof
        self._wfd = commands_out.fileno()
        self._rfd = events_in.fileno()
        os.set_blocking(self._wfd, False)
        os.set_blocking(self._rfd, False)
        self._out = bytearray()  # framed bytes the pipe had no room for yet
        self._in = bytearray()  # received bytes not yet a whole message
        self._closing = False
        loop.add_reader(self._rfd, self._readable)

    @property
    def backlog_bytes(self) -> int:
        """Bytes accepted but not yet written to the pipe (grows if the shard stalls)."""
        return len(self._out)

    def write(self, payload: bytes) -> None:
        if self._commands_out.closed:
            return
        data = frame(payload)
        if self._out:
            self._out += data
            return
        try:
            written = os.write(self._wfd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # the shard is gone; the reader sees end-of-file and reports it
        if written < len(data):
            self._out += memoryview(data)[written:]
            self._loop.add_writer(self._wfd, self._writable)

    def _writable(self) -> None:
        try:
            written = os.write(self._wfd, self._out)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._out)  # the shard is gone: nothing more will be read
        del self._out[:written]
        if not self._out:
            self._loop.remove_writer(self._wfd)
            if self._closing:
                self._close_commands()

    def _readable(self) -> None:
        try:
            chunk = os.read(self._rfd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._loop.remove_reader(self._rfd)
            self._events_in.close()
            self._on_eof()
            return
        buffer = self._in
        buffer += chunk
        messages, used = unframe(buffer)
        if used:
            del buffer[:used]
        loads, on_events = pickle.loads, self._on_events
        for message in messages:
            on_events(loads(message))

    def close(self) -> None:
        """Close the command pipe once what is buffered is written: the shard sees EOF."""
        self._closing = True
        if not self._out:
            self._close_commands()

    def _close_commands(self) -> None:
        if not self._commands_out.closed:
            self._loop.remove_writer(self._wfd)
            self._commands_out.close()


class ThreadedPipes:
    """A shard's pipes served by a writer thread and a reader thread (any platform)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        commands_out: Connection,
        events_in: Connection,
        on_events: EventsCallback,
        on_eof: EofCallback,
    ) -> None:
        self._loop = loop
        self._outbox: queue.SimpleQueue[Optional[bytes]] = queue.SimpleQueue()
        # Each counter has one writing thread, so their difference needs no lock.
        self._queued = 0  # bytes handed to the writer thread (loop thread writes)
        self._sent = 0  # bytes written to the pipe (writer thread writes)
        self._on_events = on_events
        self._on_eof = on_eof
        for target, conn, role in (
            (self._write_loop, commands_out, "writer"),
            (self._read_loop, events_in, "reader"),
        ):
            threading.Thread(target=target, args=(conn,), name=f"pipe-{role}", daemon=True).start()

    @property
    def backlog_bytes(self) -> int:
        return self._queued - self._sent

    def write(self, payload: bytes) -> None:
        self._queued += len(payload)
        self._outbox.put(payload)

    def close(self) -> None:
        self._outbox.put(None)

    def _write_loop(self, conn: Connection) -> None:
        try:
            while True:
                data = self._outbox.get()
                if data is None:
                    break
                conn.send_bytes(data)
                self._sent += len(data)
        except OSError:
            pass  # the shard died; the reader thread reports it
        finally:
            conn.close()

    def _read_loop(self, conn: Connection) -> None:
        loads = pickle.loads
        deliver = self._loop.call_soon_threadsafe
        try:
            while True:
                deliver(self._on_events, loads(conn.recv_bytes()))
        except (EOFError, OSError):
            pass  # the shard exited or was killed
        except RuntimeError:
            return  # the loop is closed: the router is exiting
        finally:
            conn.close()
            self._outbox.put(None)  # the writer thread has nobody left to write to
        try:
            deliver(self._on_eof)
        except RuntimeError:
            pass  # the loop is closed: the router is exiting
