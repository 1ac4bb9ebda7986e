"""shard/process.py's tier loop (_TierLinks) on real pipes, in this process: routers that
die, are replaced, or stop reading."""

from __future__ import annotations

import multiprocessing
import pickle
import sys
import threading
import time
from typing import Callable, Iterator, List, Optional

import pytest

from common import messages as m
from shard import looplink, process
from shard.core import ShardCore

ROUTERS = 2


class Harness:
    """A tier shard serving two fake routers on real pipes, on a thread."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.commands: List = []  # the routers' ends: commands they write
        self.events: List = []  # the routers' ends: events they read
        links = []
        for _ in range(ROUTERS):
            commands_in, commands_out = context.Pipe(duplex=False)
            events_in, events_out = context.Pipe(duplex=False)
            links.append((commands_in, events_out))
            self.commands.append(commands_out)
            self.events.append(events_in)
        self.control, shard_control = context.Pipe()
        self.core = ShardCore(clock=lambda: 1000.0, epoch=1)
        self.tier = process._TierLinks(self.core, links, shard_control)
        self.error: Optional[BaseException] = None  # what ended serve(), if anything did
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.tier.serve()
        except Exception as error:  # (the test looks at it)
            self.error = error

    def send(self, router: int, *commands: m.Command) -> None:
        self.commands[router].send_bytes(pickle.dumps(list(commands)))

    def receive(self, router: int, timeout: float = 5.0) -> List[m.Event]:
        assert self.events[router].poll(timeout), f"router {router} got nothing"
        return pickle.loads(self.events[router].recv_bytes())

    def receive_until(self, router: int, op: int) -> List[m.Event]:
        got: List[m.Event] = []
        while not any(event[0] == op for event in got):
            got.extend(self.receive(router))
        return got

    def stop(self) -> None:
        self.control.close()
        self.thread.join(5)
        self.tier.close()


@pytest.fixture(params=["loop", "threads"])
def tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """The tier shard with each kind of link: the loop's own (POSIX) and threads (the
    kind Windows uses, run here too)."""
    if request.param == "threads":
        monkeypatch.setattr(looplink, "link_class", lambda: looplink.ThreadLink)
    elif sys.platform == "win32":
        pytest.skip("Windows' pipes cannot be watched by an event loop")
    harness = Harness()
    yield harness
    harness.stop()


def cid(router: int, n: int) -> int:
    return ROUTERS + router + n * ROUTERS


def two_members(tier: Harness) -> tuple:
    a, b = cid(0, 1), cid(1, 1)
    tier.send(0, m.join(1, 0.0, a, "r", "alice"))
    tier.receive(0)
    tier.send(1, m.join(1, 0.0, b, "r", "bob"))
    tier.receive(1)
    tier.receive(0)
    return a, b


def limit(monkeypatch: pytest.MonkeyPatch, name: str, value: float) -> None:
    """Set the limit *name* for both kinds of link (shard.looplink's and the threads')."""
    monkeypatch.setattr(process, name, value)
    monkeypatch.setattr(looplink, name, value)


def test_a_join_read_with_its_routers_end_of_file_leaves_no_ghost(tier: Harness) -> None:
    a, b = cid(0, 1), cid(1, 1)
    tier.send(0, m.join(1, 0.0, a, "lobby", "alice"))
    assert tier.receive(0)[0][0] == m.JOINED
    tier.send(1, m.join(1, 0.0, b, "lobby", "bob"))
    tier.commands[1].close()  # router 1 dies with its JOIN unread
    events = tier.receive_until(0, m.LEFT)
    assert [(e[0], e[3]) for e in events] == [(m.JOINED, b), (m.LEFT, b)]
    assert tier.core.members_of("lobby") == [a]


def test_a_replaced_routers_clients_leave_before_its_successor_hears_anything(
    tier: Harness,
) -> None:
    a, b = cid(0, 1), cid(1, 1)
    tier.send(0, m.join(1, 0.0, a, "lobby", "alice"))
    tier.receive(0)
    tier.send(1, m.join(1, 0.0, b, "lobby", "bob"))
    tier.receive(1)
    tier.receive(0)  # bob joined
    context = multiprocessing.get_context("spawn")
    commands_in, commands_out = context.Pipe(duplex=False)
    events_in, events_out = context.Pipe(duplex=False)
    tier.control.send(("router", 1, commands_in, events_out))
    assert [(e[0], e[3]) for e in tier.receive(0)] == [(m.LEFT, b)]
    assert tier.core.members_of("lobby") == [a]
    b2 = cid(1, 1) + (1 << 32) * ROUTERS  # the successor's first client
    commands_out.send_bytes(pickle.dumps([m.join(1, 0.0, b2, "lobby", "bob")]))
    assert events_in.poll(5)
    first = pickle.loads(events_in.recv_bytes())
    assert [(e[0], e[1]) for e in first] == [(m.JOINED, 1)]  # nothing of its predecessor


def test_a_router_that_takes_nothing_is_reported_and_stalls_no_one(
    tier: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit(monkeypatch, "MAX_SHARD_BACKLOG_BYTES", 8192)
    limit(monkeypatch, "ROUTER_STALL_SECONDS", 0.3)
    a, _ = two_members(tier)
    text = "x" * 200
    sent = 0
    while not tier.control.poll(0):  # router 1 reads nothing from here on
        req = sent + 2
        tier.send(0, *[m.msg(req * 100 + i, 0.0, a, "r", text) for i in range(4)])
        got = tier.receive(0)  # router 0 keeps getting its events all along
        assert all(event[0] == m.CHAT for event in got)
        sent += 1
        assert sent < 5000, "never reported"
    assert tier.control.recv() == ("stalled", 1, 0)


def flood_while(tier: Harness, until: Callable[[], bool], sender: int, cid_: int) -> int:
    """Router *sender* sends messages to room r (and takes its events) until *until*."""
    text = "x" * 200
    rounds = 0
    while not until():
        req = rounds + 2
        tier.send(sender, *[m.msg(req * 100 + i, 0.0, cid_, "r", text) for i in range(4)])
        tier.receive(sender)
        rounds += 1
        assert rounds < 1_000_000
    return rounds


def slow_reader(tier: Harness, router: int, stop: threading.Event, pause: float) -> None:
    def read() -> None:
        while not stop.is_set():
            if tier.events[router].poll(0.05):
                tier.events[router].recv_bytes()
                time.sleep(pause)  # takes its events, but slowly

    threading.Thread(target=read, daemon=True).start()


def test_a_router_that_takes_its_events_slowly_is_not_reported_past_the_bound(
    tier: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit(monkeypatch, "MAX_SHARD_BACKLOG_BYTES", 8192)
    limit(monkeypatch, "MAX_ROUTER_BACKLOG_BYTES", 64 * 1024 * 1024)
    limit(monkeypatch, "ROUTER_STALL_SECONDS", 1.0)
    a, _ = two_members(tier)
    stop = threading.Event()
    slow_reader(tier, 1, stop, pause=0.01)
    link = tier.tier.links[1]
    assert link is not None
    deadline = time.monotonic() + 2.5
    flood_while(tier, lambda: time.monotonic() > deadline, 0, a)
    stop.set()
    assert link.waiting > 8192  # it was behind, past the bound...
    assert not tier.control.poll(0.2)  # ...and not called stalled: it kept taking them


def test_a_router_that_falls_ever_further_behind_is_reported_at_the_hard_bound(
    tier: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit(monkeypatch, "MAX_SHARD_BACKLOG_BYTES", 8192)
    limit(monkeypatch, "MAX_ROUTER_BACKLOG_BYTES", 256 * 1024)
    limit(monkeypatch, "ROUTER_STALL_SECONDS", 60.0)
    a, _ = two_members(tier)
    stop = threading.Event()
    slow_reader(tier, 1, stop, pause=0.05)
    flood_while(tier, lambda: tier.control.poll(0), 0, a)
    stop.set()
    assert tier.control.recv() == ("stalled", 1, 0)


def test_the_shard_exits_when_the_supervisor_goes(tier: Harness) -> None:
    tier.control.close()
    tier.thread.join(5)
    assert not tier.thread.is_alive()


class FakeProcess:
    def __init__(self) -> None:
        self.killed = 0

    def kill(self) -> None:
        self.killed += 1


@pytest.mark.parametrize(("generation", "killed"), [(1, 1), (0, 0)], ids=["current", "stale"])
def test_the_supervisor_kills_only_the_router_a_stall_report_is_about(
    generation: int, killed: int
) -> None:
    from router.tier import Supervisor

    supervisor = Supervisor.__new__(Supervisor)  # only the state _read_shard uses
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    router = FakeProcess()
    supervisor.shard_controls = [ours]
    supervisor.router_procs = [None, router]
    supervisor.generations = [[0, 1]]  # router 1 was replaced once since shard 0 started
    theirs.send(("stalled", 1, generation))
    supervisor._read_shard(0)
    assert router.killed == killed


def test_a_stall_report_names_the_routers_generation(
    tier: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit(monkeypatch, "MAX_SHARD_BACKLOG_BYTES", 8192)
    limit(monkeypatch, "ROUTER_STALL_SECONDS", 0.3)
    context = multiprocessing.get_context("spawn")
    commands_in, commands_out = context.Pipe(duplex=False)
    events_in, events_out = context.Pipe(duplex=False)
    tier.control.send(("router", 1, commands_in, events_out))  # router 1 replaced once
    a, b = cid(0, 1), cid(1, 1) + (1 << 32) * ROUTERS
    tier.send(0, m.join(1, 0.0, a, "r", "alice"))
    tier.receive(0)
    commands_out.send_bytes(pickle.dumps([m.join(1, 0.0, b, "r", "bob")]))
    assert events_in.poll(5)
    events_in.recv_bytes()  # and it takes nothing from here on
    flood_while(tier, lambda: tier.control.poll(0), 0, a)
    assert tier.control.recv() == ("stalled", 1, 1)


def test_a_replaced_routers_last_commands_reach_neither_the_room_nor_its_successor(
    tier: Harness,
) -> None:
    """The supervisor's replacement is handled before the old router's last JOIN, which
    its reader had read but the loop had not taken yet (a reader thread's hand-off)."""
    two_members(tier)
    busy = threading.Event()
    loop = tier.tier._loop
    loop.call_soon_threadsafe(busy.wait, 5.0)  # the loop takes nothing a while
    context = multiprocessing.get_context("spawn")
    commands_in, commands_out = context.Pipe(duplex=False)
    events_in, events_out = context.Pipe(duplex=False)
    tier.control.send(("router", 1, commands_in, events_out))
    # The control thread has queued the replacement (asyncio's queue of ready callbacks:
    # the one place this is seen while the loop is busy).
    deadline = time.monotonic() + 4  # (the loop is held for 5)
    while not any(
        getattr(handle, "_callback", None) == tier.tier._on_control
        for handle in tuple(loop._ready)  # type: ignore[attr-defined]  # (copied in one go)
    ):
        assert time.monotonic() < deadline, "the replacement was never queued"
        time.sleep(0.01)
    late = cid(1, 2)
    tier.send(1, m.join(2, 0.0, late, "r", "carol"))  # the old router's last words
    tier.commands[1].close()
    time.sleep(0.2)
    busy.set()
    assert [(e[0], e[3]) for e in tier.receive(0)] == [(m.LEFT, cid(1, 1))]
    assert tier.core.members_of("r") == [cid(0, 1)]  # no ghost carol
    assert not events_in.poll(0.3)  # and the successor heard nothing of it


def test_an_error_applying_a_batch_ends_the_shard(tier: Harness) -> None:
    """As before the loop: the process exits and the supervisor restarts it, rather than it
    serving on with a batch half applied and never answered."""

    def broken(batch: List[m.Command]) -> List[m.Event]:
        raise ValueError("a bug in the core")

    tier.core.apply = broken  # type: ignore[method-assign]
    tier.send(0, m.join(1, 0.0, cid(0, 1), "lobby", "alice"))
    tier.thread.join(5)
    assert not tier.thread.is_alive()
    assert isinstance(tier.error, ValueError)
