"""The line-protocol transport: one :class:`TcpConnection` per TCP client.

A connection owns its socket transport and its :class:`~common.protocol.CommandParser`,
turns parsed commands into hub calls, and turns hub callbacks into reply lines. It also
enforces what one client may cost the router (see ``docs/LIMITS.md``):

- **writes are coalesced**: every line for one connection in one loop turn goes out as one
  ``transport.write`` (:class:`WriteCoalescer`); nothing ever awaits ``drain()``;
- **slow consumers** (a client that stops reading) are cut off when their unread output
  passes the hard limit, or stays over the soft limit too long;
- **flood control**: a token bucket per connection; over it, the connection is read no
  further until a token is free, and cut off with ``ERROR excess flood`` past a penalty;
- **timers**: ``PING`` after silence and close if still silent; close if never joined;
- **caps** on connections in total and per IP.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from collections import deque
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Set

from common import errors
from common import messages as m
from common import protocol as p
from common.errors import Refusal
from common.limits import (
    LISTEN_QUEUE,
    MAX_QUEUED_COMMANDS,
    MAX_REPLY_ALLOWANCE,
    PARSE_SLICE_BYTES,
    TIMER_SWEEP_INTERVAL,
)
from router.hub import Client, ClientRecord, Hub
from router.policy import TokenBucket, address_key, close_refused
from router.proxies import BadProxyHeader, read_proxy_header
from router.reading import SharedBufferReading, reading_class
from router.settings import Settings
from router.tls import create_listener, settled

log = logging.getLogger(__name__)

SLOW_CONSUMER = p.error_line("slow consumer")
BAD_PROXY_HEADER = p.error_line("bad PROXY protocol header")
EXCESS_FLOOD = p.error_line("excess flood")
SERVER_FULL = p.error_line("server full")

#: Lines queued in one loop turn after which the connection flushes at once, so that the
#: pause mark is seen while a burst of commands (each answered locally, e.g. usage errors)
#: is being handled, not only after it.
FLUSH_EVERY_LINES = 256


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


class TcpListener:
    """State shared by one listener's connections: the hub, the coalescer, the settings,
    the set of open connections and the timer sweep over them."""

    def __init__(self, hub: Hub, loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.loop = loop
        self.settings: Settings = hub.settings
        self.coalescer = WriteCoalescer(loop)
        self.connections: Set[TcpConnection] = set()
        self._sweeper = loop.call_later(TIMER_SWEEP_INTERVAL, self._sweep)
        self._connection_class = reading_class(loop, TcpConnection, BufferedTcpConnection)

    def new_connection(self) -> TcpConnection:
        return self._connection_class(self)

    def _sweep(self) -> None:
        self._sweeper = self.loop.call_later(TIMER_SWEEP_INTERVAL, self._sweep)
        now = self.loop.time()
        for connection in list(self.connections):
            connection.check_timers(now)


class ConnectionState(enum.Enum):
    """Where one TCP connection is (the way ``websockets`` keeps one state, not flags)."""

    CONNECTING = "connecting"  # not accepted yet (or refused: it goes straight to CLOSED)
    OPEN = "open"  # commands are read and handled
    CLOSING = "closing"  # QUIT, end of input, an error: no more input is handled, the
    #                      replies still on their way are written
    CLOSED = "closed"  # nothing more is written: the transport is gone or going


CONNECTING, OPEN = ConnectionState.CONNECTING, ConnectionState.OPEN
CLOSING, CLOSED = ConnectionState.CLOSING, ConnectionState.CLOSED


class TcpConnection(asyncio.Protocol, Client):
    """One line-protocol client."""

    __slots__ = (
        "listener", "hub", "settings", "_loop", "_coalescer", "_parser", "_out", "transport",
        "ip", "preadmitted", "proxied_client", "_socket_counted", "_counted", "state", "_bucket",
        "_waiting", "_resume", "_eof", "record", "_reply_pending", "_output_paused", "connected_at",
        "last_heard", "_ping_sent_at", "_joined_once", "_over_soft_since", "_reply_allowance",
        "_received_at", "_unparsed", "_parsing", "_input_done", "_quit_queued", "_tls",
        "_proxy_header",
    )  # fmt: skip

    def __init__(self, listener: TcpListener) -> None:
        Client.__init__(self)
        self.listener = listener
        self.hub = listener.hub
        self.settings = listener.settings
        self._loop = listener.loop
        self._coalescer = listener.coalescer
        self._parser = p.CommandParser()
        self._out: List[bytes] = []
        self.transport: Optional[asyncio.Transport] = None
        self.ip = ""
        #: Counted by a TLS port's acceptor before the handshake (router/tls.py).
        self.preadmitted = False
        #: The client a trusted proxy named before TLS (router/tls.py; "" kept the peer).
        self.proxied_client: Optional[str] = None
        self._socket_counted = False  # its descriptor is counted in the limiter's budget
        self._counted = False  # holds a slot in the connection limiter
        #: Where the connection is (see :class:`ConnectionState`).
        self.state = CONNECTING
        # flood control
        self._bucket: Optional[TokenBucket] = None
        self._waiting: Deque[p.Event] = deque()
        self._resume: Optional[asyncio.TimerHandle] = None
        self._eof = False  # the peer half-closed: finish the waiting commands, then close
        #: The hub's record of this client (its rooms, its username); None until
        #: connected. Read here, changed only by the hub.
        self.record: Optional[ClientRecord] = None
        # A command that asks for a reply (HISTORY, NAMES, ROOMS) is being answered: the
        # commands after it wait, so one reply at a time can be outstanding.
        self._reply_pending = False
        # The transport holds more than settings.output_pause unsent bytes: no command is
        # handled (and nothing read) until the client has taken its output.
        self._output_paused = False
        # timers (loop.time())
        self.connected_at = self.last_heard = 0.0
        self._ping_sent_at: Optional[float] = None
        self._joined_once = False
        # slow consumer
        self._over_soft_since: Optional[float] = None
        self._reply_allowance = 0  # bytes of replies the client asked for (HISTORY)
        self._received_at: Optional[float] = None  # of the queued reply command being handled
        # input read but not parsed yet (see _parse_more)
        self._unparsed = bytearray()
        self._parsing = False
        self._input_done = False  # the end of the input has been fed to the parser
        self._quit_queued = False  # a QUIT waits in _waiting: no local command overtakes it
        self._tls = False  # set when the connection is made
        #: From a trusted proxy: the PROXY v1 header read so far (None: not waiting for one).
        self._proxy_header: Optional[bytearray] = None

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport = settled(transport)
        # TLS has no half-close: asyncio closes after end of input whatever we answer
        self._tls = transport.get_extra_info("sslcontext") is not None
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else ""
        self.address = address_key(self.ip)
        self._socket_counted = True
        if self.preadmitted:  # a TLS port counted it when it was accepted
            self.preadmitted = False
        elif not self.hub.limiter.open(self.address):
            self.state = CLOSED
            close_refused(transport, SERVER_FULL)
            return
        self._counted = True
        self.state = OPEN
        self.listener.connections.add(self)
        self.connected_at = self.last_heard = self._loop.time()
        settings = self.settings
        transport.set_write_buffer_limits(high=settings.output_pause)
        if settings.rate_limit > 0:
            self._bucket = TokenBucket(settings.rate_limit, settings.rate_burst, self.last_heard)
        self.write(p.WELCOME)
        if self.proxied_client is not None:  # a trusted proxy's header came before TLS
            client = self.proxied_client
            self.record = self.hub.add(self, address_key(client) if client else self.address)
            return
        if settings.trusted_proxies.trusts(self.ip):
            self._proxy_header = bytearray()  # a PROXY header may name the client first
            return
        self.record = self.hub.add(self, self.address)

    def _read_proxy_header(self, data: bytes) -> bytes:
        """From a trusted peer: take a PROXY header (v1 or v2) off the front of the input,
        if it starts with one, and become the hub's client under the address it names (else
        under the peer's: a local client of a proxy's address needs none). Returns the input
        that follows (b"" while a header is still coming). A malformed header closes."""
        header = self._proxy_header
        assert header is not None
        header += data
        try:
            found = read_proxy_header(bytes(header))
        except BadProxyHeader as error:
            log.info("bad PROXY header from %s: %s", self.ip, error)
            self._cut_off(BAD_PROXY_HEADER)
            return b""
        if found is None:
            return b""  # more of it is coming
        client, length = found
        return self._proxied_as(address_key(client) if client else self.address,
                                bytes(header[length:]))  # fmt: skip

    def _proxied_as(self, address: str, rest: bytes) -> bytes:
        self._proxy_header = None
        self.record = self.hub.add(self, address)
        return rest

    def data_received(self, data: bytes) -> None:
        if self.state is not OPEN:
            return  # after QUIT or an error: ignored
        if self._proxy_header is not None:
            data = self._read_proxy_header(data)
            if not data or self.state is not OPEN:
                return
        self.last_heard = self._loop.time()
        self._ping_sent_at = None
        if self._unparsed or len(data) > PARSE_SLICE_BYTES:
            self._unparsed += data
            self._parse_more()
        else:
            self._handle(self._parser.receive_data(data))

    def _parse_more(self) -> None:
        """Parse the input kept back, a slice at a time, while nothing holds the commands
        up: a read of thousands of short lines never turns into thousands of waiting
        command objects (up to 100 times the bytes they came from). What is kept back
        stops the reading until it is parsed."""
        if self._parsing:
            return  # called back from inside the loop below; it goes on by itself
        self._parsing = True
        try:
            unparsed = self._unparsed
            while unparsed and not (self.state is not OPEN or self._waiting or self._held()):
                chunk = bytes(unparsed[:PARSE_SLICE_BYTES])
                del unparsed[:PARSE_SLICE_BYTES]
                self._handle(self._parser.receive_data(chunk))
        finally:
            self._parsing = False
        if self.state is not OPEN or self.transport is None:
            return
        if self._unparsed:
            self.transport.pause_reading()
        else:
            self._work_off()  # all parsed: resume reading, or finish after end of input

    def _handle(self, events: List[p.Event]) -> None:
        """Dispatch parsed *events* now, or queue them behind what waits."""
        if self._bucket is not None or self._waiting or self._held():
            self._queue(events)
            self._work_off()
            return
        dispatch, out, record = _DISPATCH, self._out, self.record
        for index, event in enumerate(events):
            dispatch[type(event)](self, event)
            if self.state is not OPEN:
                return
            if len(out) > FLUSH_EVERY_LINES:
                self.flush()  # may pause output: checked next
            # _held(), the record's part first: a chat message changes none of them.
            if (record is not None and record.changing) or self._held():
                # The rest waits its turn (a reply, a JOIN's outcome, the client reading).
                self._queue(events[index + 1 :])
                self._work_off()
                return

    def eof_received(self) -> bool:
        # The peer will send no more, but may still read (`nc -N`, a piped client):
        # finish the last line, let every shard answer, then close.
        self._eof = True
        if self.state is CLOSED:
            return False  # we had closed our side too: the transport may go
        if self._proxy_header is not None:  # a health check: connected, said nothing, left
            self._begin_closing()
            self.close()
            return False
        if self.state is OPEN:
            if self._unparsed:
                self._parse_more()  # the last line is parsed once the rest has been
            else:
                self._end_of_input()
        return not self._tls

    def _end_of_input(self) -> None:
        """The peer's input is all parsed but an unterminated last line: parse it, finish
        the waiting commands, then close (``_work_off``)."""
        if not self._input_done:
            self._input_done = True
            self._waiting.extend(self._parser.receive_data(b""))
        self._work_off()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.state = CLOSED
        self._out.clear()
        self._waiting.clear()
        self._unparsed.clear()
        self.hub.output.forget(self)
        if self._resume is not None:
            self._resume.cancel()
        if self._socket_counted:
            self._socket_counted = False
            self.hub.limiter.close(self.address, self._counted)
        if self._counted:
            self._counted = False
            self.listener.connections.discard(self)
        if self.record is not None:
            # Gone: leave every room now (a QUIT still waiting for its shards stops waiting).
            self._begin_closing()
            self.hub.drop(self.record)

    # --- flood control and backpressure -----------------------------------------------

    def _held(self) -> bool:
        """True while the next command must wait: for a JOIN's outcome, for a reply, for
        the client to read its output, or for a token (a resume timer is set)."""
        record = self.record
        return (
            (record is not None and record.changing > 0)
            or self._reply_pending
            or self._output_paused
            or (self._resume is not None)
        )

    def _waiting_on_shard_only(self) -> bool:
        """True if the only hold is a shard's answer (a JOIN's outcome, a reply): then
        reading goes on (up to ``MAX_QUEUED_COMMANDS``) and local commands are handled."""
        record = self.record
        return ((record is not None and record.changing > 0) or self._reply_pending) and not (
            self._output_paused or self._resume is not None
        )

    def _queue(self, events: List[p.Event]) -> None:
        """Queue *events* behind the waiting ones. While the only hold is a shard's answer,
        local commands (PING, PONG, usage errors) are handled at once instead: their
        replies may overtake (docs/PROTOCOL.md), so a client whose NAMES waits on a slow
        shard can still PING. They still take a token of the flood-control bucket."""
        waiting = self._waiting
        if not self._waiting_on_shard_only():
            waiting.extend(events)
            return
        dispatch, bucket, now = _DISPATCH, self._bucket, self._loop.time()
        for event in events:
            kind = type(event)
            if kind is p.Quit:
                self._quit_queued = True  # nothing after it is answered, locals included
            if (
                kind in _LOCAL
                and not (self.state is not OPEN or self._quit_queued)
                and (bucket is None or bucket.take(now) == 0.0)
            ):
                dispatch[kind](self, event)
            elif kind in _REPLY_COMMANDS:
                # Its request deadline counts from now, not from when it gets its turn.
                waiting.append(_Received(event, now))
            else:
                waiting.append(event)

    def _work_off(self) -> None:
        """Handle waiting commands as far as the token bucket and the holds allow."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        waiting, dispatch, bucket = self._waiting, _DISPATCH, self._bucket
        while waiting and not (self.state is not OPEN or self._held()):
            if bucket is not None:
                wait = bucket.take(self._loop.time())
                if wait > 0.0:
                    self._throttle(wait)
                    return
            event = waiting.popleft()
            dispatch[type(event)](self, event)
            if len(self._out) > FLUSH_EVERY_LINES:
                self.flush()
        if self.state is not OPEN:
            return
        if self._held():
            assert self.transport is not None
            if self._waiting_on_shard_only():
                # The local commands already read need not wait for the shard either.
                rest = list(waiting)
                waiting.clear()
                self._queue(rest)
            if self._waiting_on_shard_only() and len(waiting) < MAX_QUEUED_COMMANDS:
                self.transport.resume_reading()  # a PING may still come and be answered
            else:
                self.transport.pause_reading()
            return
        if self._unparsed:
            self._parse_more()
        elif self._eof:
            if self._input_done:
                self._finish(bye=False)
            else:
                self._end_of_input()
        elif self.transport is not None:
            self.transport.resume_reading()

    def _throttle(self, wait: float) -> None:
        assert self.transport is not None
        self.hub.metrics.throttled("tcp")
        if len(self._waiting) / self.settings.rate_limit > self.settings.flood_penalty:
            log.info("cutting off %s: excess flood", self.ip)
            self._cut_off(EXCESS_FLOOD)
            return
        self.transport.pause_reading()
        self._resume = self._loop.call_later(wait, self._work_off)

    def pause_writing(self) -> None:
        # asyncio: the transport holds more than settings.output_pause unsent bytes.
        self._output_paused = True

    def resume_writing(self) -> None:
        # asyncio: the client has read its output down to a quarter of the pause mark.
        self._output_paused = False
        if self.state is OPEN:
            self._work_off()

    # --- output ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue *data* for this loop turn's single write to the socket."""
        if self.state is CLOSED:
            return
        if not self._out:
            self._coalescer.mark(self)
        self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if not out or self.state is CLOSED:
            return
        transport = self.transport
        assert transport is not None
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        buffered = transport.get_write_buffer_size()
        if buffered or self.hub.output.holds(self):
            self.hub.output.update(self, buffered)
            if self.state is CLOSED:
                return  # cut off: a budget was over
        if buffered > self.settings.out_soft:
            self._check_backlog(buffered, self._loop.time())
        elif self._over_soft_since is not None or self._reply_allowance:
            self._over_soft_since = None
            self._reply_allowance = 0

    def _check_backlog(self, buffered: int, now: float) -> None:
        """Cut off a slow consumer: over the hard limit, or over the soft one for too long.
        Replies the client asked for (HISTORY) do not count against it."""
        settings = self.settings
        allowance = self._reply_allowance
        if buffered > settings.out_hard + allowance:
            log.info("cutting off %s: slow consumer (%d bytes unread)", self.ip, buffered)
            self.hub.metrics.cut_off("tcp")
            self._cut_off(SLOW_CONSUMER)
        elif buffered > settings.out_soft + allowance:
            if self._over_soft_since is None:
                self._over_soft_since = now
            elif now - self._over_soft_since > settings.out_soft_seconds:
                log.info("cutting off %s: slow consumer (over the soft limit)", self.ip)
                self.hub.metrics.cut_off("tcp")
                self._cut_off(SLOW_CONSUMER)
        else:
            self._over_soft_since = None

    def unsent_bytes(self) -> int:
        """Bytes the transport holds that the client has not read (for the budget)."""
        transport = self.transport
        if transport is None or self.state is CLOSED and transport.is_closing():
            return 0
        return transport.get_write_buffer_size()

    def cut_off_over_budget(self) -> None:
        """The output budget is full and this client holds the most: drop it now. Its
        buffered bytes are freed at once (abort); it is far behind, an ERROR line queued
        behind them would not reach it anyway."""
        transport = self.transport
        if self.state is OPEN:
            self._begin_closing()
            self._waiting.clear()
            self._drop()
        self.state = CLOSED
        self._out.clear()
        if transport is not None:
            transport.abort()

    def _cut_off(self, reason: bytes) -> None:
        """Best effort: queue *reason* behind what is unread, stop serving this client,
        abort the socket if the client does not take its bytes within a grace period."""
        transport = self.transport
        assert transport is not None
        self._begin_closing()
        self._out.clear()
        self._waiting.clear()
        self._drop()
        self._out.append(reason)
        self.close()

    def close(self) -> None:
        """Flush what is queued and close: send end-of-file, keep reading (and discarding)
        so the kernel does not reset the connection over unread input and lose our last
        line, and abort the socket if the peer has not closed after a grace period."""
        if self.state is CLOSED:
            return
        self.state = CLOSED  # first: the last write below must not re-enter the checks
        out, self._out = self._out, []
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if out:
            transport.write(b"".join(out))
        if self._eof or not transport.can_write_eof():
            transport.close()  # the peer sends nothing more: a plain close loses nothing
        else:
            try:
                transport.write_eof()
            except OSError:  # the peer is already gone (ENOTCONN): nothing left to say
                transport.abort()
                return
            transport.resume_reading()
        self._loop.call_later(self.settings.slow_consumer_close_grace, transport.abort)

    # --- timers ----------------------------------------------------------------------

    def check_timers(self, now: float) -> None:
        """Called about once a second: keepalive, join deadline, soft output limit."""
        if self.state is not OPEN:
            return
        settings = self.settings
        if not self._joined_once and now - self.connected_at > settings.join_timeout:
            self._error_and_close(f"no JOIN within {settings.join_timeout:g} seconds")
        elif self._ping_sent_at is not None:
            if now - self._ping_sent_at > settings.ping_timeout:
                self._error_and_close("ping timeout")
        elif now - self.last_heard > settings.idle_ping:
            self._ping_sent_at = now
            self.write(p.ping_line(str(int(now))))
        if self._over_soft_since is not None and self.transport is not None:
            self._check_backlog(self.transport.get_write_buffer_size(), now)

    def _error_and_close(self, description: str) -> None:
        self._begin_closing()
        self.write(p.error_line(description))
        self._drop()
        self.close()

    # --- hub callbacks ---------------------------------------------------------------

    def deliver(self, room: str, entry: m.Entry, wire: bytes) -> None:
        self.write(wire)

    def deliver_run(self, room: str, entries: List[m.Entry], wire: bytes) -> None:
        self.write(wire)

    def deliver_private(self, room: str, event: m.Event) -> None:
        self.write(event[-1])  # the PRIVMSG line

    def on_joined(self, room: str, entry: m.Entry) -> None:
        self._joined_once = True
        self.write(p.joined_line(room))
        self._go_on()

    def on_left(self, room: str) -> None:
        self.write(p.left_line(room))
        self._go_on()

    def on_refused(self, op: int, refusal: Refusal) -> None:
        self.write(refusal.error_line())
        if op == m.JOIN or op == m.LEAVE:
            self._go_on()

    def on_room_lost(self, room: str) -> None:
        self.write(Refusal(errors.ROOM_UNAVAILABLE, room).error_line())

    def _begin_closing(self) -> None:
        """No more input is handled (a CLOSED connection stays CLOSED)."""
        if self.state is not CLOSED:
            self.state = CLOSING

    def _drop(self) -> None:
        """Leave every room now (the connection is being closed)."""
        if self.record is not None:
            self.hub.drop(self.record)

    def _go_on(self) -> None:
        """A JOIN or LEAVE was answered: the commands that waited for it go on."""
        if self.state is OPEN:
            self._work_off()

    def on_shutdown(self) -> None:
        self._begin_closing()
        self.write(p.SHUTTING_DOWN)
        self.close()

    def on_room_restarted(self, room: str) -> None:
        self.write(p.info_line(f"room {room} restarted, history lost"))

    def on_room_notice(self, room: str, text: str) -> None:
        self.write(p.info_line(text))

    # --- commands --------------------------------------------------------------------

    def _msg(self, command: p.Msg) -> None:
        room, text = command  # the hot path: no attribute lookups on the named tuple
        self.hub.say(self.record, room, text)  # type: ignore[arg-type]

    def _privmsg(self, command: p.Privmsg) -> None:
        assert self.record is not None
        self.hub.privmsg(self.record, command.room, command.to, command.text)

    def _join(self, command: p.Join) -> None:
        assert self.record is not None
        wait = self.hub.addresses.join_wait(self.record.address, self._loop.time())
        if wait > 0.0:
            # This address joins faster than its bucket allows: the JOIN (and everything
            # after it, to keep their order) waits for a token. Not a flood of this
            # connection's own, so no excess-flood cut-off.
            assert self.transport is not None
            self._waiting.appendleft(command)
            self.transport.pause_reading()
            self._resume = self._loop.call_later(wait, self._work_off)
            return
        # No JOIN or LEAVE of ours is in flight (the commands after one wait for it), so
        # the connection's username is settled: fixed by a JOIN that succeeded, or free.
        assert self.record is not None
        refusal = self.hub.join(self.record, command.room, command.username)
        if refusal is not None:
            self.write(refusal.error_line())

    def _leave(self, command: p.Leave) -> None:
        assert self.record is not None
        refusal = self.hub.leave(self.record, command.room)
        if refusal is not None:
            self.write(refusal.error_line())

    def _quit(self, command: Optional[p.Quit] = None) -> None:
        self._finish(bye=True)

    def _finish(self, bye: bool) -> None:
        """Leave every room once the shards have answered what came before, then close."""
        self._begin_closing()

        def done() -> None:
            if bye:
                self.write(p.BYE)
            self.close()

        assert self.record is not None
        self.hub.drop(self.record, on_done=done)

    def _received(self, item: _Received) -> None:
        """A reply command that waited behind another: handle it with the time it has
        left of its request deadline (or fail it now if it has none left)."""
        self._received_at = item.at
        try:
            _DISPATCH[type(item.command)](self, item.command)
        finally:
            self._received_at = None

    def _reply_deadline(self, room: str) -> Optional[float]:
        """The deadline of the reply command being handled: its request timeout counted
        from when it was read. None (and its ERROR written) if that has passed already."""
        now = self._loop.time()
        timeout = self.settings.request_timeout
        if self._received_at is None:
            return now + timeout
        deadline = self._received_at + timeout
        if deadline > now:
            return deadline
        self.write(Refusal(errors.SHARD_TIMEOUT, room).error_line())
        return None

    def _refused_reply(self, refusal: Refusal) -> None:
        self._write_reply([refusal.error_line()])

    def _names(self, command: p.Names) -> None:
        room = command.room
        deadline = self._reply_deadline(room)
        if deadline is None:
            return

        def reply(names: List[str]) -> None:
            self._write_reply([p.names_line(room, names)])

        assert self.record is not None
        self._reply_pending = True
        self.hub.names(self.record, room, reply, self._refused_reply, deadline)

    def _rooms(self, command: p.Rooms) -> None:
        deadline = self._reply_deadline("")
        if deadline is None:
            return

        def reply(listing: List[Any]) -> None:
            lines = [p.room_line(room, count) for room, count in listing]
            lines.append(p.rooms_end_line(len(listing)))
            self._write_reply(lines)

        self._reply_pending = True
        self.hub.rooms(reply, asker=self.record, deadline=deadline)

    def _history(self, command: p.History) -> None:
        room = command.room
        deadline = self._reply_deadline(room)
        if deadline is None:
            return

        def reply(result: List[m.Entry]) -> None:
            lines = [
                p.history_line(room, seq, ts, username if kind == m.KIND_CHAT else "*", text)
                for seq, ts, kind, username, text in result
            ]
            lines.append(p.history_end_line(room, len(result)))
            self._write_reply(lines)

        assert self.record is not None
        self._reply_pending = True
        self.hub.history(self.record, room, command.n, reply, self._refused_reply, deadline)

    def _write_reply(self, lines: List[bytes]) -> None:
        """The answer to the one outstanding reply command (HISTORY, NAMES, ROOMS): allowed
        on top of the output limits, so a full HISTORY never trips the slow-consumer
        cut-off. The allowance is this reply's size, not added to an earlier one's: the
        next reply command waits until this is answered and read down to the pause mark.
        Then the commands that waited behind it go on."""
        data = b"".join(lines)
        self._reply_allowance = min(len(data), MAX_REPLY_ALLOWANCE)
        self.write(data)
        self.flush()  # now: a big reply pauses the commands behind it before they run
        self._reply_pending = False
        if self.state is OPEN:
            self._work_off()

    def _ping(self, command: p.Ping) -> None:
        self.write(p.pong_line(command.token))

    def _peer_error(self, error: p.PeerError) -> None:
        self.write(error.reply)
        if error.fatal:
            self._begin_closing()
            self._drop()
            self.close()


