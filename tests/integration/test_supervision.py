"""Shard supervision on a real cluster: a shard killed, crashing at start, or stopped.

The router must keep every other room serving, restart a dead shard with backoff and put
its members back (their history is lost, and they are told so), give up on a shard that
keeps crashing (its rooms answer ``ERROR room unavailable``), and answer requests to a
stopped shard's rooms with an error after ``REQUEST_TIMEOUT`` instead of hanging.

Linux/POSIX only: the tests send signals (``kill -9``, SIGSTOP/SIGCONT) to shard pids.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from typing import Iterator, List, Tuple

import pytest

from common.hashing import room_to_shard
from common.limits import MAX_RESTARTS, MAX_SHARD_BACKLOG_BYTES, REQUEST_TIMEOUT
from tests.cluster import Cluster, LineClient, pid_alive, router_rss_kb, wait_gone

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="signals to shard pids, /proc"
)

SHARDS = 2


def room_on(shard: int, prefix: str) -> str:
    """The first room called ``<prefix><i>`` that lives on *shard*."""
    for i in range(1000):
        room = f"{prefix}{i}"
        if room_to_shard(room, SHARDS) == shard:
            return room
    raise AssertionError("no room found")


def read_until(c: LineClient, wanted: str, timeout: float) -> List[str]:
    return c.read_until(lambda line: line == wanted, timeout=timeout)


def no_traceback(cluster: Cluster) -> None:
    assert "Traceback" not in cluster.log, cluster.log[-4000:]


class SteadyTalker:
    """Sends numbered messages to a room from one client, in a thread, while another
    member reads them: afterwards :meth:`check` asserts nothing was lost or reordered."""

    def __init__(self, talker: LineClient, reader: LineClient, room: str) -> None:
        self.talker, self.reader, self.room = talker, reader, room
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = b"".join(f"MSG {self.room} n{self.sent + i}\n".encode() for i in range(10))
            self.talker.send_raw(batch)
            self.sent += 10
            time.sleep(0.02)

    def check(self) -> int:
        self._stop.set()
        self._thread.join(5)
        expected = [f"MSG {self.room} talker n{i}" for i in range(self.sent)]
        for c in (self.talker, self.reader):
            got = [line for line in c.read_lines(self.sent, timeout=10.0)]
            assert got == expected
        return self.sent


# --- kill -9 -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["spawn", "fork"], ids=str)
def test_killed_shard_is_restarted_and_its_members_chat_again(start_method: str) -> None:
    with Cluster(
        shards=SHARDS, start_method=start_method, extra_args=["--rate-limit", "0"]
    ) as cluster:
        victim_room, safe_room = room_on(0, "victim"), room_on(1, "safe")
        old_pid = cluster.shard_pids()[0]
        a1, a2 = cluster.connect(), cluster.connect()
        a1.join(victim_room, "a1")
        a2.join(victim_room, "a2")
        talker, reader = cluster.connect(), cluster.connect()
        reader.join(safe_room, "reader")
        talker.join(safe_room, "talker")
        reader.expect(f"INFO talker joined {safe_room}")
        a1.send(f"MSG {victim_room} before the crash")
        for c in (a1, a2):
            read_until(c, f"MSG {victim_room} a1 before the crash", timeout=5)
        steady = SteadyTalker(talker, reader, safe_room)
        # Traffic in flight to the victim as it dies.
        a1.send_raw(b"".join(f"MSG {victim_room} burst {i}\n".encode() for i in range(200)))

        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        elapsed, a1_lines = chat_until_echo(a1, victim_room, "a1", timeout=20.0)
        print(f"\n[{start_method}] kill -9 to first successful MSG echo: {elapsed:.2f}s")

        line = cluster.wait_for_log(r"shard 0 restarted \(pid \d+", timeout=10)
        new_pid = int(re.search(r"pid (\d+)", line).group(1))  # type: ignore[union-attr]
        assert new_pid != old_pid and pid_alive(new_pid)
        assert wait_gone([old_pid], 5.0) == []
        restarted = f"INFO room {victim_room} restarted, history lost"
        assert restarted in a1_lines
        a2_lines = read_until(a2, restarted, timeout=10)
        assert not any(line.startswith("ERROR") for line in a2_lines)
        # a2 gets a1's successful probe: both are members again.
        probe = [line for line in a1_lines if line.startswith(f"MSG {victim_room} a1 probe")][-1]
        read_until(a2, probe, timeout=5)
        a2.send(f"MSG {victim_room} a2 is back")
        for c in (a1, a2):
            read_until(c, f"MSG {victim_room} a2 a2 is back", timeout=5)
        a1.send(f"NAMES {victim_room}")
        read_until(a1, f"NAMES {victim_room} a1 a2", timeout=5)
        # History is gone: only what was said after the restart.
        a1.send(f"HISTORY {victim_room}")
        history = a1.read_until(lambda line: line.startswith("END HISTORY"), timeout=5)
        assert not any("before the crash" in line or " burst " in line for line in history)
        assert any(line.endswith(" a2 a2 is back") for line in history)
        # The other shard's room lost nothing while this happened.
        assert steady.check() > 0
        assert time.monotonic() - killed_at < 30
        no_traceback(cluster)


def chat_until_echo(
    c: LineClient, room: str, username: str, timeout: float
) -> Tuple[float, List[str]]:
    """Keep sending ``MSG room probe-k`` until one is echoed. Returns the seconds from the
    call to the first echo, and every line read meanwhile."""
    start = time.monotonic()
    lines: List[str] = []
    k = 0
    while time.monotonic() - start < timeout:
        c.send(f"MSG {room} probe-{k}")
        k += 1
        probe_deadline = time.monotonic() + 0.2
        while time.monotonic() < probe_deadline:
            try:
                line = c.readline(max(0.01, probe_deadline - time.monotonic()))
            except (TimeoutError, OSError):
                break
            lines.append(line)
            if line.startswith(f"MSG {room} {username} probe-"):
                return time.monotonic() - start, lines
    raise AssertionError(f"no echo in {timeout}s; last lines {lines[-5:]}")


# --- a shard that crashes at start -------------------------------------------------------


@pytest.fixture(scope="module")
def crashing_cluster() -> Iterator[Cluster]:
    cluster = Cluster(shards=SHARDS, extra_args=["--fault-crash-shard", "0"]).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.timeout(60)
def test_crashing_shard_trips_the_restart_limit(crashing_cluster: Cluster) -> None:
    cluster = crashing_cluster
    cluster.wait_for_log(r"shard 0 died .*giving up", timeout=30)
    assert len(re.findall(r"shard 0 restarted", cluster.log)) == MAX_RESTARTS
    assert "shard 1 died" not in cluster.log
    assert cluster.proc is not None and cluster.proc.poll() is None  # the router runs on

    dead_room, live_room = room_on(0, "dead"), room_on(1, "alive")
    c = cluster.connect()
    c.send(f"JOIN {dead_room} ghost")
    assert c.readline() == "ERROR room unavailable"
    c.send(f"NAMES {dead_room}")
    assert c.readline() == "ERROR room unavailable"
    # The failed JOIN fixed no name and no room; the other shard's rooms work.
    c.join(live_room, "ghost")
    c.send(f"MSG {live_room} still here")
    assert c.readline() == f"MSG {live_room} ghost still here"
    c.send(f"MSG {dead_room} into the void")
    assert c.readline() == "ERROR room unavailable"
    c.send("ROOMS")
    assert c.read_lines(2) == [f"ROOM {live_room} 1", "END ROOMS 1"]
    c.send("PING alive")
    assert c.readline() == "PONG alive"
    c.close()
    no_traceback(cluster)


@pytest.mark.timeout(60)
def test_router_with_a_lost_shard_still_stops_cleanly(crashing_cluster: Cluster) -> None:
    cluster = crashing_cluster
    cluster.wait_for_log(r"giving up", timeout=30)
    c = cluster.connect()
    c.join(room_on(1, "bye"), "leaver")
    pids = cluster.marked_pids()
    assert cluster.stop(signal.SIGTERM) == 0
    assert c.read_all_until_closed() == ["INFO server shutting down"]
    assert wait_gone(pids, 5.0) == []
    assert "stopped" in cluster.log
    no_traceback(cluster)


# --- SIGSTOP -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stopped_shard_times_out_requests_and_recovers() -> None:
    with Cluster(shards=SHARDS) as cluster:
        frozen_room, live_room = room_on(0, "frozen"), room_on(1, "live")
        frozen_pid = cluster.shard_pids()[0]
        s1 = cluster.connect(timeout=15.0)
        s1.join(frozen_room, "s1")
        t1, t2 = cluster.connect(), cluster.connect()
        t1.join(live_room, "t1")
        t2.join(live_room, "t2")
        t1.expect(f"INFO t2 joined {live_room}")
        os.kill(frozen_pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            s1.send(f"NAMES {frozen_room}")
            s1.send(f"HISTORY {frozen_room} 10")
            s1.send(f"MSG {frozen_room} said while frozen")
            t2.send("ROOMS")
            # The router and the other shard are unaffected meanwhile (up to 8 rounds, all
            # well before the frozen room's requests time out, however slow the machine).
            seen_by_t2: List[str] = []  # (the ROOMS answer may come among them)
            rounds = 0
            for i in range(8):
                if time.monotonic() > stopped_at + REQUEST_TIMEOUT - 2.0:
                    break
                s1.send(f"PING s{i}")
                assert s1.readline(2.0) == f"PONG s{i}"
                start = time.monotonic()
                t1.send(f"MSG {live_room} live {i}")
                read_until(t1, f"MSG {live_room} t1 live {i}", timeout=2.0)
                seen_by_t2 += read_until(t2, f"MSG {live_room} t1 live {i}", timeout=2.0)
                assert time.monotonic() - start < 2.0
                rounds += 1
                time.sleep(0.3)
            assert rounds, "no round before the timeout"
            # NAMES and HISTORY of the frozen room: an error after the request timeout.
            errors = [s1.readline(10.0), s1.readline(10.0)]
            waited = time.monotonic() - stopped_at
            assert errors == ["ERROR room busy, try again"] * 2
            assert REQUEST_TIMEOUT - 1.0 <= waited <= REQUEST_TIMEOUT + 5.0
            # ROOMS: the frozen shard contributes nothing after the timeout.
            rooms = seen_by_t2
            if not [line for line in rooms if line.startswith("END ROOMS")]:
                rooms += t2.read_until(lambda line: line.startswith("END ROOMS"), timeout=10.0)
            assert [line for line in rooms if line.startswith(("ROOM ", "END "))] == [
                f"ROOM {live_room} 2",
                "END ROOMS 1",
            ]
        finally:
            os.kill(frozen_pid, signal.SIGCONT)
        # Nothing sent to the stopped shard was lost: it is applied once it runs again.
        assert s1.readline(10.0) == f"MSG {frozen_room} s1 said while frozen"
        s1.send(f"NAMES {frozen_room}")
        assert s1.readline(5.0) == f"NAMES {frozen_room} s1"
        s1.send(f"HISTORY {frozen_room} 1")
        assert s1.read_lines(2, timeout=5.0)[1] == f"END HISTORY {frozen_room} 1"
        assert "shard 0 died" not in cluster.log
        no_traceback(cluster)
        for c in (s1, t1, t2):
            c.close()


# --- a shard killed again and again, with members ----------------------------------------


@pytest.mark.timeout(60)
def test_shard_killed_too_often_is_given_up_and_its_members_are_told() -> None:
    """Kill shard 0 each time it comes back: after MAX_RESTARTS restarts the router gives
    up; its members hear ``ERROR room unavailable`` and keep their other rooms."""
    with Cluster(shards=SHARDS) as cluster:
        doomed_room, live_room = room_on(0, "doomed"), room_on(1, "refuge")
        m1, m2 = cluster.connect(), cluster.connect()
        for c, name in ((m1, "m1"), (m2, "m2")):
            c.join(doomed_room, name)
            c.join(live_room, name)
        pid = cluster.shard_pids()[0]
        for restart in range(1, MAX_RESTARTS + 1):
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while len(re.findall(r"shard 0 restarted", cluster.log)) < restart:
                assert time.monotonic() < deadline, cluster.log[-2000:]
                time.sleep(0.02)
            line = re.findall(r"shard 0 restarted \(pid (\d+)", cluster.log)[-1]
            pid = int(line)
            for c in (m1, m2):
                read_until(c, f"INFO room {doomed_room} restarted, history lost", timeout=10)
        os.kill(pid, signal.SIGKILL)
        cluster.wait_for_log(r"shard 0 died .*giving up", timeout=10)
        for c in (m1, m2):
            read_until(c, "ERROR room unavailable", timeout=5)
            c.send(f"MSG {doomed_room} anyone")
            assert c.readline(5.0) == "ERROR room unavailable"
        m1.send(f"NAMES {doomed_room}")
        assert m1.readline(5.0) == "ERROR room unavailable"
        # The other room, on the healthy shard, still has both, under the same names.
        m1.send(f"MSG {live_room} we are fine")
        for c in (m1, m2):
            read_until(c, f"MSG {live_room} m1 we are fine", timeout=5)
        m1.send(f"NAMES {live_room}")
        assert m1.readline(5.0) == f"NAMES {live_room} m1 m2"
        m2.send("QUIT")
        assert m2.read_all_until_closed() == ["INFO bye"]
        read_until(m1, f"INFO m2 left {live_room}", timeout=5)
        assert cluster.proc is not None and cluster.proc.poll() is None
        no_traceback(cluster)
        m1.close()


# --- a stopped shard's backlog is bounded ------------------------------------------------


@pytest.mark.timeout(60)
def test_stopped_shard_backlog_is_bounded_and_nothing_is_silently_dropped() -> None:
    """12 MB of MSGs to a stopped shard's room: past MAX_SHARD_BACKLOG_BYTES they are
    refused (``ERROR room unavailable``), the router's memory stays bounded, and once the
    shard runs again every MSG was either delivered (in order) or refused, none lost.
    Output limits are raised so the catch-up burst cannot cut the sender off."""
    big = str(256 * 1024 * 1024)
    flags = ["--rate-limit", "0", "--output-hard-limit", big, "--output-soft-limit", big]
    with Cluster(shards=SHARDS, extra_args=flags) as cluster:
        frozen_room, live_room = room_on(0, "jam"), room_on(1, "free")
        pid = cluster.shard_pids()[0]
        pumper = cluster.connect()
        pumper.join(frozen_room, "pumper")
        other = cluster.connect()
        other.join(live_room, "other")
        lines: List[str] = []
        reader = threading.Thread(target=collect, args=(pumper, lines), daemon=True)
        reader.start()
        before = router_rss_kb(cluster)
        batches, per_batch, text = 120, 50, "z" * 1990
        os.kill(pid, signal.SIGSTOP)
        try:
            for b in range(batches):
                pumper.send_raw(
                    b"".join(
                        f"MSG {frozen_room} {b * per_batch + i:05d} {text}\n".encode()
                        for i in range(per_batch)
                    )
                )
            deadline = time.monotonic() + 10
            while "ERROR room unavailable" not in lines:
                assert time.monotonic() < deadline, "nothing refused"
                time.sleep(0.05)
            growth_mb = (router_rss_kb(cluster) - before) / 1024
            assert growth_mb < MAX_SHARD_BACKLOG_BYTES / 2**20 + 20, growth_mb
            other.send(f"MSG {live_room} unaffected")
            assert other.readline(2.0) == f"MSG {live_room} other unaffected"
        finally:
            os.kill(pid, signal.SIGCONT)
        total = batches * per_batch
        deadline = time.monotonic() + 30
        while len(lines) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        echoes = [line for line in lines if line.startswith(f"MSG {frozen_room} pumper ")]
        refused = [line for line in lines if line == "ERROR room unavailable"]
        assert len(echoes) + len(refused) == len(lines) == total
        assert echoes and refused
        print(f"\n{len(echoes)} delivered, {len(refused)} refused")
        numbers = [int(line.split()[3]) for line in echoes]
        assert numbers == sorted(numbers)
        assert "cutting off" not in cluster.log
        no_traceback(cluster)
        pumper.close()
        other.close()


def collect(c: LineClient, lines: List[str]) -> None:
    try:
        while True:
            lines.append(c.readline(60.0))
    except (EOFError, OSError):
        pass
