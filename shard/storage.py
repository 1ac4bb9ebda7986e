"""Room history that survives: a store the shard writes behind its in-memory rooms.

Layout: ``STORAGE_SLOTS`` fixed virtual slots. A room hashes to one slot
(:func:`common.hashing.room_to_slot`), each slot is one SQLite file
``DATA_DIR/slot-NNN.sqlite3`` and shard ``index`` of ``count`` owns the whole slots
:func:`common.hashing.shard_slots` gives it, so it is the only process that opens them
(each file is locked while open: SQLite's exclusive locking mode, which in WAL mode also
keeps the WAL index in the process's memory instead of a ``-shm`` file).

The shard serves from memory; the store is written *behind* it: the shard stages each new
entry (:meth:`SqliteStore.append`) and commits once per batch it applied
(:meth:`SqliteStore.commit`): one transaction per slot file the batch touched, never one
per message. The store is read only when a room comes back into memory
(:meth:`SqliteStore.load`). Nothing here runs on the router's event loop: only shard
processes (and the start check, before any shard serves) open slot files.

A commit that fails (disk full, I/O error) never raises: its report names the rooms whose
entries are not stored, the entries are kept (bounded) and written by a later commit.
A slot file that cannot be opened or read at run time is left alone for the rest of the
process (never written over history it could not read); its rooms are served from memory
as new rooms and every commit reports them. :func:`shard.slot_files.check_data_dir`
answers a bad data directory or slot file with one line for the operator before the
cluster starts; the files themselves (creation, schema, locking) are in
:mod:`shard.slot_files`.

:class:`MemoryStore` keeps nothing (``--in-memory``: history dies with the shard).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Callable,
    Deque,
    Dict,
    FrozenSet,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from common.hashing import room_to_slot, shard_slots
from common.limits import (
    HISTORY_SIZE,
    MAX_UNSTORED_ENTRIES,
    RETENTION_STEP,
    STORAGE_RETRY_SECONDS,
    STORAGE_ROOM_CACHE,
    STORAGE_SEQ_BITS,
    STORAGE_SLOTS,
)
from common.messages import Entry
from shard.slot_files import (
    MAX_ROOM_ID,
    SEQ_MASK,
    StorageError,
    create_slot_file,
    error_name,
    highest_epoch,
    open_slot_file,
    os_problem,
    remember_epoch,
    slot_file_name,
    sqlite_problem,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredRoom:
    """A room's history as the store has it.

    ``epoch`` names this history: chosen when it was created, it changes only when history
    was lost. ``seq`` is the room's last sequence number (0: nothing recorded yet) and
    ``entries`` its last ``HISTORY_SIZE`` entries, oldest first, consecutive, the last one
    numbered ``seq``. ``problem`` is set when the stored history could not be read: the
    room then has only what this process staged for it, or else a new, empty history (new
    epoch), and the store will not write it.
    """

    name: str
    epoch: int
    seq: int
    entries: Tuple[Entry, ...] = ()
    problem: Optional[str] = None


@dataclass(frozen=True)
class CommitReport:
    """What one :meth:`HistoryStore.commit` did not manage.

    ``failed``: room -> one-line reason, for every room whose entries (of this batch or an
    earlier one) are not on disk after this commit. ``dropped`` (a subset): rooms whose
    unstored entries were given up in this commit (their slot file is unusable, or more than
    ``MAX_UNSTORED_ENTRIES`` waited); the others are retried by the next commit.
    ``recovered``: rooms whose earlier unstored entries are all on disk now.
    """

    failed: Mapping[str, str] = field(default_factory=dict)
    dropped: FrozenSet[str] = frozenset()
    recovered: FrozenSet[str] = frozenset()

    @property
    def ok(self) -> bool:
        """True when everything staged so far is on disk."""
        return not self.failed


NOTHING_FAILED = CommitReport()

Clock = Callable[[], float]


class EpochSource:
    """Hands out epochs: milliseconds since the Unix epoch, strictly increasing within the
    process, so a room's history that is lost and started again never gets its old epoch
    back (and stays a safe integer for JavaScript until the year 287,000)."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._last = 0

    def next(self) -> int:
        """A new epoch, greater than every earlier one from this source."""
        self._last = max(int(self._clock() * 1000), self._last + 1)
        return self._last

    def exceed(self, epoch: int) -> None:
        """Make every later epoch greater than *epoch* (one found on disk: a clock set back,
        or a restart within the same millisecond, must not hand it out again)."""
        self._last = max(self._last, epoch)


