"""Slot files of the history store: creating, opening and checking them, and the one-line
answers for an operator when a data directory or a file cannot be used.

Each storage slot is one SQLite file ``DATA_DIR/slot-NNN.sqlite3`` (see
:mod:`shard.storage`): WAL journal, ``synchronous=NORMAL`` by default, exclusive locking (the
one process that opened it holds it; in WAL mode that also keeps the WAL index in memory, so
there is no ``-shm`` file), ``PRAGMA application_id`` marking it as ours, ``PRAGMA
user_version`` its schema version, and a ``meta`` table recording which slot of how many it
holds. A slot file that exists is always complete: it is built under a temporary name and
renamed (:func:`create_slot_file`).

:func:`check_data_dir` runs before any shard serves and turns every problem it finds into
one line naming the file and what to do (:class:`StorageError`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from common.limits import (
    STORAGE_BUSY_TIMEOUT,
    STORAGE_CHECKPOINT_PAGES,
    STORAGE_MIN_FREE_BYTES,
    STORAGE_SEQ_BITS,
    STORAGE_SLOTS,
)

log = logging.getLogger(__name__)

#: The schema this code writes. Each version's steps are in ``_SCHEMA_STEPS``; a file of an
#: older version is migrated step by step when it is opened, a newer one is refused.
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of every slot file ("shch"): tells our files from other SQLite
#: databases that happen to be in the data directory.
APPLICATION_ID = 0x73686368
SQLITE_HEADER = b"SQLite format 3\x00"
SLOT_FILE = re.compile(r"slot-(\d{3,})\.sqlite3")

#: Largest seq a slot file can hold, and the mask of the seq in an entry's key.
SEQ_MASK = (1 << STORAGE_SEQ_BITS) - 1
#: Largest room number in a slot file (keys are signed 64-bit integers).
MAX_ROOM_ID = (1 << (63 - STORAGE_SEQ_BITS)) - 1

_SCHEMA_STEPS: Dict[int, Tuple[str, ...]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
        # A room's seq is its newest entry's: a stored room always keeps at least that one.
        "CREATE TABLE rooms (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
        " epoch INTEGER NOT NULL)",
        # key = room id << STORAGE_SEQ_BITS | seq: one b-tree in (room, seq) order.
        "CREATE TABLE entries (key INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL,"
        " username TEXT NOT NULL, text TEXT NOT NULL)",
        # For people reading a file with the sqlite3 shell; shardchat does not use it.
        f"CREATE VIEW history AS SELECT rooms.name AS room, entries.key & {SEQ_MASK} AS seq,"
        " ts, kind, username, text FROM entries"
        f" JOIN rooms ON rooms.id = entries.key >> {STORAGE_SEQ_BITS}",
    ),
}

MOVE_AWAY = "move it away to start with empty history for its rooms, or restore it from a backup"


# Stable codes of StorageError (what a caller may match; the text is for people).
NOT_A_DIRECTORY = "not_a_directory"
CANNOT_CREATE = "cannot_create"
NOT_WRITABLE = "not_writable"
NO_SPACE = "no_space"
NOT_A_DATABASE = "not_a_database"
CORRUPTED = "corrupted"
NOT_OURS = "not_ours"
NEWER_SCHEMA = "newer_schema"
WRONG_SLOT = "wrong_slot"
IN_USE = "in_use"
UNUSABLE = "unusable"


class StorageError(Exception):
    """A data directory or slot file that cannot be used. ``str()`` is one line naming the
    file and what to do; ``code`` is one of the codes above; ``problems`` lists every such
    line when several files are bad."""

    def __init__(self, message: str, code: str = UNUSABLE, problems: Sequence[str] = ()) -> None:
        message = " ".join(message.splitlines())  # SQLite's own texts may span lines
        super().__init__(message)
        self.code = code
        self.problems: Tuple[str, ...] = tuple(problems) or (message,)


def slot_file_name(slot: int) -> str:
    """``slot-007.sqlite3`` for slot 7."""
    return f"slot-{slot:03d}.sqlite3"


def error_name(error: sqlite3.Error) -> str:
    """SQLite's result code name (``SQLITE_FULL``...) where Python gives it (3.11+), else
    guessed from SQLite's fixed message texts."""
    name = getattr(error, "sqlite_errorname", None)
    if name:
        return str(name)
    text = str(error)
    for needle, guess in (
        ("file is not a database", "SQLITE_NOTADB"),
        ("malformed", "SQLITE_CORRUPT"),
        ("locked", "SQLITE_BUSY"),
        ("disk is full", "SQLITE_FULL"),
        ("readonly", "SQLITE_READONLY"),
        ("unable to open", "SQLITE_CANTOPEN"),
        ("disk I/O error", "SQLITE_IOERR"),
    ):
        if needle in text:
            return guess
    return "SQLITE_ERROR"


