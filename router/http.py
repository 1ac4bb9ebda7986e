"""The HTTP transport: one :class:`HttpConnection` per TCP connection from a browser.

A connection owns its socket transport and its sans-IO
:class:`~router.http_parser.HttpRequestParser` and nothing else: it feeds the parser,
hands each complete request to the :class:`~router.http_api.HttpApi`, writes the answer,
and enforces the connection-level limits (request deadline, keep-alive idle time, the
shared connection caps). Requests on one connection are answered one at a time, in order
(a long poll can take ``settings.poll_timeout`` seconds). Reading goes on while a request is being
answered, so a client that goes away is noticed at once (its poll is cancelled), but pauses
once one more full request is buffered, so a pipelining client cannot make the router
buffer without bound. The next request is not even looked at while the answers already
written are unread past the pause mark (``settings.output_pause``), and an answer left
unread over the soft output limit for ``settings.out_soft_seconds`` cuts the connection
off, as for a slow TCP consumer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from typing import Any, List, Optional, Set

from common.limits import (
    LISTEN_QUEUE,
    MAX_PIPELINED_BYTES,
)
from router.http_api import SECURITY_HEADERS, ApiError, Exchange, HttpApi, Response
from router.http_parser import CLOSED as END_OF_STREAM
from router.http_parser import (
    CONTINUE_RESPONSE,
    NEED_DATA,
    Continue,
    HttpRequestParser,
    ProtocolError,
    Request,
    format_response,
)
from router.http_static import StaticFiles
from router.hub import Hub
from router.policy import SessionRateLimit, address_key, close_refused
from router.reading import SharedBufferReading, reading_class
from router.tls import create_listener, settled
from web import WEB_ROOT

log = logging.getLogger(__name__)


def _server_full_response() -> bytes:
    response = ApiError(503, "server_full", "too many connections").response()
    headers = response.headers + SECURITY_HEADERS
    return format_response(503, headers, response.body, False)


#: The answer to a connection refused at accept (over a connection cap or out of
#: descriptors to spare), formatted once.
SERVER_FULL_RESPONSE = _server_full_response()


class ConnectionState(enum.Enum):
    """Where one HTTP connection is (one state, not flags; reading and writing paused are
    flow control, kept apart)."""

    OPEN = "open"  # requests are read and answered, one at a time
    CLOSING = "closing"  # the server stops: the request being answered is the last
    LINGERING = "lingering"  # the last answer is out and our side half-closed: what the
    #                          client still sends is read and thrown away, then close
    CLOSED = "closed"  # the transport is gone or going


OPEN, CLOSING = ConnectionState.OPEN, ConnectionState.CLOSING
LINGERING, CLOSED = ConnectionState.LINGERING, ConnectionState.CLOSED


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 client connection (keep-alive, one request at a time)."""

    def __init__(self, api: HttpApi, connections: Set[HttpConnection]) -> None:
        self.api = api
        self._connections = connections
        self._loop = api.hub.loop
        self._parser = HttpRequestParser()
        self.transport: Optional[asyncio.Transport] = None
        self.peer: Any = None
        self.ip = ""
        self.address = ""  # the per-address limits' key of self.ip
        self._client_address = ""  # whom requests count against (see connection_made)
        self._proxied = False  # the peer is a trusted proxy (--trusted-proxy)
        self._tls = False  # the connection speaks TLS
        self._unread_check: Optional[asyncio.TimerHandle] = None  # slow-consumer timer
        #: Counted by a TLS port's acceptor before the handshake (router/tls.py).
        self.preadmitted = False
        #: The client a trusted proxy named before TLS (router/tls.py; "" kept the peer):
        #: then the connection is that client's, and its forwarding headers mean nothing.
        self.proxied_client: Optional[str] = None
        self._socket_counted = False  # its descriptor is counted in the limiter's budget
        self._counted = False  # holds a slot in the hub's connection limiter
        self._exchange: Optional[Exchange] = None  # the request being answered
        self._request: Optional[Request] = None
        self._deadline: Optional[asyncio.TimerHandle] = None  # whole request must arrive
        self._idle: Optional[asyncio.TimerHandle] = None  # keep-alive between requests
        self._write_paused = False
        self._read_paused = False
        self._next_scheduled = False
        #: Where the connection is (see :class:`ConnectionState`).
        self.state = OPEN
        self._peer_eof = False  # the client will send nothing more

    @property
    def busy(self) -> bool:
        return self._exchange is not None

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport = settled(transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        self.peer = transport.get_extra_info("peername")
        self.ip = str(self.peer[0]) if self.peer else ""
        self.address = address_key(self.ip)
        self._proxied = self.api.hub.settings.trusted_proxies.trusts(self.ip)
        # Whom its requests are counted against (self.address holds the connection's slot).
        self._client_address = self.address
        if self.proxied_client is not None:
            self._proxied = False
            if self.proxied_client:
                self._client_address = address_key(self.proxied_client)
        self._socket_counted = True
        if self.preadmitted:  # a TLS port counted it when it was accepted
            self.preadmitted = False
        elif not self.api.hub.limiter.open(self.address):  # TCP and HTTP share the caps
            self.state = CLOSED
            close_refused(transport, SERVER_FULL_RESPONSE)
            return
        self._counted = True
        self._connections.add(self)
        transport.set_write_buffer_limits(high=self.api.hub.settings.output_pause)
        self._arm_deadline()

    def data_received(self, data: bytes) -> None:
        if self.state is LINGERING:
            return
        self._parser.receive_data(data)
        if not (self.busy or self._write_paused):
            if self._deadline is None and self._parser.in_progress:
                self._arm_deadline()
            self._process()
        if (self._parser.buffered > MAX_PIPELINED_BYTES) is not self._read_paused:
            self._pace_reading()

    def _pace_reading(self) -> None:
        """Read only while less than one more full request is waiting unparsed: requests
        are answered one at a time, and not while the answers are unread, so a client
        pipelining faster than that must wait rather than fill the router's memory."""
        over = self._parser.buffered > MAX_PIPELINED_BYTES
        if over is self._read_paused:
            return  # the usual case: nothing to change
        transport = self.transport
        if transport is None or self.state is CLOSED or self.state is LINGERING:
            return
        if over and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif self._read_paused and not over:
            self._read_paused = False
            transport.resume_reading()

    def eof_received(self) -> bool:
        if self.state is LINGERING:
            self.close()
            return False
        self._peer_eof = True
        self._parser.receive_data(b"")
        exchange = self._exchange
        if exchange is None:
            self._process()
        elif exchange.abandon_on_eof:
            # A browser that aborts a long poll closes its socket: stop waiting for it.
            self.close()
            self._exchange = None
            exchange.cancel()
        # keep the write side open: an answer may still be on its way (not over TLS, which
        # has no half-close: asyncio closes then whatever we answer)
        return not self._tls

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.state = CLOSED
        self._connections.discard(self)
        self.api.hub.output.forget(self)
        if self._socket_counted:
            self._socket_counted = False
            self.api.hub.limiter.close(self.address, self._counted)
            self._counted = False
        self._cancel_timers()
        self._cancel_unread_check()
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.state is CLOSED:
            return
        self._account_unsent()
        if not self.busy:
            self._ready_for_next()

    # --- unsent output -----------------------------------------------------------------

    def unsent_bytes(self) -> int:
        """Bytes of answers the client has not read yet (for the output budget)."""
        transport = self.transport
        if transport is None or self.state is CLOSED:
            return 0
        return transport.get_write_buffer_size()

    def cut_off_over_budget(self) -> None:
        """The output budget is full and this connection holds the most: drop it now."""
        log.info("http %s: cut off (output budget)", self.peer)
        self._drop_now()

    def _account_unsent(self) -> None:
        """Tell the budget what is unread; arm the slow-consumer check while it is over the
        soft limit (an answer nobody reads must not hold its bytes and socket forever)."""
        unsent = self.unsent_bytes()
        output = self.api.hub.output
        if not unsent and not output.holds(self):
            return  # the usual case: the answer went straight to the socket
        output.update(self, unsent)
        settings = self.api.hub.settings
        if unsent > settings.out_soft and self._unread_check is None and self.state is not CLOSED:
            self._unread_check = self._loop.call_later(
                settings.out_soft_seconds, self._check_unread
            )

    def _check_unread(self) -> None:
        self._unread_check = None
        transport = self.transport
        if transport is None:
            return
        settings = self.api.hub.settings
        unsent = transport.get_write_buffer_size()
        if self.state is CLOSED:
            if unsent:  # closed, and its last answer is still not taken: let it go
                log.info("http %s: aborted (closed with an answer unread)", self.peer)
                transport.abort()
            return
        if unsent > settings.out_soft:
            log.info("http %s: cut off (slow consumer: answer unread)", self.peer)
            self.api.hub.metrics.cut_off("http")
            self._drop_now()
        else:
            self._account_unsent()

    def _drop_now(self) -> None:
        """Close at once, discarding what is unsent; a waiting request is cancelled."""
        exchange, self._exchange = self._exchange, None
        self.close()
        if self.transport is not None:
            self.transport.abort()
        if exchange is not None:
            exchange.cancel()

    # --- requests --------------------------------------------------------------------

    def _process(self) -> None:
        """Handle the next complete request in the parser, if any."""
        self._next_scheduled = False
        if self.state is CLOSED or self.busy:
            return
        event = self._parser.next_event()
        if event is NEED_DATA:
            return
        if event is END_OF_STREAM:
            self.close()
        elif isinstance(event, ProtocolError):
            self._refuse(event)
        elif isinstance(event, Continue):
            self._continue(event.request)
        else:
            assert isinstance(event, Request)
            self._start(event)
        if self._read_paused:
            self._pace_reading()  # a request left the parser: there may be room to read again

    def _continue(self, head: Request) -> None:
        """The client waits for ``100 Continue`` before sending the body: send it, unless
        the head alone is refused (bad host or origin, unknown path...). Then the refusal
        is the answer and the connection closes: the body is never read."""
        assert self.transport is not None
        refusal = self.api.refusal(head)
        if refusal is None:
            self.transport.write(CONTINUE_RESPONSE)
            return
        headers = refusal.headers + SECURITY_HEADERS
        head_only = head.method == "HEAD"
        data = format_response(refusal.status, headers, refusal.body, False, head_only)
        self.transport.write(data)
        self._close_after_answer()

    def _start(self, request: Request) -> None:
        self._cancel_timers()
        self._request = request
        address, https = self._client_address, self._tls
        if self._proxied:  # a trusted proxy: the client is the one it names
            client, scheme = self.api.hub.settings.trusted_proxies.client_of(
                self.ip, request.headers
            )
            address, https = address_key(client), https or scheme == "https"
        exchange = self._exchange = Exchange(
            lambda response: self._finish(exchange, response), address, https
        )
        self.api.handle(request, exchange)

    def _finish(self, exchange: Exchange, response: Response) -> None:
        if self.state is CLOSED or exchange is not self._exchange:
            return
        request = self._request
        assert request is not None and self.transport is not None
        self._exchange = self._request = None
        keep_alive = request.keep_alive and self.state is OPEN
        head_only = request.method == "HEAD"
        headers = response.headers + SECURITY_HEADERS
        data = format_response(response.status, headers, response.body, keep_alive, head_only)
        self.transport.write(data)
        self._account_unsent()
        if self.state is CLOSED:
            return  # cut off: the output budget was over
        if not keep_alive:
            self._close_after_answer()
            return
        if not self._write_paused:
            self._ready_for_next()

    def _ready_for_next(self) -> None:
        """Between requests: start the right timer and look at what is buffered."""
        if self._parser.in_progress:
            self._arm_deadline()
        else:
            self._arm_idle()
        if not self._next_scheduled:
            # Not recursively: a pipelined burst must not grow the stack.
            self._next_scheduled = True
            self._loop.call_soon(self._process)

    def _refuse(self, error: ProtocolError) -> None:
        """Answer a protocol error and close (the parser is dead after one)."""
        assert self.transport is not None
        log.debug("http %s: %s %s", self.peer, error.status, error.message)
        response = ApiError(error.status, error.code, error.message).response()
        headers = response.headers + SECURITY_HEADERS
        self.transport.write(format_response(error.status, headers, response.body, False))
        self._close_after_answer()

    # --- timers ----------------------------------------------------------------------

    def _arm_deadline(self) -> None:
        self._cancel_timers()
        timeout = self.api.hub.settings.http_request_timeout
        self._deadline = self._loop.call_later(timeout, self._on_deadline)

    def _arm_idle(self) -> None:
        self._cancel_timers()
        idle = self.api.hub.settings.http_keepalive_idle
        self._idle = self._loop.call_later(idle, self._on_idle)

    def _cancel_timers(self) -> None:
        for timer in (self._deadline, self._idle):
            if timer is not None:
                timer.cancel()
        self._deadline = self._idle = None

    def _cancel_unread_check(self) -> None:
        if self._unread_check is not None:
            self._unread_check.cancel()
            self._unread_check = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if not self.busy and self.state is not CLOSED:
            self._refuse(
                ProtocolError(408, "request_timeout", "the request did not arrive in time")
            )

    def _on_idle(self) -> None:
        self._idle = None
        if not self.busy:
            self.close()

    # --- closing ---------------------------------------------------------------------

    def close(self) -> None:
        if self.state is not CLOSED:
            self.state = CLOSED
            self._cancel_timers()
            self._connections.discard(self)
            transport = self.transport
            if transport is not None:
                transport.close()
                if transport.get_write_buffer_size() and self._unread_check is None:
                    # asyncio keeps a closed transport until its buffer is written: a peer
                    # that never reads must not hold it (and its descriptor) forever.
                    self._unread_check = self._loop.call_later(
                        self.api.hub.settings.out_soft_seconds, self._check_unread
                    )

    def _close_after_answer(self) -> None:
        """Half-close once the answer is written, discard input for up to ``http_linger``
        seconds (or until the client closes), then close: closing with unread input would
        reset the connection and could destroy the answer before the client reads it."""
        transport = self.transport
        if self.state is CLOSED or transport is None:
            return
        if self._peer_eof or not transport.can_write_eof():
            self.close()  # nothing more will come (or cannot half-close): close after the write
            return
        self._cancel_timers()
        self.state = LINGERING
        try:
            transport.write_eof()
        except OSError as error:  # the peer is gone already (ENOTCONN): nothing to wait for
            log.debug("http %s: %s", self.peer, error)
            self.close()
            return
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self._idle = self._loop.call_later(self.api.hub.settings.http_linger, self.close)

    def shutdown(self) -> None:
        """The server stops: close now if idle, else after the current answer."""
        if self.state is OPEN:
            self.state = CLOSING
        if not self.busy:
            self.close()


class HttpServer(asyncio.AbstractServer):
    """The listening server plus what it owns (the API, open connections): closing it
    also closes idle connections and makes the busy ones close after their answer."""

    def __init__(
        self, server: asyncio.AbstractServer, api: HttpApi, connections: Set[HttpConnection]
    ) -> None:
        self._server = server
        self.api = api
        self._connections = connections

    @property
    def sockets(self) -> List[Any]:
        return list(self._server.sockets)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._server.close()
        self.api.close()
        for connection in list(self._connections):
            connection.shutdown()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server.is_serving()

    async def start_serving(self) -> None:
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    def close_clients(self) -> None:
        for connection in list(self._connections):
            connection.close()

    def abort_clients(self) -> None:
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.abort()


class BufferedHttpConnection(HttpConnection, SharedBufferReading):
    """An :class:`HttpConnection` read into the router's shared buffer (router/reading.py)."""


async def start_http_server(
    hub: Hub,
    host: str,
    port: int,
    start_serving: bool = False,
    backlog: int = LISTEN_QUEUE,
    tls: Optional[ssl.SSLContext] = None,
    **where: Any,
) -> asyncio.AbstractServer:
    """Bind the HTTP listener (browser UI and JSON API; HTTPS only with *tls*, and its
    session cookies ``Secure``), not yet accepting unless
    *start_serving*; asyncio accepts up to *backlog* connections per loop wake-up and
    listens with it. Everything else (timeouts, allowed hosts) comes from
    ``hub.settings``. Raises ``OSError`` if the port cannot be bound. The returned server
    owns the API state (sessions); closing it ends the connections."""
    loop = asyncio.get_running_loop()
    api = HttpApi(hub, StaticFiles(WEB_ROOT))
    api.admit = SessionRateLimit(hub.settings.rate_limit, hub.settings.rate_burst)
    api.secure_cookies = tls is not None
    connections: Set[HttpConnection] = set()
    hub.metrics.connections["http"] = lambda: len(connections)
    hub.metrics.sessions = lambda: len(api.sessions)
    connection_class = reading_class(loop, HttpConnection, BufferedHttpConnection)
    server = await create_listener(
        loop, lambda: connection_class(api, connections), host, port, context=tls,
        settings=hub.settings, limiter=hub.limiter, start_serving=start_serving,
        backlog=backlog, **where,
    )  # fmt: skip
    return HttpServer(server, api, connections)
