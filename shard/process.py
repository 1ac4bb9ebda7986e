"""The shard process: a thin loop around :class:`shard.core.ShardCore`.

It reads command batches from its end of the pipe, applies them and writes back the events,
one pipe message per group of batches. It exits when the pipe reaches end-of-file (the
router closed it or died, even by ``kill -9``) or when its parent process is gone.

``run_shard`` is the process target; it must stay importable at module level so that the
``spawn`` start method can find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from common import messages as m
from common.limits import (
    MAX_ROUTER_BACKLOG_BYTES,
    MAX_SHARD_BACKLOG_BYTES,
    MAX_SHARD_BATCH,
    ROUTER_STALL_SECONDS,
)
from common.proctitle import set_process_name
from shard import looplink
from shard.core import ShardCore
from shard.fanout import NO_ROUTER, RouterFanout, router_of
from shard.handoff import read_on_thread
from shard.journal import open_store

log = logging.getLogger(__name__)

#: Seconds between checks that the parent is still alive while the pipe is quiet.
PARENT_CHECK_INTERVAL = 1.0


def run_shard(
    commands: Connection,
    events: Connection,
    index: int,
    close_inherited: bool = False,
    log_level: str = "WARNING",
    crash_at_start: bool = False,
    data_dir: Optional[str] = None,
    shard_count: int = 1,
    redis: Optional[Any] = None,
) -> None:
    """Serve shard *index*: read batches from *commands*, write events to *events*, until
    the router goes away.

    *close_inherited* is set under the ``fork`` start method: the child then holds copies
    of every descriptor the router had (other shards' pipe ends, listening and client
    sockets), and closes all but its own two pipes and stdio. Otherwise a client socket the
    router closed would stay open here, and no shard would see end-of-file when the router
    dies. *crash_at_start* exists for the supervision tests: the shard exits at once.
    With *data_dir*, the history of the rooms in the storage slots this shard owns (as
    shard *index* of *shard_count*) is kept there (:class:`shard.storage.SqliteStore`);
    without, in memory only.
    """
    # Ctrl+C reaches the whole process group; the router decides when shards stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if close_inherited:
        _close_inherited_fds(keep=(commands.fileno(), events.fileno()))
    if crash_at_start:
        os._exit(3)
    set_process_name(f"shardchat-sh{index}")  # `ps -e`, top: shardchat-sh0, -sh1, ...
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s shard-{index} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    parent_pid = os.getppid()
    if redis is not None:  # its rooms are shared through Redis (shard/redis_node.py)
        from shard.redis_node import serve

        serve([(commands, events)], None, index, shard_count, redis, parent_pid)
        return
    core = ShardCore(store=open_store(data_dir, index, shard_count)) if data_dir else ShardCore()
    try:
        _serve(commands, events, core, parent_pid)
    finally:
        core.close()
        commands.close()
        events.close()
    log.debug("shard %d exiting", index)


def run_tier_shard(
    links: List[Tuple[Connection, Connection]],
    control: Connection,
    index: int,
    log_level: str = "WARNING",
    data_dir: Optional[str] = None,
    shard_count: int = 1,
    redis: Optional[Any] = None,
) -> None:
    """Serve shard *index* for a router tier: ``links[r]`` is router *r*'s (commands,
    events) pipe pair; *control* is the supervisor's, which sends a new pair when a router
    was restarted (see :func:`shard.fanout.router_of` for who gets which event). Exits
    when the supervisor goes away (*control* at end-of-file)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_process_name(f"shardchat-sh{index}")
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s shard-{index} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if redis is not None:
        from shard.redis_node import serve

        serve(links, control, index, shard_count, redis)
        control.close()
        return
    core = ShardCore(store=open_store(data_dir, index, shard_count)) if data_dir else ShardCore()
    tier = _TierLinks(core, links, control)
    try:
        tier.serve()
    finally:
        core.close()
        tier.close()
        control.close()
    log.debug("shard %d exiting", index)


#: The req of the DROPs a tier shard makes for a dead router's clients: not 0 (which
#: completes nothing), and never a router's (theirs count up from 1).
GONE_ROUTER_REQ = -1