def sqlite_problem(path: Path, error: sqlite3.Error) -> StorageError:
    """The operator's one line (and code) about *error* on slot file *path*."""
    name = error_name(error)
    if name.startswith("SQLITE_NOTADB"):
        return StorageError(
            f"{path} is not a SQLite database (corrupted?): {MOVE_AWAY}", NOT_A_DATABASE
        )
    if name.startswith("SQLITE_CORRUPT"):
        return StorageError(f"{path} is corrupted ({error}): {MOVE_AWAY}", CORRUPTED)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StorageError(
            f"{path} is in use by another process (another shardchat on the same data"
            " directory?): stop it, or pass another --data-dir",
            IN_USE,
        )
    if name.startswith("SQLITE_FULL"):
        return StorageError(f"{path}: {_NO_SPACE}", NO_SPACE)
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return StorageError(
            f"{path} cannot be opened for writing ({error}): check the permissions of it and"
            " its directory, or pass another --data-dir",
            NOT_WRITABLE,
        )
    return StorageError(f"{path} cannot be used ({name}: {error}): {MOVE_AWAY}", UNUSABLE)


_NO_SPACE = "no space left on its device: free some space, or pass another --data-dir"


def os_problem(path: Path, error: OSError, doing: str) -> StorageError:
    """The operator's one line (and code) about *error* while *doing* something to *path*."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return StorageError(f"{path}: {_NO_SPACE}", NO_SPACE)
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(
            f"{path} is not writable ({reason}): fix its permissions, or pass another --data-dir",
            NOT_WRITABLE,
        )
    return StorageError(
        f"{path} cannot be {doing} ({reason}): fix it, or pass another --data-dir",
        CANNOT_CREATE if doing == "created" else UNUSABLE,
    )


def _check_header(path: Path, shown: Path) -> None:
    """Raise ``StorageError`` unless *path* is empty or starts like a SQLite database (read
    with plain file I/O first, so the operator gets the errno, not SQLite's summary)."""
    try:
        with open(path, "rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except OSError as error:
        raise os_problem(shown, error, "read") from None
    if header and header != SQLITE_HEADER:
        raise StorageError(
            f"{shown} is not a SQLite database (corrupted?): {MOVE_AWAY}", NOT_A_DATABASE
        )


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """Open *path* (creating it if missing) in WAL mode, locked to this process."""
    conn = sqlite3.connect(str(path), timeout=STORAGE_BUSY_TIMEOUT, isolation_level=None)
    try:
        # Exclusive before the first access: WAL without a -shm file, and a second process
        # (another cluster on the same directory) is refused instead of writing too.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL journal mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA wal_autocheckpoint={STORAGE_CHECKPOINT_PAGES}")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA journal_size_limit={STORAGE_CHECKPOINT_PAGES * page_size}")
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare_schema(conn: sqlite3.Connection, path: Path, slot: int, slots: int) -> None:
    """Create or migrate the schema of a freshly opened slot file and check that it is ours,
    of a version we understand, and holds *slot* of *slots*. Raises ``StorageError``."""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id != APPLICATION_ID and (application_id or version or tables):
        raise StorageError(
            f"{path} is a SQLite database but not a shardchat history file: move it out of"
            f" {path.parent}",
            NOT_OURS,
        )
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"{path} has history schema version {version}, newer than this shardchat"
            f" understands ({SCHEMA_VERSION}): run the newer shardchat, or pass another"
            " --data-dir",
            NEWER_SCHEMA,
        )
    if version < SCHEMA_VERSION:
        _migrate(conn, version, slot, slots)
    layout = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if (layout.get("slot"), layout.get("slots")) != (slot, slots):
        raise StorageError(
            f"{path} holds storage slot {layout.get('slot')} of {layout.get('slots')}, not"
            f" slot {slot} of {slots} (renamed, or from another layout): {MOVE_AWAY}",
            WRONG_SLOT,
        )


def _migrate(conn: sqlite3.Connection, version: int, slot: int, slots: int) -> None:
    """Bring the schema from *version* to ``SCHEMA_VERSION`` in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _SCHEMA_STEPS[step]:
                conn.execute(statement)
        if version == 0:
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)", (("slot", slot), ("slots", slots))
            )
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def open_slot_file(
    path: Path,
    slot: int,
    slots: int = STORAGE_SLOTS,
    synchronous: str = "NORMAL",
    shown: Optional[Path] = None,
) -> sqlite3.Connection:
    """Open the file of storage *slot* (SQLite creates it if missing), ready to read and
    write: WAL, *synchronous*, locked to this process, schema checked (and migrated).

    The caller owns the connection. Raises ``StorageError`` with the operator's one line
    (naming *shown*, by default *path*) when the file cannot be opened, is not ours, is of
    a newer schema, or holds another slot.
    """
    shown = shown or path
    if path.exists():
        _check_header(path, shown)
    try:
        conn = _connect(path, synchronous)
    except sqlite3.Error as error:
        raise sqlite_problem(shown, error) from None
    try:
        _prepare_schema(conn, shown, slot, slots)
    except sqlite3.Error as error:
        conn.close()
        raise sqlite_problem(shown, error) from None
    except BaseException:
        conn.close()
        raise
    return conn


def highest_epoch(conn: sqlite3.Connection) -> int:
    """The greatest epoch the slot file holds or has held (its rooms' and the ones of
    forgotten rooms, kept in ``meta``); 0 for none. Raises ``sqlite3.Error``."""
    (stored,) = conn.execute("SELECT coalesce(max(epoch), 0) FROM rooms").fetchone()
    (forgotten,) = conn.execute(
        "SELECT coalesce(max(value), 0) FROM meta WHERE key = 'epoch_floor'"
    ).fetchone()
    return max(stored, forgotten)


def remember_epoch(conn: sqlite3.Connection, epoch: int) -> None:
    """Keep *epoch* (of a room whose rows are deleted) for :func:`highest_epoch`, inside the
    caller's transaction. Raises ``sqlite3.Error``."""
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch_floor', max(?, coalesce("
        "(SELECT value FROM meta WHERE key = 'epoch_floor'), 0)))",
        (epoch,),
    )


