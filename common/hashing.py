"""Room -> shard mapping: a stable hash, the same in every process, run and platform.

Python's built-in ``hash()`` of a str is salted per process (PYTHONHASHSEED), so two
processes would disagree on where a room lives. BLAKE2b of the room's UTF-8 bytes is stable
everywhere and spreads well; the router caches the answer per room name.
"""

from __future__ import annotations

import hashlib


def room_hash(room: str) -> int:
    """A 64-bit unsigned hash of *room* that never changes across processes or versions."""
    digest = hashlib.blake2b(room.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def room_to_shard(room: str, shard_count: int) -> int:
    """Index in ``range(shard_count)`` of the shard that owns *room*.

    Raises ``ValueError`` if *shard_count* is not positive.
    """
    if shard_count < 1:
        raise ValueError(f"shard_count must be positive, got {shard_count}")
    return room_hash(room) % shard_count
