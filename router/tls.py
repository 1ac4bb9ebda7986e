"""TLS for both listeners (``--tls-cert FILE --tls-key FILE``), with the standard library's
:mod:`ssl`: TLS 1.2 and later only, the certificate chain and key read at start and again
on SIGHUP (a renewed certificate is used by the next handshakes; open connections keep
theirs).

A TLS port's listener accepts plain sockets (:class:`TlsAcceptor`): each is counted against
the connection caps by its peer's address *before* any TLS work, like a plaintext one, so
handshakes in progress hold slots of their address (and the descriptor budget) and one
address cannot start more of them than it may hold connections; one over a cap is closed
at once, without the handshake its refusal would cost. Then asyncio's TLS takes the socket
(``loop.connect_accepted_socket``) and the connection's own protocol gets it when the
handshake is done. A client that speaks plaintext to a TLS port fails its handshake: its
socket is closed and (outside asyncio's debug mode) nothing is logged, so it costs nobody
else anything; a handshake that does not finish in ``--tls-handshake-timeout`` seconds is
closed the same way.

From a ``--trusted-proxy`` peer the acceptor first takes a PROXY protocol header (v1 or v2)
off the front of the plain socket, if there is one (HAProxy and nginx send it before the
TLS they pass through): it peeks, and reads no byte past the header, so the TLS handshake
starts exactly where the header ends. The connection is then the named client's, and its
protocol is told so (``proxied_client``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
from asyncio.proactor_events import BaseProactorEventLoop
from typing import Any, Callable, Optional, Protocol, Set, Tuple

from router.policy import ConnectionLimiter, address_key
from router.proxies import PROXY_V2_MAX_BYTES, BadProxyHeader, ProxyHeader, read_proxy_header
from router.settings import Settings

log = logging.getLogger(__name__)


class TlsError(Exception):
    """The certificate or key cannot be used; the message is one line for the operator."""


def server_context(cert: str, key: Optional[str]) -> ssl.SSLContext:
    """A server context for *cert* (a PEM chain) and *key* (its PEM private key; None: in
    *cert*). Raises :class:`TlsError`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_chain(context, cert, key)
    return context


def load_chain(context: ssl.SSLContext, cert: str, key: Optional[str]) -> None:
    """(Re)load the certificate chain and key into *context*. Raises :class:`TlsError`."""
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as error:
        raise TlsError(f"TLS: {error.filename or cert}: no such file") from error
    except PermissionError as error:
        raise TlsError(f"TLS: {error.filename or cert}: permission denied") from error
    except (ssl.SSLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or str(error)
        raise TlsError(
            f"TLS: cannot use certificate {cert} with key {key or cert} ({reason}): both must "
            "be PEM files, the key the certificate's own"
        ) from error


def settled(transport: asyncio.Transport) -> asyncio.Transport:
    """*transport*, safe to use in every loop turn until its protocol's ``connection_lost``.

    Before Python 3.11 a TLS transport whose socket is gone raises AttributeError from
    ``get_write_buffer_size``, ``pause_reading``, ``resume_reading`` and the like, for the
    loop turn between the socket's loss and the protocol's ``connection_lost`` (which
    asyncio calls a turn later); anything that writes, flushes or resumes a connection in
    that turn (another client's message, a shard's answer) would fail. Such a transport is
    wrapped so those calls answer as a closed one would: nothing buffered, not reading."""
    if sys.version_info >= (3, 11) or transport.get_extra_info("sslcontext") is None:
        return transport
    return _SettledTlsTransport(transport)


class _SettledTlsTransport(asyncio.Transport):
    """A pre-3.11 TLS transport whose calls that reach the lost socket do nothing."""

    __slots__ = ("_inner",)

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self._inner = inner

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def write(self, data: Any) -> None:
        self._inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._inner.writelines(list_of_data)

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def get_write_buffer_size(self) -> int:
        try:
            return self._inner.get_write_buffer_size()
        except AttributeError:  # the socket is gone: nothing will be written
            return 0

    def get_write_buffer_limits(self) -> Tuple[int, int]:
        try:
            return self._inner.get_write_buffer_limits()
        except AttributeError:
            return (0, 0)

    def set_write_buffer_limits(
        self, high: Optional[int] = None, low: Optional[int] = None
    ) -> None:
        with contextlib.suppress(AttributeError):
            self._inner.set_write_buffer_limits(high, low)

    def is_reading(self) -> bool:
        try:
            return self._inner.is_reading()
        except RuntimeError:  # "SSL transport has not been initialized yet": it is gone
            return False

    def pause_reading(self) -> None:
        with contextlib.suppress(AttributeError):
            self._inner.pause_reading()

    def resume_reading(self) -> None:
        with contextlib.suppress(AttributeError):
            self._inner.resume_reading()


class Admittable(Protocol):
    """A connection protocol that can be handed a socket already counted by the limiter:
    while ``preadmitted`` is True the count is the acceptor's; ``connection_made`` takes it
    over (and sets it False) instead of counting again."""

    preadmitted: bool
    #: The client a trusted proxy's PROXY header named before TLS (``""``: the header
    #: kept the peer's address); None if no header was read for it.
    proxied_client: Optional[str]

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...


def protocol_factory(
    loop: asyncio.AbstractEventLoop,
    context: Optional[ssl.SSLContext],
    handshake_timeout: float,
    limiter: ConnectionLimiter,
    factory: Callable[[], Admittable],
    trusts: Callable[[str], bool] = lambda ip: False,
) -> Callable[[], asyncio.BaseProtocol]:
    """What a listener accepts with: *factory* itself for plaintext (*context* None), else
    a :class:`TlsAcceptor`'s gate (the listener is then created without ``ssl=``); the
    peers *trusts* says yes to may send a PROXY header before TLS. Where the acceptor
    cannot work (:func:`counts_handshakes` is False) use :func:`listener_options` instead."""
    if context is None or not counts_handshakes(loop):
        return factory
    return TlsAcceptor(loop, context, handshake_timeout, limiter, factory, trusts).gate


async def create_listener(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], Admittable],
    host: str,
    port: int,
    *,
    context: Optional[ssl.SSLContext],
    settings: Settings,
    limiter: ConnectionLimiter,
    start_serving: bool,
    backlog: int,
    sock: Optional[socket.socket] = None,
    reuse_port: bool = False,
) -> asyncio.AbstractServer:
    """Bind a listener whose connections *factory* makes: plaintext, or TLS-only with
    *context* (through a :class:`TlsAcceptor` where it works, else asyncio's own TLS).
    Both transports' listeners are made here. Raises ``OSError`` if it cannot bind.
    A router of a tier listens on the supervisor's *sock*, or binds with *reuse_port*
    (``SO_REUSEPORT``: the kernel spreads the connections over the tier's routers)."""
    timeout = settings.tls_handshake_timeout
    accept = protocol_factory(
        loop, context, timeout, limiter, factory, settings.trusted_proxies.trusts
    )
    where: dict = {"sock": sock} if sock is not None else {"host": host, "port": port}
    if reuse_port:
        where["reuse_port"] = True
    return await loop.create_server(
        accept,
        start_serving=start_serving,
        backlog=backlog,
        **where,
        **listener_options(loop, context, timeout),
    )


