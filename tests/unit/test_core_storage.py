"""The shard core over a history store (shard/core.py + shard/storage.py): rooms come back
from the store with their seq and epoch, every batch is committed before its events are
returned, and a store that stops (or starts again) storing a room's history is reported
once per change as a STORAGE event, which the hub turns into a notice for the members."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Dict, FrozenSet, List, Tuple

from common import messages as m
from router.hub import Hub, Membership
from shard.core import ShardCore
from shard.storage import NOTHING_FAILED, CommitReport, MemoryStore, SqliteStore, StoredRoom
from tests.memory_shards import MemoryPool
from tests.unit.test_hub_fanout import Recorder

T = 1_800_000_000.0


class FlakyStore(MemoryStore):
    """A memory store whose commits fail for the rooms in :attr:`failing` (with their
    entries kept, as SqliteStore keeps them), and recover when they leave it."""

    def __init__(self) -> None:
        super().__init__(epoch=5)
        self.failing: Dict[str, str] = {}
        self._waiting: set = set()
        self.commits = 0
        self.staged: List[str] = []

    def append(self, room: str, epoch: int, entry: m.Entry) -> None:
        self.staged.append(room)

    def record(self, item: Tuple[str, int, m.Entry]) -> None:
        self.append(*item)

    def commit(self) -> CommitReport:
        self.commits += 1
        touched = set(self.staged) | self._waiting
        self.staged = []
        failed = {room: self.failing[room] for room in touched if room in self.failing}
        recovered: FrozenSet[str] = frozenset(self._waiting - set(failed))
        self._waiting = set(failed)
        if not failed and not recovered:
            return NOTHING_FAILED
        return CommitReport(failed, frozenset(), recovered)


def join(core: ShardCore, cid: int, room: str, name: str) -> List[m.Event]:
    return core.apply([m.join(cid, 0.0, cid, room, name)])


def say(core: ShardCore, cid: int, room: str, text: str, req: int = 100) -> List[m.Event]:
    return core.apply([m.msg(req, 0.0, cid, room, text)])


def storage_events(events: List[m.Event]) -> List[m.Event]:
    return [event for event in events if event[0] == m.STORAGE]


def test_every_batch_is_committed_once() -> None:
    store = FlakyStore()
    core = ShardCore(clock=lambda: T, store=store)
    join(core, 1, "lobby", "alice")
    core.apply([m.msg(2, 0.0, 1, "lobby", "a"), m.msg(3, 0.0, 1, "lobby", "b")])
    assert store.commits == 2


def test_a_failing_room_is_reported_once_then_once_when_it_recovers() -> None:
    store = FlakyStore()
    core = ShardCore(clock=lambda: T, store=store)
    join(core, 1, "lobby", "alice")
    join(core, 2, "other", "bob")
    store.failing["lobby"] = "disk full"
    first = say(core, 1, "lobby", "one")
    assert first[0][0] == m.CHAT  # the batch's own events come first
    assert storage_events(first) == [m.storage("lobby", "disk full")]
    assert storage_events(say(core, 1, "lobby", "two")) == []  # not again while it lasts
    assert storage_events(say(core, 2, "other", "fine")) == []  # other rooms unaffected
    del store.failing["lobby"]
    assert storage_events(say(core, 2, "other", "x")) == [m.storage("lobby", None)]
    assert storage_events(say(core, 1, "lobby", "three")) == []
    assert core.unsaved == {}


def test_rooms_come_back_from_the_store_with_their_seq_and_epoch(tmp_path: Path) -> None:
    core = ShardCore(clock=lambda: T, store=SqliteStore(tmp_path))
    joined = join(core, 1, "lobby", "alice")
    epoch = joined[0][5]
    for i in range(600):
        say(core, 1, "lobby", f"m{i}", req=10 + i)
    before = core.apply([m.history(9, 0.0, 1, "lobby", 500)])[0][2]
    core.close()  # a stop; a crash is tested on real processes
    again = ShardCore(clock=lambda: T + 1, store=SqliteStore(tmp_path))
    rejoined = again.apply([m.rejoin(1, 0.0, 1, "lobby", "alice")])
    assert rejoined == [m.done(1, epoch)]  # the same history: the router says nothing
    assert again.apply([m.history(9, 0.0, 1, "lobby", 500)])[0][2] == before
    chat = say(again, 1, "lobby", "next")[0]
    assert chat[3][0] == before[-1][0] + 1
    again.close()


def test_an_in_memory_core_starts_every_room_anew() -> None:
    core = ShardCore(clock=lambda: T, epoch=42)
    assert join(core, 1, "lobby", "alice")[0][5] == 42
    assert isinstance(core.store, MemoryStore)
    assert core.store.load("x") == StoredRoom("x", 42, 0)


class Noticed(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.notices: List[str] = []

    def on_room_notice(self, room: str, text: str) -> None:
        self.notices.append(text)


def test_the_hub_tells_the_members_of_the_room_only() -> None:
    loop = asyncio.new_event_loop()
    hub = Hub(loop)
    pool = MemoryPool(hub, 1)
    store = FlakyStore()
    pool.links[0].core = ShardCore(clock=lambda: T, store=store)
    hub.attach(pool)  # type: ignore[arg-type]
    alice, bob, carol = Noticed(), Noticed(), Noticed()
    records = {}
    for client, room in ((alice, "lobby"), (bob, "lobby"), (carol, "other")):
        record = records[id(client)] = hub.add(client)
        hub.join(record, room, f"u{id(client)}")
    for _ in range(5):
        loop.run_until_complete(asyncio.sleep(0))
    assert records[id(alice)].rooms["lobby"] is Membership.JOINED
    store.failing["lobby"] = "database or disk is full"

    def run(record_client: Noticed, room: str, text: str) -> None:
        hub.say(records[id(record_client)], room, text)
        for _ in range(5):
            loop.run_until_complete(asyncio.sleep(0))

    run(alice, "lobby", "hello")
    expected = (
        "room lobby history not saved (the server's disk is full or failing); "
        "messages are kept in memory only"
    )
    assert alice.notices == bob.notices == [expected] and carol.notices == []
    del store.failing["lobby"]
    run(carol, "other", "hi")
    assert alice.notices[-1] == bob.notices[-1] == "room lobby history saved again"
    assert carol.notices == []
    hub.close()
    loop.close()


def test_the_hub_words_a_recovery_with_losses() -> None:
    loop = asyncio.new_event_loop()
    hub = Hub(loop)
    hub.attach(MemoryPool(hub, 1))  # type: ignore[arg-type]
    alice = Noticed()
    record = hub.add(alice)
    hub.join(record, "lobby", "alice")
    for _ in range(5):
        loop.run_until_complete(asyncio.sleep(0))
    hub.on_shard_events(0, [m.storage("lobby", None, True)])
    assert alice.notices == [
        "room lobby history saved again; some messages from while it was not were lost"
    ]
    hub.close()
    loop.close()


def test_notices_reach_the_line_protocol_as_info() -> None:
    from router.tcp import TcpConnection

    written: List[bytes] = []
    connection = TcpConnection.__new__(TcpConnection)
    connection.write = written.append  # type: ignore[method-assign]
    TcpConnection.on_room_notice(connection, "lobby", "room lobby history saved again")
    assert written == [b"INFO room lobby history saved again\n"]


class DroppingStore(FlakyStore):
    """Reports the failing rooms' entries as given up (shed), as SqliteStore does when too
    many wait."""

    def commit(self) -> CommitReport:
        report = super().commit()
        if report.failed:
            return CommitReport(report.failed, frozenset(report.failed), report.recovered)
        return report


def test_a_room_that_lost_entries_is_not_told_all_is_well() -> None:
    store = DroppingStore()
    core = ShardCore(clock=lambda: T, store=store)
    join(core, 1, "lobby", "alice")
    store.failing["lobby"] = "disk full"
    assert storage_events(say(core, 1, "lobby", "lost")) == [m.storage("lobby", "disk full")]
    del store.failing["lobby"]
    assert storage_events(say(core, 1, "lobby", "back")) == [m.storage("lobby", None, True)]


class RetryingStore(FlakyStore):
    def __init__(self) -> None:
        super().__init__()
        self.due = False

    def retry_due(self) -> bool:
        return self.due


def test_an_idle_shard_retries_what_waits() -> None:
    store = RetryingStore()
    core = ShardCore(clock=lambda: T, store=store)
    join(core, 1, "lobby", "alice")
    store.failing["lobby"] = "disk full"
    say(core, 1, "lobby", "waits")
    commits = store.commits
    assert core.idle() == [] and store.commits == commits  # nothing due: no commit
    del store.failing["lobby"]
    store.due = True
    assert core.idle() == [m.storage("lobby", None)]
