"""``multiprocessing.Connection``'s framing, spoken on pipes driven by an event loop: a
4-byte big-endian signed length (or ``-1`` and an 8-byte length for messages over 2 GiB),
then the bytes. The routers' ends (:mod:`router.pipes`) and a Redis shard's
(:mod:`shard.looplink`) use it; the other end is a plain ``Connection``."""

from __future__ import annotations

import struct
from typing import List, Tuple

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
#: Bytes asked for per read of a pipe.
READ_SIZE = 1 << 20


def frame(payload: bytes) -> bytes:
    """*payload* with ``Connection.send_bytes``' length header in front."""
    if len(payload) > 0x7FFFFFFF:
        return _SHORT.pack(-1) + _LONG.pack(len(payload)) + payload
    return _SHORT.pack(len(payload)) + payload


def unframe(buffer: bytearray) -> Tuple[List[bytes], int]:
    """The complete messages at the start of *buffer* and how many bytes they took."""
    messages: List[bytes] = []
    pos, size = 0, len(buffer)
    while size - pos >= 4:
        (length,) = _SHORT.unpack_from(buffer, pos)
        header = 4
        if length == -1:
            if size - pos < 12:
                break
            (length,) = _LONG.unpack_from(buffer, pos + 4)
            header = 12
        if size - pos - header < length:
            break
        start = pos + header
        messages.append(bytes(buffer[start : start + length]))
        pos = start + length
    return messages, pos
