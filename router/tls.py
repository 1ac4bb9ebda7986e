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
closed the same way."""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio.proactor_events import BaseProactorEventLoop
from typing import Callable, Optional, Protocol, Set

from router.policy import ConnectionLimiter, address_key

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


class Admittable(Protocol):
    """A connection protocol that can be handed a socket already counted by the limiter:
    while ``preadmitted`` is True the count is the acceptor's; ``connection_made`` takes it
    over (and sets it False) instead of counting again."""

    preadmitted: bool

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...


def protocol_factory(
    loop: asyncio.AbstractEventLoop,
    context: Optional[ssl.SSLContext],
    handshake_timeout: float,
    limiter: ConnectionLimiter,
    factory: Callable[[], Admittable],
) -> Callable[[], asyncio.BaseProtocol]:
    """What a listener accepts with: *factory* itself for plaintext (*context* None), else
    a :class:`TlsAcceptor`'s gate (the listener is then created without ``ssl=``).
    Where the acceptor cannot work (:func:`counts_handshakes` is False) use
    :func:`listener_options` instead."""
    if context is None or not counts_handshakes(loop):
        return factory
    return TlsAcceptor(loop, context, handshake_timeout, limiter, factory).gate


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
    ) -> None:
        self._loop = loop
        self._context = context
        self._timeout = handshake_timeout
        self._limiter = limiter
        self._factory = factory
        #: Handshakes in progress (kept: a task nobody holds may be collected mid-way).
        self.handshakes: Set[asyncio.Task] = set()

    def gate(self) -> asyncio.Protocol:
        """The listener's protocol factory."""
        return _Gate(self)

    def admit(self, transport: asyncio.BaseTransport) -> None:
        """A plain socket was accepted: count it, then start its handshake (or close it)."""
        peer = transport.get_extra_info("peername")
        address = address_key(str(peer[0]) if peer else "")
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
        task = self._loop.create_task(self._handshake(protocol, sock, address))
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    async def _handshake(self, protocol: Admittable, sock: object, address: str) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self._context, ssl_handshake_timeout=self._timeout
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
