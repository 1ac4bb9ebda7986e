"""Room -> shard and room -> storage slot mapping: stable hashes, the same in every process,
run and platform.

Python's built-in ``hash()`` of a str is salted per process (PYTHONHASHSEED), so two
processes would disagree on where a room lives. BLAKE2b of the room's UTF-8 bytes is stable
everywhere and spreads well; the router caches the answer per room name.

Durable history is laid out in ``STORAGE_SLOTS`` fixed virtual *slots* (one SQLite file
each, ``shard/storage.py``): a room always hashes to the same slot, whatever the shard
count, and shard ``index`` of ``count`` owns a contiguous range of whole slots
(:func:`shard_slots`). Routing a room to :func:`room_to_shard` therefore sends it to the
shard that holds its file, for every count from 1 to ``STORAGE_SLOTS``.
"""

from __future__ import annotations

import hashlib

from common.limits import STORAGE_SLOTS


def room_hash(room: str) -> int:
    """A 64-bit unsigned hash of *room* that never changes across processes or versions."""
    digest = hashlib.blake2b(room.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def room_to_slot(room: str, slots: int = STORAGE_SLOTS) -> int:
    """The storage slot in ``range(slots)`` that holds *room*'s history; independent of the
    shard count. Raises ``ValueError`` if *slots* is not positive."""
    if slots < 1:
        raise ValueError(f"slots must be positive, got {slots}")
    return room_hash(room) % slots


def _check_layout(shard_count: int, slots: int) -> None:
    if not 1 <= shard_count <= slots:
        raise ValueError(f"shard_count must be in 1..{slots} (one slot each at least)")


def slot_to_shard(slot: int, shard_count: int, slots: int = STORAGE_SLOTS) -> int:
    """Index of the shard (of *shard_count*) that owns storage *slot*.

    Shard ``i`` owns the slots ``s`` with ``s * shard_count // slots == i``: a contiguous
    range, the ranges' sizes differing by at most one. Raises ``ValueError`` if *slot* is
    not in ``range(slots)`` or *shard_count* not in ``1..slots``.
    """
    _check_layout(shard_count, slots)
    if not 0 <= slot < slots:
        raise ValueError(f"slot must be in range({slots}), got {slot}")
    return slot * shard_count // slots


def shard_slots(index: int, shard_count: int, slots: int = STORAGE_SLOTS) -> range:
    """The storage slots shard *index* of *shard_count* owns (the inverse of
    :func:`slot_to_shard`). Raises ``ValueError`` for an index outside ``range(shard_count)``
    or a *shard_count* not in ``1..slots``."""
    _check_layout(shard_count, slots)
    if not 0 <= index < shard_count:
        raise ValueError(f"index must be in range({shard_count}), got {index}")
    # s * count // slots == index  <=>  ceil(index * slots / count) <= s < ceil(...(index+1))
    start = -(-index * slots // shard_count)
    stop = -(-(index + 1) * slots // shard_count)
    return range(start, stop)


def room_to_shard(room: str, shard_count: int, slots: int = STORAGE_SLOTS) -> int:
    """Index in ``range(shard_count)`` of the shard that owns *room*: the one that owns the
    room's storage slot, so a room's history file is always where the room is served.

    Raises ``ValueError`` if *shard_count* is not in ``1..slots``.
    """
    return slot_to_shard(room_to_slot(room, slots), shard_count, slots)
