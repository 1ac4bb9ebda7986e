"""The shard process: a thin loop around :class:`shard.core.ShardCore`.

It reads command batches from its end of the pipe, applies them and writes back the events,
one pipe message per group of batches. It exits when the pipe reaches end-of-file (the
router closed it or died, even by ``kill -9``) or when its parent process is gone.

``run_shard`` is the process target; it must stay importable at module level so that the
``spawn`` start method can find it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, List, Optional, Sequence, Tuple

from common import messages as m
from common.limits import (
    MAX_ROUTER_BACKLOG_BYTES,
    MAX_SHARD_BACKLOG_BYTES,
    MAX_SHARD_BATCH,
    ROUTER_STALL_SECONDS,
)
from common.proctitle import set_process_name
from shard.core import ShardCore
from shard.fanout import NO_ROUTER, RouterFanout, router_of
from shard.handoff import receive
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

    Events go to each router through its own :class:`_EventSender` (a thread and a bounded
    queue), so a router that stops reading stalls only itself: once it counts as stalled
    (see :class:`_EventSender`), the shard tells the supervisor (``("stalled", r)``), which
    restarts it, and sends it nothing more."""

    def __init__(
        self, core: ShardCore, links: List[Tuple[Connection, Connection]], control: Connection
    ) -> None:
        self.core = core
        self.control = control
        self.commands: List[Optional[Connection]] = [c for c, _ in links]
        self.senders: List[Optional[_EventSender]] = [
            _EventSender(r, events, self._stalled) for r, (_, events) in enumerate(links)
        ]
        self.fanout = RouterFanout(len(links), core.members_of)
        #: Per router, how many times the supervisor replaced its pipes here: a stall report
        #: names it, so one about a router already replaced is not taken for its successor.
        self.generations = [0] * len(links)
        self._stalls: queue.SimpleQueue[int] = queue.SimpleQueue()

    def serve(self) -> None:
        control = self.control
        while True:
            for sender in self.senders:
                if sender is not None:
                    sender.check()
            while not self._stalls.empty():
                self._report_stall(self._stalls.get())
            readers = [c for c in self.commands if c is not None]
            ready = wait([control, *readers], PARENT_CHECK_INTERVAL)
            batch: List[m.Command] = []
            sources: List[int] = []
            gone: List[int] = []
            for conn in ready:
                if conn is control:
                    if not self._on_control(batch, sources):
                        return
                elif conn in self.commands:  # (not one just replaced by the supervisor)
                    router = self.commands.index(conn)
                    if not self._read(conn, router, batch, sources):
                        gone.append(router)
            if batch:
                self._apply(batch, sources)
            elif not ready:
                self._send(self.fanout.split((), (), self.core.idle()))
            for router in gone:
                self._router_gone(router)

    def _read(self, conn: Connection, router: int, batch: list, sources: list) -> bool:
        """Take what router *router* sent (False: its pipe ended, it is gone)."""
        try:
            while True:
                commands = pickle.loads(conn.recv_bytes())
                batch.extend(commands)
                sources.extend([router] * len(commands))
                if len(batch) >= MAX_SHARD_BATCH or not conn.poll():
                    return True
        except (EOFError, OSError):
            return False

    def _apply(self, batch: List[m.Command], sources: List[int]) -> None:
        self._send(self.fanout.split(batch, sources, self.core.apply(batch)))

    def _on_control(self, batch: List[m.Command], sources: List[int]) -> bool:
        """A message from the supervisor (False: it is gone). ``("router", r, commands,
        events)``: router *r* was restarted; these are its new pipes. What was read from
        the others is applied first, then the old router's clients leave, then the new
        pipes are used: nothing of the old router reaches the new one."""
        try:
            message = receive(self.control)
        except (EOFError, OSError):
            return False
        _, router, commands, events = message
        if batch:
            self._apply(batch, sources)
            del batch[:], sources[:]
        if self.commands[router] is not None or self.senders[router] is not None:
            self._router_gone(router)
        self.commands[router] = commands
        self.senders[router] = _EventSender(router, events, self._stalled)
        self.generations[router] += 1
        return True

    def _router_gone(self, router: int) -> None:
        """Router *router* died: close its pipes, and its clients leave every room here now
        (the other routers' members hear them leave). Called after what it sent was
        applied, so none of its JOINs can come after its clients' DROPs."""
        conn, sender = self.commands[router], self.senders[router]
        self.commands[router] = self.senders[router] = None
        if conn is not None:
            conn.close()
        if sender is not None:
            sender.close()
        routers = self.fanout.routers
        drops = [
            m.drop(GONE_ROUTER_REQ, 0.0, cid)
            for cid in self.core.clients()
            if router_of(cid, routers) == router
        ]
        if drops:
            self._apply(drops, [NO_ROUTER] * len(drops))

    def _stalled(self, router: int) -> None:
        """(On a sender's thread.) Router *router* has taken nothing for too long."""
        self._stalls.put(router)

    def _report_stall(self, router: int) -> None:
        sender = self.senders[router]
        if sender is None or not sender.stalled:
            return
        log.error("router %d takes no events; asking the supervisor to restart it", router)
        try:
            self.control.send(("stalled", router, self.generations[router]))
        except OSError:
            pass  # the supervisor is gone: the control pipe's end-of-file says so

    def _send(self, per_router: List[List[m.Event]]) -> None:
        for router, events in enumerate(per_router):
            sender = self.senders[router]
            if events and sender is not None:
                sender.send(pickle.dumps(events, pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        for conn in self.commands:
            if conn is not None:
                conn.close()
        for sender in self.senders:
            if sender is not None:
                sender.close()


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
