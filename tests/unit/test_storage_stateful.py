"""The SQLite history store against a dict-of-lists model (a hypothesis state machine).

Random sequences of: entries appended to rooms (bursts past the 500-entry retention
included), commits, forgets, histories started anew under a new epoch, and restarts of
every store with a random shard count, with or without committing first (a restart without
a commit is a crash: what was staged is gone). The model keeps per room its epoch and its
entries, committed and staged; after every step each room's ``load`` must equal the model's
last 500 entries, and after every restart the files on disk must hold exactly those.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from common.hashing import room_to_shard, room_to_slot
from common.limits import HISTORY_SIZE, RETENTION_STEP
from common.messages import KIND_CHAT, KIND_JOIN, KIND_LEAVE, Entry
from shard.journal import JournaledStore, journal_path, prepare_data_dir
from shard.slot_files import check_data_dir, slot_file_name
from shard.storage import HistoryStore, SqliteStore

#: Rooms in different slots, and two that differ only by case (two rooms).
ROOMS = ["lobby", "Lobby", "zoë", "日本", "room-7"]
TEXTS = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
KINDS = st.sampled_from([KIND_CHAT, KIND_JOIN, KIND_LEAVE])
COUNTS = st.sampled_from([1, 2, 3, 64])


class RoomModel:
    """One room's history: its epoch and every entry (the store keeps the last 500)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.entries: List[Entry] = []

    @property
    def seq(self) -> int:
        return self.entries[-1][0] if self.entries else 0


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="shardchat-store-")
        self.data_dir = Path(self.directory) / "data"
        check_data_dir(self.data_dir)
        self.count = 1
        self.stores = [self.open_store(0, 1)]
        # What a load must show (committed + staged), and what is on disk (committed).
        self.visible: Dict[str, RoomModel] = {}
        self.committed: Dict[str, RoomModel] = {}
        self.stored_epochs: Dict[str, List[int]] = {}
        self.clock = 0.0

    def teardown(self) -> None:
        for store in self.stores:
            store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def open_store(self, index: int, count: int) -> HistoryStore:
        return SqliteStore(self.data_dir, index, count)

    def crash(self, store: HistoryStore) -> None:
        store.close()  # without a commit: the staged entries are gone

    def store_of(self, room: str) -> HistoryStore:
        return self.stores[room_to_shard(room, self.count)]

    def model_of(self, room: str) -> RoomModel:
        """The room's model, created as the shard core would: with the epoch ``load``
        hands out for a room that has no history."""
        model = self.visible.get(room)
        if model is None:
            loaded = self.store_of(room).load(room)
            assert (loaded.seq, loaded.entries) == (0, ())
            # A new history's epoch is greater than every epoch the room ever had on disk
            # (even after a restart within the same millisecond, or after a forget).
            assert loaded.epoch > max(self.stored_epochs.get(room, [0]))
            model = self.visible[room] = RoomModel(loaded.epoch)
        return model

    # --- rules ----------------------------------------------------------------------

    @rule(room=st.sampled_from(ROOMS), kind=KINDS, text=TEXTS, count=st.integers(1, 3))
    def append(self, room: str, kind: str, text: str, count: int) -> None:
        model = self.model_of(room)
        for _ in range(count):
            self.clock += 0.25
            item = (model.seq + 1, self.clock, kind, "zoë", text)
            model.entries.append(item)
            self.store_of(room).append(room, model.epoch, item)

    @rule(room=st.sampled_from(ROOMS), count=st.sampled_from([HISTORY_SIZE - 1, 600]))
    def burst(self, room: str, count: int) -> None:
        self.append(room, KIND_CHAT, "burst", count)

    @rule(room=st.sampled_from(ROOMS))
    def start_anew(self, room: str) -> None:
        """History lost elsewhere (e.g. a shard with --in-memory): a new epoch, seq from 1."""
        epoch = self.store_of(room).new_epoch(room)
        assert epoch > max(self.stored_epochs.get(room, [0]))
        model = self.visible[room] = RoomModel(epoch)
        self.append(room, KIND_JOIN, "again", 1)
        assert model.seq == 1

    @rule(room=st.sampled_from(ROOMS))
    def forget(self, room: str) -> None:
        self.store_of(room).forget(room)
        self.visible.pop(room, None)

    @rule()
    def commit(self) -> None:
        for store in self.stores:
            assert store.commit().ok
        self.now_committed()

    def now_committed(self) -> None:
        """What every store staged is committed now."""
        self.committed = {room: _copy(model) for room, model in self.visible.items()}
        for room, model in self.committed.items():
            if model.entries:
                self.stored_epochs.setdefault(room, []).append(model.epoch)

    @rule(count=COUNTS, commit_first=st.booleans())
    def restart(self, count: int, commit_first: bool) -> None:
        if commit_first:
            self.commit()
        for store in self.stores:
            self.crash(store)
        self.visible = {room: _copy(model) for room, model in self.committed.items()}
        self.start_cluster()
        self.check_files()
        self.count = count
        self.stores = [self.open_store(index, count) for index in range(count)]

    def start_cluster(self) -> None:
        """What a cluster does at start, before any shard opens its store."""

    # --- checks ---------------------------------------------------------------------

    @invariant()
    def loads_match_the_model(self) -> None:
        for room in ROOMS:
            model = self.visible.get(room)
            if model is None:
                continue  # a load would hand out a new epoch: done when the room is used
            loaded = self.store_of(room).load(room)
            assert (loaded.epoch, loaded.seq) == (model.epoch, model.seq)
            assert list(loaded.entries) == model.entries[-HISTORY_SIZE:]
            assert loaded.problem is None

    def check_files(self) -> None:
        """With every store closed: each file holds the committed last 500 (and at most
        ``RETENTION_STEP`` older ones)."""
        for room in ROOMS:
            stored = _read_file(self.data_dir, room)
            model = self.committed.get(room)
            if model is None:
                assert stored is None or stored[1] == []
                continue
            assert stored is not None
            epoch, entries = stored
            assert epoch == model.epoch
            # the last 500, and at most RETENTION_STEP older ones waiting to be deleted
            assert entries[-HISTORY_SIZE:] == model.entries[-HISTORY_SIZE:]
            assert len(entries) <= HISTORY_SIZE + RETENTION_STEP
            assert [e[0] for e in entries] == list(range(entries[0][0], entries[-1][0] + 1))


