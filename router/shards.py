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
a restart that fails (no descriptors, no memory, no processes: any ``OSError`` from the
pipes or the process start) counts as one more attempt and is tried again the same way.
After more than ``MAX_RESTARTS`` attempts within ``RESTART_WINDOW`` seconds the pool gives
up on that shard and its rooms answer ``room_unavailable``. Commands that arrive while a
shard is down are refused at once (never silently dropped).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import multiprocessing
import os
import pickle
import stat
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Set

from common import errors
from common import messages as m
from common.hashing import room_to_shard
from common.limits import (
    MAX_RESTARTS,
    MAX_SHARD_BACKLOG_BYTES,
    RESTART_BACKOFF_MAX,
    RESTART_BACKOFF_MIN,
    RESTART_WINDOW,
    SHARD_FDS,
)
from router.descriptors import open_descriptors
from router.pipes import SelectorPipes, ThreadedPipes, default_pipe_io
from router.policy import FdBudget
from shard.process import run_shard

log = logging.getLogger(__name__)


class ShardListener(Protocol):
    """What the pool tells its owner (the hub). All calls happen on the loop thread."""

    def on_shard_events(self, index: int, events: List[tuple]) -> None: ...

    def on_shard_down(self, index: int) -> None: ...

    def on_shard_restarted(self, index: int) -> None: ...

    def on_shard_lost(self, index: int) -> None: ...


class ShardState(enum.Enum):
    """Where one shard is in its life, as the router sees it."""

    STOPPED = "stopped"  # not started yet, or closed at shutdown
    RUNNING = "running"
    RESTARTING = "restarting"  # died, or a start failed: the next attempt is scheduled
    GIVEN_UP = "given_up"  # too many attempts: its rooms are unavailable until the router restarts


class ShardStartError(Exception):
    """A shard process could not be started. ``reason`` is one line, e.g.
    ``EMFILE: Too many open files``; ``errno`` is the ``OSError``'s, if there was one."""

    def __init__(self, index: int, error: BaseException) -> None:
        self.index = index
        self.errno: Optional[int] = getattr(error, "errno", None)
        self.reason = describe_error(error)
        super().__init__(f"shard {index}: {self.reason}")


def describe_error(error: BaseException) -> str:
    """One line for *error*: ``EMFILE: Too many open files`` for an ``OSError``."""
    code = getattr(error, "errno", None)
    if isinstance(error, OSError) and code is not None:
        return f"{errno.errorcode.get(code, code)}: {error.strerror or error}"
    return f"{type(error).__name__}: {error}"