class HistoryStore(Protocol):
    """What a shard needs from its history store; one owner (the shard loop), not
    thread-safe."""

    def load(self, room: str) -> StoredRoom:
        """*room*'s stored history, staged entries included; a room with none comes back
        empty with a new epoch. Never raises for I/O (see ``StoredRoom.problem``)."""
        ...

    def new_epoch(self, room: str) -> int:
        """An epoch *room* never had (to start its history anew). Never raises for I/O."""
        ...

    def append(self, room: str, epoch: int, entry: Entry) -> None:
        """Stage *entry* (the next of *room*'s history *epoch*) for the next commit."""
        ...

    def record(self, item: Tuple[str, int, Entry]) -> None:
        """``append(*item)``: what the shard calls for every entry (a store may make it a
        bound ``list.append``, so that recording an entry runs no Python code)."""
        ...

    def forget(self, room: str) -> None:
        """Stage the deletion of *room*'s stored history."""
        ...

    def commit(self) -> CommitReport:
        """Store everything staged: one transaction per touched slot file. Never raises
        for I/O."""
        ...

    def retry_due(self) -> bool:
        """True if entries wait whose retry is due (commit them while idle)."""
        ...

    def close(self) -> None:
        """Close the files; whatever is staged and not committed is dropped (as in a
        crash)."""
        ...


class MemoryStore:
    """``--in-memory``: nothing is stored, every load is a new, empty history.

    With *epoch*, every history this store starts is named *epoch* (one per shard
    incarnation: what an in-memory shard has always done); without, each gets a new one."""

    def __init__(self, clock: Clock = time.time, epoch: Optional[int] = None) -> None:
        self._epochs = EpochSource(clock)
        self._epoch = epoch

    def load(self, room: str) -> StoredRoom:
        """A new, empty history for *room*."""
        return StoredRoom(room, self._epochs.next() if self._epoch is None else self._epoch, 0)

    def new_epoch(self, room: str) -> int:
        """A new epoch."""
        return self._epochs.next()

    def append(self, room: str, epoch: int, entry: Entry) -> None:
        """Nothing to stage."""

    def record(self, item: Tuple[str, int, Entry]) -> None:
        """Nothing to stage."""

    def forget(self, room: str) -> None:
        """Nothing to forget."""

    def commit(self) -> CommitReport:
        """Nothing ever fails."""
        return NOTHING_FAILED

    def retry_due(self) -> bool:
        """Nothing ever waits."""
        return False

    def close(self) -> None:
        """Nothing to close."""


def _read_room(conn: sqlite3.Connection, room: str) -> Optional[StoredRoom]:
    """*room*'s stored history, or None if the file has none."""
    row = conn.execute("SELECT id, epoch FROM rooms WHERE name = ?", (room,)).fetchone()
    if row is None:
        return None
    room_id, epoch = row
    low = room_id << STORAGE_SEQ_BITS
    newest_first = conn.execute(
        "SELECT key - ?, ts, kind, username, text FROM entries WHERE key BETWEEN ? AND ?"
        " ORDER BY key DESC LIMIT ?",
        (low, low, low | SEQ_MASK, HISTORY_SIZE),
    ).fetchall()
    if not newest_first:
        return None  # a room row without entries: nothing to continue (not written so)
    newest_first.reverse()
    return StoredRoom(room, epoch, newest_first[-1][0], _consecutive_tail(newest_first))


