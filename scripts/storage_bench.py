#!/usr/bin/env python3
"""What durable history costs a shard: a benchmark of ``shard/storage.py``, not a test.

Measured in one process on real files (in a temporary directory under ``--dir``, which
should be on the disk the data directory will be on; never a tmpfs)::

    python scripts/storage_bench.py                 # everything, about a minute
    python scripts/storage_bench.py --seconds 0.5   # quicker, noisier

Each rate is the median of five rounds, by wall clock, with the CPU time this process
spent (the rest is waiting for the disk: fsyncs).

``commit``
    Commits per second and microseconds per stored message for batches of 1, 10, 100 and
    1000 messages (64-character texts) in one commit, with ``synchronous=NORMAL`` (the
    default) and ``FULL``. The room is past its 500 entries first, so every commit also
    deletes what falls out of the retention, as in steady state.
``spread``
    100 messages per commit spread over 1, 10 and 100 rooms in as many slot files: one
    transaction per slot file, so this is the price of a batch that touches many slots.
``size``
    Bytes on disk per room with 500 entries of 64 and of 2000 characters (rooms of one
    slot file, after the WAL is checkpointed and removed by close), and what loading one
    such room (at a shard start) and ``quick_check`` (the start check) cost.

Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

HERE = Path(__file__).resolve().parent.parent
#: Rounds per measurement; the median one is reported.
ROUNDS = 5
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common.hashing import room_to_slot  # noqa: E402
from common.limits import HISTORY_SIZE  # noqa: E402
from shard.slot_files import check_data_dir, slot_file_name  # noqa: E402
from shard.storage import SqliteStore  # noqa: E402


def rooms_in_distinct_slots(count: int) -> List[str]:
    """*count* room names whose slots all differ."""
    seen: Dict[int, str] = {}
    for number in range(100_000):
        seen.setdefault(room_to_slot(f"room-{number}"), f"room-{number}")
        if len(seen) == count:
            break
    return list(seen.values())


def rooms_in_one_slot(count: int) -> List[str]:
    """*count* room names that all hash to slot 0's file."""
    names = (f"room-{number}" for number in range(10_000_000))
    return [name for name, _ in zip((n for n in names if room_to_slot(n) == 0), range(count))]


class Writer:
    """Appends consecutive entries to rooms of one store, as a shard core would."""

    def __init__(self, store: SqliteStore, rooms: List[str], text: str) -> None:
        self.store = store
        self.text = text
        self.state = {room: [store.load(room).epoch, 0] for room in rooms}

    def stage(self, room: str, count: int) -> None:
        epoch_seq = self.state[room]
        for _ in range(count):
            epoch_seq[1] += 1
            self.store.append(
                room, epoch_seq[0], (epoch_seq[1], time.time(), "chat", "u", self.text)
            )


def timed_commits(writer: Writer, rooms: List[str], per_room: int, seconds: float) -> Dict:
    """Stage *per_room* messages in each room and commit, again and again, in ``ROUNDS``
    rounds of *seconds* / ``ROUNDS``; the median round's rates (the machine may be shared:
    the median is steadier than the mean), wall clock and CPU time of this process."""
    for room in rooms:  # warm up: past the retention, files open
        writer.stage(room, HISTORY_SIZE + 10)
    assert writer.store.commit().ok
    rounds = []
    for _ in range(ROUNDS):
        commits = 0
        start, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds / ROUNDS:
            for room in rooms:
                writer.stage(room, per_room)
            assert writer.store.commit().ok
            commits += 1
        rounds.append((time.perf_counter() - start, time.process_time() - cpu, commits))
    wall, cpu, commits = sorted(rounds, key=lambda item: item[0] / item[2])[ROUNDS // 2]
    messages = commits * per_room * len(rooms)
    return {
        "commits_per_s": round(commits / wall, 1),
        "messages_per_s": round(messages / wall),
        "us_per_message": round(wall / messages * 1e6, 2),
        "cpu_us_per_message": round(cpu / messages * 1e6, 2),
        "us_per_commit": round(wall / commits * 1e6, 1),
    }


def fresh_dir(base: Path) -> Path:
    path = Path(tempfile.mkdtemp(prefix="storage-bench-", dir=str(base)))
    check_data_dir(path)
    return path


def bench_commit(base: Path, seconds: float) -> Iterator[Dict]:
    for synchronous in ("NORMAL", "FULL"):
        for batch in (1, 10, 100, 1000):
            path = fresh_dir(base)
            store = SqliteStore(path, synchronous=synchronous)
            try:
                result = timed_commits(
                    Writer(store, ["lobby"], "x" * 64), ["lobby"], batch, seconds
                )
            finally:
                store.close()
                shutil.rmtree(path)
            yield {"bench": "commit", "synchronous": synchronous, "batch": batch, **result}


def bench_spread(base: Path, seconds: float) -> Iterator[Dict]:
    for slots in (1, 10, 100):
        path = fresh_dir(base)
        store = SqliteStore(path)
        rooms = rooms_in_distinct_slots(slots)
        try:
            result = timed_commits(Writer(store, rooms, "x" * 64), rooms, 100 // slots, seconds)
        finally:
            store.close()
            shutil.rmtree(path)
        yield {"bench": "spread", "batch": 100, "slot_files": slots, **result}


def bench_size(base: Path) -> Iterator[Dict]:
    for chars in (64, 2000):
        path = fresh_dir(base)
        rooms = rooms_in_one_slot(40)
        store = SqliteStore(path)
        writer = Writer(store, rooms, "y" * chars)
        for room in rooms:
            writer.stage(room, 600)  # 100 more than are kept: retention has deleted some
            assert store.commit().ok
        store.close()
        file = path / slot_file_name(0)
        size = file.stat().st_size
        store = SqliteStore(path)
        start = time.perf_counter()
        for room in rooms:
            assert len(store.load(room).entries) == HISTORY_SIZE
        load_ms = (time.perf_counter() - start) / len(rooms) * 1000
        store.close()
        start = time.perf_counter()
        check_data_dir(path)
        check_ms = (time.perf_counter() - start) * 1000
        shutil.rmtree(path)
        yield {
            "bench": "size",
            "text_chars": chars,
            "rooms": len(rooms),
            "bytes_per_room": size // len(rooms),
            "bytes_per_entry": size // len(rooms) // HISTORY_SIZE,
            "load_ms_per_room": round(load_ms, 2),
            "check_ms_per_mib": round(check_ms / (size / 2**20), 1),
        }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--benches", default="commit,spread,size")
    args = parser.parse_args(argv)
    chosen = set(args.benches.split(","))
    runs = []
    if "commit" in chosen:
        runs.append(bench_commit(args.dir, args.seconds))
    if "spread" in chosen:
        runs.append(bench_spread(args.dir, args.seconds))
    if "size" in chosen:
        runs.append(bench_size(args.dir))
    print(json.dumps({"python": sys.version.split()[0], "cpus": os.cpu_count()}), flush=True)
    for run in runs:
        for result in run:
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
