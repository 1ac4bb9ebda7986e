"""The line-protocol transport: one :class:`TcpConnection` per TCP client.

A connection owns its socket transport and its :class:`~common.protocol.CommandParser`,
turns parsed commands into hub calls, and turns hub callbacks into reply lines. Writes are
coalesced: every line for one connection in one loop turn goes out as one
``transport.write`` (see :class:`WriteCoalescer`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, List, Optional

from common import messages as m
from common import protocol as p
from common.limits import MAX_ROOMS_PER_CLIENT
from router.hub import Client, Failure, Hub

log = logging.getLogger(__name__)


def failure_line(failure: Failure) -> bytes:
    """The ``ERROR`` line for a refused command."""
    code, room = failure
    if code == m.ERR_NOT_IN_ROOM:
        return p.not_in_room_error(room)
    if code == m.ERR_NAME_TAKEN:
        return p.name_taken_error(room)
    if code == m.ERR_ALREADY_IN_ROOM:
        return p.already_in_room_error(room)
    if code == m.ERR_TOO_MANY_ROOMS:
        return p.error_line(f"too many rooms (at most {MAX_ROOMS_PER_CLIENT})")
    if code == m.ERR_UNAVAILABLE:
        return p.error_line("room unavailable")
    if code == m.ERR_TIMEOUT:
        return p.error_line("room busy, try again")
    return p.error_line(code.replace("_", " "))


class WriteCoalescer:
    """Collects the connections written to in this loop turn and flushes each once, at the
    start of the next turn, so N lines to one connection cost one ``transport.write``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: List[TcpConnection] = []

    def mark(self, connection: TcpConnection) -> None:
        if not self._dirty:
            self._loop.call_soon(self.flush)
        self._dirty.append(connection)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush()


class TcpConnection(asyncio.Protocol, Client):
    """One line-protocol client."""

    def __init__(self, hub: Hub, coalescer: WriteCoalescer) -> None:
        Client.__init__(self)
        self.hub = hub
        self._coalescer = coalescer
        self._parser = p.CommandParser()
        self._out: List[bytes] = []
        self.transport: Optional[asyncio.Transport] = None
        self.peer: Any = None
        self._closing = False  # QUIT, EOF or a fatal error: no more input is handled
        self._closed = False  # the transport is gone: nothing more is written
        self._dispatch: Dict[type, Callable[[Any], None]] = {
            p.Msg: self._msg,
            p.Join: self._join,
            p.Leave: self._leave,
            p.Quit: self._quit,
            p.Names: self._names,
            p.Rooms: self._rooms,
            p.History: self._history,
            p.Ping: self._ping,
            p.Pong: _ignore,
            p.PeerError: self._peer_error,
        }

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.hub.add(self)
        self.write(p.WELCOME)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # after QUIT: ignored
        dispatch = self._dispatch
        for event in self._parser.receive_data(data):
            dispatch[type(event)](event)
            if self._closing:
                break

    def eof_received(self) -> bool:
        # The peer will send no more, but may still read (`nc -N`, a piped client):
        # finish the last line, let every shard answer, then close.
        if not self._closing:
            for event in self._parser.receive_data(b""):
                self._dispatch[type(event)](event)
            self._finish(bye=False)
        return True

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._closed = True
        self._out.clear()
        if not self._closing:
            self._closing = True
            self.hub.drop(self)
        elif self.cid in self.hub.clients:
            self.hub.drop(self)  # a QUIT still waiting for its shards: stop waiting

    # --- output ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue *data* for this loop turn's single write to the socket."""
        if self._closed:
            return
        if not self._out:
            self._coalescer.mark(self)
        self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if out and not self._closed:
            assert self.transport is not None
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def close(self) -> None:
        """Flush what is queued and close the connection."""
        self.flush()
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    # --- hub callbacks ---------------------------------------------------------------

    def deliver(self, room: str, entry: m.Entry, wire: bytes) -> None:
        self.write(wire)

    def on_joined(self, room: str, entry: m.Entry) -> None:
        self.write(p.joined_line(room))

    def on_left(self, room: str, entry: m.Entry) -> None:
        self.write(p.left_line(room))

    def on_failure(self, op: int, failure: Failure) -> None:
        self.write(failure_line(failure))

    def on_shutdown(self) -> None:
        self.write(p.SHUTTING_DOWN)
        self.close()

    def on_room_restarted(self, room: str) -> None:
        self.write(p.info_line(f"room {room} restarted, history lost"))

    # --- commands --------------------------------------------------------------------

    def _msg(self, command: p.Msg) -> None:
        self.hub.say(self, command.room, command.text)

    def _join(self, command: p.Join) -> None:
        code = self.hub.join(self, command.room, command.username)
        if code == m.ERR_WRONG_USERNAME:
            self.write(p.wrong_username_error(self.username or ""))
        elif code is not None:
            self.write(failure_line(Failure(code, command.room)))

    def _leave(self, command: p.Leave) -> None:
        self.hub.leave(self, command.room)

    def _quit(self, command: Optional[p.Quit] = None) -> None:
        self._finish(bye=True)

    def _finish(self, bye: bool) -> None:
        """Leave every room once the shards have answered what came before, then close."""
        self._closing = True

        def done() -> None:
            if bye:
                self.write(p.BYE)
            self.close()

        self.hub.drop(self, on_done=done)

    def _names(self, command: p.Names) -> None:
        room = command.room

        def reply(result: Any) -> None:
            if isinstance(result, Failure):
                self.write(failure_line(result))
            else:
                self.write(p.names_line(room, result))

        self.hub.names(self, room, reply)

    def _rooms(self, command: p.Rooms) -> None:
        def reply(listing: List[Any]) -> None:
            for room, count in listing:
                self.write(p.room_line(room, count))
            self.write(p.rooms_end_line(len(listing)))

        self.hub.rooms(reply)

    def _history(self, command: p.History) -> None:
        room = command.room

        def reply(result: Any) -> None:
            if isinstance(result, Failure):
                self.write(failure_line(result))
                return
            for seq, ts, kind, username, text in result:
                if kind != m.KIND_CHAT:
                    username = "*"
                self.write(p.history_line(room, seq, ts, username, text))
            self.write(p.history_end_line(room, len(result)))

        self.hub.history(self, room, command.n, reply)

    def _ping(self, command: p.Ping) -> None:
        self.write(p.pong_line(command.token))

    def _peer_error(self, error: p.PeerError) -> None:
        self.write(error.reply)
        if error.fatal:
            self._closing = True
            self.hub.drop(self)
            self.close()


def _ignore(_: Any) -> None:
    pass


async def start_tcp_server(
    hub: Hub, host: str, port: int, start_serving: bool = False
) -> asyncio.AbstractServer:
    """Bind the line-protocol listener (not yet accepting unless *start_serving*)."""
    loop = asyncio.get_running_loop()
    coalescer = WriteCoalescer(loop)
    return await loop.create_server(
        lambda: TcpConnection(hub, coalescer), host, port, start_serving=start_serving
    )
