"""Room -> shard hashing: stable across processes and versions, and evenly spread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from common.hashing import room_hash, room_to_shard
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

KNOWN_SHARDS = {  # room -> shard for 2, 3, 4, 8 and 64 shards
    "lobby": [0, 1, 2, 6, 54],
    "general": [1, 1, 1, 5, 29],
    "a": [1, 2, 3, 7, 47],
    "zoë": [0, 0, 2, 2, 34],
    "日本": [0, 0, 2, 2, 58],
    "room-0": [1, 2, 3, 3, 59],
}
COUNTS = [2, 3, 4, 8, 64]


@pytest.mark.parametrize("room", list(KNOWN_HASHES), ids=repr)
def test_known_hash(room: str) -> None:
    assert room_hash(room) == KNOWN_HASHES[room]


@pytest.mark.parametrize("room", list(KNOWN_SHARDS), ids=repr)
def test_known_shard(room: str) -> None:
    assert [room_to_shard(room, n) for n in COUNTS] == KNOWN_SHARDS[room]


def test_hash_is_64_bit_unsigned() -> None:
    values = [room_hash(f"r{i}") for i in range(1000)]
    assert all(0 <= v < 2**64 for v in values)
    assert max(values) >= 2**63  # the top bit is used


def test_one_shard_takes_everything() -> None:
    assert {room_to_shard(f"r{i}", 1) for i in range(100)} == {0}


@pytest.mark.parametrize("count", [0, -1])
def test_shard_count_must_be_positive(count: int) -> None:
    with pytest.raises(ValueError, match="shard_count"):
        room_to_shard("lobby", count)


_CHILD = (
    "import json, sys; from common.hashing import room_hash, room_to_shard; "
    "rooms = json.loads(sys.stdin.read()); "
    "print(json.dumps([[room_hash(r), room_to_shard(r, 7)] for r in rooms]))"
)


@pytest.mark.parametrize("seed", ["0", "1", "12345", "random"])
def test_same_in_a_process_with_another_hash_seed(seed: str) -> None:
    rooms = [*KNOWN_HASHES, *(f"room-{i}" for i in range(200))]
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps(rooms),
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=30,
        check=True,
    ).stdout
    assert json.loads(out) == [[room_hash(r), room_to_shard(r, 7)] for r in rooms]


@pytest.mark.parametrize("count", [2, 4, 8])
def test_spread(count: int) -> None:
    rooms = 10_000
    per_shard = Counter(room_to_shard(f"room-{i}", count) for i in range(rooms))
    even = rooms / count
    assert set(per_shard) == set(range(count))
    for shard, n in per_shard.items():
        assert abs(n - even) <= 0.1 * even, (shard, n, even)


def test_spread_of_short_similar_names() -> None:
    # Names people actually pick differ in one character; they must not cluster.
    per_shard = Counter(room_to_shard(f"{a}{b}", 4) for a in "abcdefghij" for b in "0123456789")
    assert len(per_shard) == 4
    assert max(per_shard.values()) <= 40
