"""shard.looplink: a Redis shard's pipes to a router, on real pipes and a real loop. Both
kinds (the selector's, the POSIX default, and the threads') carry commands in and events
out in order with Connection's framing, say when the router's end closes, and count a
router as stalled by the same rules as the tier shard's sender: at once past the hard
bound, after ROUTER_STALL_SECONDS past the soft one, never while it keeps taking them."""

from __future__ import annotations

import asyncio
import pickle
import sys
import threading
import time
from multiprocessing import Pipe
from typing import Any, Callable, List

import pytest

from shard import looplink, process
from shard.looplink import LoopLink, ThreadLink

pytestmark = pytest.mark.timeout(30)

KINDS = [ThreadLink] + ([] if sys.platform == "win32" else [LoopLink])


def run_with_link(kind: type, body: Callable[..., Any]) -> Any:
    """Run *body(link, router_commands, router_events, got, eofs, stalls)* on a loop."""
    commands_r, commands_w = Pipe(duplex=False)  # the router writes commands
    events_r, events_w = Pipe(duplex=False)  # the shard writes events

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        got: List[Any] = []
        eofs: List[int] = []
        stalls: List[int] = []
        link = kind(loop, 3, commands_r, events_w, got.append, lambda: eofs.append(1),
                    stalls.append)  # fmt: skip
        try:
            return await body(link, commands_w, events_r, got, eofs, stalls)
        finally:
            link.close()

    try:
        return asyncio.run(main())
    finally:
        for conn in (commands_w, events_r):
            conn.close()


def slow_reader(events: Any, stop: threading.Event, pause: float) -> threading.Thread:
    """A router that takes its events, one each *pause* seconds, until *stop*."""

    def read() -> None:
        while not stop.is_set():
            if events.poll(0.05):
                events.recv_bytes()
                time.sleep(pause)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


async def until(done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("kind", KINDS)
def test_commands_in_events_out_in_order_and_the_end_is_told(kind: type) -> None:
    async def body(link: Any, commands: Any, events: Any, got: List[Any], eofs: List[int],
                   stalls: List[int]) -> None:  # fmt: skip
        for i in range(50):
            commands.send_bytes(pickle.dumps([("cmd", i)]))
        big = [("cmd", "x" * 300_000)]  # (more than a pipe holds: read in pieces)
        loop = asyncio.get_running_loop()  # (a blocking write: not on the loop)
        await loop.run_in_executor(None, commands.send_bytes, pickle.dumps(big))
        await until(lambda: len(got) == 51)
        assert got[:50] == [[("cmd", i)] for i in range(50)] and got[50] == big
        for i in range(20):
            link.send(pickle.dumps([("event", i)]))
        link.send(b"y" * 500_000)  # more than the pipe holds: the rest waits for room
        received = await loop.run_in_executor(
            None, lambda: [events.recv_bytes() for _ in range(21)]
        )
        assert [pickle.loads(r) for r in received[:20]] == [[("event", i)] for i in range(20)]
        assert received[20] == b"y" * 500_000
        assert not eofs
        commands.close()
        await until(lambda: bool(eofs))
        assert not stalls

    run_with_link(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_router_that_takes_nothing_is_stalled_after_the_stall_time(
    kind: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (looplink, process):
        monkeypatch.setattr(module, "MAX_SHARD_BACKLOG_BYTES", 8192)
        monkeypatch.setattr(module, "ROUTER_STALL_SECONDS", 0.3)

    async def body(link: Any, commands: Any, events: Any, got: List[Any], eofs: List[int],
                   stalls: List[int]) -> None:  # fmt: skip
        started = time.monotonic()
        while not stalls:  # nobody reads the events
            link.send(b"z" * 4096)
            link.check()
            await asyncio.sleep(0.01)
            assert time.monotonic() - started < 10, "never stalled"
        assert time.monotonic() - started >= 0.3
        assert stalls == [3] and link.stalled
        link.send(b"more")  # nothing more is queued for it
        link.check()
        assert stalls == [3]

    run_with_link(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_router_that_falls_ever_further_behind_is_stalled_at_the_hard_bound(
    kind: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (looplink, process):
        monkeypatch.setattr(module, "MAX_SHARD_BACKLOG_BYTES", 8192)
        monkeypatch.setattr(module, "MAX_ROUTER_BACKLOG_BYTES", 256 * 1024)
        monkeypatch.setattr(module, "ROUTER_STALL_SECONDS", 60.0)

    async def body(link: Any, commands: Any, events: Any, got: List[Any], eofs: List[int],
                   stalls: List[int]) -> None:  # fmt: skip
        stop = threading.Event()
        reader = slow_reader(events, stop, pause=0.05)  # slower than they come
        sent = 0
        while not stalls:
            link.send(b"w" * 8192)
            link.check()
            sent += 1
            await asyncio.sleep(0)
            assert sent < 100_000, "never stalled"
        stop.set()
        reader.join(2)
        assert stalls == [3]

    run_with_link(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_router_that_keeps_taking_its_events_slowly_is_not_stalled(
    kind: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (looplink, process):
        monkeypatch.setattr(module, "MAX_SHARD_BACKLOG_BYTES", 8192)
        monkeypatch.setattr(module, "MAX_ROUTER_BACKLOG_BYTES", 64 * 1024 * 1024)
        monkeypatch.setattr(module, "ROUTER_STALL_SECONDS", 0.3)

    async def body(link: Any, commands: Any, events: Any, got: List[Any], eofs: List[int],
                   stalls: List[int]) -> None:  # fmt: skip
        stop = threading.Event()
        reader = slow_reader(events, stop, pause=0.01)
        behind = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            link.send(b"v" * 8192)
            link.check()
            waiting = link.waiting if isinstance(link, LoopLink) else link._sender._waiting
            behind = max(behind, waiting)
            await asyncio.sleep(0.002)
        stop.set()
        reader.join(2)
        assert behind > 8192  # it was behind, past the soft bound...
        assert not stalls  # ...and not called stalled: it kept taking them

    run_with_link(kind, body)


@pytest.mark.skipif(sys.platform == "win32", reason="the selector's link: POSIX")
def test_a_stall_in_the_middle_of_a_frame_leaves_the_router_whole_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(looplink, "MAX_ROUTER_BACKLOG_BYTES", 256 * 1024)

    async def body(link: Any, commands: Any, events: Any, got: List[Any], eofs: List[int],
                   stalls: List[int]) -> None:  # fmt: skip
        first = b"a" * 200_000  # more than the pipe holds: the pipe takes part of it
        link.send(first)
        link.send(b"b" * 100_000)  # waits behind it
        assert link.waiting > 100_000
        link.send(b"c" * 100_000)  # past the hard bound: stalled
        assert stalls == [3]
        loop = asyncio.get_running_loop()
        received = await loop.run_in_executor(None, events.recv_bytes)
        assert received == first  # the frame the pipe had begun is finished...
        await until(lambda: link.waiting == 0)
        assert not await loop.run_in_executor(None, events.poll, 0.2)  # ...and nothing after

    run_with_link(LoopLink, body)