def _copy(model: RoomModel) -> RoomModel:
    copy = RoomModel(model.epoch)
    copy.entries = list(model.entries)
    return copy


def _read_file(data_dir: Path, room: str) -> Optional[Tuple[int, List[Entry]]]:
    path = data_dir / slot_file_name(room_to_slot(room))
    if not path.exists():
        return None
    conn = sqlite3.connect(str(path))
    try:
        row = conn.execute("SELECT epoch FROM rooms WHERE name = ?", (room,)).fetchone()
        if row is None:
            return None
        entries = conn.execute(
            "SELECT seq, ts, kind, username, text FROM history WHERE room = ? ORDER BY seq",
            (room,),
        ).fetchall()
        return row[0], entries
    finally:
        conn.close()


class JournaledStoreMachine(StoreMachine):
    """The same model, the stores writing through their journals (moves every 100
    entries, so bursts move in the middle of a batch's staging): a commit is a journal
    write, a crash loses only what was not committed, a restart with another shard count
    finds every room once the cluster's start moved the journals, and a crash of one
    shard is recovered from its journal alone."""

    def open_store(self, index: int, count: int) -> HistoryStore:
        store = SqliteStore(self.data_dir, index, count)
        return JournaledStore(store, journal_path(self.data_dir, index), move_entries=100)

    def crash(self, store: HistoryStore) -> None:
        assert isinstance(store, JournaledStore)
        store.close(move=False)

    def start_cluster(self) -> None:
        prepare_data_dir(self.data_dir)

    @rule(room=st.sampled_from(ROOMS))
    def crash_one_shard(self, room: str) -> None:
        """``kill -9`` of the shard of *room*, and its restart (same layout)."""
        index = room_to_shard(room, self.count)
        self.crash(self.stores[index])
        for name in ROOMS:
            if room_to_shard(name, self.count) == index:
                if name in self.committed:
                    self.visible[name] = _copy(self.committed[name])
                else:
                    self.visible.pop(name, None)
        self.stores[index] = self.open_store(index, self.count)

    @rule()
    def move(self) -> None:
        """A commit that moves everything into the slot files, due or not."""
        for store in self.stores:
            assert isinstance(store, JournaledStore)
            assert store.move().ok
        self.now_committed()


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestStoreAgainstModel = StoreMachine.TestCase
JournaledStoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None
)
TestJournaledStoreAgainstModel = JournaledStoreMachine.TestCase
