"""Shard (re)starts that fail (router/shards.py): retried with the backoff, logged, given up
past the restart limit, and never leaking a descriptor or a process.

The shards are real processes from a real ``multiprocessing`` context; :class:`FlakyContext`
wraps it and makes ``Pipe()`` or ``Process.start()`` fail with a chosen errno for as many
start attempts as a test asks. The restart backoff is shortened (a module constant) so the
tests do not wait seconds, except where the doubling itself is checked.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import threading
from collections import deque
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Tuple

import pytest

from common import errors
from common import messages as m
from common.limits import MAX_RESTARTS, SHARD_FDS, SHARD_START_FDS
from router import shards
from router.descriptors import open_descriptors
from router.policy import FdBudget
from router.shards import ShardLink, ShardPool, ShardStartError, ShardState, describe_error
from tests.cluster import ROOT, pid_alive

START_METHODS = [
    method for method in ("spawn", "fork") if method in multiprocessing.get_all_start_methods()
]
LINUX = sys.platform.startswith("linux")

#: Where a start attempt can fail, in the order a start gets there.
STEPS = ("pipe1", "pipe2", "start")


class FailingProcess:
    """Stands in for a process whose ``start()`` fails (fork or spawn said no)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def start(self) -> None:
        raise OSError(self.code, os.strerror(self.code))


class FlakyContext:
    """A real multiprocessing context whose next start attempts go as planned: each entry
    of :attr:`plan` is taken by one attempt (which begins with its first ``Pipe()``) and is
    None (it succeeds) or ``(step, errno)``: it fails at that step (see :data:`STEPS`)."""

    def __init__(self, method: str) -> None:
        self._real = multiprocessing.get_context(method)
        self.plan: Deque[Optional[Tuple[str, int]]] = deque()
        self.attempts = 0
        self._step: Optional[str] = None  # where the attempt under way is
        self._outcome: Optional[Tuple[str, int]] = None

    def fail(self, count: int, step: str = "pipe1", code: int = errno.EMFILE) -> None:
        self.plan.extend([(step, code)] * count)

    def succeed(self, count: int = 1) -> None:
        self.plan.extend([None] * count)

    def get_start_method(self) -> str:
        return self._real.get_start_method()

    def Pipe(self, duplex: bool = True) -> Any:  # noqa: N802 - multiprocessing's name
        if self._step is None:
            self.attempts += 1
            self._outcome = self.plan.popleft() if self.plan else None
            self._step = "pipe1"
        else:
            self._step = "pipe2"
        self._maybe_fail(self._step)
        return self._real.Pipe(duplex)

    def Process(self, **kwargs: Any) -> Any:  # noqa: N802 - multiprocessing's name
        self._step = None
        outcome, self._outcome = self._outcome, None
        if outcome is not None and outcome[0] == "start":
            return FailingProcess(outcome[1])
        return self._real.Process(**kwargs)

    def _maybe_fail(self, step: str) -> None:
        if self._outcome is not None and self._outcome[0] == step:
            code = self._outcome[1]
            self._step = self._outcome = None
            raise OSError(code, os.strerror(code))


