"""Pipe ends handed to a running process over its control pipe (a router tier's
supervisor giving a restarted child's pipes to the others).

multiprocessing pickles a ``Connection`` sent after a process started through its
resource sharer: the sender keeps a duplicate of the descriptor until the receiver fetches
it, and for ever if the receiver dies first, so a supervisor restarting children would
leak two descriptors each time a receiver died (or was stopped) with such a message
unread. On Linux and the BSDs the descriptors travel in the control pipe's socket itself
instead (``SCM_RIGHTS``, right after the message): what a dead receiver never took is freed
by the kernel with its socket. On macOS (where multiprocessing waits for the receiver to
acknowledge each descriptor, which a supervisor must not do) and on Windows, the ends are
pickled as before.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable, List, Sequence

#: Descriptors go in the control pipe's socket (see the module docstring).
IN_BAND = sys.platform not in ("win32", "darwin") and hasattr(socket, "CMSG_SPACE")

#: Marks a message whose ends follow it in the socket.
_WITH_ENDS = "with-ends"


def send_with_ends(control: Connection, message: tuple, ends: Sequence[Connection]) -> None:
    """Send *message* on *control* with the pipe *ends* (the caller still closes its own
    copies afterwards); the receiver's :func:`receive` returns ``(*message, *ends)``.
    Raises ``OSError`` if the receiver is gone."""
    if not IN_BAND:
        control.send((*message, *ends))
        return
    fds = array.array("i", [end.fileno() for end in ends])
    sock = _borrowed(control)
    try:
        control.send((_WITH_ENDS, message, [(end.readable, end.writable) for end in ends]))
        sock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    finally:
        sock.detach()


def _borrowed(control: Connection) -> socket.socket:
    """*control*'s own descriptor as a socket, without a duplicate (which could fail for
    want of a descriptor between the message and its ends); ``detach()`` it after."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=control.fileno())


def receive(control: Connection) -> Any:
    """The next message on *control*; one sent by :func:`send_with_ends` comes back as
    ``(*message, *ends)``. Raises ``EOFError`` at end-of-file and ``OSError`` (also when
    the ends could not be taken: no descriptors left)."""
    message = control.recv()
    if not (isinstance(message, tuple) and message and message[0] == _WITH_ENDS):
        return message
    _, inner, modes = message
    fds = _receive_fds(control, len(modes))
    ends = [Connection(fd, readable, writable) for fd, (readable, writable) in zip(fds, modes)]
    return (*inner, *ends)


def read_on_thread(
    control: Connection,
    loop: asyncio.AbstractEventLoop,
    on_message: Callable[[Any], None],
    on_end: Callable[[], None],
) -> None:
    """Read *control* on a daemon thread (taking passed ends may wait on the sender, which a
    loop must not): each message, as :func:`receive` returns it, goes to *on_message* on
    *loop*, and the pipe's end to *on_end*. Nothing more once *loop* is closed."""

    def read() -> None:
        try:
            while True:
                loop.call_soon_threadsafe(on_message, receive(control))
        except (EOFError, OSError):
            pass
        except RuntimeError:
            return  # the loop is closed: stopping
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(on_end)

    threading.Thread(target=read, daemon=True, name="control").start()


def _receive_fds(control: Connection, count: int) -> List[int]:
    fds = array.array("i")
    sock = _borrowed(control)
    try:
        data, ancillary, flags, _ = sock.recvmsg(1, socket.CMSG_SPACE(count * fds.itemsize))
    finally:
        sock.detach()
    if not data:
        raise EOFError
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(fds) != count or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError(f"{count} pipe ends were sent, {len(fds)} received (no descriptors left?)")
    return list(fds)
