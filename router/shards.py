"""The router's side of the shard processes: start them, batch commands to them, read their
events, notice when they die.

Each shard is joined to the router by two one-way ``multiprocessing`` pipes: commands go
down one, events come back up the other. The event loop never touches a pipe: a *writer
thread* per shard pickles and sends the batches the loop hands it, and a *reader thread* per
shard receives and unpickles event batches and passes them to the loop with
``call_soon_threadsafe``. Threads rather than non-blocking pipe I/O because a
``multiprocessing`` ``Connection`` has no non-blocking mode on Windows, and a partial
message must never stall the loop. A stopped shard (SIGSTOP) only blocks its own writer
thread; the loop keeps serving every other shard.

Batching: :meth:`ShardLink.send` appends to a list; the first append in a loop turn
schedules one flush with ``call_soon``, so everything bound for one shard in one turn goes
as one pipe message.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import queue
import threading
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any, Callable, Dict, List, Optional

from common.hashing import room_to_shard
from shard.process import run_shard

log = logging.getLogger(__name__)

EventsCallback = Callable[[int, List[tuple]], None]
ExitCallback = Callable[[int], None]


class ShardLink:
    """One shard process, its two pipes and its two threads. Used from the loop thread.

    *on_events(index, events)* and *on_exit(index)* are called on the loop thread.
    """

    def __init__(
        self,
        index: int,
        context: BaseContext,
        loop: asyncio.AbstractEventLoop,
        on_events: EventsCallback,
        on_exit: ExitCallback,
        log_level: str = "WARNING",
    ) -> None:
        self.index = index
        self._context = context
        self._loop = loop
        self._on_events = on_events
        self._on_exit = on_exit
        self._log_level = log_level
        self.process: Optional[Any] = None
        self._commands_out: Optional[Connection] = None
        self._events_in: Optional[Connection] = None
        self._outbox: queue.SimpleQueue[Optional[bytes]] = queue.SimpleQueue()
        self._pending: List[tuple] = []
        self._flush_scheduled = False
        # Each counter has one writer thread, so no lock is needed to read the difference.
        self.batches_queued = 0  # handed to the writer thread (loop thread writes)
        self.batches_sent = 0  # written to the pipe (writer thread writes)
        self.alive = False
        #: How many times this shard has been started; a restart loses its rooms' history,
        #: so clients that resume from a seq must also compare the epoch.
        self.epoch = 0

    @property
    def backlog(self) -> int:
        """Batches handed over but not yet written to the pipe (grows if the shard stalls)."""
        return self.batches_queued - self.batches_sent

    def router_fds(self) -> List[int]:
        """The router's pipe descriptors, for a ``fork`` child to close."""
        ends = (self._commands_out, self._events_in)
        return [end.fileno() for end in ends if end is not None and not end.closed]

    def start(self, close_fds: List[int]) -> None:
        """Start the shard process and its threads. *close_fds*: see :func:`run_shard`."""
        commands_in, self._commands_out = self._context.Pipe(duplex=False)
        self._events_in, events_out = self._context.Pipe(duplex=False)
        fds = close_fds + self.router_fds() if self._context.get_start_method() == "fork" else []
        self.process = self._context.Process(
            target=run_shard,
            args=(commands_in, events_out, self.index, fds, self._log_level),
            name=f"shardchat-shard-{self.index}",
            daemon=True,
        )
        self.process.start()
        # Our copies of the shard's ends must go, or we would never see end-of-file.
        commands_in.close()
        events_out.close()
        self._outbox = queue.SimpleQueue()
        self.batches_queued = self.batches_sent = 0
        self.alive = True
        self.epoch += 1
        threading.Thread(
            target=self._write_loop,
            args=(self._commands_out, self._outbox),
            name=f"shard-{self.index}-writer",
            daemon=True,
        ).start()
        threading.Thread(
            target=self._read_loop,
            args=(self._events_in,),
            name=f"shard-{self.index}-reader",
            daemon=True,
        ).start()

    def send(self, command: tuple) -> None:
        """Queue *command* for this shard; it leaves in this loop turn's batch."""
        self._pending.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if batch and self.alive:
            self.batches_queued += 1
            self._outbox.put(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        """Close the command pipe (after what is queued): the shard sees EOF and exits."""
        self._flush()
        self.alive = False
        self._outbox.put(None)

    def _write_loop(self, conn: Connection, outbox: queue.SimpleQueue[Optional[bytes]]) -> None:
        try:
            while True:
                data = outbox.get()
                if data is None:
                    break
                conn.send_bytes(data)
                self.batches_sent += 1
        except OSError:
            pass  # the shard died; the reader thread reports it
        finally:
            conn.close()

    def _read_loop(self, conn: Connection) -> None:
        loads = pickle.loads
        deliver = self._loop.call_soon_threadsafe
        try:
            while True:
                events = loads(conn.recv_bytes())
                deliver(self._on_events, self.index, events)
        except (EOFError, OSError):
            pass  # the shard exited or was killed
        except RuntimeError:
            return  # the loop is closed: the router is exiting
        finally:
            conn.close()
        try:
            deliver(self._exited)
        except RuntimeError:
            pass  # the loop is closed: the router is exiting

    def _exited(self) -> None:
        self.alive = False
        self._on_exit(self.index)

    def join(self, timeout: float) -> None:
        """Wait for the process to end; kill it if it has not after *timeout* seconds."""
        if self.process is None:
            return
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("shard %d did not stop in %.1fs; killing it", self.index, timeout)
            self.process.kill()
            self.process.join(1.0)


class ShardPool:
    """All shards, and the room -> shard routing (cached stable hash)."""

    def __init__(
        self,
        count: int,
        context: BaseContext,
        loop: asyncio.AbstractEventLoop,
        on_events: EventsCallback,
        on_exit: ExitCallback,
        log_level: str = "WARNING",
    ) -> None:
        self.links = [
            ShardLink(i, context, loop, on_events, on_exit, log_level) for i in range(count)
        ]
        self._room_shard: Dict[str, int] = {}

    def start(self) -> None:
        close_fds: List[int] = []
        for link in self.links:
            link.start(close_fds)
            close_fds.extend(link.router_fds())
        log.info("started %d shard processes (pids %s)", len(self.links), self.pids())

    def pids(self) -> List[int]:
        return [link.process.pid for link in self.links if link.process is not None]

    def index_of(self, room: str) -> int:
        index = self._room_shard.get(room)
        if index is None:
            if len(self._room_shard) > 100_000:
                self._room_shard.clear()  # a cache, not state: keep it bounded
            index = self._room_shard[room] = room_to_shard(room, len(self.links))
        return index

    def link_for(self, room: str) -> ShardLink:
        return self.links[self.index_of(room)]

    def close(self) -> None:
        for link in self.links:
            link.close()

    def join(self, timeout: float) -> None:
        for link in self.links:
            link.join(timeout)