def _ignore(connection: TcpConnection, command: Any) -> None:
    pass


#: Commands answered by the router alone, whose replies may overtake the others'.
_LOCAL = frozenset({p.Ping, p.Pong, p.PeerError})
#: Commands that ask a shard for a reply; one is outstanding at a time per connection.
_REPLY_COMMANDS = frozenset({p.Names, p.Rooms, p.History})


class _Received(NamedTuple):
    """A reply command queued behind another, with the loop time it was read at."""

    command: Any
    at: float


#: Command type -> handler. One table for all connections (not a dict of bound methods per
#: connection: with thousands of connections that is memory for nothing).
_DISPATCH: Dict[type, Callable[[TcpConnection, Any], None]] = {
    p.Msg: TcpConnection._msg,
    p.Privmsg: TcpConnection._privmsg,
    p.Join: TcpConnection._join,
    p.Leave: TcpConnection._leave,
    p.Quit: TcpConnection._quit,
    p.Names: TcpConnection._names,
    p.Rooms: TcpConnection._rooms,
    p.History: TcpConnection._history,
    p.Ping: TcpConnection._ping,
    p.Pong: _ignore,
    p.PeerError: TcpConnection._peer_error,
    _Received: TcpConnection._received,
}


class BufferedTcpConnection(TcpConnection, SharedBufferReading):
    """A :class:`TcpConnection` read into the router's shared buffer (router/reading.py)."""

    __slots__ = ()


async def start_tcp_server(
    hub: Hub,
    host: str,
    port: int,
    start_serving: bool = False,
    backlog: int = LISTEN_QUEUE,
    tls: Optional[ssl.SSLContext] = None,
    **where: Any,
) -> asyncio.AbstractServer:
    """Bind the line-protocol listener (not yet accepting unless *start_serving*). asyncio
    accepts up to *backlog* connections per loop wake-up and listens with it. With *tls*,
    it speaks TLS only. *where*: ``sock`` or ``reuse_port`` (a router tier, see
    :func:`router.tls.create_listener`)."""
    loop = asyncio.get_running_loop()
    listener = TcpListener(hub, loop)
    hub.metrics.connections["tcp"] = lambda: len(listener.connections)
    return await create_listener(
        loop, listener.new_connection, host, port, context=tls, settings=hub.settings,
        limiter=hub.limiter, start_serving=start_serving, backlog=backlog, **where,
    )  # fmt: skip