def counts_handshakes(loop: asyncio.AbstractEventLoop) -> bool:
    """False on a proactor loop (Windows): closing one of its socket transports shuts the
    connection down (``shutdown(SHUT_RDWR)``), not just its descriptor, so the acceptor's
    hand-over of a ``dup`` would kill it. There asyncio's own TLS listener does the
    handshake, and a connection counts once it is done."""
    return not isinstance(loop, BaseProactorEventLoop)


def listener_options(
    loop: asyncio.AbstractEventLoop, context: Optional[ssl.SSLContext], handshake_timeout: float
) -> dict:
    """The ``create_server`` keywords that go with :func:`protocol_factory`: asyncio's TLS
    where the acceptor does not do it, else none."""
    if context is None or counts_handshakes(loop):
        return {}
    return {"ssl": context, "ssl_handshake_timeout": handshake_timeout}


class TlsAcceptor:
    """Accepts a TLS port's connections (see the module docstring). *factory* makes the
    connection's own protocol; *limiter* is the caps the plaintext ports share."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: ssl.SSLContext,
        handshake_timeout: float,
        limiter: ConnectionLimiter,
        factory: Callable[[], Admittable],
        trusts: Callable[[str], bool] = lambda ip: False,
    ) -> None:
        self._loop = loop
        self._context = context
        self._timeout = handshake_timeout
        self._limiter = limiter
        self._factory = factory
        self._trusts = trusts
        #: Handshakes in progress (kept: a task nobody holds may be collected mid-way).
        self.handshakes: Set[asyncio.Task] = set()

    def gate(self) -> asyncio.Protocol:
        """The listener's protocol factory."""
        return _Gate(self)

    def admit(self, transport: asyncio.BaseTransport) -> None:
        """A plain socket was accepted: count it, then start its handshake (or close it)."""
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        address = address_key(ip)
        if not self._limiter.open(address):
            self._limiter.close(address, False)
            transport.abort()  # before TLS: a refusal costs no handshake
            return
        try:
            sock = transport.get_extra_info("socket").dup()
        except OSError as error:  # out of descriptors for the copy
            log.info("cannot take a TLS connection from %s: %s", address, error)
            self._limiter.close(address, True)
            transport.abort()
            return
        transport.abort()  # the copy holds the connection; nothing was read from it
        protocol = self._factory()
        protocol.preadmitted = True
        if not self._trusts(ip):
            self._start_handshake(protocol, sock, address)
            return

        deadline = self._loop.time() + self._timeout  # the header and the handshake together

        def header_read(found: Optional[ProxyHeader]) -> None:
            if found is None:  # a bad header, or none in time, or the peer went
                self._give_back(protocol, sock, address)
                return
            if found.length:  # there was one (None: the peer speaks for itself)
                protocol.proxied_client = found.client
            left = max(0.001, deadline - self._loop.time())
            self._start_handshake(protocol, sock, address, left)

        _ProxyHeaderReader(self._loop, sock, self._timeout, header_read, ip)

    def _start_handshake(
        self,
        protocol: Admittable,
        sock: socket.socket,
        address: str,
        timeout: Optional[float] = None,
    ) -> None:
        handshake = self._handshake(protocol, sock, address, timeout or self._timeout)
        task = self._loop.create_task(handshake)
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    async def _handshake(
        self, protocol: Admittable, sock: object, address: str, timeout: float
    ) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self._context, ssl_handshake_timeout=timeout
            )  # type: ignore[arg-type]
        except (OSError, asyncio.TimeoutError):
            pass  # plaintext, a timeout, a reset: asyncio closed the socket
        except asyncio.CancelledError:
            self._give_back(protocol, sock, address)
            raise
        except Exception:
            log.error("TLS handshake with %s failed", address, exc_info=True)
        self._give_back(protocol, sock, address)

    def _give_back(self, protocol: Admittable, sock: object, address: str) -> None:
        """The handshake ended: if it never reached the protocol, its slot is ours."""
        if protocol.preadmitted:
            protocol.preadmitted = False
            sock.close()  # type: ignore[attr-defined]  # closed already, unless it failed early
            self._limiter.close(address, True)


