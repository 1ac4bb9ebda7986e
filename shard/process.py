"""The shard process: a thin loop around :class:`shard.core.ShardCore`.

It reads command batches from its end of the pipe, applies them and writes back the events,
one pipe message per group of batches. It exits when the pipe reaches end-of-file (the
router closed it or died, even by ``kill -9``) or when its parent process is gone.

``run_shard`` is the process target; it must stay importable at module level so that the
``spawn`` start method can find it.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection, wait
from typing import List, Optional, Sequence, Tuple

from common import messages as m
from common.limits import MAX_SHARD_BATCH
from common.proctitle import set_process_name
from shard.core import ShardCore
from shard.fanout import NO_ROUTER, RouterFanout, router_of
from shard.storage import SqliteStore

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
    core = ShardCore(store=SqliteStore(data_dir, index, shard_count)) if data_dir else ShardCore()
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
    core = ShardCore(store=SqliteStore(data_dir, index, shard_count)) if data_dir else ShardCore()
    tier = _TierLinks(core, links)
    try:
        tier.serve(control)
    finally:
        core.close()
        tier.close()
        control.close()
    log.debug("shard %d exiting", index)


#: The req of the DROPs a tier shard makes for a dead router's clients: not 0 (which
#: completes nothing), and never a router's (theirs count up from 1).
GONE_ROUTER_REQ = -1


class _TierLinks:
    """A tier shard's pipes to its routers, and what it does when one goes or comes."""

    def __init__(self, core: ShardCore, links: List[Tuple[Connection, Connection]]) -> None:
        self.core = core
        self.commands: List[Optional[Connection]] = [c for c, _ in links]
        self.events: List[Optional[Connection]] = [e for _, e in links]
        self.fanout = RouterFanout(len(links), core.members_of)

    def serve(self, control: Connection) -> None:
        loads = pickle.loads
        while True:
            readers = [c for c in self.commands if c is not None]
            ready = wait([control, *readers], PARENT_CHECK_INTERVAL)
            batch: List[m.Command] = []
            sources: List[int] = []
            for conn in ready:
                if conn is control:
                    if not self._on_control(control, batch, sources):
                        return
                    continue
                if conn not in self.commands:
                    continue  # replaced by the supervisor's message just read
                router = self.commands.index(conn)
                try:
                    while True:
                        commands = loads(conn.recv_bytes())
                        batch.extend(commands)
                        sources.extend([router] * len(commands))
                        if len(batch) >= MAX_SHARD_BATCH or not conn.poll():
                            break
                except (EOFError, OSError):
                    self._router_gone(router, batch, sources)
            if not ready:
                self._send(self.fanout.split((), (), self.core.idle()))
                continue
            if batch:
                self._send(self.fanout.split(batch, sources, self.core.apply(batch)))

    def _on_control(self, control: Connection, batch: List[m.Command], sources: List[int]) -> bool:
        """A message from the supervisor (False: it is gone). ``("router", r, commands,
        events)``: router *r* was restarted; these are its new pipes."""
        try:
            message = control.recv()
        except (EOFError, OSError):
            return False
        _, router, commands, events = message
        if self.commands[router] is not None:
            self._router_gone(router, batch, sources)
        self.commands[router], self.events[router] = commands, events
        return True

    def _router_gone(self, router: int, batch: List[m.Command], sources: List[int]) -> None:
        """Router *router* died: its clients leave every room here (the other routers'
        members hear them leave), before anything its successor sends."""
        for end in (self.commands[router], self.events[router]):
            if end is not None:
                end.close()
        self.commands[router] = self.events[router] = None
        routers = self.fanout.routers
        for cid in self.core.clients():
            if router_of(cid, routers) == router:
                batch.append(m.drop(GONE_ROUTER_REQ, 0.0, cid))
                sources.append(NO_ROUTER)

    def _send(self, per_router: List[List[m.Event]]) -> None:
        dumps, highest = pickle.dumps, pickle.HIGHEST_PROTOCOL
        for router, events in enumerate(per_router):
            out = self.events[router]
            if events and out is not None:
                try:
                    out.send_bytes(dumps(events, highest))
                except OSError:
                    log.debug("router %d is gone", router)  # its command pipe says so next

    def close(self) -> None:
        for end in (*self.commands, *self.events):
            if end is not None:
                end.close()


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