def create_slot_file(path: Path, slot: int, slots: int = STORAGE_SLOTS) -> None:
    """Create the empty slot file *path* atomically: built under a temporary name and
    renamed, so a slot file that exists is always complete (a failed creation, e.g. on a
    full disk, leaves nothing that could be mistaken for history). Raises ``StorageError``.
    """
    building = path.with_name(path.name + ".new")
    try:
        if building.exists():
            building.unlink()  # left by a creation that failed
        open_slot_file(building, slot, slots, shown=path).close()
        os.replace(building, path)
    except OSError as error:
        raise os_problem(path, error, "created") from None
    _sync_directory(path.parent)


def _sync_directory(path: Path) -> None:
    """fsync *path* so a rename in it survives a power cut (POSIX; Windows has no such
    call and needs none)."""
    if os.name != "posix":
        return
    try:
        handle = os.open(str(path), os.O_RDONLY)
    except OSError as error:
        log.warning("cannot open %s to sync it: %s", path, error)
        return
    try:
        os.fsync(handle)
    except OSError as error:
        log.warning("cannot sync %s: %s", path, error)
    finally:
        os.close(handle)


# --- the start check ------------------------------------------------------------------


def check_data_dir(data_dir: Union[str, Path], slots: int = STORAGE_SLOTS) -> None:
    """Make sure *data_dir* can hold the history, before any shard serves: create it if
    missing, then check that it is a writable directory with at least
    ``STORAGE_MIN_FREE_BYTES`` free, and that every slot file in it opens, is a shardchat
    history file of a schema this version understands, holds its slot, and passes
    ``PRAGMA quick_check``. Runs in the caller's process and closes every file it opened.

    Raises ``StorageError``: one line naming the first bad file and what to do (and how many
    more are bad; ``problems`` has them all), for the caller to print and exit 1.
    """
    path = Path(data_dir)
    _check_directory(path)
    problems: List[StorageError] = []
    for item in _slot_files(path, slots):
        problem = _check_slot_file(item)
        if problem is not None:
            problems.append(problem)
            if problem.code == IN_USE:
                break  # another cluster holds them all: waiting for each would take minutes
    if problems:
        message = str(problems[0])
        if len(problems) > 1:
            message += f" ({len(problems) - 1} more slot files in {path} have problems too)"
        raise StorageError(message, problems[0].code, [str(problem) for problem in problems])


