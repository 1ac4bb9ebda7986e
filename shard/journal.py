"""A durable shard's journal: each batch's history in one write, the slot files later.

A shard that keeps history (:class:`JournaledStore`) appends one *record* per batch it
applied to its journal file ``DATA_DIR/journal-NNN.log`` (``NNN``: the shard's index),
with a single ``os.write``, before the batch's events go out. Once the write returned, the
batch survives a crash of the shard (``kill -9``): the kernel has it. The entries go on
to the slot files (:class:`shard.storage.SqliteStore`) in a *move*: every
``JOURNAL_MOVE_SECONDS``, or as soon as ``JOURNAL_MOVE_ENTRIES`` entries or
``JOURNAL_MAX_BYTES`` of records wait, one transaction per slot file for everything that
waits (only each room's last ``HISTORY_SIZE`` entries: older ones would be deleted by
retention). After a move the journal is cut back to nothing, or, if some slot could not
be written, rewritten to hold just what still waits (bounded by ``MAX_UNSTORED_ENTRIES``).

So a batch costs one ``write`` instead of a transaction per slot file it touched, and the
slot files see few, large transactions. Recovery:

- a shard that starts (or restarts after a crash) reads its own journal back, stages it
  in its store and moves it at once, before it serves (:meth:`JournaledStore.__init__`);
- a cluster that starts moves *every* journal in the directory into the slot files
  before any shard starts (:func:`prepare_data_dir`): the shard count may have changed,
  and a room's entries must be in its slot file before another shard owns that slot.

A record is ``length (4 bytes) | CRC-32 (4) | payload``, little-endian; the payload is the
``marshal`` of a list of ``(room, epoch, entry)`` items (``(room, None, None)``: the
room's history was forgotten). Reading stops at the first record that is cut short or does
not match its CRC (a power cut in the middle of a write): what comes before it counts.
Replaying a journal twice is harmless: entries already in a slot file are skipped.

If the journal cannot be written (a full disk), the store falls back to moving every
batch at once (what the slot files then refuse is reported as not stored) until a move
leaves the journal consistent again. The journal is never fsynced: a power cut or OS crash
can lose what the slot files do not have yet (at most ``JOURNAL_MOVE_SECONDS`` of it).
"""

from __future__ import annotations

import errno
import logging
import marshal
import os
import re
import struct
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

from common.limits import (
    HISTORY_SIZE,
    JOURNAL_MAX_BYTES,
    JOURNAL_MOVE_ENTRIES,
    JOURNAL_MOVE_SECONDS,
    STORAGE_SLOTS,
)
from common.messages import Entry
from shard.slot_files import IN_USE, StorageError, check_data_dir, os_problem
from shard.storage import NOTHING_FAILED, CommitReport, SqliteStore, StoredRoom

log = logging.getLogger(__name__)

#: One staged change: ``(room, epoch, entry)``, or ``(room, None, None)`` for a forget.
Item = Tuple[str, Optional[int], Optional[Entry]]

JOURNAL_FILE = re.compile(r"journal-(\d{3,})\.log")
_HEADER = struct.Struct("<II")  # payload length, CRC-32 of the payload
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0)


def journal_name(index: int) -> str:
    """``journal-002.log`` for shard 2."""
    return f"journal-{index:03d}.log"


def encode(items: Sequence[Item]) -> bytes:
    """One framed record holding *items*."""
    payload = marshal.dumps(items if isinstance(items, list) else list(items))
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes) -> Tuple[List[Item], int]:
    """The items of the whole, intact records at the start of *data*, and how many bytes
    those records take (less than ``len(data)``: the rest is cut short or damaged)."""
    items: List[Item] = []
    offset, size = 0, len(data)
    while offset + _HEADER.size <= size:
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        try:
            record = marshal.loads(payload)
        except (EOFError, ValueError, TypeError):
            break  # matched its CRC by chance: as damaged as the rest
        if not isinstance(record, list):
            break
        items.extend(record)
        offset = start + length
    return items, offset


