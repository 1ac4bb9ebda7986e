"""Browser sessions in a router tier (``--routers N``): each session lives on the router
that created it, and a request that another router took is forwarded to it.

A browser opens several connections and each may be accepted by any router, but a
session's state (its rooms, its cursor, the polls waiting on it) has one owner. Its token
says which: ``r<index>.<random>``. A router that gets a request whose session cookie names
another router hands the parsed request to that router over loopback and writes back its
answer; the owner answers it exactly as if it had taken the connection itself (the
client's address and scheme go along, so the per-address limits count the real client).

The hop: a loopback TCP connection to the owner's *sibling port* (bound by the
supervisor, one per router, kept across that router's restarts). It starts with the
cluster's secret (random, given to every router at start), read and checked before
anything else: only this cluster's routers can speak on the port, and nothing is
unpickled or buffered for anyone else. Then one request at a time, one frame each way:
``pickle((request, address, https))`` there, ``pickle(response)`` back; kept open for
the next request (at most ``MAX_IDLE_HOPS`` idle per sibling).
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
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from common.limits import MAX_FORWARDED_BYTES
from router.pipes import frame

log = logging.getLogger(__name__)

#: A frame's length header: router.pipes' (``multiprocessing.Connection``'s) own, whose
#: :func:`router.pipes.frame` writes them (a frame here is far below its 2 GiB form).
_LENGTH = struct.Struct("!i")
#: Seconds to connect to a sibling router on loopback before taking it for dead.
CONNECT_TIMEOUT = 2.0
#: Seconds a connection to a sibling port may take to send its request frame (a router
#: sends it at once): one that sends nothing holds no descriptor longer than this.
FIRST_FRAME_TIMEOUT = 5.0
#: Seconds an idle hop stays open on the owner's side, and (less, so that the owner never
#: closes one as it is reused) how long the forwarding side reuses one.
HOP_IDLE_SECONDS = 30.0
HOP_REUSE_SECONDS = 20.0
#: Connections to a sibling port that have not shown the secret yet, at most (each for at
#: most FIRST_FRAME_TIMEOUT). Past it the oldest of them is closed if it has waited
#: PENDING_HOP_GRACE (a router shows the secret as it connects), else the new one is; a
#: router whose new hop is closed before any answer tries again, NEW_HOP_ATTEMPTS times in
#: all, NEW_HOP_BACKOFF seconds times the attempt apart (a burst of forwarded requests).
MAX_PENDING_HOPS = 1024
PENDING_HOP_GRACE = 0.5
NEW_HOP_ATTEMPTS = 6
NEW_HOP_BACKOFF = 0.05
#: Idle hops kept per sibling: beyond, a finished hop is closed (a burst of forwarded
#: long-polls opens as many as there are polls; they are not all kept).
MAX_IDLE_HOPS = 64
HIGHEST = pickle.HIGHEST_PROTOCOL


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


#: What :meth:`Siblings._ask` returns for a hop that ended before any byte of an answer.
_CLOSED = object()
#: What :meth:`Siblings.forward` returns when the owner took the request but did not answer
#: (in time, or whole): it may have applied it, so it is not tried anywhere else.
NO_ANSWER = object()


async def _read_answer(reader: asyncio.StreamReader) -> Any:
    """A frame's payload; ``_CLOSED`` at end-of-file (or a reset) before any of it, None
    if it broke off midway or is over the bound."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as error:
        return None if error.partial else _CLOSED
    except ConnectionError:
        return _CLOSED
    (length,) = _LENGTH.unpack(head)
    if not 0 <= length <= MAX_FORWARDED_BYTES:
        return None
    try:
        return await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def read_frame(reader: asyncio.StreamReader) -> Optional[bytes]:
    """One frame's payload, or None at end-of-file or when it is over the bound."""
    payload = await _read_answer(reader)
    return None if payload is _CLOSED else payload