def _consecutive_tail(rows: List[Entry]) -> Tuple[Entry, ...]:
    """The entries of *rows* (sorted by seq) that run without a hole up to the newest: what
    the shard may serve as history (it relies on consecutive seqs)."""
    start = len(rows) - 1
    while start > 0 and rows[start - 1][0] == rows[start][0] - 1:
        start -= 1
    if start:
        log.warning(
            "stored history has a hole before seq %d; older entries ignored", rows[start][0]
        )
    return tuple(rows[start:])


# --- the SQLite store -----------------------------------------------------------------


class _Pending:
    """A room's staged writes: entries of history *epoch* (the last ``HISTORY_SIZE``; older
    ones would be deleted by retention anyway), after deleting its stored history if
    *forget*."""

    __slots__ = ("slot", "epoch", "entries", "forget", "failed")

    def __init__(self, slot: int, epoch: Optional[int], forget: bool = False) -> None:
        self.slot = slot
        self.epoch = epoch
        self.entries: Deque[Entry] = deque(maxlen=HISTORY_SIZE)
        self.forget = forget
        self.failed = False  # an earlier commit of these entries failed


@dataclass
class _DownSlot:
    """A slot file that could not be opened or read: never written in this process."""

    reason: str


_SlotState = Union[sqlite3.Connection, _DownSlot]
#: A stored room as the last commit left it: ``(id, epoch, newest seq)``.
_Known = Tuple[int, int, int]


def merge(
    name: str, stored: Optional[StoredRoom], pending: Optional[_Pending]
) -> Optional[StoredRoom]:
    """Room *name*'s *stored* history with *pending* applied, as a commit leaves it on disk:
    the pending entries continue the stored ones only if they are of the same epoch and
    follow its last seq; otherwise they start the history anew. None when there is no
    history at all."""
    if pending is None:
        return stored
    if pending.forget:
        stored = None
    if not pending.entries:
        return stored
    new: Sequence[Entry] = pending.entries
    base: Tuple[Entry, ...] = ()
    if stored is not None and pending.epoch is not None and pending.epoch < stored.epoch:
        return stored  # an older history's entries (a stale journal replayed): not news
    if stored is not None and pending.epoch == stored.epoch:
        new = _after(new, stored.seq)
        if not new:
            return stored
        if new[0][0] == stored.seq + 1:
            base = stored.entries
    entries = (base + tuple(new))[-HISTORY_SIZE:]
    assert pending.epoch is not None  # entries always come with their epoch
    return StoredRoom(name, pending.epoch, entries[-1][0], entries)


def _after(entries: Sequence[Entry], seq: int) -> Sequence[Entry]:
    """The *entries* (consecutive, of the stored history's epoch) newer than *seq*, the
    stored history's last: entries staged again that are already stored (a journal replayed
    after a crash that came between a move and cutting the journal back) are not new, and
    must not be taken for a history that starts anew."""
    if not entries or entries[0][0] > seq:
        return entries
    return [entry for entry in entries if entry[0] > seq]


