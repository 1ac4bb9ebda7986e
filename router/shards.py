"""The router's side of the shard processes: start them, batch commands to them, read their
events, notice when they die and restart them.

Each shard is joined to the router by two one-way ``multiprocessing`` pipes: commands go
down one, events come back up the other. The event loop never blocks on a pipe: on POSIX
the pipes are non-blocking and watched by the loop's selector, elsewhere a writer and a
reader thread per shard do the blocking I/O (see :mod:`router.pipes`). A stopped shard
(SIGSTOP) cannot stall the loop; its backlog is bounded (``MAX_SHARD_BACKLOG_BYTES``) and
past it the commands are refused with ``room_unavailable``.

Batching: :meth:`ShardLink.send` appends to a list; the first append in a loop turn
schedules one flush with ``call_soon``, so everything bound for one shard in one turn goes
as one pipe message.

Supervision (:class:`ShardPool`): a shard whose event pipe reaches end-of-file has died.
It is restarted after a backoff (``RESTART_BACKOFF_MIN`` doubling to ``RESTART_BACKOFF_MAX``);
after more than ``MAX_RESTARTS`` restarts within ``RESTART_WINDOW`` seconds the pool gives up
on that shard and its rooms answer ``room_unavailable``. Commands that arrive while a shard
is down are refused at once (never silently dropped).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
import time
from collections import deque
from multiprocessing.context import BaseContext
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol

from common import messages as m
from common.hashing import room_to_shard
from common.limits import (
    MAX_RESTARTS,
    MAX_SHARD_BACKLOG_BYTES,
    RESTART_BACKOFF_MAX,
    RESTART_BACKOFF_MIN,
    RESTART_WINDOW,
)
from router.pipes import SelectorPipes, ThreadedPipes, default_pipe_io
from shard.process import run_shard

log = logging.getLogger(__name__)


class ShardListener(Protocol):
    """What the pool tells its owner (the hub). All calls happen on the loop thread."""

    def on_shard_events(self, index: int, events: List[tuple]) -> None: ...

    def on_shard_down(self, index: int) -> None: ...

    def on_shard_restarted(self, index: int) -> None: ...

    def on_shard_lost(self, index: int) -> None: ...


def refuse(batch: List[tuple], code: str) -> List[tuple]:
    """The events a shard would have sent had it refused every command in *batch*."""
    events: List[tuple] = []
    for command in batch:
        op, req, cid = command[0], command[1], command[2]
        if op == m.DROP:
            events.append((m.DONE, req, cid, None))  # nothing left to leave
        elif op == m.ROOMS:
            events.append((m.DONE, req, cid, []))
        elif op != m.REJOIN:
            events.append((m.FAIL, req, cid, op, code, command[3]))
    return events


class ShardLink:
    """One shard process and its two pipes. Used from the loop thread."""

    def __init__(
        self,
        index: int,
        context: BaseContext,
        loop: asyncio.AbstractEventLoop,
        listener: ShardListener,
        on_exit: Callable[[ShardLink], None],
        log_level: str = "WARNING",
        pipe_io: str = "",
    ) -> None:
        self.index = index
        self._context = context
        self._loop = loop
        self._listener = listener
        self._on_exit = on_exit
        self._log_level = log_level
        self._pipes_class = (
            SelectorPipes if (pipe_io or default_pipe_io()) == "selector" else ThreadedPipes
        )
        self.process: Optional[Any] = None
        self._pipes: Optional[Any] = None
        self._pending: List[tuple] = []
        self._flush_scheduled = False
        self.alive = False
        #: How many times this shard has been started; a restart loses its rooms' history,
        #: so clients that resume from a seq must also compare the epoch.
        self.epoch = 0
        self.crash_at_start = False  # for the supervision tests

    @property
    def backlog_bytes(self) -> int:
        """Bytes handed over but not yet written to the pipe (grows if the shard stalls)."""
        return self._pipes.backlog_bytes if self._pipes is not None else 0

    def start(self) -> None:
        """Start (or restart) the shard process and connect its pipes to the loop."""
        commands_in, commands_out = self._context.Pipe(duplex=False)
        events_in, events_out = self._context.Pipe(duplex=False)
        forked = self._context.get_start_method() == "fork"
        process = self.process = self._context.Process(
            target=run_shard,
            args=(commands_in, events_out, self.index, forked, self._log_level),
            kwargs={"crash_at_start": self.crash_at_start},
            name=f"shardchat-shard-{self.index}",
            daemon=True,
        )
        process.start()
        # Our copies of the shard's ends must go, or we would never see end-of-file.
        commands_in.close()
        events_out.close()
        index, on_events = self.index, self._listener.on_shard_events
        self._pipes = self._pipes_class(
            self._loop,
            commands_out,
            events_in,
            lambda events: on_events(index, events),
            lambda: self._exited(process),
        )
        self.alive = True
        self.epoch += 1

    def send(self, command: tuple) -> None:
        """Queue *command* for this shard; it leaves in this loop turn's batch."""
        self._pending.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        if not self.alive or self.backlog_bytes > MAX_SHARD_BACKLOG_BYTES:
            self._listener.on_shard_events(self.index, refuse(batch, m.ERR_UNAVAILABLE))
            return
        assert self._pipes is not None
        self._pipes.write(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        """Close the command pipe after what is queued: the shard sees EOF and exits."""
        self._flush()
        self.alive = False
        if self._pipes is not None:
            self._pipes.close()

    def _exited(self, process: Any) -> None:
        if process is not self.process:
            return  # a previous incarnation
        self.alive = False
        if self._pipes is not None:
            self._pipes.close()
        process.join(0)  # reap it if it is already gone (never wait on the loop)
        self._on_exit(self)

    def join(self, timeout: float) -> None:
        """Wait for the process to end; kill it if it has not after *timeout* seconds.
        Blocking: call from a worker thread or at exit, not from the loop."""
        if self.process is None:
            return
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("shard %d did not stop in %.1fs; killing it", self.index, timeout)
            self.process.kill()
            self.process.join(1.0)


class ShardPool:
    """All shards, the room -> shard routing (cached stable hash) and their supervision."""

    def __init__(
        self,
        count: int,
        context: BaseContext,
        loop: asyncio.AbstractEventLoop,
        listener: ShardListener,
        log_level: str = "WARNING",
        pipe_io: str = "",
    ) -> None:
        self._loop = loop
        self._listener = listener
        self.links = [
            ShardLink(i, context, loop, listener, self._on_exit, log_level, pipe_io)
            for i in range(count)
        ]
        self._room_shard: Dict[str, int] = {}
        self._restarts: Dict[int, Deque[float]] = {i: deque() for i in range(count)}
        self.stopping = False

    def start(self) -> None:
        for link in self.links:
            link.start()
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

    def _on_exit(self, link: ShardLink) -> None:
        if self.stopping:
            return
        code = link.process.exitcode if link.process is not None else None
        self._listener.on_shard_down(link.index)
        now = time.monotonic()
        history = self._restarts[link.index]
        while history and history[0] < now - RESTART_WINDOW:
            history.popleft()
        if len(history) >= MAX_RESTARTS:
            log.error(
                "shard %d died (exit code %s) after %d restarts in %.0fs; giving up: its "
                "rooms are unavailable",
                link.index,
                code,
                len(history),
                RESTART_WINDOW,
            )
            self._listener.on_shard_lost(link.index)
            return
        delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * 2 ** len(history))
        history.append(now)
        log.error("shard %d died (exit code %s); restarting in %.1fs", link.index, code, delay)
        self._loop.call_later(delay, self._restart, link)

    def _restart(self, link: ShardLink) -> None:
        if self.stopping:
            return
        multiprocessing.active_children()  # reap any exited shard not reaped yet
        link.start()
        log.info("shard %d restarted (pid %s, epoch %d)", link.index, link.process.pid, link.epoch)
        self._listener.on_shard_restarted(link.index)

    def close(self) -> None:
        self.stopping = True
        for link in self.links:
            link.close()

    def join(self, timeout: float) -> None:
        for link in self.links:
            link.join(timeout)
