"""The history store (shard/storage.py, shard/slot_files.py) on real SQLite files.

Every test works in its own ``tmp_path``. The disk-full and read-only cases mount a tiny
tmpfs (Linux, as root); elsewhere they are skipped, and the permission case runs with
``chmod`` instead (root ignores permissions, so that one is skipped as root).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import pytest

from common.hashing import room_to_shard, room_to_slot
from common.limits import (
    HISTORY_SIZE,
    RETENTION_STEP,
    STORAGE_MIN_FREE_BYTES,
    STORAGE_RETRY_SECONDS,
    STORAGE_SLOTS,
)
from common.messages import KIND_CHAT, KIND_JOIN, Entry
from shard.slot_files import (
    APPLICATION_ID,
    CANNOT_CREATE,
    CORRUPTED,
    IN_USE,
    MAX_ROOM_ID,
    NEWER_SCHEMA,
    NO_SPACE,
    NOT_A_DATABASE,
    NOT_A_DIRECTORY,
    NOT_OURS,
    NOT_WRITABLE,
    SCHEMA_VERSION,
    SEQ_MASK,
    WRONG_SLOT,
    StorageError,
    check_data_dir,
    slot_file_name,
)
from shard.storage import (
    EpochSource,
    MemoryStore,
    SqliteStore,
    StoredRoom,
)
from tests.cluster import ROOT

pytestmark = pytest.mark.timeout(120)

MOVE_AWAY = "move it away to start with empty history for its rooms, or restore it from a backup"


# --- helpers ---------------------------------------------------------------------------


def entry(seq: int, text: str = "", kind: str = KIND_CHAT, user: str = "alice") -> Entry:
    return (seq, 1_700_000_000.0 + seq / 1000, kind, user, text or f"message {seq}")


def record(store: SqliteStore, room: str, count: int, text: str = "") -> StoredRoom:
    """Stage *count* entries continuing *room*'s history (as the shard core would)."""
    stored = store.load(room)
    for seq in range(stored.seq + 1, stored.seq + count + 1):
        store.append(room, stored.epoch, entry(seq, text))
    return stored


def slot_path(data_dir: Path, room: str) -> Path:
    return data_dir / slot_file_name(room_to_slot(room))


def rows_on_disk(data_dir: Path, room: str) -> List[int]:
    """The seqs stored for *room*, read with a plain connection (the store must be
    closed: it holds the file's lock while open)."""
    conn = sqlite3.connect(str(slot_path(data_dir, room)))
    try:
        return [
            seq
            for (seq,) in conn.execute(
                "SELECT seq FROM history WHERE room = ? ORDER BY seq", (room,)
            )
        ]
    finally:
        conn.close()


def stores_for(data_dir: Path, count: int) -> List[SqliteStore]:
    return [SqliteStore(data_dir, index, count) for index in range(count)]


def close_all(stores: Sequence[SqliteStore]) -> None:
    for store in stores:
        store.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "shardchat-data"
    check_data_dir(path)
    return path