class _ProxyHeaderReader:
    """Takes a PROXY header off the front of *sock* (a trusted peer's, before TLS) without
    reading past it: it peeks at what arrived, takes off only bytes that are header, and
    calls ``done(header)`` once it knows (a :class:`~router.proxies.ProxyHeader` of
    length 0: there is none) or ``done(None)`` (a bad header, none within *timeout*, the
    peer gone). Selector loops only (the acceptor is not used on others)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        timeout: float,
        done: Callable[[Optional[ProxyHeader]], None],
        ip: str,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._done: Optional[Callable[[Optional[ProxyHeader]], None]] = done
        self._ip = ip
        self._taken = bytearray()  # header bytes read off the socket so far
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)
        self._timer = loop.call_later(timeout, self._finish, None, "no PROXY header in time")

    def _readable(self) -> None:
        try:
            peeked = self._sock.recv(PROXY_V2_MAX_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._finish(None, str(error))
            return
        if not peeked:
            self._finish(None, "")  # gone before TLS (a health check): nothing to say
            return
        try:
            found = read_proxy_header(bytes(self._taken) + peeked)
            if found is not None and found.length < len(self._taken):
                raise BadProxyHeader("it started like one and then was not")
        except BadProxyHeader as error:
            self._finish(None, f"bad PROXY header: {error}")
            return
        # Take off only header bytes: all that was peeked while more is needed, else the
        # rest of the header (peeked already: exactly those are there).
        wanted = len(peeked) if found is None else found.length - len(self._taken)
        try:
            taken = self._sock.recv(wanted) if wanted else b""
        except OSError as error:
            self._finish(None, str(error))
            return
        if len(taken) != wanted:
            self._finish(None, "the PROXY header went missing between peek and read")
            return
        self._taken += taken
        if found is not None:
            self._finish(found, "")

    def _finish(self, found: Optional[ProxyHeader], why: str) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        self._timer.cancel()
        self._loop.remove_reader(self._sock.fileno())
        if found is None and why:
            log.info("closing a connection from %s before TLS: %s", self._ip, why)
        done(found)


class _Gate(asyncio.Protocol):
    """What a TLS port's listener makes per socket: it hands the socket to the acceptor."""

    def __init__(self, acceptor: TlsAcceptor) -> None:
        self._acceptor = acceptor

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._acceptor.admit(transport)


def reload(context: ssl.SSLContext, cert: str, key: Optional[str]) -> None:
    """SIGHUP: load the files again; on failure keep what was loaded, and say so. They are
    tried on a fresh context first: loading into the live one is not atomic (a certificate
    that loads with a key that does not would leave it with neither)."""
    try:
        load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
        load_chain(context, cert, key)
    except TlsError as error:
        log.error("%s; still using the certificate loaded before", error)
        return
    log.info("TLS certificate reloaded from %s", cert)