class Recorder:
    """The pool's listener: records what the hub would be told."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, int]] = []
        self.events: List[Tuple[int, list]] = []

    def on_shard_events(self, index: int, events: List[tuple]) -> None:
        self.events.append((index, events))

    def on_shard_down(self, index: int) -> None:
        self.calls.append(("down", index))

    def on_shard_restarted(self, index: int) -> None:
        self.calls.append(("restarted", index))

    def on_shard_lost(self, index: int) -> None:
        self.calls.append(("lost", index))


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait (polling the loop) until *condition* holds; fail after *timeout* seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def answers(pool: ShardPool, recorder: Recorder, index: int) -> None:
    """Shard *index* answers a ROOMS request."""
    seen = len(recorder.events)
    pool.links[index].send((m.ROOMS, 7, 0))
    await until(lambda: any(i == index for i, _ in recorder.events[seen:]), timeout=10.0)


def run_pool(
    context: FlakyContext,
    body: Callable[[ShardPool, Recorder], Awaitable[None]],
    count: int = 2,
    fds: Optional[FdBudget] = None,
) -> None:
    """Start a pool of *count* shards on *context*, run *body*, stop the pool."""

    async def main() -> None:
        recorder = Recorder()
        pool = ShardPool(count, context, asyncio.get_running_loop(), recorder, fds=fds)  # type: ignore[arg-type]
        pool.start()
        try:
            await body(pool, recorder)
        finally:
            pool.close()
            await asyncio.to_thread(pool.join, 5.0)

    asyncio.run(main())


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "RESTART_BACKOFF_MIN", 0.01)
    monkeypatch.setattr(shards, "RESTART_BACKOFF_MAX", 0.05)


def failed_restart_lines(caplog: pytest.LogCaptureFixture, index: int) -> List[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith(f"shard {index} could not be restarted")
    ]


def kill(pool: ShardPool, index: int) -> int:
    process = pool.links[index].process
    assert process is not None
    pid = process.pid
    process.kill()
    return pid


# --- retried, logged, recovers -----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize(
    "step, code",
    [
        ("pipe1", errno.EMFILE),
        ("pipe2", errno.ENFILE),
        ("start", errno.EAGAIN),
        ("start", errno.ENOMEM),
    ],
    ids=["pipe1-EMFILE", "pipe2-ENFILE", "start-EAGAIN", "start-ENOMEM"],
)
def test_failed_restarts_are_retried_logged_and_recover(
    method: str, step: str, code: int, quick_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed shard whose next MAX_RESTARTS - 1 restarts fail is started by the last
    attempt the limit allows; each failure is one line naming the errno and the next
    step; the hub hears "down" once and "restarted" once; no descriptor is left over."""
    caplog.set_level(logging.INFO, logger="router.shards")
    context = FlakyContext(method)
    failures = MAX_RESTARTS - 1

    async def body(pool: ShardPool, recorder: Recorder) -> None:
        await answers(pool, recorder, 0)
        before = settled_descriptors()
        context.fail(failures, step, code)
        old_pid = kill(pool, 0)
        await until(lambda: ("restarted", 0) in recorder.calls)
        assert recorder.calls == [("down", 0), ("restarted", 0)]
        link = pool.links[0]
        assert link.state is ShardState.RUNNING and link.epoch == 2
        assert link.process is not None and link.process.pid != old_pid
        await answers(pool, recorder, 0)
        await answers(pool, recorder, 1)
        lines = failed_restart_lines(caplog, 0)
        name = errno.errorcode[code]
        assert len(lines) == failures, lines
        assert all(f"({name}: {os.strerror(code)}); restarting in " in line for line in lines)
        assert not context.plan
        if before is not None:
            # The new shard's descriptors replace the old one's (the numbers may differ).
            assert len(settled_descriptors() or ()) == len(before)

    run_pool(context, body)


@pytest.mark.timeout(60)
def test_failed_restarts_back_off_like_deaths(caplog: pytest.LogCaptureFixture) -> None:
    """The delays before the attempts double from RESTART_BACKOFF_MIN, whether the shard
    died again or its start failed (the real constants: 0.1 s doubling)."""
    caplog.set_level(logging.INFO, logger="router.shards")
    context = FlakyContext(START_METHODS[-1])

    async def body(pool: ShardPool, recorder: Recorder) -> None:
        context.fail(3, "pipe1", errno.EMFILE)
        kill(pool, 1)
        await until(lambda: ("restarted", 1) in recorder.calls)

    run_pool(context, body)
    delays = [
        float(found)
        for record in caplog.records
        for found in re.findall(r"^shard 1 .*; restarting in ([\d.]+)s$", record.getMessage())
    ]
    assert delays == [0.1, 0.2, 0.4, 0.8]


