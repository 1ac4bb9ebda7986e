"""Durable history (issue 11) on real processes and real files: history survives a shard's
``kill -9``, a full stop and start, and a start with another shard count; seqs continue;
bad storage is one line and exit 1 at start, and a failing disk at run time is told to
the room's members while the shard keeps serving."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest

from common.hashing import room_to_shard
from shard.slot_files import SCHEMA_VERSION, create_slot_file, slot_file_name
from tests.cluster import START_CLUSTER, Cluster, LineClient
from tests.integration.test_http_api import Api

pytestmark = pytest.mark.timeout(120)

LINUX = sys.platform.startswith("linux")
FAST = ["--rate-limit", "0"]


def rooms_on_every_shard(prefix: str, shards: int, count: int) -> List[str]:
    """*count* room names, spread so that every one of *shards* shards has at least one."""
    chosen: Dict[int, List[str]] = {index: [] for index in range(shards)}
    i = 0
    while sum(len(names) for names in chosen.values()) < count or not all(chosen.values()):
        name = f"{prefix}{i}"
        index = room_to_shard(name, shards)
        if not chosen[index] or sum(map(len, chosen.values())) < count:
            chosen[index].append(name)
        i += 1
    return [name for names in chosen.values() for name in names][:count]


def history(client: LineClient, room: str) -> List[str]:
    """The room's HISTORY lines (the reply's body)."""
    client.send(f"HISTORY {room}")
    lines = client.read_until(lambda line: line.startswith(f"END HISTORY {room} "), timeout=15)
    return [line for line in lines if line.startswith("HISTORY ")]


def seq_of(line: str) -> int:
    return int(line.split(" ", 3)[2])


def send_and_wait(client: LineClient, room: str, texts: List[str]) -> List[str]:
    """Send every text to *room*, then read until the echo of the last; return all lines."""
    client.send_raw("".join(f"MSG {room} {text}\n" for text in texts).encode())
    last = texts[-1]
    return client.read_until(lambda line: line.endswith(f" {last}"), timeout=30)


def shard_pid(cluster: Cluster, index: int) -> int:
    """The pid of shard *index* now (its last restart's, else its first)."""
    for line in reversed(cluster.log_lines):
        match = re.search(rf"shard {index} restarted \(pid (\d+)", line)
        if match:
            return int(match.group(1))
    return cluster.shard_pids()[index]


def kill_shard(cluster: Cluster, index: int) -> None:
    restarts = sum(f"shard {index} restarted" in line for line in cluster.log_lines)
    os.kill(shard_pid(cluster, index), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while sum(f"shard {index} restarted" in line for line in cluster.log_lines) <= restarts:
        assert time.monotonic() < deadline, cluster.log
        time.sleep(0.05)


def settle(client: LineClient, rooms: List[str], timeout: float = 20.0) -> List[str]:
    """Wait until every room answers HISTORY again (its shard is back and the client was
    put back in); return the lines read meanwhile besides the replies."""
    seen: List[str] = []
    deadline = time.monotonic() + timeout
    for room in rooms:
        while True:
            client.send(f"HISTORY {room} 1")
            line = client.readline(10)
            seen.append(line)
            if line.startswith("HISTORY "):
                seen.extend(client.read_until(lambda reply: reply.startswith("END HISTORY")))
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
    return seen


def test_history_survives_kill_9_of_every_shard(tmp_path: Path) -> None:
    """600 messages in each of 3 rooms, every shard killed: the same last 500 entries come
    back, nobody hears history was lost, and the next message's seq continues."""
    rooms = rooms_on_every_shard("dur-", 2, 3)
    with Cluster(shards=2, data_dir=tmp_path, extra_args=FAST) as cluster:
        alice = cluster.connect(timeout=15)
        for room in rooms:
            alice.join(room, "alice")
        for room in rooms:
            send_and_wait(alice, room, [f"{room}-m{i}" for i in range(600)])
        before = {room: history(alice, room) for room in rooms}
        assert all(len(lines) == 500 for lines in before.values())
        assert before[rooms[0]][-1].endswith(f"{rooms[0]}-m599")
        for index in range(2):
            kill_shard(cluster, index)
        heard = settle(alice, rooms)
        assert not [line for line in heard if line.startswith("INFO")], heard
        after = {room: history(alice, room) for room in rooms}
        assert after == before
        for room in rooms:
            send_and_wait(alice, room, ["after"])
            newest = history(alice, room)[-1]
            assert newest.endswith(" alice after")
            assert seq_of(newest) == seq_of(before[room][-1]) + 1
        alice.close()
        # the HTTP side: a poll's cursors from before a kill -9 go on without `missed`
        api = Api(cluster, timeout=15)
        api.join(rooms[0], "bob")
        first = api.poll(f"room={rooms[0]}&after=0")
        kill_shard(cluster, room_to_shard(rooms[0], 2))
        deadline = time.monotonic() + 20
        while True:
            reply = api.post("/api/send", {"room": rooms[0], "text": "bob after the kill"})
            if reply.status == 200:
                break
            assert time.monotonic() < deadline, reply.json
            time.sleep(0.1)
        later = api.poll("cursors=" + first["cursors"])
        assert later["missed"] is False and later["epoch"] == first["epoch"]
        assert [m["text"] for m in later["messages"]] == ["bob after the kill"]
        api.close()


def test_history_survives_a_stop_and_a_start_with_other_shard_counts(tmp_path: Path) -> None:
    rooms = [f"move-{i}" for i in range(12)]
    with Cluster(shards=2, data_dir=tmp_path, extra_args=FAST) as cluster:
        alice = cluster.connect(timeout=15)
        for room in rooms:
            alice.join(room, "alice")
            send_and_wait(alice, room, [f"{room} says {i}" for i in range(30)])
        before = {room: history(alice, room) for room in rooms}
        alice.close()
        assert cluster.stop() == 0
    for shards in (3, 1):
        with Cluster(shards=shards, data_dir=tmp_path, extra_args=FAST) as cluster:
            assert any(f"history kept in {tmp_path}" in line for line in cluster.log_lines)
            bob = cluster.connect(timeout=15)
            for room in rooms:
                bob.join(room, f"bob{shards}")
                lines = history(bob, room)
                # what was there, then the leaves and joins since, bob's join the newest
                assert lines[: len(before[room])] == before[room]
                assert lines[-1].endswith(f" * bob{shards} joined {room}")
                seqs = [seq_of(line) for line in lines]
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # seqs continue
            bob.close()
            assert cluster.stop() == 0


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="kills a process group (POSIX)")
@pytest.mark.parametrize("routers", [1, 2])
def test_history_survives_kill_9_of_the_whole_cluster_and_a_start_with_more_shards(
    tmp_path: Path, routers: int
) -> None:
    """Every process killed at once: what the shards journaled and had not moved into the
    slot files yet is moved by the next start, before shards that own other slots serve."""
    rooms = [f"crash-{i}" for i in range(8)]
    extra = [*FAST, "--routers", str(routers)]
    with Cluster(shards=2, data_dir=tmp_path, extra_args=extra, new_session=True) as cluster:
        alice = cluster.connect(timeout=15)
        for room in rooms:
            alice.join(room, "alice")
            send_and_wait(alice, room, [f"{room} says {i}" for i in range(40)])
        before = {room: history(alice, room) for room in rooms}
        cluster.signal_group(signal.SIGKILL)
        cluster.proc.wait(10)
        alice.close()
    journals = sorted(path.name for path in tmp_path.glob("journal-*.log"))
    assert journals == ["journal-000.log", "journal-001.log"]
    with Cluster(shards=3, data_dir=tmp_path, extra_args=FAST) as cluster:
        bob = cluster.connect(timeout=15)
        for room in rooms:
            bob.join(room, "bob")
            lines = history(bob, room)
            # what was there (alice's leave was never recorded: her shard died with her),
            # then bob's join, its seq next
            assert lines[:-1] == before[room]
            assert lines[-1].endswith(f" * bob joined {room}")
            assert seq_of(lines[-1]) == seq_of(before[room][-1]) + 1
        bob.no_line()  # nothing said about history being lost
        bob.close()
        assert cluster.stop() == 0
    assert not [path for path in tmp_path.glob("journal-*.log") if path.stat().st_size]


def test_every_echoed_message_of_a_flood_is_in_history_after_a_crash(tmp_path: Path) -> None:
    """A shard killed in the middle of a flood loses at most the batch it had not
    committed: nothing a client saw echoed."""
    room = "flood"
    with Cluster(shards=2, data_dir=tmp_path, extra_args=FAST) as cluster:
        alice = cluster.connect(timeout=15)
        alice.join(room, "alice")
        texts = [f"flood-{i}" for i in range(450)]

        sent = [0]
        killed = threading.Event()

        def flood() -> None:  # still sending when the shard dies: it dies mid-stream
            for number, text in enumerate(texts):
                if number == len(texts) - 50:  # (however slow the echoes: the last 50 after)
                    killed.wait(30)
                try:
                    alice.send_raw(f"MSG {room} {text}\n".encode())
                except OSError:
                    return
                sent[0] += 1
                time.sleep(0.002)

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        echoed: List[str] = []
        while len(echoed) < 100:
            line = alice.readline(10)
            if line.startswith(f"MSG {room} alice "):
                echoed.append(line.split(" ", 3)[3])
        os.kill(shard_pid(cluster, room_to_shard(room, 2)), signal.SIGKILL)
        sent_at_kill = sent[0]
        killed.set()
        # read what else arrives (echoes, refusals) until it goes quiet
        while True:
            try:
                line = alice.readline(3)
            except (socket.timeout, TimeoutError):
                break
            if line.startswith(f"MSG {room} alice "):
                echoed.append(line.split(" ", 3)[3])
        sender.join(10)
        assert sent[0] > sent_at_kill  # the flood went on past the kill: it died mid-stream
        settle(alice, [room])
        stored = {line.split(" ", 5)[5] for line in history(alice, room)}
        assert set(echoed) <= stored, sorted(set(echoed) - stored)[:5]
        alice.close()


# --- bad storage at start: one line, exit 1 ------------------------------------------------


def start_and_fail(data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(START_CLUSTER), "--tcp-port", "0", "--http-port", "0"]
    return subprocess.run(
        [*args, "--shards", "2", "--data-dir", str(data_dir), *extra],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_exit_1(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "listening" not in result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history"
    path.write_text("not a directory")
    assert_one_line_exit_1(start_and_fail(path), str(path))


def test_a_corrupted_slot_file_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / slot_file_name(7)
    bad.write_bytes(b"this is not a database" * 500)
    assert_one_line_exit_1(start_and_fail(tmp_path), slot_file_name(7))
    assert bad.read_bytes().startswith(b"this is not a database")  # left as it was


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / slot_file_name(3)
    create_slot_file(path, 3)
    conn = sqlite3.connect(str(path))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    line = assert_one_line_exit_1(start_and_fail(tmp_path), slot_file_name(3))
    assert "newer" in line


def test_a_second_cluster_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with Cluster(shards=2, data_dir=tmp_path, extra_args=FAST) as cluster:
        alice = cluster.connect()
        alice.join("shared", "alice")  # its shard opens (and locks) the room's slot file
        send_and_wait(alice, "shared", ["hello"])
        assert_one_line_exit_1(start_and_fail(tmp_path), "in use")
        alice.close()


@pytest.mark.skipif(not LINUX, reason="raises the limit again with resource.prlimit (Linux)")
def test_a_full_disk_at_run_time_is_told_and_nothing_is_lost_once_it_recovers(
    tmp_path: Path,
) -> None:
    """Files may not grow past 192 KiB (``RLIMIT_FSIZE``, as a full disk would): commits
    fail, the members hear that history is not being saved, the room goes on from memory;
    once files may grow again, what waited is stored and they hear so."""
    import resource

    room = "fullroom"
    with Cluster(shards=1, data_dir=tmp_path, extra_args=FAST, file_size_limit=192 * 1024) as cl:
        alice = cl.connect(timeout=15)
        bob = cl.connect(timeout=15)
        alice.join(room, "alice")
        bob.join(room, "bob")
        alice.expect(f"INFO bob joined {room}")
        carol = Api(cl, timeout=15)  # a browser in the room
        carol.join(room, "carol")
        cursors = carol.poll(f"room={room}&after=0")["cursors"]
        notice = f"INFO room {room} history not saved"
        sent = 0
        while True:
            assert sent < 2000, "commits never failed"
            lines = send_and_wait(alice, room, [f"big-{sent} " + "x" * 1500])
            sent += 1
            told = [line for line in lines if line.startswith(notice)]
            if told:
                break
        assert len(told) == 1
        bob.read_until(lambda line: line.startswith(notice))
        notices: List[str] = []
        while not notices:
            polled = carol.poll("cursors=" + cursors)
            cursors = polled["cursors"]
            notices = polled["rooms"][room].get("notices", [])
        assert len(notices) == 1 and notices[0] == told[0][len("INFO ") :]
        # still served from memory, and not told again for every message
        more = send_and_wait(alice, room, [f"while-full-{i}" for i in range(20)])
        assert not [line for line in more if line.startswith("INFO room")]
        assert history(alice, room)[-1].endswith("while-full-19")
        shard = shard_pid(cl, 0)
        resource.prlimit(shard, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        lines = send_and_wait(alice, room, ["after the disk came back"])
        if not [line for line in lines if line.startswith("INFO room")]:  # (an idle retry
            lines += alice.read_until(lambda line: line.startswith("INFO room"))  # may be first)
        assert f"INFO room {room} history saved again" in lines
        before = history(alice, room)
        kill_shard(cl, 0)
        settle(alice, [room])
        after = history(alice, room)
        assert after[: len(before)] == before  # everything, the full-disk messages too
        assert "Traceback" not in cl.log
        alice.close()
        bob.close()
        carol.close()
