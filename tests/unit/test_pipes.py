"""router.pipes speaks multiprocessing.Connection's framing, in both directions, and both
pipe implementations carry batches to a real Connection end and back."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import sys
import threading
from typing import Any, List

import pytest

from router.pipes import SelectorPipes, ThreadedPipes, frame, unframe

PAYLOADS = [b"", b"x", b"hello" * 1000, bytes(range(256)) * 300]


@pytest.mark.parametrize("payload", PAYLOADS, ids=["empty", "one", "5k", "77k"])
def test_frame_is_what_connection_recv_bytes_reads(payload: bytes) -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    # Write our framing with a raw write (a thread: big payloads exceed the pipe buffer).
    sender = threading.Thread(target=_raw_write, args=(writer, frame(payload)))
    sender.start()
    assert reader.recv_bytes() == payload
    sender.join()
    reader.close()
    writer.close()


def _raw_write(conn: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(conn.fileno(), view)
        view = view[written:]


def test_unframe_reads_connection_send_bytes_split_anywhere() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    messages = [b"a", b"", b"bc" * 5000, b"d"]
    sender = threading.Thread(target=lambda: [writer.send_bytes(m) for m in messages])
    sender.start()
    stream = bytearray()
    while len(stream) < sum(4 + len(m) for m in messages):
        stream += os.read(reader.fileno(), 65536)
    sender.join()
    for cut in range(0, len(stream), 997):
        buffer = bytearray(stream[:cut])
        first, used = unframe(buffer)
        rest, used_rest = unframe(bytearray(stream[used:]))
        assert first + rest == messages
        assert used + used_rest == len(stream)
    reader.close()
    writer.close()


def test_unframe_long_header() -> None:
    # The 2 GiB+ form (-1, then an 8-byte length), shown with a small length.
    data = bytearray(b"\xff\xff\xff\xff" + (3).to_bytes(8, "big") + b"abc" + b"\x00\x00")
    assert unframe(data) == ([b"abc"], 15)


IMPLEMENTATIONS = [ThreadedPipes]
if sys.platform != "win32":
    IMPLEMENTATIONS.append(SelectorPipes)


@pytest.mark.parametrize("pipes_class", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_batches_round_trip_through_an_echoing_peer(pipes_class: type) -> None:
    async def scenario() -> List[List[tuple]]:
        loop = asyncio.get_running_loop()
        commands_in, commands_out = multiprocessing.Pipe(duplex=False)
        events_in, events_out = multiprocessing.Pipe(duplex=False)
        echo = threading.Thread(target=_echo, args=(commands_in, events_out), daemon=True)
        echo.start()
        received: List[List[tuple]] = []
        done = asyncio.Event()
        pipes = pipes_class(loop, commands_out, events_in, received.append, done.set)
        batches = [[(1, i, "x" * (i * 1000))] for i in range(200)]  # ~20 MB: fills the pipe
        for batch in batches:
            pipes.write(pickle.dumps(batch))
        pipes.close()  # the echo peer sees EOF after the last batch and closes its end
        await asyncio.wait_for(done.wait(), 20)
        assert received == batches
        assert pipes.backlog_bytes == 0
        return received

    asyncio.run(scenario())


def _echo(commands: Any, events: Any) -> None:
    try:
        while True:
            events.send_bytes(commands.recv_bytes())
    except EOFError:
        pass
    finally:
        events.close()
        commands.close()