def refuse(batch: List[m.Command], code: str) -> List[m.Event]:
    """The completions a shard would have sent had it refused every command in *batch*
    (a DROP has nothing to leave, a ROOMS nothing to list)."""
    events: List[m.Event] = []
    for command in batch:
        op, req = command[m.OP], command[m.REQ]
        if op == m.DROP:
            events.append(m.done(req, None))
        elif op == m.ROOMS:
            events.append(m.done(req, []))
        else:
            events.append(m.fail(req, code))
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
        data_dir: Optional[str] = None,
        count: int = 1,
        redis: Optional[Any] = None,
    ) -> None:
        self.index = index
        self._data_dir = data_dir  # where its rooms' history is kept (None: in memory)
        self._redis = redis  # a RedisSpec: its rooms are shared through Redis (--redis)
        self._count = count  # of shards: which storage slots are this one's
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
        self._pending: List[m.Command] = []
        self._flush_scheduled = False
        #: Called with (index, batch) as each batch goes down the pipe (or is refused
        #: because the shard is down): the hub's record of the commands in flight.
        self.on_flush: Callable[[int, List[m.Command]], None] = _nothing
        self.state = ShardState.STOPPED
        #: How many times this shard has been started (for the log; the epoch of a room's
        #: history is the shard's to say).
        self.epoch = 0
        self.exit_code: Optional[int] = None  # of the last incarnation, once it died
        self.crash_at_start = False  # for the supervision tests

    @property
    def alive(self) -> bool:
        return self.state is ShardState.RUNNING

    @property
    def fds_held(self) -> int:
        """Descriptors this shard holds in the router (``SHARD_FDS`` while it runs)."""
        return SHARD_FDS if self.state is ShardState.RUNNING else 0

    @property
    def backlog_bytes(self) -> int:
        """Bytes handed over but not yet written to the pipe (grows if the shard stalls)."""
        return self._pipes.backlog_bytes if self._pipes is not None else 0

    def start(self) -> None:
        """Start (or restart) the shard process and connect its pipes to the loop.

        Raises :class:`ShardStartError` if a pipe, the process or the pipes' threads cannot
        be created (EMFILE, ENFILE, ENOMEM, EAGAIN...). Whatever was half-created is closed
        first: a failed start leaves no descriptor and no process behind."""
        self._forget_process()
        forked = self._context.get_start_method() == "fork"
        before = open_descriptors() if forked else None
        ends: List[Connection] = []
        failure: Optional[ShardStartError] = None
        try:
            commands_in, commands_out = self._context.Pipe(duplex=False)
            ends += (commands_in, commands_out)
            events_in, events_out = self._context.Pipe(duplex=False)
            ends += (events_in, events_out)
            process = self._spawn(commands_in, events_out, forked)
        except OSError as error:
            for end in ends:
                end.close()
            failure = ShardStartError(self.index, error)
        if failure is not None:
            # Raised out here, with the OSError and its traceback gone: they kept
            # multiprocessing's half-made Popen alive, whose finalizer closes its pipes
            # (spawn). What a failed fork leaves behind belongs to nobody: close it.
            if before is not None:
                _close_orphaned_pipes(before)
            raise failure
        # Our copies of the shard's ends must go, or we would never see end-of-file.
        commands_in.close()
        events_out.close()
        self.process = process
        try:
            self._connect(process, commands_out, events_in)
        except (OSError, RuntimeError) as error:  # RuntimeError: no thread (ThreadedPipes)
            process.kill()  # reaped with the other exited children (_forget_process)
            commands_out.close()
            events_in.close()
            failure = ShardStartError(self.index, error)
        if failure is not None:
            raise failure
        self.state = ShardState.RUNNING
        self.epoch += 1

    def _spawn(self, commands_in: Connection, events_out: Connection, forked: bool) -> Any:
        """Create and start the shard process (raises ``OSError``)."""
        process = self._context.Process(
            target=run_shard,
            args=(commands_in, events_out, self.index, forked, self._log_level),
            kwargs={
                "crash_at_start": self.crash_at_start,
                "data_dir": self._data_dir,
                "shard_count": self._count,
                "redis": self._redis,
            },
            name=f"shardchat-shard-{self.index}",
            daemon=True,
        )
        process.start()
        return process

    def _connect(self, process: Any, commands_out: Connection, events_in: Connection) -> None:
        index, on_events = self.index, self._listener.on_shard_events

        def events_of_this_incarnation(events: List[tuple]) -> None:
            if self.process is process:  # a dead one's last events answer nothing now
                on_events(index, events)

        self._pipes = self._pipes_class(
            self._loop,
            commands_out,
            events_in,
            events_of_this_incarnation,
            lambda: self._exited(process),
        )

    def _forget_process(self) -> None:
        """Let go of the previous incarnation: once it has exited, close its handle (the
        sentinel and the start pipe, two descriptors). One not reaped yet is left to
        ``multiprocessing``'s own reaping of exited children."""
        process, self.process = self.process, None
        if process is not None and process.exitcode is not None:
            process.close()

    def send(self, command: m.Command) -> None:
        """Queue *command* for this shard; it leaves in this loop turn's batch."""
        self._pending.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_first(self, commands: List[m.Command]) -> None:
        """Queue *commands* ahead of everything queued and not sent yet (the REJOINs of a
        restarted shard must reach it before the commands that waited for it)."""
        if commands:
            self._pending[:0] = commands
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        self.on_flush(self.index, batch)
        if not self.alive or self.backlog_bytes > MAX_SHARD_BACKLOG_BYTES:
            self._listener.on_shard_events(self.index, refuse(batch, errors.ROOM_UNAVAILABLE))
            return
        assert self._pipes is not None
        self._pipes.write(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        """Close the command pipe after what is queued: the shard sees EOF and exits."""
        self._flush()
        self.state = ShardState.STOPPED
        if self._pipes is not None:
            self._pipes.close()

    def _exited(self, process: Any) -> None:
        if process is not self.process:
            return  # a previous incarnation
        if self.state is ShardState.RUNNING:
            self.state = ShardState.RESTARTING  # the pool decides: restart or give up
        if self._pipes is not None:
            self._pipes.close()
        # Reading exitcode reaps it if it is already gone, without waiting and without a
        # descriptor (join(0) would open a selector, which can fail with EMFILE).
        self.exit_code = process.exitcode
        self._on_exit(self)

    def join(self, timeout: float) -> None:
        """Wait for the process to end; kill it if it has not after *timeout* seconds.
        Blocking: call from a worker thread or at exit, not from the loop."""
        process = self.process
        if process is None:
            return
        try:
            process.join(timeout)
        except OSError as error:  # join waits with a selector: out of descriptors
            log.warning("shard %d: cannot wait for it (%s)", self.index, describe_error(error))
        if process.is_alive():
            log.warning("shard %d did not stop in %.1fs; killing it", self.index, timeout)
            process.kill()
            try:
                process.join(1.0)
            except OSError:
                pass  # killed; reaped at exit


def _nothing(index: int, batch: List[m.Command]) -> None:
    pass


def _close_orphaned_pipes(before: Set[int]) -> None:
    """Close the pipes a failed fork start left open: ``multiprocessing``'s fork Popen
    makes two pipes before ``os.fork()`` and hands them to its finalizer only once the
    fork succeeded (CPython 3.9-3.13 ``popen_fork._launch``), so when the second pipe or
    the fork fails they belong to nobody. Only pipes that were not open in *before* (taken
    before the start) are closed, once our own pipe ends are: only the loop thread
    creates descriptors meanwhile."""
    after = open_descriptors()
    for fd in sorted((after or set()) - before):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass  # closed meanwhile


class RestartPolicy:
    """When to start a dead process again (a shard; in a tier, a router too): after a
    backoff doubling from ``RESTART_BACKOFF_MIN`` to ``RESTART_BACKOFF_MAX``, and no more
    than ``MAX_RESTARTS`` times within ``RESTART_WINDOW`` seconds."""

    def __init__(self) -> None:
        self._times: Deque[float] = deque()

    @property
    def recent(self) -> int:
        """Starts within the window (as of the last :meth:`next_delay`)."""
        return len(self._times)

    def next_delay(self, now: float) -> Optional[float]:
        """Seconds to wait before the next start (counted as one), or None: give up."""
        while self._times and self._times[0] < now - RESTART_WINDOW:
            self._times.popleft()
        if len(self._times) >= MAX_RESTARTS:
            return None
        delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * 2 ** len(self._times))
        self._times.append(now)
        return delay


