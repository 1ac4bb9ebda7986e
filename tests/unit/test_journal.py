"""A durable shard's journal (shard/journal.py) on real files: records, crashes, replays,
moves into the slot files, and a data directory whose disk is full."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from common.hashing import room_to_shard
from common.limits import HISTORY_SIZE, STORAGE_RETRY_SECONDS
from shard.journal import (
    JournaledStore,
    decode,
    encode,
    journal_path,
    open_store,
    prepare_data_dir,
)
from shard.slot_files import IN_USE, StorageError, check_data_dir
from shard.storage import SqliteStore
from tests.cluster import ROOT
from tests.unit.test_storage import entry, fill, rows_on_disk, slot_path, tmpfs  # noqa: F401

pytestmark = pytest.mark.timeout(120)

ROOMS = ["lobby", "dev", "zoë"]  # three slot files


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "shardchat-data"
    check_data_dir(path)
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def journaled(data_dir: Path, clock: Callable[[], float], **limits: int) -> JournaledStore:
    return JournaledStore(
        SqliteStore(data_dir, monotonic=clock), journal_path(data_dir, 0), monotonic=clock,
        **limits,
    )  # fmt: skip


def record(store: JournaledStore, room: str, count: int, text: str = "") -> int:
    """Record *count* entries continuing *room*'s history; its epoch."""
    stored = store.load(room)
    for seq in range(stored.seq + 1, stored.seq + count + 1):
        store.record((room, stored.epoch, entry(seq, text)))
    return stored.epoch


def seqs(store: JournaledStore, room: str) -> List[int]:
    return [item[0] for item in store.load(room).entries]


# --- records ---------------------------------------------------------------------------


ITEMS_A = [("lobby", 7, entry(1)), ("zoë", 7, entry(1, "ünïcode"))]
ITEMS_B = [("lobby", None, None), ("lobby", 8, entry(1, "again"))]


def test_records_cut_at_every_offset_give_the_whole_ones_before_the_cut() -> None:
    first, second = encode(ITEMS_A), encode(ITEMS_B)
    data = first + second
    for cut in range(len(data) + 1):
        items, intact = decode(data[:cut])
        if cut < len(first):
            assert (items, intact) == ([], 0), cut
        elif cut < len(data):
            assert (items, intact) == (ITEMS_A, len(first)), cut
        else:
            assert (items, intact) == (ITEMS_A + ITEMS_B, len(data))


@pytest.mark.parametrize("where", ["header", "payload"])
def test_a_damaged_record_ends_what_is_read(where: str) -> None:
    first, second, third = encode(ITEMS_A), encode(ITEMS_B), encode(ITEMS_A)
    damaged = bytearray(second)
    damaged[2 if where == "header" else len(damaged) // 2] ^= 0x40
    items, intact = decode(first + bytes(damaged) + third)
    assert (items, intact) == (ITEMS_A, len(first))


# --- the write path --------------------------------------------------------------------


def test_a_commit_is_one_record_in_the_journal_and_no_transaction(
    data_dir: Path, clock: Clock
) -> None:
    store = journaled(data_dir, clock)
    path = journal_path(data_dir, 0)
    sizes = []
    for _ in range(3):
        batch = []
        for room in ROOMS:
            epoch = store.load(room).epoch
            start = store.load(room).seq + 1
            batch += [(room, epoch, entry(seq)) for seq in range(start, start + 5)]
        for item in batch:
            store.record(item)
        assert store.commit().ok
        sizes.append(len(encode(batch)))
        assert path.stat().st_size == sum(sizes)  # one record per batch, nothing else
    assert not any(slot_path(data_dir, room).exists() for room in ROOMS)  # no slot written
    assert decode(path.read_bytes())[1] == sum(sizes)
    assert store.move().ok
    assert path.stat().st_size == 0  # cut back once everything is in the slot files
    store.close()
    assert all(rows_on_disk(data_dir, room) == list(range(1, 16)) for room in ROOMS)


def test_a_crash_is_recovered_from_the_journal(data_dir: Path, clock: Clock) -> None:
    store = journaled(data_dir, clock)
    epoch = record(store, "lobby", 30)
    assert store.commit().ok
    record(store, "lobby", 4)  # the batch being applied when the shard died
    store.close(move=False)  # kill -9: nothing moved, the last batch not committed
    store = journaled(data_dir, clock)
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq) == (epoch, 30)
    assert journal_path(data_dir, 0).stat().st_size == 0  # moved at once at the start
    record(store, "lobby", 1)
    assert store.load("lobby").seq == 31  # seq continues
    store.close()
    assert rows_on_disk(data_dir, "lobby") == list(range(1, 32))


