"""Browser sessions in a router tier (``--routers N``): each session lives on the router
that created it, and a request that another router took is forwarded to it.

A browser opens several connections and each may be accepted by any router, but a
session's state (its rooms, its cursor, the polls waiting on it) has one owner. Its token
says which: ``r<index>.<random>``. A router that gets a request whose session cookie names
another router hands the parsed request to that router over loopback and writes back its
answer; the owner answers it exactly as if it had taken the connection itself (the
client's address and scheme go along, so the per-address limits count the real client).

The hop: one loopback TCP connection per forwarded request to the owner's *sibling port*
(bound by the supervisor, one per router, kept across that router's restarts), carrying
one frame each way: ``secret + pickle((request, address, https))`` there, ``pickle(response)``
back. The secret (random, per cluster, given to every router at start) comes first and is
checked before anything is unpickled: only this cluster's routers can speak on the port.
A long-poll waits on the owner like any poll; if the browser goes away, the forwarding
router closes the hop, and the owner cancels the poll.

An owner that cannot be reached (it died; the supervisor restarts it empty) has lost its
sessions: the request is then answered here as one with an unknown session (``401
no_session``, or a new session for a join), which is what the page already handles.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import struct
from typing import Any, Callable, List, Optional

from common.limits import MAX_FORWARDED_BYTES

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
#: Seconds to connect to a sibling router on loopback before taking it for dead.
CONNECT_TIMEOUT = 2.0
#: Seconds a connection to a sibling port may take to send its request frame (a router
#: sends it at once): one that sends nothing holds no descriptor longer than this.
FIRST_FRAME_TIMEOUT = 5.0


def token_prefix(index: int) -> str:
    """What the session tokens of router *index* start with."""
    return f"r{index}."


def owner_of(token: Optional[str]) -> Optional[int]:
    """The router index a session token names, or None (no token, or not a tier's)."""
    if not token or token[0] != "r":
        return None
    number, dot, _ = token[1:].partition(".")
    if not dot or not number.isdigit() or len(number) > 4:
        return None
    return int(number)


def frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> Optional[bytes]:
    """One frame's payload, or None at end-of-file or when it is over the bound."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(head)
        if length > MAX_FORWARDED_BYTES:
            return None
        return await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class Siblings:
    """This router's view of the tier's others: their sibling ports (``ports[i]`` is
    router *i*'s) and the cluster's secret."""

    def __init__(self, index: int, ports: List[int], secret: bytes) -> None:
        self.index = index
        self.ports = ports
        self.secret = secret

    def foreign_owner(self, token: Optional[str]) -> Optional[int]:
        """The other router that owns the session *token* names, or None."""
        owner = owner_of(token)
        if owner is None or owner == self.index or owner >= len(self.ports):
            return None
        return owner

    async def forward(self, owner: int, request: Any, address: str, https: bool) -> Any:
        """Have router *owner* answer *request*; its response, or None if it cannot be
        reached (or broke off). Cancelled when the client goes away: the hop is closed."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.ports[owner]), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError):
            return None
        try:
            payload = pickle.dumps((request, address, https), pickle.HIGHEST_PROTOCOL)
            writer.write(frame(self.secret + payload))
            answer = await read_frame(reader)
            return pickle.loads(answer) if answer is not None else None
        finally:
            writer.close()


async def serve_siblings(
    sock: Any, secret: bytes, handle: Callable[[Any, str, bool, Callable[[Any], None]], Any]
) -> asyncio.AbstractServer:
    """Answer forwarded requests on *sock* (this router's sibling port). *handle* is called
    with (request, address, https, respond) and returns a cancel function (called if the
    forwarding router closes the hop before the answer)."""

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                data = await asyncio.wait_for(read_frame(reader), FIRST_FRAME_TIMEOUT)
            except asyncio.TimeoutError:
                return  # not one of ours: ours write the frame at once
            if data is None or not hmac.compare_digest(data[: len(secret)], secret):
                return
            request, address, https = pickle.loads(data[len(secret) :])
            answered: asyncio.Future = asyncio.get_running_loop().create_future()

            def respond(response: Any) -> None:
                if not answered.done():
                    answered.set_result(response)

            cancel = handle(request, address, https, respond)
            gone = asyncio.ensure_future(reader.read(1))  # the hop closed: nobody waits
            await asyncio.wait({answered, gone}, return_when=asyncio.FIRST_COMPLETED)
            if answered.done():
                gone.cancel()
                writer.write(frame(pickle.dumps(answered.result(), pickle.HIGHEST_PROTOCOL)))
                await writer.drain()
            else:
                cancel()
        except (ConnectionError, pickle.UnpicklingError, ValueError, TypeError) as error:
            log.debug("forwarded request broke off: %s", error)
        finally:
            writer.close()

    return await asyncio.start_server(one, sock=sock)