class SqliteStore:
    """The history of the rooms in the slots shard *shard_index* of *shard_count* owns,
    one SQLite file per slot under *data_dir* (see the module docstring).

    *data_dir* must exist (:func:`shard.slot_files.check_data_dir` creates it). Slot files
    are opened on first use and stay open (and locked) until :meth:`close`.
    *synchronous* is SQLite's ``NORMAL`` (the default: in WAL mode a commit survives a
    process crash; a power cut can lose the commits since the last checkpoint) or ``FULL``
    (every commit fsynced). Raises ``ValueError`` for a bad layout or *synchronous*.
    """

    def __init__(
        self,
        data_dir: Union[str, Path],
        shard_index: int = 0,
        shard_count: int = 1,
        *,
        slots: int = STORAGE_SLOTS,
        synchronous: str = "NORMAL",
        clock: Clock = time.time,
        max_unstored: int = MAX_UNSTORED_ENTRIES,
        monotonic: Clock = time.monotonic,
        retry_seconds: float = STORAGE_RETRY_SECONDS,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.data_dir = Path(data_dir)
        self._slots = slots
        self._owned = shard_slots(shard_index, shard_count, slots)
        self._synchronous = synchronous
        self._epochs = EpochSource(clock)
        self._max_unstored = max_unstored
        self._monotonic = monotonic
        self._retry_seconds = retry_seconds
        #: slot -> (when to try it again, why it failed): a failing slot is not retried on
        #: every batch (each retry writes everything that waits).
        self._retry_at: Dict[int, Tuple[float, str]] = {}
        self._files: Dict[int, _SlotState] = {}
        #: room -> (id, epoch, newest stored seq) as of the last commit that wrote it: this
        #: process is the file's only writer, so a commit need not read them back.
        self._known: Dict[str, _Known] = {}
        # Staged rooms, oldest first: the ones that waited longest are given up first.
        self._staged: OrderedDict[str, _Pending] = OrderedDict()
        # What commits gave up because a slot is down, until take_dropped() takes it.
        self._given_up: List[Tuple[str, _Pending]] = []

    # --- the HistoryStore API ---------------------------------------------------------

    def load(self, room: str) -> StoredRoom:
        """*room*'s history: what is stored, with what is staged applied; a room with none
        comes back empty with a new epoch. A slot file that cannot be read gives that new
        empty history with ``problem`` set, and is not written again by this store.
        Raises ``ValueError`` for a room outside this shard's slots (a routing bug)."""
        slot = self._slot_of(room)
        pending = self._staged.get(room)
        stored: Optional[StoredRoom] = None
        problem: Optional[str] = None
        try:
            conn = self._file(slot, create=False)  # also learns the file's epochs
            if conn is not None and not (pending and pending.forget):
                stored = _read_room(conn, room)
        except StorageError as error:
            problem = str(error)
        except sqlite3.Error as error:
            problem = self._take_down(slot, str(sqlite_problem(self._path(slot), error)))
        merged = merge(room, stored, pending)
        if merged is None:
            return StoredRoom(room, self._epochs.next(), 0, (), problem)
        if problem:
            return StoredRoom(room, merged.epoch, merged.seq, merged.entries, problem)
        return merged

    def new_epoch(self, room: str) -> int:
        """An epoch greater than every one this store handed out and every one *room*'s
        slot file holds or held (milliseconds, unless those are ahead of the clock)."""
        try:
            self._file(self._slot_of(room), create=False)  # opening it learns its epochs
        except StorageError:
            pass  # unreadable: its epochs are unknown, the clock's will do
        return self._epochs.next()

    def append(self, room: str, epoch: int, entry: Entry) -> None:
        """Stage *entry*, the next entry of *room*'s history *epoch*. An epoch other than
        the staged one starts the history anew (the stored one is replaced at commit).
        Raises ``ValueError`` for a room outside this shard's slots, or a seq outside
        ``1..2**STORAGE_SEQ_BITS - 1``."""
        self.extend(room, epoch, (entry,))

    def record(self, item: Tuple[str, int, Entry]) -> None:
        """``append(*item)``."""
        self.extend(item[0], item[1], (item[2],))

    def extend(self, room: str, epoch: int, entries: Sequence[Entry]) -> None:
        """Stage *entries*, the next consecutive entries of *room*'s history *epoch*: what
        :meth:`append` does for each of them, in one call. Raises ``ValueError`` as
        :meth:`append` does."""
        if not entries:
            return
        if not (0 < entries[0][0] and entries[-1][0] <= SEQ_MASK):
            raise ValueError(f"seqs {entries[0][0]}..{entries[-1][0]} are outside 1..{SEQ_MASK}")
        pending = self._staged.get(room)
        if pending is None:
            pending = self._staged[room] = _Pending(self._slot_of(room), epoch)
        elif pending.epoch != epoch:
            fresh = _Pending(pending.slot, epoch, forget=pending.forget)
            fresh.failed = pending.failed
            pending = self._staged[room] = fresh
        pending.entries.extend(entries)

    def forget(self, room: str) -> None:
        """Stage the deletion of *room*'s stored history (and drop its staged entries)."""
        pending = self._staged.pop(room, None)
        forgotten = _Pending(pending.slot if pending else self._slot_of(room), None, True)
        forgotten.failed = bool(pending and pending.failed)
        self._staged[room] = forgotten

    def commit(self) -> CommitReport:
        """Write everything staged: one transaction per slot file, all of a slot's rooms or
        none of them. Never raises for I/O: a slot whose transaction failed keeps its
        entries staged for the next commit (up to ``MAX_UNSTORED_ENTRIES``), a slot whose
        file is unusable drops them; both are in the report."""
        if not self._staged:
            return NOTHING_FAILED
        failed: Dict[str, str] = {}
        dropped: List[str] = []
        recovered: List[str] = []
        now = self._monotonic()
        for slot, rooms in self._by_slot().items():
            waiting = self._retry_at.get(slot)
            if waiting is not None and now < waiting[0]:
                for name, _ in rooms:  # failed a moment ago: not again so soon
                    failed[name] = waiting[1]
                continue
            reason = self._commit_slot(slot, rooms)
            if reason is None:
                self._retry_at.pop(slot, None)
                recovered.extend(name for name, pending in rooms if pending.failed)
                for name, _ in rooms:
                    del self._staged[name]
                continue
            self._retry_at[slot] = (now + self._retry_seconds, reason)
            for name, pending in rooms:
                failed[name] = reason
                pending.failed = True
            if isinstance(self._files.get(slot), _DownSlot):
                dropped.extend(name for name, _ in rooms)
                for name, pending in rooms:
                    del self._staged[name]
                    self._given_up.append((name, pending))
        dropped.extend(self._shed_unstored())
        if not failed:
            return CommitReport(recovered=frozenset(recovered))
        return CommitReport(failed, frozenset(dropped), frozenset(recovered))

    def close(self) -> None:
        """Close every slot file (checkpointing its WAL). Staged, uncommitted entries are
        dropped, as a crash would."""
        if self._staged:
            log.warning("closing the history store with %d rooms uncommitted", len(self._staged))
            self._staged.clear()
        for state in self._files.values():
            if isinstance(state, sqlite3.Connection):
                try:
                    state.close()
                except sqlite3.Error as error:
                    log.warning("closing a slot file failed: %s", error)
        self._files.clear()

    # --- helpers ----------------------------------------------------------------------

    def retry_due(self) -> bool:
        """True if something waits to be stored and may be tried now (the shard's loop
        asks while it is idle, so a slot that failed is retried without new traffic)."""
        if not self._staged:
            return False
        now, retry_at = self._monotonic(), self._retry_at
        slots = {pending.slot for pending in self._staged.values()}
        return any(slot not in retry_at or now >= retry_at[slot][0] for slot in slots)

    def staged(self) -> List[Tuple[str, Optional[int], Optional[Entry]]]:
        """What is staged, in the order it would be staged again: ``(room, None, None)``
        for a forgotten room, then ``(room, epoch, entry)`` for each of its entries (what
        :mod:`shard.journal` rewrites its file with when a move left some of it here)."""
        items: List[Tuple[str, Optional[int], Optional[Entry]]] = []
        for name, pending in self._staged.items():
            if pending.forget:
                items.append((name, None, None))
            items.extend((name, pending.epoch, entry) for entry in pending.entries)
        return items

    def take_dropped(self) -> List[Tuple[str, Optional[int], Optional[Entry]]]:
        """What commits gave up since the last call because a room's slot is down, as
        :meth:`staged` lists it (:mod:`shard.journal` keeps it in its file instead)."""
        items: List[Tuple[str, Optional[int], Optional[Entry]]] = []
        for name, pending in self._given_up:
            if pending.forget:
                items.append((name, None, None))
            items.extend((name, pending.epoch, entry) for entry in pending.entries)
        self._given_up = []
        return items

    def unstored_entries(self) -> int:
        """How many staged entries are waiting (after a failed commit: for a retry)."""
        return sum(len(pending.entries) for pending in self._staged.values())

    def owns(self, room: str) -> bool:
        """True if *room* is in one of this store's slots."""
        return room_to_slot(room, self._slots) in self._owned

    def _slot_of(self, room: str) -> int:
        slot = room_to_slot(room, self._slots)
        if slot not in self._owned:
            raise ValueError(f"room {room!r} is in slot {slot}, not one of this shard's")
        return slot

    def _path(self, slot: int) -> Path:
        return self.data_dir / slot_file_name(slot)

    def _file(self, slot: int, create: bool) -> Optional[sqlite3.Connection]:
        """The open file of *slot*; None if it does not exist and not *create*.

        Raises ``StorageError`` if it cannot be opened: an existing file's slot is then
        down (its history could not be read); a file that could not be created is tried
        again next time (there was no history to lose).
        """
        state = self._files.get(slot)
        if isinstance(state, _DownSlot):
            raise StorageError(state.reason)
        if state is not None:
            return state
        path = self._path(slot)
        try:
            exists = path.exists()
        except OSError as error:  # EACCES, EIO, ESTALE on the directory: try again later
            raise os_problem(path, error, "read") from None
        if not exists:
            if not create:
                return None
            create_slot_file(path, slot, self._slots)
        try:
            conn = open_slot_file(path, slot, self._slots, self._synchronous)
        except OSError as error:
            problem = os_problem(path, error, "opened")
            self._take_down(slot, str(problem))
            raise problem from None
        except StorageError as error:
            self._take_down(slot, str(error))
            raise
        try:
            self._epochs.exceed(highest_epoch(conn))
        except sqlite3.Error as error:
            conn.close()
            problem = sqlite_problem(path, error)
            self._take_down(slot, str(problem))
            raise problem from None
        self._files[slot] = conn
        return conn

    def _take_down(self, slot: int, reason: str) -> str:
        """Leave *slot*'s file alone for the rest of the process; return *reason*."""
        log.error("history of storage slot %d is not available: %s", slot, reason)
        state = self._files.get(slot)
        if isinstance(state, sqlite3.Connection):
            state.close()
        self._files[slot] = _DownSlot(reason)
        return reason

    def _by_slot(self) -> Dict[int, List[Tuple[str, _Pending]]]:
        groups: Dict[int, List[Tuple[str, _Pending]]] = {}
        for name, pending in self._staged.items():
            groups.setdefault(pending.slot, []).append((name, pending))
        return groups

    def _commit_slot(self, slot: int, rooms: Sequence[Tuple[str, _Pending]]) -> Optional[str]:
        """Write *rooms* to *slot*'s file in one transaction; None, or why it failed."""
        try:
            conn = self._file(slot, create=True)
        except StorageError as error:
            return str(error)
        assert conn is not None
        known = self._known
        written: Dict[str, Optional[_Known]] = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            for name, pending in rooms:
                written[name] = _write_room(conn, name, pending, known.get(name))
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            for name, _ in rooms:
                known.pop(name, None)  # read them back next time
            reason = str(sqlite_problem(self._path(slot), error))
            _rollback(conn)
            if error_name(error).startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
                self._take_down(slot, reason)
            else:
                log.warning("history commit of storage slot %d failed: %s", slot, reason)
            return reason
        if len(known) + len(written) > STORAGE_ROOM_CACHE:
            known.clear()
        for name, state in written.items():
            if state is None:
                known.pop(name, None)
            else:
                known[name] = state
        return None

    def _shed_unstored(self) -> List[str]:
        """Give up the entries that waited longest until at most ``max_unstored`` wait,
        keeping each room's last entry (so that the room's stored seq still moves past every
        entry its members saw, and the gap is stored as one); return those rooms."""
        waiting = self.unstored_entries()
        shed: List[str] = []
        for name, pending in self._staged.items():
            if waiting <= self._max_unstored:
                break
            if len(pending.entries) > 1:
                waiting -= len(pending.entries) - 1
                last = pending.entries[-1]
                pending.entries.clear()
                pending.entries.append(last)
                shed.append(name)
        if shed:
            log.error("gave up storing older entries of %d rooms (too many unstored)", len(shed))
        return shed


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if SQLite did not already (it does by itself for some errors)."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as error:
            log.warning("rollback failed: %s", error)


def _write_room(
    conn: sqlite3.Connection, name: str, pending: _Pending, known: Optional[_Known]
) -> Optional[_Known]:
    """Apply *pending* to *name*'s rows, inside the caller's transaction; the same result as
    :func:`merge`. *known* is what the last commit left of the room (None: read it).
    Returns the room's ``(id, epoch, newest seq)`` after it (None: it has no rows).
    Raises ``sqlite3.Error`` (the commit fails)."""
    if known is None or pending.forget:
        row = conn.execute("SELECT id, epoch FROM rooms WHERE name = ?", (name,)).fetchone()
        newest: Optional[int] = None
    else:
        row, newest = known[:2], known[2]
    if row is not None and pending.forget:
        low = row[0] << STORAGE_SEQ_BITS
        conn.execute("DELETE FROM entries WHERE key BETWEEN ? AND ?", (low, low | SEQ_MASK))
        conn.execute("DELETE FROM rooms WHERE id = ?", (row[0],))
        remember_epoch(conn, row[1])  # the room's next history must get a greater one
        row = None
    if not pending.entries:
        return None
    entries: Sequence[Entry] = pending.entries
    if row is None:
        room_id = _insert_room(conn, name, pending.epoch)
        low = room_id << STORAGE_SEQ_BITS
    else:
        room_id, epoch = row
        low = room_id << STORAGE_SEQ_BITS
        if newest is None:
            top = conn.execute(
                "SELECT max(key) FROM entries WHERE key BETWEEN ? AND ?", (low, low | SEQ_MASK)
            ).fetchone()[0]
            newest = top - low if top is not None else 0
        if pending.epoch < epoch:
            return (room_id, epoch, newest)  # an older history's entries: not news
        if epoch == pending.epoch:
            entries = _after(entries, newest)
            if not entries:
                return (room_id, epoch, newest)  # all of them stored already
        if epoch != pending.epoch or entries[0][0] != newest + 1:
            conn.execute("DELETE FROM entries WHERE key BETWEEN ? AND ?", (low, low | SEQ_MASK))
        if epoch != pending.epoch:
            conn.execute("UPDATE rooms SET epoch = ? WHERE id = ?", (pending.epoch, room_id))
    conn.executemany(
        "INSERT OR REPLACE INTO entries (key, ts, kind, username, text) VALUES (?, ?, ?, ?, ?)",
        [(low + seq, ts, kind, username, text) for seq, ts, kind, username, text in entries],
    )
    last = entries[-1][0]
    first = entries[0][0]
    # Retention in steps: entries past the last HISTORY_SIZE go once RETENTION_STEP of them
    # have piled up (a delete per commit would rewrite the room's oldest page every time).
    if (last - HISTORY_SIZE) // RETENTION_STEP > (first - 1 - HISTORY_SIZE) // RETENTION_STEP:
        conn.execute(
            "DELETE FROM entries WHERE key BETWEEN ? AND ?", (low, low + last - HISTORY_SIZE)
        )
    return (room_id, pending.epoch, last)


def _insert_room(conn: sqlite3.Connection, name: str, epoch: Optional[int]) -> int:
    """Add room *name* to the file; its number. Raises ``sqlite3.OperationalError`` when the
    file has no room numbers left (``STORAGE_SEQ_BITS``)."""
    room_id = conn.execute("INSERT INTO rooms (name, epoch) VALUES (?, ?)", (name, epoch)).lastrowid
    if room_id is None or room_id > MAX_ROOM_ID:
        raise sqlite3.OperationalError(f"the file holds {MAX_ROOM_ID} rooms, no more fit")
    return room_id