def test_replaying_entries_that_are_stored_already_changes_nothing(
    data_dir: Path, clock: Clock
) -> None:
    """A crash after a move and before the journal was cut back: the whole journal is
    replayed over slot files that have it all (and have dropped its oldest entries)."""
    store = journaled(data_dir, clock)
    epoch = record(store, "lobby", 549)
    assert store.move().ok
    record(store, "lobby", 51)
    assert store.commit().ok
    saved = journal_path(data_dir, 0).read_bytes()  # 550..600
    assert store.move().ok
    before = store.load("lobby")
    store.close(move=False)
    journal_path(data_dir, 0).write_bytes(saved)
    store = journaled(data_dir, clock)
    after = store.load("lobby")
    assert after == before and (after.epoch, after.seq) == (epoch, 600)
    assert seqs(store, "lobby") == list(range(101, 601))
    store.close()
    on_disk = rows_on_disk(data_dir, "lobby")
    assert on_disk[-HISTORY_SIZE:] == list(range(101, 601))
    assert on_disk == list(range(on_disk[0], 601))  # nothing replaced, nothing twice


def test_moves_are_due_by_time(data_dir: Path, clock: Clock) -> None:
    store = journaled(data_dir, clock, move_seconds=2)
    record(store, "lobby", 3)
    assert store.commit().ok
    assert not store.retry_due() and not slot_path(data_dir, "lobby").exists()
    clock.now = 2.0
    assert store.retry_due()  # the shard's idle loop moves them
    assert store.commit().ok and not store.retry_due()
    assert store.unstored_entries() == 0
    store.close(move=False)
    assert rows_on_disk(data_dir, "lobby") == [1, 2, 3]


def test_moves_are_due_by_entries_and_by_bytes(data_dir: Path, clock: Clock) -> None:
    store = journaled(data_dir, clock, move_entries=10, max_bytes=10_000)
    record(store, "lobby", 9)
    assert store.commit().ok and store.unstored_entries() == 9
    record(store, "lobby", 1)
    assert store.commit().ok and store.unstored_entries() == 0  # the 10th entry moved all
    record(store, "dev", 1, text="x" * 12_000)
    assert store.commit().ok and store.unstored_entries() == 0  # past max_bytes
    store.close()


def test_only_each_rooms_last_500_are_written_by_a_move(data_dir: Path, clock: Clock) -> None:
    store = journaled(data_dir, clock)
    record(store, "lobby", 2000)
    assert store.commit().ok
    assert store.unstored_entries() == HISTORY_SIZE  # staged: what a move would write
    store.close()
    assert rows_on_disk(data_dir, "lobby") == list(range(1501, 2001))