@pytest.fixture
def store(data_dir: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(data_dir)
    yield store
    store.close()


def _mount_tmpfs(target: Path, options: str) -> None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs Linux and root")
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount tmpfs file systems (``mount(options)`` -> mount point); unmounted at the end."""
    mounted: List[Path] = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        _mount_tmpfs(target, options)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill *directory*'s device with one file until about *leave* bytes are free."""
    filler = directory / "filler"
    with open(filler, "wb") as file:
        try:
            while True:
                free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
                if free <= leave:
                    break
                file.write(b"\0" * min(65536, free - leave))
                file.flush()
        except OSError:
            pass  # the device is full
    return filler


# --- round trips -----------------------------------------------------------------------


def test_a_new_room_is_empty_with_a_new_epoch(store: SqliteStore) -> None:
    first = store.load("lobby")
    again = store.load("lobby")
    assert (first.name, first.seq, first.entries, first.problem) == ("lobby", 0, (), None)
    assert again.epoch > first.epoch  # nothing was recorded: each load is a new history


def test_round_trip(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    stored = store.load("lobby")
    entries = [
        (1, 1700000000.123, KIND_JOIN, "zoë", "zoë joined lobby"),
        (2, 1700000001.5, KIND_CHAT, "zoë", "héllo 日本 " + "x" * 1990),
        (3, 1700000002.0, KIND_CHAT, "zoë", "tab\there"),
    ]
    for item in entries:
        store.append("lobby", stored.epoch, item)
    assert store.commit().ok
    store.close()
    reopened = SqliteStore(data_dir)
    assert reopened.load("lobby") == StoredRoom("lobby", stored.epoch, 3, tuple(entries))
    reopened.close()


def test_seq_and_epoch_continue_after_reopen(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    first = record(store, "lobby", 5)
    store.commit()
    store.close()
    store = SqliteStore(data_dir)
    second = record(store, "lobby", 3)
    assert (second.epoch, second.seq) == (first.epoch, 5)
    store.commit()
    store.close()
    store = SqliteStore(data_dir)
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq) == (first.epoch, 8)
    assert [item[0] for item in loaded.entries] == list(range(1, 9))
    store.close()


def test_load_includes_what_is_staged(store: SqliteStore) -> None:
    record(store, "lobby", 3)
    store.commit()
    record(store, "lobby", 2)  # not committed yet: a room evicted and revived in one batch
    assert [item[0] for item in store.load("lobby").entries] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("per_commit", [600, 100, 1], ids=["one-commit", "six-commits", "600"])
def test_retention_keeps_the_last_500(data_dir: Path, per_commit: int) -> None:
    store = SqliteStore(data_dir)
    for _ in range(600 // per_commit):
        record(store, "lobby", per_commit)
        assert store.commit().ok
    loaded = store.load("lobby")
    assert loaded.seq == 600
    assert [item[0] for item in loaded.entries] == list(range(101, 601))
    store.close()
    rows = rows_on_disk(data_dir, "lobby")  # older ones deleted, not just hidden
    assert rows[-500:] == list(range(101, 601)) and rows == list(range(rows[0], 601))
    assert len(rows) <= HISTORY_SIZE + RETENTION_STEP


def test_retention_bounds_the_rows_of_a_room_however_long_it_runs(data_dir: Path) -> None:
    most = 0
    for _ in range(15):  # the file is locked while a store has it open: look between runs
        store = SqliteStore(data_dir)
        for _ in range(97):
            record(store, "lobby", 1)
            assert store.commit().ok
        store.close()
        rows = rows_on_disk(data_dir, "lobby")
        assert rows == list(range(rows[0], rows[-1] + 1))
        most = max(most, len(rows))
    assert rows[-1] == 15 * 97 and most <= HISTORY_SIZE + RETENTION_STEP
    assert len(rows) >= HISTORY_SIZE


def test_many_rooms_in_many_slots(data_dir: Path) -> None:
    rooms = [f"room-{i}" for i in range(300)]
    store = SqliteStore(data_dir)
    for number, room in enumerate(rooms):
        record(store, room, number % 7 + 1, text=f"in {room}")
    assert store.commit().ok
    store.close()
    slots = {room_to_slot(room) for room in rooms}
    assert len(slots) > 150
    assert sorted(os.listdir(data_dir)) == sorted(slot_file_name(slot) for slot in slots)
    store = SqliteStore(data_dir)
    for number, room in enumerate(rooms):
        loaded = store.load(room)
        assert loaded.seq == number % 7 + 1
        assert {item[4] for item in loaded.entries} == {f"in {room}"}
    store.close()


@pytest.mark.parametrize("then", [1, 3, 64], ids=lambda n: f"then-{n}-shards")
def test_another_shard_count_finds_every_room(data_dir: Path, then: int) -> None:
    rooms = [f"room-{i}" for i in range(200)]
    stores = stores_for(data_dir, 2)
    epochs = {}
    for room in rooms:
        epochs[room] = record(stores[room_to_shard(room, 2)], room, 4).epoch
    assert all(store.commit().ok for store in stores)
    close_all(stores)
    stores = stores_for(data_dir, then)
    for room in rooms:
        loaded = stores[room_to_shard(room, then)].load(room)
        assert (loaded.epoch, loaded.seq, len(loaded.entries)) == (epochs[room], 4, 4)
    close_all(stores)


def test_a_room_of_another_shard_is_refused(data_dir: Path) -> None:
    room = next(f"r{i}" for i in range(100) if room_to_shard(f"r{i}", 2) == 1)
    store = SqliteStore(data_dir, 0, 2)
    with pytest.raises(ValueError, match="not one of this shard's"):
        store.load(room)
    with pytest.raises(ValueError, match="not one of this shard's"):
        store.append(room, 1, entry(1))
    store.close()


def test_one_transaction_per_touched_slot_file(store: SqliteStore) -> None:
    rooms = ["room-1", "room-2", "room-3", "room-4", "room-5", "room-6"]
    slots = {room_to_slot(room) for room in rooms}
    for room in rooms:
        record(store, room, 1)
    store.commit()  # creates and opens the files
    statements: List[str] = []
    for conn in store._files.values():  # the open slot files (test-only access)
        assert isinstance(conn, sqlite3.Connection)
        conn.set_trace_callback(statements.append)
    for room in rooms:
        record(store, room, 50)
    assert store.commit().ok
    assert statements.count("COMMIT") == len(slots)
    assert store.commit().ok  # nothing staged: no transaction at all
    assert statements.count("COMMIT") == len(slots)


def test_forget_deletes_the_stored_history(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    first = record(store, "lobby", 10)
    record(store, "dev", 2)
    store.commit()
    store.forget("lobby")
    assert store.load("lobby").seq == 0  # staged: load already agrees
    store.commit()
    store.close()
    assert rows_on_disk(data_dir, "lobby") == []
    store = SqliteStore(data_dir)
    loaded = store.load("lobby")
    assert (loaded.seq, loaded.entries) == (0, ())
    assert loaded.epoch != first.epoch
    assert store.load("dev").seq == 2
    store.close()


def test_another_epoch_replaces_the_stored_history(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    record(store, "lobby", 10)
    store.commit()
    epoch = store.new_epoch("lobby")
    store.append("lobby", epoch, entry(1, "again"))
    store.commit()
    store.close()
    store = SqliteStore(data_dir)
    assert store.load("lobby") == StoredRoom("lobby", epoch, 1, (entry(1, "again"),))
    store.close()
    assert rows_on_disk(data_dir, "lobby") == [1]


def test_a_gap_in_staged_entries_starts_the_stored_history_after_it(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    stored = record(store, "lobby", 10)
    store.commit()
    store.append("lobby", stored.epoch, entry(15))  # 11..14 never reached the store
    store.commit()
    store.close()
    store = SqliteStore(data_dir)
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq, loaded.entries) == (stored.epoch, 15, (entry(15),))
    store.close()


def test_a_hole_on_disk_is_served_as_the_tail_after_it(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    record(store, "lobby", 10)
    store.commit()
    store.close()
    conn = sqlite3.connect(str(slot_path(data_dir, "lobby")))
    conn.execute(f"DELETE FROM entries WHERE key & {SEQ_MASK} = 6")
    conn.commit()
    conn.close()
    store = SqliteStore(data_dir)
    assert [item[0] for item in store.load("lobby").entries] == [7, 8, 9, 10]
    store.close()


def test_memory_store_keeps_nothing() -> None:
    store = MemoryStore()
    first = store.load("lobby")
    store.append("lobby", first.epoch, entry(1))
    assert store.commit().ok
    again = store.load("lobby")
    assert (again.seq, again.entries) == (0, ())
    assert again.epoch > first.epoch
    assert store.new_epoch("lobby") > again.epoch
    store.close()


def test_epochs_increase_even_when_the_clock_does_not() -> None:
    times = iter([1000.0, 1000.0, 999.0, 1000.0005, 2000.0])
    epochs = EpochSource(lambda: next(times))
    assert [epochs.next() for _ in range(5)] == [
        1_000_000,
        1_000_001,
        1_000_002,
        1_000_003,
        2_000_000,
    ]


def _stopped_clock() -> float:
    return 1000.0  # every epoch from the clock would be 1_000_000


@pytest.mark.parametrize("how", ["stored", "forgotten", "new_epoch"])
def test_a_room_never_gets_an_old_epoch_back(data_dir: Path, how: str) -> None:
    store = SqliteStore(data_dir, clock=_stopped_clock)
    record(store, "lobby", 3)
    record(store, "dev", 1)  # same slot file or not, its epoch is 1_000_001
    assert store.commit().ok
    if how == "forgotten":
        store.forget("lobby")
        assert store.commit().ok
    store.close()
    # A restart in the same millisecond (or with the clock set back).
    store = SqliteStore(data_dir, clock=_stopped_clock)
    if how == "new_epoch":
        epoch = store.new_epoch("lobby")
    else:
        if how == "stored":
            store.forget("lobby")  # staged only: the load sees an empty room
        epoch = store.load("lobby").epoch
    assert epoch > 1_000_000
    store.close()


# --- crashes ---------------------------------------------------------------------------


def test_close_without_commit_loses_only_that_batch(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    stored = record(store, "lobby", 20)
    store.commit()
    record(store, "lobby", 5)  # the batch being applied when the shard died
    store.close()
    store = SqliteStore(data_dir)
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq) == (stored.epoch, 20)
    store.close()


_WRITER = """
import sys
from shard.storage import SqliteStore
data_dir, batch, stop_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = SqliteStore(data_dir)
rooms = ["lobby", "dev", "zoë"]
epochs = {room: store.load(room).epoch for room in rooms}
for number in range(1, 1_000_000):
    for room in rooms:
        for seq in range(number * batch - batch + 1, number * batch + 1):
            store.append(room, epochs[room], (seq, 0.0, "chat", "a", "x" * 100))
    if number == stop_after:
        print("staged", number, flush=True)
        sys.stdin.read()  # wait to be killed with the batch staged, not committed
    assert store.commit().ok
    print("committed", number, flush=True)
"""


def _start_writer(data_dir: Path, batch: int, stop_after: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(data_dir), str(batch), str(stop_after)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )


def _kill(process: subprocess.Popen) -> List[List[str]]:
    """Kill the writer at once; return the lines it wrote that were not read yet."""
    process.send_signal(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
    process.wait(timeout=30)
    assert process.stdout is not None and process.stdin is not None
    # The last piece is cut off mid-line if the kill came while it was being written.
    rest = [line.split() for line in process.stdout.read().split("\n")[:-1]]
    process.stdout.close()
    process.stdin.close()
    return rest


def _stored_seqs(data_dir: Path) -> List[int]:
    store = SqliteStore(data_dir)
    try:
        return [store.load(room).seq for room in ("lobby", "dev", "zoë")]
    finally:
        store.close()


def test_a_killed_writer_loses_only_the_batch_it_had_not_committed(data_dir: Path) -> None:
    writer = _start_writer(data_dir, batch=10, stop_after=7)
    assert writer.stdout is not None
    lines = [writer.stdout.readline().split() for _ in range(7)]
    assert lines[-1] == ["staged", "7"]
    _kill(writer)
    assert _stored_seqs(data_dir) == [60, 60, 60]  # batches 1-6 of 10 entries each


def test_a_writer_killed_mid_flood_keeps_every_batch_it_reported(data_dir: Path) -> None:
    writer = _start_writer(data_dir, batch=7, stop_after=0)
    assert writer.stdout is not None
    while int(writer.stdout.readline().split()[1]) < 300:
        pass
    rest = _kill(writer)  # most likely in the middle of a commit
    reported = int(rest[-1][1]) if rest else 300
    seqs = _stored_seqs(data_dir)
    # Every reported commit is stored, and at most the one in flight more; each batch is
    # whole per slot file (the three rooms are in three files: each is one transaction).
    assert all(seq in (reported * 7, (reported + 1) * 7) for seq in seqs), (reported, seqs)


# --- bad storage at start: one line each -----------------------------------------------


def test_a_missing_data_dir_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "shardchat-data"
    check_data_dir(path)
    assert path.is_dir()
    assert os.listdir(path) == []  # the probe is gone, no slot file is made up front


def test_a_file_in_place_of_the_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "shardchat-data"
    path.write_text("not a directory")
    with pytest.raises(StorageError) as caught:
        check_data_dir(path)
    assert (
        str(caught.value) == f"{path} is not a directory: move it away, or pass another --data-dir"
    )
    assert caught.value.code == NOT_A_DIRECTORY


def test_a_file_in_the_way_of_creating_the_data_dir(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("in the way")
    path = tmp_path / "a" / "shardchat-data"
    with pytest.raises(StorageError) as caught:
        check_data_dir(path)
    assert str(caught.value).startswith(f"{path} cannot be created")
    assert caught.value.code == CANNOT_CREATE


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX, not root")
def test_an_unwritable_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "shardchat-data"
    path.mkdir()
    path.chmod(0o500)
    try:
        with pytest.raises(StorageError) as caught:
            check_data_dir(path)
    finally:
        path.chmod(0o700)
    assert str(caught.value) == (
        f"{path} is not writable (Permission denied): fix its permissions, or pass another"
        " --data-dir"
    )
    assert caught.value.code == NOT_WRITABLE


def test_a_read_only_data_dir(tmpfs: Callable[[str], Path]) -> None:
    path = tmpfs("ro,size=1m")
    with pytest.raises(StorageError) as caught:
        check_data_dir(path)
    assert str(caught.value) == (
        f"{path} is not writable (Read-only file system): fix its permissions, or pass"
        " another --data-dir"
    )
    assert caught.value.code == NOT_WRITABLE


def test_a_full_data_dir(tmpfs: Callable[[str], Path]) -> None:
    path = tmpfs("size=1m")
    fill(path, leave=0)
    with pytest.raises(StorageError) as caught:
        check_data_dir(path)
    assert str(caught.value) == (
        f"{path}: no space left on its device: free some space, or pass another --data-dir"
    )
    assert caught.value.code == NO_SPACE


def test_a_nearly_full_data_dir(tmpfs: Callable[[str], Path]) -> None:
    path = tmpfs("size=4m")
    check_data_dir(path)  # 4 MiB free is enough
    fill(path, leave=STORAGE_MIN_FREE_BYTES // 2)
    with pytest.raises(StorageError) as caught:
        check_data_dir(path)
    assert str(caught.value).startswith(f"{path}: only ")
    assert str(caught.value).endswith(
        f" KiB free on its device (at least {STORAGE_MIN_FREE_BYTES // 1024} KiB needed): free"
        " some space, or pass another --data-dir"
    )
    assert caught.value.code == NO_SPACE


def _write_rooms(data_dir: Path, rooms: Sequence[str]) -> None:
    store = SqliteStore(data_dir)
    for room in rooms:
        record(store, room, 30, text="y" * 300)
    assert store.commit().ok
    store.close()


def test_a_slot_file_that_is_not_a_database(data_dir: Path) -> None:
    path = data_dir / slot_file_name(7)
    path.write_bytes(b"this is not SQLite\n" * 100)
    with pytest.raises(StorageError) as caught:
        check_data_dir(data_dir)
    assert str(caught.value) == f"{path} is not a SQLite database (corrupted?): {MOVE_AWAY}"
    assert caught.value.code == NOT_A_DATABASE


def test_a_slot_file_corrupted_inside(data_dir: Path) -> None:
    _write_rooms(data_dir, ["lobby"])
    path = slot_path(data_dir, "lobby")
    data = bytearray(path.read_bytes())
    data[3 * 4096 : 3 * 4096 + 8] = b"\xff" * 8  # a b-tree page header
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError) as caught:
        check_data_dir(data_dir)
    message = str(caught.value)
    assert message.startswith(f"{path} is corrupted (")
    assert message.endswith(f"): {MOVE_AWAY}")
    assert "\n" not in message
    assert caught.value.code == CORRUPTED


def test_a_slot_file_of_a_newer_schema(data_dir: Path) -> None:
    _write_rooms(data_dir, ["lobby"])
    path = slot_path(data_dir, "lobby")
    conn = sqlite3.connect(str(path))
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError) as caught:
        check_data_dir(data_dir)
    assert str(caught.value) == (
        f"{path} has history schema version {SCHEMA_VERSION + 1}, newer than this shardchat"
        f" understands ({SCHEMA_VERSION}): run the newer shardchat, or pass another --data-dir"
    )
    assert caught.value.code == NEWER_SCHEMA


def test_another_sqlite_database_in_the_data_dir(data_dir: Path) -> None:
    path = data_dir / slot_file_name(3)
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    with pytest.raises(StorageError) as caught:
        check_data_dir(data_dir)
    assert str(caught.value) == (
        f"{path} is a SQLite database but not a shardchat history file: move it out of {data_dir}"
    )
    assert caught.value.code == NOT_OURS


def test_a_renamed_slot_file(data_dir: Path) -> None:
    _write_rooms(data_dir, ["lobby"])
    source = slot_path(data_dir, "lobby")
    target = data_dir / slot_file_name(room_to_slot("lobby") + 1)
    source.rename(target)
    with pytest.raises(StorageError) as caught:
        check_data_dir(data_dir)
    assert str(caught.value) == (
        f"{target} holds storage slot {room_to_slot('lobby')} of {STORAGE_SLOTS}, not slot"
        f" {room_to_slot('lobby') + 1} of {STORAGE_SLOTS} (renamed, or from another layout):"
        f" {MOVE_AWAY}"
    )
    assert caught.value.code == WRONG_SLOT


def test_a_slot_file_beyond_the_layout(data_dir: Path) -> None:
    path = data_dir / slot_file_name(STORAGE_SLOTS)
    path.write_bytes(b"")
    with pytest.raises(StorageError) as caught:
        check_data_dir(data_dir)
    assert str(caught.value) == (
        f"{path} is beyond the {STORAGE_SLOTS} storage slots of this version (from another"
        f" layout?): {MOVE_AWAY}"
    )
    assert caught.value.code == WRONG_SLOT


def test_a_slot_file_in_use_by_another_process(data_dir: Path) -> None:
    _write_rooms(data_dir, ["lobby"])
    holder = SqliteStore(data_dir)
    holder.load("lobby")  # opens (and locks) the file, as a running shard does
    try:
        with pytest.raises(StorageError) as caught:
            check_data_dir(data_dir)
    finally:
        holder.close()
    assert str(caught.value) == (
        f"{slot_path(data_dir, 'lobby')} is in use by another process (another shardchat on"
        " the same data directory?): stop it, or pass another --data-dir"
    )
    assert caught.value.code == IN_USE
    check_data_dir(data_dir)  # released with the close


def test_the_check_stops_at_the_first_file_in_use(data_dir: Path) -> None:
    rooms = ["lobby", "dev", "zoë"]
    assert len({room_to_slot(room) for room in rooms}) == 3
    _write_rooms(data_dir, rooms)
    holder = SqliteStore(data_dir)
    for room in rooms:
        holder.load(room)
    try:
        with pytest.raises(StorageError) as caught:
            check_data_dir(data_dir)
    finally:
        holder.close()
    # Another cluster holds them all; one wait for one file is enough to say so.
    assert caught.value.code == IN_USE
    assert len(caught.value.problems) == 1


def test_several_bad_files_are_counted_in_the_one_line(data_dir: Path) -> None:
    for slot in (1, 2, 3):
        (data_dir / slot_file_name(slot)).write_bytes(b"garbage" * 10)
    with pytest.raises(StorageError) as caught:
        check_data_dir(data_dir)
    first = f"{data_dir / slot_file_name(1)} is not a SQLite database (corrupted?): {MOVE_AWAY}"
    assert str(caught.value) == f"{first} (2 more slot files in {data_dir} have problems too)"
    assert len(caught.value.problems) == 3
    assert caught.value.code == NOT_A_DATABASE


def test_good_files_and_other_files_pass_the_check(data_dir: Path) -> None:
    _write_rooms(data_dir, [f"room-{i}" for i in range(20)])
    (data_dir / "README.txt").write_text("backups are elsewhere")
    (data_dir / (slot_file_name(9) + ".new")).write_bytes(b"a creation that failed")
    check_data_dir(data_dir)


def test_the_files_are_ours_and_in_wal_mode(data_dir: Path) -> None:
    _write_rooms(data_dir, ["lobby"])
    conn = sqlite3.connect(str(slot_path(data_dir, "lobby")))
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


# --- bad storage at run time: reported, never raised -----------------------------------


def test_a_corrupted_file_at_run_time_is_left_alone(data_dir: Path) -> None:
    path = data_dir / slot_file_name(room_to_slot("lobby"))
    garbage = b"garbage" * 100
    path.write_bytes(garbage)
    store = SqliteStore(data_dir)
    loaded = store.load("lobby")
    assert (loaded.seq, loaded.entries) == (0, ())
    assert loaded.problem == f"{path} is not a SQLite database (corrupted?): {MOVE_AWAY}"
    store.append("lobby", loaded.epoch, entry(1))
    report = store.commit()
    assert report.failed == {"lobby": loaded.problem}
    assert report.dropped == {"lobby"}
    assert store.unstored_entries() == 0  # given up: they would only pile up
    store.close()
    assert path.read_bytes() == garbage  # never written over


def test_a_file_that_became_unreadable_keeps_the_other_slots_going(data_dir: Path) -> None:
    rooms = ["lobby", "dev"]
    assert room_to_slot("lobby") != room_to_slot("dev")
    _write_rooms(data_dir, rooms)
    slot_path(data_dir, "lobby").write_bytes(b"garbage" * 100)
    store = SqliteStore(data_dir)
    assert store.load("lobby").problem
    dev = record(store, "dev", 5)
    assert dev.seq == 30 and dev.problem is None
    assert store.commit().ok
    store.close()


def test_disk_full_at_run_time_is_reported_and_retried(tmpfs: Callable[[str], Path]) -> None:
    data_dir = tmpfs("size=2m")
    check_data_dir(data_dir)
    now = [0.0]
    store = SqliteStore(data_dir, monotonic=lambda: now[0])
    record(store, "lobby", 10)
    assert store.commit().ok
    filler = fill(data_dir, leave=0)
    stored = record(store, "lobby", 200, text="z" * 2000)  # ~400 KB: cannot fit
    report = store.commit()  # must not raise
    assert set(report.failed) == {"lobby"}
    assert report.failed["lobby"] == (
        f"{slot_path(data_dir, 'lobby')}: no space left on its device: free some space, or"
        " pass another --data-dir"
    )
    assert not report.dropped  # kept for a retry
    assert store.load("lobby").seq == 210  # and still served
    record(store, "lobby", 5)
    assert set(store.commit().failed) == {"lobby"}  # still waiting
    assert not store.retry_due()
    filler.unlink()
    assert set(store.commit().failed) == {"lobby"}  # not retried before STORAGE_RETRY_SECONDS
    now[0] = STORAGE_RETRY_SECONDS
    assert store.retry_due()  # the shard's idle loop would commit now
    report = store.commit()
    assert report.ok and report.recovered == {"lobby"} and not store.retry_due()
    store.close()
    store = SqliteStore(data_dir)
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq) == (stored.epoch, 215)
    assert [item[0] for item in loaded.entries] == list(range(1, 216))
    store.close()


def test_a_new_slot_file_on_a_full_disk_is_created_later(tmpfs: Callable[[str], Path]) -> None:
    data_dir = tmpfs("size=1m")
    check_data_dir(data_dir)
    filler = fill(data_dir, leave=0)
    store = SqliteStore(data_dir, retry_seconds=0)
    stored = record(store, "lobby", 3)
    report = store.commit()
    assert set(report.failed) == {"lobby"} and not report.dropped
    assert not slot_path(data_dir, "lobby").exists()  # no half-made file left behind
    filler.unlink()
    assert store.commit().ok
    store.close()
    store = SqliteStore(data_dir)
    assert (store.load("lobby").epoch, store.load("lobby").seq) == (stored.epoch, 3)
    store.close()


def _limit_pages(store: SqliteStore, room: str) -> None:
    """Make *room*'s open slot file "full" at its current size (SQLite's own page cap:
    a disk-full that works on every platform)."""
    conn = store._files[room_to_slot(room)]  # test-only access to the open file
    assert isinstance(conn, sqlite3.Connection)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")


def test_unstored_entries_are_bounded(data_dir: Path) -> None:
    store = SqliteStore(data_dir, max_unstored=100)
    rooms = ["lobby", "dev"]
    for room in rooms:
        record(store, room, 1)
    assert store.commit().ok
    for room in rooms:
        _limit_pages(store, room)
    lobby = record(store, "lobby", 80, text="w" * 1000)
    report = store.commit()
    assert set(report.failed) == {"lobby"} and not report.dropped
    record(store, "dev", 80, text="w" * 1000)
    report = store.commit()
    assert set(report.failed) == {"lobby", "dev"}
    assert report.dropped == {"lobby"}  # waited longest: its older entries are given up
    assert store.unstored_entries() == 81  # lobby's last entry and dev's 80
    assert store.load("lobby").seq == 81  # the room's seq still moves past what was seen
    store.close()
    store = SqliteStore(data_dir)
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq) == (lobby.epoch, 1)  # nothing of it was stored
    store.close()


def test_after_a_shed_the_stored_history_restarts_after_the_gap(data_dir: Path) -> None:
    store = SqliteStore(data_dir, max_unstored=10, retry_seconds=0)
    lobby = record(store, "lobby", 5)
    assert store.commit().ok
    _limit_pages(store, "lobby")
    record(store, "lobby", 50, text="v" * 1000)
    report = store.commit()
    assert report.dropped == {"lobby"}
    conn = store._files[room_to_slot("lobby")]
    assert isinstance(conn, sqlite3.Connection)
    conn.execute("PRAGMA max_page_count=1000000")  # space again
    assert store.commit().ok
    store.close()
    store = SqliteStore(data_dir)
    loaded = store.load("lobby")
    assert (loaded.epoch, loaded.seq) == (lobby.epoch, 55)
    assert [item[0] for item in loaded.entries] == [55]  # 1-54 are not served as if whole
    store.close()


def test_history_size_is_the_retention(store: SqliteStore) -> None:
    assert HISTORY_SIZE == 500  # the number the docs and the issue promise
    record(store, "lobby", HISTORY_SIZE + 1)
    assert len(store.load("lobby").entries) == HISTORY_SIZE


def test_seqs_must_fit_the_key(store: SqliteStore) -> None:
    epoch = store.load("lobby").epoch
    for seq in (0, -1, SEQ_MASK + 1):
        with pytest.raises(ValueError, match="outside 1.."):
            store.append("lobby", epoch, entry(seq))
    store.append("lobby", epoch, entry(SEQ_MASK))  # the largest one fits
    assert store.commit().ok
    assert store.load("lobby").seq == SEQ_MASK


def test_a_slot_file_with_no_room_numbers_left(data_dir: Path) -> None:
    _write_rooms(data_dir, ["lobby"])
    conn = sqlite3.connect(str(slot_path(data_dir, "lobby")))
    conn.execute("INSERT INTO rooms (id, name, epoch) VALUES (?, 'last', 1)", (MAX_ROOM_ID,))
    conn.commit()
    conn.close()
    newcomer = next(
        f"r{i}" for i in range(10_000) if room_to_slot(f"r{i}") == room_to_slot("lobby")
    )
    store = SqliteStore(data_dir)
    record(store, newcomer, 1)
    report = store.commit()  # refused, not raised, and not stored with a wrapped-around key
    assert set(report.failed) == {newcomer}
    assert "no more fit" in report.failed[newcomer]
    assert store.load("lobby").seq == 30
    store.close()