# --- past the limit: given up ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_restarts_that_keep_failing_are_given_up(
    method: str, quick_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Every restart fails: after MAX_RESTARTS attempts the pool gives up exactly as on a
    shard that keeps crashing (logged, the hub told, state GIVEN_UP); the other shard
    keeps serving and the dead one's descriptors are not leaked."""
    caplog.set_level(logging.INFO, logger="router.shards")
    context = FlakyContext(method)
    fds = FdBudget(None)

    async def body(pool: ShardPool, recorder: Recorder) -> None:
        started = context.attempts
        context.fail(100, "pipe1", errno.EMFILE)
        kill(pool, 0)
        await until(lambda: ("lost", 0) in recorder.calls)
        assert recorder.calls == [("down", 0), ("lost", 0)]
        assert context.attempts - started == MAX_RESTARTS
        assert pool.links[0].state is ShardState.GIVEN_UP
        assert pool.in_state(ShardState.GIVEN_UP) == [0]
        assert pool.in_state(ShardState.RUNNING) == [1]
        assert fds.shard_fds == SHARD_FDS  # only shard 1's
        await answers(pool, recorder, 1)
        given_up = [
            record
            for record in caplog.records
            if "giving up" in record.getMessage() and record.levelno == logging.ERROR
        ]
        assert len(given_up) == 1
        assert (
            given_up[0]
            .getMessage()
            .startswith(
                "shard 0 could not be restarted (EMFILE: Too many open files) after "
                f"{MAX_RESTARTS} restarts in 60s; giving up"
            )
        )
        assert len(failed_restart_lines(caplog, 0)) == MAX_RESTARTS
        # Commands for the lost shard are refused at once, not queued.
        seen = len(recorder.events)
        pool.links[0].send(m.names(9, 0.0, 1, "room"))
        await until(lambda: len(recorder.events) > seen)
        assert recorder.events[-1] == (0, [m.fail(9, errors.ROOM_UNAVAILABLE)])

    run_pool(context, body, fds=fds)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_several_shards_dying_at_once_all_come_back(method: str, quick_backoff: None) -> None:
    """Three shards die together while the next four start attempts (whichever shard's)
    fail: every one of them is running again."""
    context = FlakyContext(method)
    fds = FdBudget(None)

    async def body(pool: ShardPool, recorder: Recorder) -> None:
        context.fail(2, "pipe1", errno.EMFILE)
        context.fail(2, "start", errno.EAGAIN)
        for index in range(3):
            kill(pool, index)
        await until(lambda: all(("restarted", i) in recorder.calls for i in range(3)))
        assert not context.plan
        assert pool.in_state(ShardState.RUNNING) == [0, 1, 2]
        assert fds.shard_fds == 3 * SHARD_FDS == fds.shard_fds_set_aside
        for index in range(3):
            await answers(pool, recorder, index)

    run_pool(context, body, count=3, fds=fds)


# --- no leak -----------------------------------------------------------------------------


def settled_descriptors() -> Optional[set]:
    """The open descriptors once earlier tests' garbage (process handles hold two each)
    has been collected."""
    gc.collect()
    return open_descriptors()


