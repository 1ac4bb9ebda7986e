"""Room -> shard and room -> storage slot -> shard hashing: stable across processes and
versions, and evenly spread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Callable

import pytest

from common.hashing import (
    room_hash,
    room_to_shard,
    room_to_slot,
    shard_slots,
    slot_to_shard,
)
from common.limits import MAX_SHARDS, STORAGE_SLOTS
from tests.cluster import ROOT

pytestmark = pytest.mark.timeout(60)

# Computed once (BLAKE2b-64 of the UTF-8 name, big-endian). They must never change: a
# router and its shards, or two versions during an upgrade, must agree where a room lives.
KNOWN_HASHES = {
    "lobby": 11664609480044122678,
    "Lobby": 7803253681045219132,
    "general": 12653298204465543517,
    "a": 4681665781835383343,
    "": 16476032584258269876,
    "zoë": 5923137667275124194,
    "日本": 16731776207566445370,
    "room-0": 4233017081410561595,
    "room-9999": 14443258269002400842,
}


@pytest.mark.parametrize("room", list(KNOWN_HASHES), ids=repr)
def test_known_hash(room: str) -> None:
    assert room_hash(room) == KNOWN_HASHES[room]


# --- storage slots: room -> slot -> shard ------------------------------------------------

# Computed once. They must never change while history exists: a room's slot names its file.
KNOWN_SLOTS = {"lobby": 54, "general": 93, "a": 47, "zoë": 226, "日本": 58, "room-0": 59, "": 180}
# A room is routed to the shard that owns its slot: these must not change either.
KNOWN_SLOT_SHARDS = {  # room -> owning shard for 1, 2, 3, 4 and 64 shards
    "lobby": [0, 0, 0, 0, 13],
    "general": [0, 0, 1, 1, 23],
    "zoë": [0, 1, 2, 3, 56],
    "": [0, 1, 2, 2, 45],
}
SLOT_COUNTS = [1, 2, 3, 4, 64]


def test_there_are_at_least_as_many_slots_as_shards_allowed() -> None:
    assert STORAGE_SLOTS >= MAX_SHARDS


@pytest.mark.parametrize("room", list(KNOWN_SLOTS), ids=repr)
def test_known_slot(room: str) -> None:
    assert room_to_slot(room) == KNOWN_SLOTS[room]


@pytest.mark.parametrize("room", list(KNOWN_SLOT_SHARDS), ids=repr)
def test_known_slot_shard(room: str) -> None:
    assert [room_to_shard(room, n) for n in SLOT_COUNTS] == KNOWN_SLOT_SHARDS[room]


@pytest.mark.parametrize("count", range(1, MAX_SHARDS + 1))
def test_every_slot_is_owned_by_exactly_one_shard(count: int) -> None:
    owners = Counter(slot for index in range(count) for slot in shard_slots(index, count))
    assert sorted(owners) == list(range(STORAGE_SLOTS))
    assert set(owners.values()) == {1}
    for index in range(count):
        owned = shard_slots(index, count)
        assert owned.step == 1 and len(owned) >= 1  # a contiguous, non-empty range
        assert all(slot_to_shard(slot, count) == index for slot in owned)
    sizes = {len(shard_slots(index, count)) for index in range(count)}
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("count", [1, 2, 3, 7, 64])
def test_a_room_goes_to_the_shard_that_owns_its_slot(count: int) -> None:
    for i in range(2000):
        room = f"room-{i}"
        shard = room_to_shard(room, count)
        assert room_to_slot(room) in shard_slots(shard, count)


@pytest.mark.parametrize("slots", [1, 5, 64, 256])
def test_a_smaller_layout_works_the_same(slots: int) -> None:
    count = min(slots, 4)
    owned = [slot for index in range(count) for slot in shard_slots(index, count, slots)]
    assert owned == list(range(slots))
    assert all(0 <= room_to_slot(f"r{i}", slots) < slots for i in range(500))


@pytest.mark.parametrize(
    "call",
    [
        lambda: room_to_slot("lobby", 0),
        lambda: slot_to_shard(0, 0),
        lambda: slot_to_shard(0, STORAGE_SLOTS + 1),
        lambda: slot_to_shard(-1, 2),
        lambda: slot_to_shard(STORAGE_SLOTS, 2),
        lambda: shard_slots(2, 2),
        lambda: shard_slots(-1, 2),
        lambda: shard_slots(0, 0),
    ],
    ids=[
        "no-slots",
        "no-shards",
        "more-shards-than-slots",
        "negative-slot",
        "slot-past-the-end",
        "index-past-the-end",
        "negative-index",
        "no-shards-for-slots",
    ],
)
def test_bad_layouts_are_refused(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


def test_slots_spread_evenly() -> None:
    per_slot = Counter(room_to_slot(f"room-{i}") for i in range(100_000))
    even = 100_000 / STORAGE_SLOTS
    assert len(per_slot) == STORAGE_SLOTS
    # 390 rooms a slot on average, a standard deviation of ~20: 25% is 5 of them.
    assert all(abs(n - even) <= 0.25 * even for n in per_slot.values())


_SLOT_CHILD = (
    "import json, sys; from common.hashing import room_to_slot, room_to_shard; "
    "rooms = json.loads(sys.stdin.read()); "
    "print(json.dumps([[room_to_slot(r), room_to_shard(r, 3)] for r in rooms]))"
)


@pytest.mark.parametrize("seed", ["0", "1", "random"])
def test_slots_are_the_same_in_a_process_with_another_hash_seed(seed: str) -> None:
    rooms = [*KNOWN_SLOTS, *(f"room-{i}" for i in range(200))]
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run(
        [sys.executable, "-c", _SLOT_CHILD],
        input=json.dumps(rooms),
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=30,
        check=True,
    ).stdout
    assert json.loads(out) == [[room_to_slot(r), room_to_shard(r, 3)] for r in rooms]