def test_a_torn_last_record_keeps_the_ones_before_it(
    data_dir: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = journaled(data_dir, clock)
    epoch = record(store, "lobby", 5)
    assert store.commit().ok
    store.close(move=False)
    with open(journal_path(data_dir, 0), "ab") as file:
        file.write(encode([("lobby", epoch, entry(6))])[:-3])  # a power cut mid-write
    with caplog.at_level(logging.WARNING):
        store = journaled(data_dir, clock)
    assert seqs(store, "lobby") == [1, 2, 3, 4, 5]
    assert "cut short or damaged" in caplog.text
    store.close()


_WRITER = """
import sys
from shard.journal import open_store
store = open_store(sys.argv[1], 0, 1)
rooms = ["lobby", "dev", "zoë"]
epochs = {room: store.load(room).epoch for room in rooms}
for number in range(1, 1_000_000):
    for room in rooms:
        for seq in range(number * 7 - 6, number * 7 + 1):
            store.record((room, epochs[room], (seq, 0.0, "chat", "a", "x" * 100)))
    assert store.commit().ok
    print("committed", number, flush=True)
"""


def test_a_shard_killed_mid_flood_keeps_every_batch_it_reported(data_dir: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(data_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    assert writer.stdout is not None
    while int(writer.stdout.readline().split()[1]) < 3000:  # past a move or two
        pass
    writer.send_signal(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
    writer.wait(timeout=30)
    lines = [line.split() for line in writer.stdout.read().split("\n")[:-1]]
    writer.stdout.close()
    reported = int(lines[-1][1]) if lines else 3000
    prepare_data_dir(data_dir)  # the next start
    store = SqliteStore(data_dir)
    for room in ROOMS:
        loaded = store.load(room)
        assert loaded.seq in (reported * 7, (reported + 1) * 7), (room, reported, loaded.seq)
        assert [item[0] for item in loaded.entries] == list(
            range(loaded.seq - HISTORY_SIZE + 1, loaded.seq + 1)
        )
    store.close()


# --- the start of a cluster ------------------------------------------------------------


@pytest.mark.parametrize("then", [1, 2, 5])
def test_the_start_moves_every_journal_whatever_the_shard_count(data_dir: Path, then: int) -> None:
    rooms = [f"room-{number}" for number in range(40)]
    stores = [open_store(data_dir, index, 3) for index in range(3)]
    epochs = {}
    for room in rooms:
        store = stores[room_to_shard(room, 3)]
        epochs[room] = store.load(room).epoch
        for seq in range(1, 8):
            store.record((room, epochs[room], entry(seq)))
    for store in stores:
        assert store.commit().ok
        store.close(move=False)  # every shard killed
    prepare_data_dir(data_dir)
    assert not list(data_dir.glob("journal-*"))
    after = [SqliteStore(data_dir, index, then) for index in range(then)]
    for room in rooms:
        loaded = after[room_to_shard(room, then)].load(room)
        assert (loaded.epoch, loaded.seq) == (epochs[room], 7)
    for store in after:
        store.close()


def test_a_journal_another_cluster_writes_stops_the_start(data_dir: Path) -> None:
    if os.name != "posix":
        pytest.skip("journals are locked with flock (POSIX)")
    running = open_store(data_dir, 0, 1)
    record(running, "lobby", 3)
    assert running.commit().ok
    with pytest.raises(StorageError) as raised:
        prepare_data_dir(data_dir)
    assert raised.value.code == IN_USE
    assert str(raised.value) == (
        f"{journal_path(data_dir, 0)} is in use by another process (another shardchat on the"
        " same data directory?): stop it, or pass another --data-dir"
    )
    assert seqs(running, "lobby") == [1, 2, 3]  # left alone
    running.close()


# --- a full disk -----------------------------------------------------------------------


@pytest.fixture
def full_slots(tmpfs: Callable[[str], Path]) -> Iterator[Path]:  # noqa: F811
    """A data directory on a 2 MiB tmpfs (filled by the test)."""
    path = tmpfs("size=2m")
    check_data_dir(path)
    yield path


def test_a_full_disk_for_the_slots_keeps_the_journal_to_what_waits(
    full_slots: Path, tmp_path: Path, clock: Clock
) -> None:
    """The slot files cannot be written, the journal (elsewhere) can: each move leaves the
    journal holding just what waits (not everything recorded since the disk filled), and
    what waits is in the slot files once there is room again."""
    journal = tmp_path / "journal-000.log"

    def open_it() -> JournaledStore:
        inner = SqliteStore(full_slots, monotonic=clock)
        return JournaledStore(inner, journal, monotonic=clock, move_entries=20)

    store = open_it()
    epoch = record(store, "lobby", 10)
    assert store.move().ok
    filler = fill(full_slots, leave=0)
    failed = None
    for _ in range(30):  # 30 moves' worth, of 20 entries of 2,000 characters
        record(store, "lobby", 20, text="z" * 2000)
        clock.now += STORAGE_RETRY_SECONDS
        report = store.commit()
        failed = failed or report.failed.get("lobby")
    assert failed is not None and "no space left on its device" in failed
    waiting = store.unstored_entries()
    assert waiting == HISTORY_SIZE  # the room's last 500; the rest would be retention's
    kept, _ = decode(journal.read_bytes())
    assert len(kept) == HISTORY_SIZE  # not the 600 recorded since the disk filled
    assert kept == [("lobby", epoch, entry(seq, "z" * 2000)) for seq in range(111, 611)]
    store.close(move=False)  # and a crash on top of it
    filler.unlink()
    store = open_it()
    assert store.unstored_entries() == 0  # replayed and moved
    assert seqs(store, "lobby") == list(range(111, 611))
    store.close()


def test_a_full_disk_for_the_journal_moves_every_batch_until_it_can_be_written(
    full_slots: Path, clock: Clock
) -> None:
    store = journaled(full_slots, clock)
    epoch = record(store, "lobby", 10)
    assert store.move().ok
    filler = fill(full_slots, leave=0)
    record(store, "lobby", 100, text="z" * 2000)
    report = store.commit()  # the journal write fails, so does the move
    assert "no space left on its device" in report.failed["lobby"]
    assert store.load("lobby").seq == 110  # still served
    filler.unlink()
    clock.now = STORAGE_RETRY_SECONDS
    record(store, "lobby", 1)
    report = store.commit()  # moved at once, not journaled: the journal is not whole
    assert report.ok and report.recovered == {"lobby"}
    assert journal_path(full_slots, 0).stat().st_size == 0
    record(store, "lobby", 1)
    assert store.commit().ok and store.unstored_entries() == 1  # journaled again
    store.close(move=False)
    store = journaled(full_slots, clock)
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq) == (epoch, 112)
    store.close()


def test_a_journal_with_rooms_of_other_shards_does_not_stop_the_shard(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only if the start did not move the journals (it always does): the shard keeps its
    own rooms' entries and drops the others', instead of failing at every restart."""
    rooms = [f"room-{number}" for number in range(10)]
    store = open_store(data_dir, 0, 1)
    for room in rooms:
        record(store, room, 3)
    assert store.commit().ok
    store.close(move=False)
    with caplog.at_level(logging.ERROR):
        mine = open_store(data_dir, 0, 2)
    assert "entries of rooms in other shards' slots" in caplog.text
    for room in rooms:
        if room_to_shard(room, 2) == 0:
            assert seqs(mine, room) == [1, 2, 3]
    mine.close()


# --- what a move or a start must not lose (each of these lost entries once) --------------


def test_a_short_write_while_rewriting_the_journal_is_finished(
    data_dir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a nearly full disk a write may take part of what it is given; the rewrite must
    write the rest (or fail), never rename a cut record over the journal."""
    import shard.journal as journal_module

    store = journaled(data_dir, clock)
    epoch = record(store, "lobby", 300)
    real_write, calls = os.write, []

    def short_write(fd: int, data: bytes) -> int:  # the kernel's answer on a full disk
        calls.append(len(data))
        return real_write(fd, bytes(data[: max(1, len(data) // 3)]))

    journal = store._file
    assert journal is not None
    monkeypatch.setattr(journal_module.os, "write", short_write)
    journal.replace(encode([("lobby", epoch, entry(seq)) for seq in range(1, 301)]))
    monkeypatch.undo()
    assert len(calls) > 1  # it was cut short, and finished
    items, intact = decode(journal_path(data_dir, 0).read_bytes())
    assert intact == journal_path(data_dir, 0).stat().st_size and len(items) == 300
    assert not journal_path(data_dir, 0).with_name("journal-000.log.new").exists()
    store.close(move=False)


def test_a_failed_rename_leaves_no_descriptor_pointing_elsewhere(
    data_dir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite whose rename fails keeps the old journal in use; the slot files (opened
    after it, perhaps on the descriptor number it had) are never truncated or closed."""
    import shard.journal as journal_module

    store = journaled(data_dir, clock, move_entries=1)
    inner = store._store
    epoch = record(store, "lobby", 3)
    assert store.move().ok
    monkeypatch.setattr(inner, "staged", lambda: [("lobby", epoch, entry(99))])  # "left"

    real_replace = os.replace

    def refuse(source: str, target: str) -> None:  # (only the journal's rename)
        if Path(target) == journal_path(data_dir, 0):
            raise PermissionError(13, "in use by another process")
        real_replace(source, target)

    monkeypatch.setattr(journal_module.os, "replace", refuse)
    record(store, "dev", 1)  # a second slot file is opened now
    assert store.commit().ok  # stored; only the journal's rewrite failed
    monkeypatch.undo()
    assert not store._whole
    record(store, "dev", 2)
    assert store.commit().ok  # a move makes the journal whole again
    assert store._whole
    store.close()
    check = SqliteStore(data_dir)
    assert [e[0] for e in check.load("lobby").entries] == [1, 2, 3]
    assert [e[0] for e in check.load("dev").entries] == [1, 2, 3]
    check.close()
    assert not journal_path(data_dir, 0).with_name("journal-000.log.new").exists()


def test_a_journal_that_cannot_be_opened_at_a_restart_is_still_replayed(
    data_dir: Path, clock: Clock
) -> None:
    """A restarted shard that can read its journal but not lock it (the old process not
    gone yet) serves the journaled history, in the same epoch; the next start replaying
    the same journal again changes nothing."""
    if os.name != "posix":
        pytest.skip("journals are locked with flock (POSIX)")
    import fcntl

    store = journaled(data_dir, clock)
    epoch = record(store, "lobby", 5, text="old")
    assert store.commit().ok
    store.close(move=False)  # kill -9
    holder = os.open(journal_path(data_dir, 0), os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        store = journaled(data_dir, clock)
    finally:
        os.close(holder)
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq) == (epoch, 5)
    record(store, "lobby", 3, text="new")
    assert store.commit().ok
    store.close()
    prepare_data_dir(data_dir)
    after = SqliteStore(data_dir).load("lobby")
    assert after.epoch == epoch
    assert [e[4] for e in after.entries] == ["old"] * 5 + ["new"] * 3


def test_an_older_history_replayed_over_a_newer_one_changes_nothing(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    store.extend("lobby", 200, [entry(1, "new"), entry(2, "new")])
    assert store.commit().ok
    store.close()
    store = SqliteStore(data_dir)
    store.extend("lobby", 100, [entry(seq, "stale") for seq in range(1, 6)])
    assert store.load("lobby").entries == (entry(1, "new"), entry(2, "new"))  # merge
    assert store.commit().ok
    store.close()
    after = SqliteStore(data_dir).load("lobby")  # _write_room
    assert (after.epoch, [e[4] for e in after.entries]) == (200, ["new", "new"])


def test_entries_a_down_slot_cannot_take_stay_in_the_journal(data_dir: Path, clock: Clock) -> None:
    """A slot file busy at a restart (so down for that process) does not make the replay
    give up its entries: the journal keeps them, the room is served from them, and the
    next start stores them."""
    import sqlite3

    store = journaled(data_dir, clock)
    epoch = record(store, "lobby", 3)
    assert store.move().ok
    record(store, "lobby", 5)
    assert store.commit().ok  # 4..8 journaled, echoed
    store.close(move=False)
    other = sqlite3.connect(str(slot_path(data_dir, "lobby")), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        store = journaled(data_dir, clock)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.unstored_entries() == 5  # (1..3 are in the slot file, busy now)
    kept, _ = decode(journal_path(data_dir, 0).read_bytes())
    assert [item[2][0] for item in kept] == list(range(4, 9))
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq) == (epoch, 8)
    record(store, "lobby", 1)
    assert not store.move().ok  # told: not stored
    store.close()
    prepare_data_dir(data_dir)
    assert [e[0] for e in SqliteStore(data_dir).load("lobby").entries] == list(range(1, 10))


def test_a_journal_holding_only_a_torn_record_is_cut_at_the_start(
    data_dir: Path, clock: Clock
) -> None:
    store = journaled(data_dir, clock)
    record(store, "lobby", 3)
    assert store.move().ok
    store.close(move=False)
    journal_path(data_dir, 0).write_bytes(encode([("lobby", 1, entry(4))])[:-3])  # torn
    store = journaled(data_dir, clock)
    assert journal_path(data_dir, 0).stat().st_size == 0
    record(store, "lobby", 3)
    assert store.commit().ok
    store.close(move=False)  # a second crash: the new records must be readable
    store = journaled(data_dir, clock)
    assert seqs(store, "lobby") == [1, 2, 3, 4, 5, 6]
    store.close()


def test_a_file_system_without_locks_still_gets_a_journal(
    data_dir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.name != "posix":
        pytest.skip("journals are locked with flock (POSIX)")
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    store = journaled(data_dir, clock)
    assert store._file is not None and store._whole
    record(store, "lobby", 2)
    assert store.commit().ok
    assert decode(journal_path(data_dir, 0).read_bytes())[0]
    store.close()