def start_failing(link: ShardLink, context: FlakyContext, step: str, code: int) -> None:
    context.fail(1, step, code)
    with pytest.raises(ShardStartError) as raised:
        link.start()
    assert raised.value.errno == code and raised.value.index == link.index
    assert raised.value.reason == f"{errno.errorcode[code]}: {os.strerror(code)}"
    assert link.state is ShardState.STOPPED and link.process is None


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd")
@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("step", STEPS)
def test_a_failed_start_leaves_no_descriptor(method: str, step: str) -> None:
    context = FlakyContext(method)

    async def main() -> None:
        link = ShardLink(0, context, asyncio.get_running_loop(), Recorder(), lambda _: None)  # type: ignore[arg-type]
        multiprocessing.active_children()
        before = settled_descriptors()
        for _ in range(3):
            start_failing(link, context, step, errno.EMFILE)
        assert open_descriptors() == before
        assert multiprocessing.active_children() == []
        link.start()  # and the link is still usable
        assert link.state is ShardState.RUNNING
        link.close()
        await asyncio.to_thread(link.join, 5.0)

    asyncio.run(main())


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd")
@pytest.mark.parametrize("method", START_METHODS)
def test_no_thread_for_the_pipes_is_a_failed_start(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """``--pipe-io threads``: the process started but its pipe threads cannot (the thread
    limit): the process is killed, every descriptor closed, the link usable again."""
    context = FlakyContext(method)

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        link = ShardLink(0, context, loop, Recorder(), lambda _: None, pipe_io="threads")  # type: ignore[arg-type]
        before = settled_descriptors()
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", no_thread)
            with pytest.raises(ShardStartError) as raised:
                link.start()
        assert raised.value.reason == "RuntimeError: can't start new thread"
        process = link.process
        assert process is not None and link.state is ShardState.STOPPED
        await asyncio.to_thread(process.join, 5.0)
        assert process.exitcode is not None  # killed, not left running
        link.start()
        link.close()
        await asyncio.to_thread(link.join, 5.0)
        link._forget_process()
        assert settled_descriptors() == before

    asyncio.run(main())


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd")
@pytest.mark.parametrize("code", [errno.EAGAIN, errno.ENOMEM], ids=["EAGAIN", "ENOMEM"])
@pytest.mark.skipif("fork" not in START_METHODS, reason="no fork")
def test_a_failed_fork_leaves_no_descriptor(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """``os.fork()`` failing inside multiprocessing, which made two pipes before it and
    registers them for closing only after a successful fork."""
    context = FlakyContext("fork")

    def no_fork() -> int:
        raise OSError(code, os.strerror(code))

    async def main() -> None:
        link = ShardLink(0, context, asyncio.get_running_loop(), Recorder(), lambda _: None)  # type: ignore[arg-type]
        before = settled_descriptors()
        with monkeypatch.context() as patch:
            patch.setattr(os, "fork", no_fork)
            with pytest.raises(ShardStartError) as raised:
                link.start()
        assert raised.value.errno == code
        assert open_descriptors() == before

    asyncio.run(main())


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd")
@pytest.mark.parametrize("method", START_METHODS)
def test_a_pool_that_cannot_start_closes_the_shards_it_started(method: str) -> None:
    """The boot case: shard 1 of 3 cannot start; ShardStartError, and shard 0 is stopped
    again (its process exits once joined), nothing left open."""
    context = FlakyContext(method)

    async def main() -> None:
        before = settled_descriptors()
        recorder = Recorder()
        pool = ShardPool(3, context, asyncio.get_running_loop(), recorder)  # type: ignore[arg-type]
        context.succeed()
        context.fail(1, "pipe1", errno.EMFILE)
        with pytest.raises(ShardStartError) as raised:
            pool.start()
        assert raised.value.index == 1 and context.attempts == 2
        first = pool.links[0].process
        assert first is not None and pool.links[0].state is ShardState.STOPPED
        await asyncio.to_thread(pool.join, 5.0)
        assert not pid_alive(first.pid)
        first.close()  # what the next start would do
        assert open_descriptors() == before
        assert recorder.calls == []

    asyncio.run(main())


def test_describe_error() -> None:
    assert describe_error(OSError(errno.EMFILE, "Too many open files")) == (
        "EMFILE: Too many open files"
    )
    assert describe_error(RuntimeError("can't start new thread")) == (
        "RuntimeError: can't start new thread"
    )


# --- real descriptor exhaustion ----------------------------------------------------------


def probe_real_limits(method: str, warm: bool) -> Dict[str, Any]:
    """Run in a child process: lower RLIMIT_NOFILE so that 0, 1, 2... descriptors are free
    and try ShardLink.start each time, until it succeeds. Returns how many free descriptors
    it needed and, per failed attempt, its errno and whether the table was left as it was."""
    import resource

    if warm:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # started once per router, at the first spawn
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    failures: List[Tuple[Optional[int], bool]] = []

    async def main() -> int:
        context = multiprocessing.get_context(method)
        link = ShardLink(0, context, asyncio.get_running_loop(), Recorder(), lambda _: None)  # type: ignore[arg-type]
        for free in range(SHARD_START_FDS + 2):
            before = settled_descriptors()
            assert before is not None
            limit = free
            while limit - len([fd for fd in before if fd < limit]) < free:
                limit += 1
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            try:
                link.start()
            except ShardStartError as error:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                failures.append((error.errno, settled_descriptors() == before))
                continue
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            link.close()
            await asyncio.to_thread(link.join, 5.0)
            return free
        return -1

    needed = asyncio.run(main())
    return {"needed": needed, "failures": failures}


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd, sets RLIMIT_NOFILE")
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "method, warm",
    [(method, warm) for method in START_METHODS for warm in (True, False)],
    ids=lambda value: str(value) if isinstance(value, str) else ("warm" if value else "cold"),
)
def test_real_descriptor_exhaustion_fails_cleanly_and_shard_start_fds_is_enough(
    method: str, warm: bool
) -> None:
    """Every start under a real open-file limit that is too low fails with EMFILE and
    leaves the descriptor table as it was (with the resource tracker already running: a
    cold spawn start keeps the tracker it launched); with SHARD_START_FDS free it works."""
    code = (
        "import json, sys; from tests.integration.test_shard_restart import probe_real_limits; "
        f"print(json.dumps(probe_real_limits({method!r}, {warm!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n[{method}, {'warm' if warm else 'cold'}] needs {result['needed']} free descriptors")
    assert 0 < result["needed"] <= SHARD_START_FDS
    assert len(result["failures"]) == result["needed"]
    assert all(errno_ == errno.EMFILE for errno_, _ in result["failures"])
    if warm or method == "fork":
        assert all(same for _, same in result["failures"]), result["failures"]
