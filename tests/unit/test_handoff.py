"""shard/handoff.py: pipe ends handed over a control pipe, also at the descriptor limit."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Iterator, List

import pytest

from shard import handoff

pytestmark = pytest.mark.skipif(not handoff.IN_BAND, reason="descriptors in band: Linux, BSD")

resource = pytest.importorskip("resource")


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """Every descriptor of this process taken (the limit lowered to a few more than in use)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(in_use + 8, 64), hard))
    hog: List[int] = []
    try:
        with contextlib.suppress(OSError):
            while len(hog) < 100_000:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def pipe_pair() -> tuple:
    return multiprocessing.Pipe(duplex=False)  # (reader, writer)


def test_ends_arrive_with_their_message_and_work() -> None:
    ours, theirs = multiprocessing.Pipe()
    reader, writer = pipe_pair()
    handoff.send_with_ends(ours, ("router", 1), [reader, writer])
    kind, index, got_reader, got_writer = handoff.receive(theirs)
    assert (kind, index) == ("router", 1)
    got_writer.send_bytes(b"through the handed-over ends")
    assert got_reader.recv_bytes() == b"through the handed-over ends"
    ours.send(("lost", 3))  # what follows is read as before
    assert handoff.receive(theirs) == ("lost", 3)


def test_a_sender_without_a_free_descriptor_still_hands_the_ends_over() -> None:
    ours, theirs = multiprocessing.Pipe()
    reader, writer = pipe_pair()
    with no_descriptor_left():
        handoff.send_with_ends(ours, ("shard", 0), [reader, writer])
    kind, index, got_reader, got_writer = handoff.receive(theirs)
    assert (kind, index) == ("shard", 0)
    got_writer.send_bytes(b"x")
    assert got_reader.recv_bytes() == b"x"


def test_a_receiver_without_free_descriptors_is_told_and_stays_in_step() -> None:
    ours, theirs = multiprocessing.Pipe()
    reader, writer = pipe_pair()
    handoff.send_with_ends(ours, ("shard", 0), [reader, writer])
    ours.send(("lost", 1))
    with no_descriptor_left(), pytest.raises(OSError, match="2 pipe ends were sent"):
        handoff.receive(theirs)
    assert handoff.receive(theirs) == ("lost", 1)