def _check_directory(path: Path) -> None:
    """Create *path* if missing; raise ``StorageError`` unless it is a writable directory
    with room to spare."""
    if path.exists() and not path.is_dir():
        raise StorageError(
            f"{path} is not a directory: move it away, or pass another --data-dir", NOT_A_DIRECTORY
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(
            f"{path} cannot be created (a part of it is a file): pass another --data-dir",
            CANNOT_CREATE,
        ) from None
    except OSError as error:
        raise os_problem(path, error, "created") from None
    _probe_write(path)
    free = shutil.disk_usage(str(path)).free
    if free < STORAGE_MIN_FREE_BYTES:
        raise StorageError(
            f"{path}: only {free // 1024} KiB free on its device (at least"
            f" {STORAGE_MIN_FREE_BYTES // 1024} KiB needed): free some space, or pass another"
            " --data-dir",
            NO_SPACE,
        )


def _probe_write(path: Path) -> None:
    """Write, fsync and delete a small file in *path*: the one test of "writable" that
    holds for root, read-only mounts and full devices alike."""
    try:
        handle, name = tempfile.mkstemp(prefix=".probe-", dir=str(path))
    except OSError as error:
        raise os_problem(path, error, "written") from None
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(b"\0" * 4096)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise os_problem(path, error, "written") from None
    finally:
        try:
            os.unlink(name)
        except OSError as error:
            log.warning("could not remove the probe file %s: %s", name, error)


def _slot_files(path: Path, slots: int) -> Iterable[Tuple[Path, int, int]]:
    """``(file, slot, slots)`` for every ``slot-NNN.sqlite3`` in *path*, sorted."""
    for name in sorted(os.listdir(path)):
        match = SLOT_FILE.fullmatch(name)
        if match:
            yield path / name, int(match.group(1)), slots


def _check_slot_file(item: Tuple[Path, int, int]) -> Optional[StorageError]:
    """None if the slot file opens and passes ``quick_check``, else the operator's line."""
    path, slot, slots = item
    if slot >= slots:
        return StorageError(
            f"{path} is beyond the {slots} storage slots of this version (from another"
            f" layout?): {MOVE_AWAY}",
            WRONG_SLOT,
        )
    try:
        conn = open_slot_file(path, slot, slots)
    except StorageError as error:
        return error
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as error:
        return sqlite_problem(path, error)
    finally:
        conn.close()
    if verdict != [("ok",)]:
        finding = _first_finding(verdict)
        return StorageError(f"{path} is corrupted (quick_check: {finding}): {MOVE_AWAY}", CORRUPTED)
    return None


def _first_finding(verdict: Sequence[Tuple[str]]) -> str:
    """The first problem ``quick_check`` reports, without its "*** in database main ***"
    heading, on one line."""
    lines = [line for (text,) in verdict for line in str(text).splitlines()]
    findings = [line for line in lines if not line.startswith("***")]
    return (findings or lines or ["no answer"])[0]