class ShardPool:
    """All shards, the room -> shard routing (cached stable hash) and their supervision.

    With *fds*, the pool keeps the descriptor budget told what the shards hold, and sets
    aside what they all hold when running, so a dead shard's descriptors wait for it."""

    def __init__(
        self,
        count: int,
        context: BaseContext,
        loop: asyncio.AbstractEventLoop,
        listener: ShardListener,
        log_level: str = "WARNING",
        pipe_io: str = "",
        fds: Optional[FdBudget] = None,
        data_dir: Optional[str] = None,
        links: Optional[List[ShardLink]] = None,
        redis: Optional[Any] = None,
    ) -> None:
        self._loop = loop
        self._listener = listener
        #: The shards; *links* when given (a tier router's, attached to given pipes).
        self.links = links or [
            ShardLink(
                i,
                context,
                loop,
                listener,
                self._on_exit,
                log_level,
                pipe_io,
                data_dir,
                count,
                redis,
            )  # fmt: skip
            for i in range(count)
        ]
        self._room_shard: Dict[str, int] = {}
        self._restarts = {i: RestartPolicy() for i in range(count)}
        #: For /metrics: restarts that succeeded, and give-ups, per shard.
        self.restarts_done: Dict[int, int] = {}
        self.give_ups: Dict[int, int] = {}
        self.stopping = False
        self._fds = fds
        if fds is not None:
            fds.shard_fds_set_aside = count * SHARD_FDS

    def start(self) -> None:
        """Start every shard. Raises :class:`ShardStartError` if one cannot start; the
        ones already started are then closed (join them with :meth:`join`)."""
        try:
            for link in self.links:
                link.start()
        except ShardStartError:
            self.close()
            raise
        finally:
            self._count_fds()
        log.info("started %d shard processes (pids %s)", len(self.links), self.pids())

    def pids(self) -> List[int]:
        return [link.process.pid for link in self.links if link.process is not None]

    def in_state(self, state: ShardState) -> List[int]:
        """The indexes of the shards in *state*."""
        return [link.index for link in self.links if link.state is state]

    def index_of(self, room: str) -> int:
        index = self._room_shard.get(room)
        if index is None:
            if len(self._room_shard) > 100_000:
                self._room_shard.clear()  # a cache, not state: keep it bounded
            index = self._room_shard[room] = room_to_shard(room, len(self.links))
        return index

    def link_for(self, room: str) -> ShardLink:
        return self.links[self.index_of(room)]

    def _count_fds(self) -> None:
        if self._fds is not None:
            self._fds.shard_fds = sum(link.fds_held for link in self.links)

    def _on_exit(self, link: ShardLink) -> None:
        self._count_fds()
        if self.stopping:
            return
        self._listener.on_shard_down(link.index)
        code = link.exit_code
        self._schedule_restart(link, "died" if code is None else f"died (exit code {code})")

    def _schedule_restart(self, link: ShardLink, what: str) -> None:
        """The shard is down (*what* says how): start it again after the backoff, or give
        up once it has been (re)started ``MAX_RESTARTS`` times within ``RESTART_WINDOW``."""
        policy = self._restarts[link.index]
        delay = policy.next_delay(time.monotonic())
        if delay is None:
            link.state = ShardState.GIVEN_UP
            self.give_ups[link.index] = self.give_ups.get(link.index, 0) + 1
            log.error(
                "shard %d %s after %d restarts in %.0fs; giving up: its rooms are unavailable",
                link.index,
                what,
                policy.recent,
                RESTART_WINDOW,
            )
            self._listener.on_shard_lost(link.index)
            return
        link.state = ShardState.RESTARTING
        log.error("shard %d %s; restarting in %.1fs", link.index, what, delay)
        self._loop.call_later(delay, self._restart, link)

    def _restart(self, link: ShardLink) -> None:
        if self.stopping:
            return
        multiprocessing.active_children()  # reap any exited shard not reaped yet
        try:
            link.start()
        except ShardStartError as error:
            self._schedule_restart(link, f"could not be restarted ({error.reason})")
            return
        finally:
            self._count_fds()
        self.restarts_done[link.index] = self.restarts_done.get(link.index, 0) + 1
        log.info("shard %d restarted (pid %s, epoch %d)", link.index, link.process.pid, link.epoch)
        self._listener.on_shard_restarted(link.index)

    def close(self) -> None:
        self.stopping = True
        for link in self.links:
            link.close()
        self._count_fds()

    def join(self, timeout: float) -> None:
        for link in self.links:
            link.join(timeout)