class _TierLinks:
    """A tier shard's pipes to its routers, and what it does when one goes or comes.

    It runs an event loop: each router's pipe pair is a :mod:`shard.looplink` link (on
    POSIX read and written straight from the loop, so a batch costs no thread hand-off;
    elsewhere a reader and a writer thread). What every router sent in one loop turn is
    applied as one batch. What waits for a router is bounded, so a router that stops
    reading stalls only itself: once it counts as stalled (see :class:`_EventSender`),
    the shard tells the supervisor (``("stalled", r, generation)``), which restarts it,
    and sends it nothing more. The supervisor's *control* pipe is read on a thread; the
    shard ends when it does."""

    def __init__(
        self, core: ShardCore, links: List[Tuple[Connection, Connection]], control: Connection
    ) -> None:
        self.core = core
        self.control = control
        self._pairs: List[Optional[Tuple[Connection, Connection]]] = list(links)
        #: Per router, its link now (None: gone, or not attached yet).
        self.links: List[Optional[Any]] = [None] * len(links)
        self.fanout = RouterFanout(len(links), core.members_of)
        #: Per router, how many times the supervisor replaced its pipes here: a stall report
        #: names it, so one about a router already replaced is not taken for its successor.
        self.generations = [0] * len(links)
        self._batch: List[m.Command] = []
        self._sources: List[int] = []
        self._applied = False  # since the last idle tick

    def serve(self) -> None:
        """Serve until the supervisor goes (its control pipe ends)."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._link_class = loop, looplink.link_class()
        self._done = asyncio.Event()
        self._error: Optional[BaseException] = None
        loop.set_exception_handler(self._on_error)
        for router, pair in enumerate(self._pairs):
            if pair is not None:
                self._attach(router, *pair)
        read_on_thread(self.control, loop, self._on_control, self._done.set)
        try:
            while not self._done.is_set():
                try:
                    await asyncio.wait_for(self._done.wait(), PARENT_CHECK_INTERVAL)
                except asyncio.TimeoutError:
                    self._tick()
            if self._error is not None:
                raise self._error
            self._apply_waiting()
        finally:
            for router in range(len(self.links)):
                self._detach(router)

    def _on_error(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        """An error in one of the loop's callbacks (applying a batch, a control message)
        ends the shard, as it did before there was a loop: the supervisor restarts it and
        the routers put their members back, rather than it serving on half-applied."""
        loop.default_exception_handler(context)
        if self._error is None:
            self._error = context.get("exception") or RuntimeError(context.get("message"))
        self._done.set()

    def _attach(self, router: int, commands: Connection, events: Connection) -> None:
        holder: List[Any] = []

        def on_commands(commands: List[m.Command]) -> None:
            if self.links[router] is holder[0]:  # (a reader thread's late hand-off of a
                self._take(router, commands)  # replaced router's commands is dropped)

        link = self._link_class(self._loop, router, commands, events, on_commands,
                                lambda: self._on_eof(router, holder[0]), self._stalled)  # fmt: skip
        holder.append(link)
        self.links[router] = link
        self._pairs[router] = None

    def _detach(self, router: int) -> None:
        link, self.links[router] = self.links[router], None
        if link is not None:
            link.close()

    def _take(self, router: int, commands: List[m.Command]) -> None:
        """Router *router*'s message of *commands*: applied once this loop turn's reads are
        done, with whatever the others sent in them (at once past ``MAX_SHARD_BATCH``)."""
        batch = self._batch
        if not batch:
            self._loop.call_soon(self._apply_waiting)
        batch.extend(commands)
        self._sources.extend([router] * len(commands))
        if len(batch) >= MAX_SHARD_BATCH:
            self._apply_waiting()

    def _apply_waiting(self) -> None:
        if self._batch:
            batch, sources = self._batch, self._sources
            self._batch, self._sources = [], []
            self._apply(batch, sources)

    def _apply(self, batch: List[m.Command], sources: List[int]) -> None:
        self._applied = True
        self._send(self.fanout.split(batch, sources, self.core.apply(batch)))
        for link in self.links:
            if link is not None:
                link.check()

    def _tick(self) -> None:
        """Every ``PARENT_CHECK_INTERVAL``: a router that takes nothing counts as stalled
        in time, and while nothing comes a failed commit is retried."""
        if not self._applied:
            self._send(self.fanout.split((), (), self.core.idle()))
        self._applied = False
        for link in self.links:
            if link is not None:
                link.check()

    def _on_control(self, message: Any) -> None:
        """``("router", r, commands, events)`` from the supervisor: router *r* was
        restarted; these are its new pipes. What was read from the others is applied
        first, then the old router's clients leave, then the new pipes are used: nothing
        of the old router reaches the new one."""
        _, router, commands, events = message
        self._apply_waiting()
        if self.links[router] is not None:
            self._router_gone(router)
        self.generations[router] += 1
        self._attach(router, commands, events)

    def _on_eof(self, router: int, link: Any) -> None:
        if self.links[router] is link:  # (not one the supervisor replaced already)
            self._apply_waiting()  # what it sent before its end comes first
            self._router_gone(router)

    def _router_gone(self, router: int) -> None:
        """Router *router* died: close its pipes, and its clients leave every room here now
        (the other routers' members hear them leave). Called after what it sent was
        applied, so none of its JOINs can come after its clients' DROPs."""
        self._detach(router)
        routers = self.fanout.routers
        drops = [
            m.drop(GONE_ROUTER_REQ, 0.0, cid)
            for cid in self.core.clients()
            if router_of(cid, routers) == router
        ]
        if drops:
            self._apply(drops, [NO_ROUTER] * len(drops))

    def _stalled(self, router: int) -> None:
        """(On the loop.) Router *router* has taken nothing for too long."""
        log.error("router %d takes no events; asking the supervisor to restart it", router)
        try:
            self.control.send(("stalled", router, self.generations[router]))
        except OSError:
            pass  # the supervisor is gone: the control pipe's end-of-file says so

    def _send(self, per_router: List[List[m.Event]]) -> None:
        for router, events in enumerate(per_router):
            link = self.links[router]
            if events and link is not None:
                link.send(pickle.dumps(events, pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        """Close what :meth:`serve` did not (the pipes of a tier that never served)."""
        for pair in self._pairs:
            if pair is not None:
                for conn in pair:
                    conn.close()
        self._pairs = [None] * len(self._pairs)


class _EventSender:
    """Writes one router's event messages on a thread, so the shard's loop never blocks on
    that router. What waits is bounded: past ``MAX_SHARD_BACKLOG_BYTES`` the router counts
    as stalled once it has taken nothing for ``ROUTER_STALL_SECONDS`` (:meth:`check`, from
    the shard's loop), past ``MAX_ROUTER_BACKLOG_BYTES`` at once; then *on_stall* is called
    once and nothing more is queued for it."""

    def __init__(
        self,
        router: int,
        events: Connection,
        on_stall: Callable[[int], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self._events = events
        self._on_stall = on_stall
        self._monotonic = monotonic
        self._queue: queue.SimpleQueue[Optional[bytes]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # bytes queued and not yet written
        self._progress_at = monotonic()  # the last write done, or when waiting began
        self.stalled = False
        self._thread = threading.Thread(target=self._run, name=f"router-{router}", daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        with self._lock:
            if self.stalled:
                return
            # (One message bigger than the bound still goes, if nothing waits before it.)
            if self._waiting and self._waiting + len(data) > MAX_ROUTER_BACKLOG_BYTES:
                self._stall()
                return
            if not self._waiting:
                self._progress_at = self._monotonic()
            self._waiting += len(data)
        self._queue.put(data)

    def check(self) -> None:
        """Count the router as stalled if it is past the backlog bound and has taken
        nothing for ``ROUTER_STALL_SECONDS``. (Called for every batch: the usual answer,
        "not behind", is read without the lock.)"""
        if self._waiting <= MAX_SHARD_BACKLOG_BYTES:
            return
        with self._lock:
            if self.stalled or self._waiting <= MAX_SHARD_BACKLOG_BYTES:
                return
            if self._monotonic() - self._progress_at >= ROUTER_STALL_SECONDS:
                self._stall()

    def _stall(self) -> None:
        self.stalled = True
        self._on_stall(self.router)

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                break
            try:
                self._events.send_bytes(data)
            except (OSError, TypeError):  # (TypeError: closed under the write, a stall)
                break  # the router is gone; its command pipe says so
            with self._lock:
                self._waiting -= len(data)
                self._progress_at = self._monotonic()
        with contextlib.suppress(OSError):  # (closed at once already if it stalled)
            self._events.close()

    def close(self) -> None:
        """Stop after what is queued (a stalled router's pipe is closed at once)."""
        if self.stalled:
            with contextlib.suppress(OSError):
                self._events.close()
        self._queue.put(None)


def _close_inherited_fds(keep: Sequence[int]) -> None:
    """Close every descriptor from 3 up except *keep* (POSIX; used only after fork)."""
    try:
        max_fd = os.sysconf("SC_OPEN_MAX")
    except (AttributeError, ValueError, OSError):
        max_fd = 65536
    low = 3
    for fd in sorted(set(keep)):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max_fd)


def _serve(conn: Connection, out: Connection, core: ShardCore, parent_pid: int) -> None:
    loads, dumps, highest = pickle.loads, pickle.dumps, pickle.HIGHEST_PROTOCOL
    while True:
        try:
            if not conn.poll(PARENT_CHECK_INTERVAL):
                if os.getppid() != parent_pid:
                    return  # orphaned: the router died and we were re-parented
                idle = core.idle()  # a failed commit is retried without new traffic
                if idle:
                    out.send_bytes(dumps(idle, highest))
                continue
            batch = loads(conn.recv_bytes())
            # Take whatever else is already waiting, so one answer covers it all.
            while len(batch) < MAX_SHARD_BATCH and conn.poll():
                batch.extend(loads(conn.recv_bytes()))
        except (EOFError, OSError):
            return  # the router closed its end or died
        events = core.apply(batch)
        if events:
            try:
                out.send_bytes(dumps(events, highest))
            except OSError:
                return  # the router is gone
