"""In-memory shards for tests of the router without processes: each link applies its
batches to a real :class:`~shard.core.ShardCore` on the next loop turn, the way a pipe
answers (never inside the call that sent it), and tells the hub what went down the "pipe"
(``on_flush``), as :class:`router.shards.ShardLink` does."""

from __future__ import annotations

from typing import Any, Callable, List

from common import messages as m
from common.hashing import room_to_shard
from shard.core import ShardCore

#: The wall clock the in-memory shards stamp entries with.
FIXED_TIME = 1_800_000_000.0


class MemoryLink:
    """One in-memory shard."""

    def __init__(self, index: int, hub: Any, epoch: int = 1) -> None:
        self.index = index
        self.hub = hub
        self.core = ShardCore(clock=lambda: FIXED_TIME, epoch=epoch)
        self.alive = True
        self.epoch = 1
        self.on_flush: Callable[[int, List[m.Command]], None] = lambda index, batch: None
        self._pending: List[m.Command] = []
        #: Every batch applied, for tests that look at what the router sent.
        self.batches: List[List[m.Command]] = []

    def send(self, command: m.Command) -> None:
        if not self._pending:
            self.hub.loop.call_soon(self._apply)
        self._pending.append(command)

    def send_first(self, commands: List[m.Command]) -> None:
        if commands and not self._pending:
            self.hub.loop.call_soon(self._apply)
        self._pending[:0] = commands

    def _apply(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        self.on_flush(self.index, batch)
        self.batches.append(batch)
        events = self.core.apply(batch)
        if events:
            self.hub.on_shard_events(self.index, events)


class MemoryPool:
    """``count`` in-memory shards, routed like the real pool."""

    def __init__(self, hub: Any, count: int = 2) -> None:
        self.links = [MemoryLink(index, hub) for index in range(count)]

    def index_of(self, room: str) -> int:
        return room_to_shard(room, len(self.links))

    def link_for(self, room: str) -> MemoryLink:
        return self.links[self.index_of(room)]

    def in_state(self, state: object) -> List[int]:
        return []  # every shard runs