class Siblings:
    """This router's view of the tier's others: their sibling ports (``ports[i]`` is
    router *i*'s) and the cluster's secret. Hops (loopback connections to a sibling) are
    kept open between requests, at most ``MAX_IDLE_HOPS`` idle per sibling, so a
    forwarded request costs no connect."""

    def __init__(
        self, index: int, ports: List[int], secret: bytes, answer_timeout: float = 60.0
    ) -> None:
        self.index = index
        self.ports = ports
        self.secret = secret
        #: Seconds to wait for a forwarded request's answer (longer than a long-poll):
        #: past it the owner counts as gone. Its port is the supervisor's and stays open
        #: while it restarts, so a dead owner is found by this, not by a refused connect.
        self.answer_timeout = answer_timeout
        #: owner -> idle hops, newest last: (reader, writer, when it became idle).
        self._idle: Dict[int, List[Tuple[Any, Any, float]]] = {}
        #: Routers the supervisor gave up on: their sessions are gone, nothing is forwarded.
        self._lost: Set[int] = set()

    def foreign_owner(self, token: Optional[str]) -> Optional[int]:
        """The other router that owns the session *token* names, or None."""
        owner = owner_of(token)
        if owner is None or owner == self.index or owner >= len(self.ports):
            return None
        return None if owner in self._lost else owner

    def is_lost(self, owner: int) -> bool:
        """True if the supervisor gave up on router *owner*."""
        return owner in self._lost

    def lost(self, owner: int) -> None:
        """Router *owner* was given up on: its sessions are answered as unknown here."""
        self._lost.add(owner)
        for _, writer, _ in self._idle.pop(owner, []):
            writer.close()

    async def forward(self, owner: int, request: Any, address: str, https: bool) -> Any:
        """Have router *owner* answer *request*; its response, None if it cannot be
        reached (it is gone, and its sessions with it), or ``NO_ANSWER`` if it broke off or
        did not answer in time. Cancelled when the client goes away:
        the hop is closed, which cancels the request there. The request is sent again
        only when a hop was closed before any byte of an answer (an idle hop the owner
        dropped, a new one refused in a burst; ``NEW_HOP_ATTEMPTS`` new hops at most):
        never after a timeout or a partial answer, where the owner may have applied it
        (one command, one outcome)."""
        payload = frame(pickle.dumps((request, address, https), HIGHEST))
        hop = self._take(owner)
        if hop is not None:
            answer = await self._ask(owner, hop, payload)
            if answer is not _CLOSED:
                return answer
        for attempt in range(NEW_HOP_ATTEMPTS):
            if attempt:  # refused before it read anything (a burst of new hops): again
                await asyncio.sleep(NEW_HOP_BACKOFF * attempt)
            hop = await self._connect(owner)
            if hop is None:
                return None
            answer = await self._ask(owner, hop, payload)
            if answer is not _CLOSED:
                return answer
        log.warning("router %d refused %d new hops in a row", owner, NEW_HOP_ATTEMPTS)
        return NO_ANSWER  # alive (it refused them), only too busy: not "gone"

    async def _ask(self, owner: int, hop: Tuple[Any, Any], payload: bytes) -> Any:
        """The owner's response on *hop*; ``NO_ANSWER`` (none in time, or a partial one), or
        ``_CLOSED`` if the hop ended before any byte of an answer came."""
        reader, writer = hop
        done = False
        try:
            writer.write(payload)
            try:
                answer = await asyncio.wait_for(_read_answer(reader), self.answer_timeout)
            except asyncio.TimeoutError:
                log.warning("router %d did not answer a forwarded request in time", owner)
                return NO_ANSWER
            if answer is None:
                return NO_ANSWER
            if answer is _CLOSED:
                return answer
            response = pickle.loads(answer)
            done = True
            return response
        except OSError:
            return NO_ANSWER
        finally:
            if done:
                self._give_back(owner, reader, writer)
            else:
                writer.close()

    async def _connect(self, owner: int) -> Optional[Tuple[Any, Any]]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.ports[owner]), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError):
            return None
        writer.write(self.secret)  # first, once: nothing is read from a hop before it
        return reader, writer

    def _take(self, owner: int) -> Optional[Tuple[Any, Any]]:
        idle = self._idle.get(owner)
        now = time.monotonic()
        while idle:
            reader, writer, since = idle.pop()
            if now - since < HOP_REUSE_SECONDS and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    def _give_back(self, owner: int, reader: Any, writer: Any) -> None:
        idle = self._idle.setdefault(owner, [])
        if len(idle) >= MAX_IDLE_HOPS or writer.is_closing():
            writer.close()
            return
        idle.append((reader, writer, time.monotonic()))

    def close(self) -> None:
        for idle in self._idle.values():
            for _, writer, _ in idle:
                writer.close()
        self._idle.clear()


async def serve_siblings(
    sock: Any, secret: bytes, handle: Callable[[Any, str, bool, Callable[[Any], None]], Any]
) -> asyncio.AbstractServer:
    """Answer forwarded requests on *sock* (this router's sibling port), one at a time
    per hop. *handle* is called with (request, address, https, respond) and returns a
    cancel function (called if the forwarding router closes the hop before the answer)."""

    #: Hops that have not shown the secret yet, oldest first, with when they came.
    pending: Dict[Any, float] = {}

    def admit(writer: asyncio.StreamWriter) -> bool:
        if len(pending) >= MAX_PENDING_HOPS:
            oldest, since = next(iter(pending.items()))
            if time.monotonic() - since < PENDING_HOP_GRACE:
                return False  # a burst: refused at once (a router tries again)
            del pending[oldest]
            oldest.transport.abort()  # silent for too long while others wait: not a router
        pending[writer] = time.monotonic()
        return True

    async def serve_hop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not admit(writer):
                return
            try:
                shown = await asyncio.wait_for(reader.readexactly(len(secret)), FIRST_FRAME_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            finally:
                pending.pop(writer, None)
            if not hmac.compare_digest(shown, secret):
                return
            while await _answer_one(reader, writer, handle):
                pass
        except (ConnectionError, pickle.UnpicklingError, ValueError, TypeError) as error:
            log.debug("forwarded request broke off: %s", error)
        finally:
            writer.close()

    return await asyncio.start_server(serve_hop, sock=sock)


async def _answer_one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Callable[[Any, str, bool, Callable[[Any], None]], Any],
) -> bool:
    """Read one forwarded request on a hop that showed the secret and answer it; False
    when the hop is to be closed."""
    try:
        data = await asyncio.wait_for(read_frame(reader), HOP_IDLE_SECONDS)
    except asyncio.TimeoutError:
        return False  # an idle hop is given up
    if data is None:
        return False
    request, address, https = pickle.loads(data)
    answered: asyncio.Future = asyncio.get_running_loop().create_future()

    def respond(response: Any) -> None:
        if not answered.done():
            answered.set_result(response)

    cancel = handle(request, address, https, respond)
    # One request at a time per hop: anything read now is the hop closing (cancel).
    gone = asyncio.ensure_future(reader.read(1))
    await asyncio.wait({answered, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not answered.done():
        cancel()
        return False
    gone.cancel()
    writer.write(frame(pickle.dumps(answered.result(), HIGHEST)))
    await writer.drain()
    return True