def read_journal(path: Path) -> List[Item]:
    """The items *path* holds (none if it does not exist). Raises ``StorageError``."""
    return _read(path)[0]


def _read(path: Path) -> Tuple[List[Item], int, int]:
    """``(items, intact bytes, file size)`` of *path*. Raises ``StorageError``."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return [], 0, 0
    except OSError as error:
        raise os_problem(path, error, "read") from None
    items, intact = decode(data)
    if intact < len(data):
        log.warning(
            "%s: the last %d bytes are cut short or damaged (a crash while writing?);"
            " the %d entries before them are kept",
            path, len(data) - intact, len(items),
        )  # fmt: skip
    return items, intact, len(data)


def fold(items: Sequence[Item]) -> List[Item]:
    """*items* as :func:`stage` would hand them over, as items again: per room, in the
    order rooms first appear, a forget if there was one, then the entries of its last
    epoch (at most ``HISTORY_SIZE``)."""
    folded: List[Item] = []
    for room, tail in _tails(items).items():
        if tail.forget:
            folded.append((room, None, None))
        folded.extend((room, tail.epoch, entry) for entry in tail.entries)
    return folded


def stage(store: SqliteStore, items: Sequence[Item]) -> None:
    """Stage *items* in *store*: the same as forgetting and appending each in turn, but
    only what that would leave staged is handed over (per room: a forget if there was one,
    then the entries of its last epoch, at most ``HISTORY_SIZE``), in one call a room."""
    for room, tail in _tails(items).items():
        if tail.forget:
            store.forget(room)
        if tail.entries:
            assert tail.epoch is not None
            store.extend(room, tail.epoch, tail.entries)


def _tails(items: Sequence[Item]) -> Dict[str, _RoomTail]:
    rooms: Dict[str, _RoomTail] = {}
    for room, epoch, entry in items:
        tail = rooms.get(room)
        if entry is None:
            rooms[room] = _RoomTail(None, True)
        elif tail is None:
            tail = rooms[room] = _RoomTail(epoch, False)
            tail.entries.append(entry)
        else:
            if tail.epoch != epoch:
                tail.epoch, tail.entries = epoch, deque(maxlen=HISTORY_SIZE)
            tail.entries.append(entry)
    return rooms


class _RoomTail:
    """What a run of items leaves staged for one room."""

    __slots__ = ("epoch", "entries", "forget")

    def __init__(self, epoch: Optional[int], forget: bool) -> None:
        self.epoch = epoch
        self.forget = forget
        self.entries: Deque[Entry] = deque(maxlen=HISTORY_SIZE)


class JournalFile:
    """The journal file: appended to, cut back, rewritten. Holds a lock on it while open
    (where the OS has one: ``flock``), so a second cluster on the same directory cannot
    move it away from under the shard that writes it. Raises ``OSError``, or
    ``StorageError`` (``in_use``) when another process holds the lock.

    After a rewrite whose reopening failed the file is not open (``fd`` -1): every call
    then fails with ``EBADF`` until :meth:`replace` succeeds, rather than act on whatever
    file got that descriptor number since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = _open_locked(path)
        self.size = os.fstat(self._fd).st_size

    def append(self, data: bytes) -> None:
        """Write *data* at the end (a short write is finished). Raises ``OSError``; what a
        failed call wrote is cut off again."""
        try:
            _write_all(self._fd, data)
        except OSError:
            if self._fd >= 0:
                self._cut(self.size)
            raise
        self.size += len(data)

    def clear(self) -> None:
        """Cut the file back to nothing. Raises ``OSError``."""
        if self._fd < 0:
            self.replace(b"")
        elif self.size:
            self._cut(0)

    def cut_to(self, size: int) -> None:
        """Cut the file back to its first *size* bytes. Raises ``OSError``."""
        if size < self.size:
            self._cut(size)

    def replace(self, data: bytes) -> None:
        """Make *data* the whole file, atomically (a new file, fsynced, renamed over it: a
        crash leaves the old one or the new one). Raises ``OSError``/``StorageError``; the
        old file is then still the journal (or, if only its reopening failed, the new one
        is, not open: see the class docstring)."""
        building = self.path.with_name(self.path.name + ".new")
        fd = _open_locked(building, truncate=True)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(building)
            raise
        os.close(fd)
        if os.name == "nt":  # Windows renames only over files nobody holds open
            self._close_fd()
        try:
            os.replace(building, self.path)
        except OSError:
            _unlink_quietly(building)
            if self._fd < 0:
                self._fd = _open_locked(self.path)
            raise
        old, self._fd = self._fd, -1
        try:
            self._fd = _open_locked(self.path)
        finally:
            if old >= 0:
                os.close(old)
        self.size = len(data)

    def close(self) -> None:
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _cut(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        self.size = size


def _write_all(fd: int, data: bytes) -> None:
    """Write all of *data* to *fd* (a regular file writes less than asked only when the
    disk is nearly full or a signal came); ``OSError`` if it takes none of the rest."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # (a leftover .new is replaced by the next rewrite, and never read)


def _open_locked(path: Path, truncate: bool = False) -> int:
    fd = os.open(str(path), _OPEN_FLAGS | (os.O_TRUNC if truncate else 0), 0o644)
    try:
        _lock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


#: ``flock`` errors that mean "no locks on this file system" (NFS, SMB, some FUSE mounts):
#: the journal is then used unlocked, as on Windows.
_NO_LOCKS = frozenset(
    getattr(errno, name) for name in ("ENOLCK", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EINVAL")
    if hasattr(errno, name)
)  # fmt: skip


def _lock(fd: int, path: Path) -> None:
    """Lock *fd* for this process, or raise ``StorageError`` (``in_use``)."""
    try:
        import fcntl
    except ImportError:  # Windows: slot files are locked by SQLite; journals are not
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StorageError(
            f"{path} is in use by another process (another shardchat on the same data"
            " directory?): stop it, or pass another --data-dir",
            IN_USE,
        ) from None
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            raise
        log.warning("%s cannot be locked here (%s); using it unlocked", path, error)


Clock = Callable[[], float]


class JournaledStore:
    """A :class:`shard.storage.SqliteStore` written through a journal (see the module
    docstring): the :class:`shard.storage.HistoryStore` a durable shard uses.

    Owns *store* and the journal file *path*; reads back (and moves) what the journal
    holds before it returns. A journal that cannot be opened is logged and done without
    (every batch is then moved at once, as without a journal). One owner, not
    thread-safe.
    """

    def __init__(
        self,
        store: SqliteStore,
        path: Union[str, Path],
        *,
        move_seconds: float = JOURNAL_MOVE_SECONDS,
        move_entries: int = JOURNAL_MOVE_ENTRIES,
        max_bytes: int = JOURNAL_MAX_BYTES,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self._store = store
        self._path = Path(path)
        self._move_seconds = move_seconds
        self._move_entries = move_entries
        self._max_bytes = max_bytes
        self._monotonic = monotonic
        self._batch: List[Item] = []  # recorded since the last commit (the same list always)
        self.record = self._batch.append
        self._batch_staged = 0  # how many of them are staged in the store already
        self._unstaged: List[Item] = []  # journaled since the last move, not staged yet
        self._waiting = 0  # entries journaled since the last move
        self._kept_bytes = 0  # the journal's size after the last move
        self._moved_at = monotonic()
        #: The journal holds everything the store has staged (False: it could not be
        #: written; every commit moves at once until a move makes it whole again).
        self._whole = True
        #: Rooms whose slot file could not be written for good (it is down for this
        #: process): their last entries, kept in the journal for the next start to store
        #: (and served from here if the room is loaded again), never dropped.
        self._parked: Dict[str, List[Item]] = {}
        self._file: Optional[JournalFile] = None
        self._reopen_at = 0.0  # when to try opening a journal that could not be opened
        items: List[Item] = []
        intact = size = 0
        try:
            items, intact, size = _read(self._path)
        except StorageError as error:  # unreadable: the next start of the cluster says so
            log.error("%s; history is written without a journal", error)
        self._open_journal()
        if self._file is not None and intact < size:
            try:  # a torn last record: new records must not go after it
                self._file.cut_to(intact)
            except OSError as error:
                log.error("%s", os_problem(self._path, error, "written"))
                self._whole = False
        foreign = [item for item in items if not store.owns(item[0])]
        if foreign:  # (the start of a cluster moves every journal: only if it did not)
            log.error("%s holds %d entries of rooms in other shards' slots; they are dropped",
                      self._path, len(foreign))  # fmt: skip
            items = [item for item in items if store.owns(item[0])]
        if items:
            stage(store, items)
            self._waiting = len(items)
            self._move()

    # --- the HistoryStore API ---------------------------------------------------------

    def load(self, room: str) -> StoredRoom:
        self._stage_waiting()
        parked = self._parked.pop(room, None)
        if parked:  # its slot is down: the history it has is the one kept here
            stage(self._store, parked)
        return self._store.load(room)

    def new_epoch(self, room: str) -> int:
        return self._store.new_epoch(room)

    def append(self, room: str, epoch: int, entry: Entry) -> None:
        self._batch.append((room, epoch, entry))

    # record(item): self._batch.append, bound in __init__ (no Python frame per entry)

    def forget(self, room: str) -> None:
        self._batch.append((room, None, None))

    def commit(self) -> CommitReport:
        """Journal what this batch recorded (one write), and move everything to the slot
        files when a move is due. Never raises for I/O; what is not stored is reported as
        by :meth:`shard.storage.SqliteStore.commit`."""
        self._journal_batch()
        if self._whole and not self._move_due():
            return NOTHING_FAILED
        return self._move()

    def move(self) -> CommitReport:
        """:meth:`commit`, and move everything that waits into the slot files now, due or
        not. Never raises for I/O."""
        self._journal_batch()
        return self._move()

    def retry_due(self) -> bool:
        """True if a move is due (while the shard is idle: so the journal stays short)."""
        if self._whole and not self._move_due():
            return False
        return bool(self._unstaged) or self._store.retry_due()

    def close(self, move: bool = True) -> None:
        """Move what waits (unless not *move*: as a crash would leave it) and close.
        Whatever this batch recorded and did not commit is not journaled, as in a crash
        (entries a load staged in the middle of it are moved all the same)."""
        self._batch.clear()
        self._batch_staged = 0
        if move and self._file is not None:
            self._move()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._store.close()

    def unstored_entries(self) -> int:
        """Entries recorded and not in the slot files yet (only what a move would write:
        each room's last ``HISTORY_SIZE``)."""
        self._stage_waiting()
        parked = sum(1 for items in self._parked.values() for item in items if item[2])
        return self._store.unstored_entries() + parked

    # --- helpers ----------------------------------------------------------------------

    def _journal_batch(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._unstaged.extend(batch[self._batch_staged :] if self._batch_staged else batch)
        self._waiting += len(batch)
        if self._whole:
            self._whole = self._write(batch)
        batch.clear()
        self._batch_staged = 0

    def _stage_waiting(self) -> None:
        """Stage everything recorded so far (what this batch recorded is journaled by its
        commit all the same)."""
        if self._unstaged:
            stage(self._store, self._unstaged)
            self._unstaged = []
        if self._batch_staged < len(self._batch):
            stage(self._store, self._batch[self._batch_staged :])
            self._batch_staged = len(self._batch)

    def _open_journal(self) -> None:
        """Open the journal file (``_file`` stays None, and ``_whole`` False, if it cannot
        be: every batch is then moved at once, and opening is tried again later)."""
        try:
            self._file = JournalFile(self._path)
        except (OSError, StorageError) as error:
            problem = error if isinstance(error, StorageError) else os_problem(
                self._path, error, "opened")  # fmt: skip
            log.error("%s; history is written without a journal for now", problem)
            self._whole = False
            self._reopen_at = self._monotonic() + self._move_seconds

    def _write(self, items: Sequence[Item]) -> bool:
        if self._file is None:
            return False
        try:
            self._file.append(encode(items))
        except OSError as error:
            log.error("%s; moving every batch to the slot files until it can be written",
                      os_problem(self._path, error, "written"))  # fmt: skip
            return False
        return True

    def _move_due(self) -> bool:
        if self._waiting >= self._move_entries:
            return True
        if self._file is not None and self._file.size - self._kept_bytes >= self._max_bytes:
            return True
        return self._monotonic() - self._moved_at >= self._move_seconds

    def _move(self) -> CommitReport:
        """Everything staged into the slot files, then the journal made to hold exactly
        what is still staged (nothing, unless a slot failed)."""
        self._stage_waiting()
        report = self._store.commit()
        for room, items in _by_room(self._store.take_dropped()).items():
            self._parked[room] = fold(self._parked.get(room, []) + items)
        self._moved_at = now = self._monotonic()
        # What a failing slot keeps (retried by the next move), and what a down one gave up.
        left = self._store.staged()
        for items in self._parked.values():
            left.extend(items)
        self._waiting = 0
        if self._file is None:
            if now < self._reopen_at:
                return report
            self._open_journal()
            if self._file is None:
                return report
        try:
            if left:
                self._file.replace(encode(left))
            else:
                self._file.clear()
        except (OSError, StorageError) as error:
            problem = error if isinstance(error, StorageError) else os_problem(
                self._path, error, "written")  # fmt: skip
            log.error("%s", problem)
            self._whole = False
        else:
            self._whole = True
        self._kept_bytes = self._file.size
        return report


def _by_room(items: Sequence[Item]) -> Dict[str, List[Item]]:
    rooms: Dict[str, List[Item]] = {}
    for item in items:
        rooms.setdefault(item[0], []).append(item)
    return rooms


# --- at the start of a cluster ----------------------------------------------------------


def journal_path(data_dir: Union[str, Path], index: int) -> Path:
    """Shard *index*'s journal in *data_dir*."""
    return Path(data_dir) / journal_name(index)


def open_store(data_dir: Union[str, Path], index: int, count: int) -> JournaledStore:
    """The history store of shard *index* of *count*: its slot files through its journal."""
    return JournaledStore(SqliteStore(data_dir, index, count), journal_path(data_dir, index))


def prepare_data_dir(data_dir: Union[str, Path], slots: int = STORAGE_SLOTS) -> None:
    """Check *data_dir* (:func:`shard.slot_files.check_data_dir`), then move every
    journal in it into the slot files and delete it, before any shard serves (a room's
    slot may belong to another shard from now on). Blocking; runs in the caller's process.
    Raises ``StorageError`` with the operator's one line."""
    path = Path(data_dir)
    check_data_dir(path, slots)
    journals = sorted(path / name for name in os.listdir(path) if JOURNAL_FILE.fullmatch(name))
    if not journals:
        return
    store = SqliteStore(path, 0, 1, slots=slots)  # every slot
    held: List[JournalFile] = []
    try:
        for journal in journals:
            held.append(JournalFile(journal))  # refuses one another cluster holds
            stage(store, read_journal(journal))
        report = store.commit()
        if not report.ok:
            reason = next(iter(report.failed.values()))
            raise StorageError(
                f"the journals in {path} cannot be moved into the slot files: {reason}"
            )
        for journal in held:
            journal.close()  # (Windows deletes only files nobody holds open)
            os.unlink(journal.path)
    except OSError as error:
        raise os_problem(path, error, "written") from None
    finally:
        for journal in held:
            journal.close()
        store.close()
    log.info("moved %d journals into the slot files of %s", len(journals), path)