# --- a router of a router tier (``--routers N``): the supervisor owns the shards -----------


class _Attachment:
    """Stands for the shard process in a tier router: the supervisor owns the process;
    this router only has its two pipe ends (one attachment per pair it was given)."""

    pid: Optional[int] = None
    exitcode: Optional[int] = None

    def close(self) -> None:
        pass


class TierShardLink(ShardLink):
    """A shard of a router tier: its pipes come from the supervisor (at start, and again
    after the supervisor restarted the shard); this router never starts or stops it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given: Optional[tuple] = None

    def give(self, commands_out: Connection, events_in: Connection) -> None:
        """The pipe pair to use at the next :meth:`start`."""
        self._given = (commands_out, events_in)

    def start(self) -> None:
        if self._given is None:
            raise ShardStartError(self.index, RuntimeError("no pipes from the supervisor"))
        commands_out, events_in = self._given
        self._given = None
        attachment = _Attachment()
        self.process = attachment
        try:
            self._connect(attachment, commands_out, events_in)
        except (OSError, RuntimeError) as error:
            commands_out.close()
            events_in.close()
            raise ShardStartError(self.index, error) from None
        self.state = ShardState.RUNNING
        self.epoch += 1

    def join(self, timeout: float) -> None:
        pass  # the supervisor's process, not ours


class TierShardPool(ShardPool):
    """The shards as one router of a tier sees them: attached to the pipes the supervisor
    made; a shard that dies is down here until the supervisor says it is back
    (:meth:`on_supervisor`), or lost."""

    def __init__(
        self,
        pipes: List[tuple],
        loop: asyncio.AbstractEventLoop,
        listener: ShardListener,
        pipe_io: str = "",
        fds: Optional[FdBudget] = None,
    ) -> None:
        context = multiprocessing.get_context("spawn")  # never used to start anything
        links: List[ShardLink] = []
        for i, (commands_out, events_in) in enumerate(pipes):
            link = TierShardLink(i, context, loop, listener, self._on_exit, pipe_io=pipe_io)
            link.give(commands_out, events_in)
            links.append(link)
        super().__init__(len(pipes), context, loop, listener, pipe_io=pipe_io, fds=fds, links=links)

    def start(self) -> None:
        """Attach every shard's pipes. Raises :class:`ShardStartError`."""
        try:
            for link in self.links:
                link.start()
        finally:
            self._count_fds()
        log.debug("attached to %d shards", len(self.links))

    def _on_exit(self, link: ShardLink) -> None:
        self._count_fds()
        if self.stopping or link.state is ShardState.GIVEN_UP:
            return
        link.state = ShardState.RESTARTING  # the supervisor restarts it, or gives up
        log.error("shard %d is down; waiting for the supervisor to restart it", link.index)
        self._listener.on_shard_down(link.index)

    def on_supervisor(self, message: tuple) -> None:
        """``("shard", index, commands_out, events_in)``: shard *index* was restarted, here
        are the new pipes; ``("lost", index)``: the supervisor gave up on it."""
        kind, index = message[0], message[1]
        link = self.links[index]
        if self.stopping:
            for end in message[2:]:
                end.close()
            return
        if link.state is ShardState.RUNNING:  # said before its end-of-file got here
            link._exited(link.process)
        if kind == "lost":
            link.state = ShardState.GIVEN_UP
            self.give_ups[index] = self.give_ups.get(index, 0) + 1
            self._listener.on_shard_lost(index)
            return
        link.give(message[2], message[3])
        try:
            link.start()
        except ShardStartError as error:
            log.error("shard %d: cannot attach its new pipes (%s)", index, error.reason)
            return
        finally:
            self._count_fds()
        self.restarts_done[index] = self.restarts_done.get(index, 0) + 1
        log.info("shard %d restarted (epoch %d)", index, link.epoch)
        self._listener.on_shard_restarted(index)
