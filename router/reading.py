"""Reading from client sockets without a fresh 256 KiB buffer per read.

asyncio's selector transports read a plain :class:`asyncio.Protocol` with
``sock.recv(256 KiB)``: every read allocates a 256 KiB bytes object and shrinks it to
what arrived. glibc serves that size with ``mmap`` + ``mremap`` + ``munmap`` (three system
calls and a page fault per read) unless an earlier free happened to raise its threshold,
which made one build of the router a quarter slower than another on the long-poll
benchmark for no reason in its own code (docs/PERFORMANCE.md). A
:class:`asyncio.BufferedProtocol` is read with ``recv_into`` a buffer it hands out
instead.

The selector transports call ``get_buffer`` and ``buffer_updated`` back to back in one
callback, so every connection of a selector loop can share one buffer: what arrived is
copied out (as bytes of its own size) before the next read. The proactor loop (Windows)
keeps reads in flight on many connections at once, so it gets the plain protocol, which
that loop already reads into a small buffer of its own."""

from __future__ import annotations

import asyncio
from typing import Type, TypeVar

from common.limits import READ_CHUNK_BYTES

_BUFFER = memoryview(bytearray(READ_CHUNK_BYTES))

P = TypeVar("P", bound=asyncio.Protocol)


class SharedBufferReading(asyncio.BufferedProtocol):
    """Mixed in *after* a protocol class with ``data_received``
    (``class Buffered(TheProtocol, SharedBufferReading)``): reads land in the shared
    buffer and reach ``data_received`` as bytes, as they would without it. After, because
    :class:`asyncio.BufferedProtocol` has an ``eof_received`` of its own that would
    otherwise hide the protocol's."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_BUFFER[:nbytes]))  # type: ignore[attr-defined]


def reading_class(loop: asyncio.AbstractEventLoop, cls: Type[P], buffered: Type[P]) -> Type[P]:
    """*buffered* (the shared-buffer subclass of *cls*) where *loop* reads each transport
    synchronously, else *cls*."""
    return buffered if isinstance(loop, asyncio.SelectorEventLoop) else cls
