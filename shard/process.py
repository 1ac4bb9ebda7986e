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
from multiprocessing.connection import Connection
from typing import Sequence

from common.limits import MAX_SHARD_BATCH
from shard.core import ShardCore

log = logging.getLogger(__name__)

#: Seconds between checks that the parent is still alive while the pipe is quiet.
PARENT_CHECK_INTERVAL = 1.0


def run_shard(
    commands: Connection,
    events: Connection,
    index: int,
    close_fds: Sequence[int] = (),
    log_level: str = "WARNING",
) -> None:
    """Serve shard *index*: read batches from *commands*, write events to *events*, until
    the router goes away.

    *close_fds* are descriptors inherited from the router under the ``fork`` start method
    (the router's ends of every shard pipe); closing them is what lets each shard see
    end-of-file when the router dies.
    """
    # Ctrl+C reaches the whole process group; the router decides when shards stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed: nothing to release
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s shard-{index} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    parent_pid = os.getppid()
    try:
        _serve(commands, events, ShardCore(), parent_pid)
    finally:
        commands.close()
        events.close()
    log.debug("shard %d exiting", index)


def _serve(conn: Connection, out: Connection, core: ShardCore, parent_pid: int) -> None:
    loads, dumps, highest = pickle.loads, pickle.dumps, pickle.HIGHEST_PROTOCOL
    while True:
        try:
            if not conn.poll(PARENT_CHECK_INTERVAL):
                if os.getppid() != parent_pid:
                    return  # orphaned: the router died and we were re-parented
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
