"""The router process: bind the listeners, start the shards, serve, shut down cleanly.

Order matters: the listeners are bound *before* any shard starts, so a port already in use
fails fast with nothing to clean up; the shards stop only after every client has been told
the server is going away.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import os
import signal
import socket
import ssl
from typing import Any, Awaitable, Callable, Dict, List, Optional

from common.limits import (
    LISTEN_BACKLOG,
    LISTEN_QUEUE,
    SHARD_STOP_TIMEOUT,
    SHUTDOWN_TIMEOUT,
    TIMER_SWEEP_INTERVAL,
)
from router.http_hosts import WILDCARD_ADDRESSES
from router.hub import Hub
from router.policy import ConnectionLimiter, FdBudget, raise_fd_limit
from router.settings import Settings
from router.shards import ShardPool, ShardStartError, TierShardPool, describe_error
from router.siblings import Siblings, serve_siblings, token_prefix
from router.tcp import start_tcp_server
from router.tier import Seat, listen_to_supervisor
from router.tls import TlsError, server_context
from router.tls import reload as reload_tls

log = logging.getLogger(__name__)


#: In a tier, each start of a router numbers its clients from ``2 ** this`` past the
#: previous start's first (about 4 billion clients each, in steps of N).
CID_INCARNATION_BITS = 32


class PortInUse(Exception):
    """A listener could not bind or listen; the message says why, in one line, and what to
    do about it."""


#: The errno of "not an address of this machine" (EADDRNOTAVAIL; WSAEADDRNOTAVAIL on Windows).
_NOT_HERE = {errno.EADDRNOTAVAIL, 10049}
_IN_USE = {errno.EADDRINUSE, 10048}


def port_in_use_message(kind: str, host: str, port: int, error: OSError) -> str:
    """One line for a listener that could not bind *host*:*port*: what the error is, and
    the hint that fits it (who holds a busy port, which --host to pass, ...)."""
    flag = "--tcp-port" if kind == "tcp" else "--http-port"
    where = f"cannot listen on {host}:{port} ({kind})"
    code = error.errno
    if code is None and "could not bind on any address" in str(error):
        code = errno.EADDRNOTAVAIL  # Python 3.13's asyncio drops it and says only this
    if isinstance(error, socket.gaierror) or not code:
        reason = error.strerror or str(error)
    else:  # asyncio's own wording repeats the address: the system's is enough
        reason = os.strerror(code)
    if isinstance(error, socket.gaierror):
        return (
            f"{where}: the host name {host!r} does not resolve ({reason}); pass an address "
            "of this machine with --host, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 "
            "(every interface)"
        )
    if code in _NOT_HERE:
        return (
            f"{where}: {host} is not an address of this machine ({reason}); pass one it "
            "has with --host, e.g. 127.0.0.1 or 0.0.0.0 (every interface)"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"{where}: permission denied ({reason}); ports below 1024 need privileges: "
            f"choose another port with {flag}"
        )
    if code in _IN_USE:
        return (
            f"{where}: the port is already in use. Find the process holding it with "
            f"`lsof -nP -iTCP:{port} -sTCP:LISTEN` (Linux/macOS) or "
            f"`netstat -ano | findstr :{port}` (Windows), or choose another port with {flag}"
        )
    return f"{where}: {reason}"


def same_port_message(port: int) -> Optional[str]:
    """The line for --tcp-port and --http-port naming one port (None if they do not)."""
    if not port:
        return None
    return (
        f"--tcp-port and --http-port are both {port}: the line protocol and HTTP need a "
        "port each; choose another for one of them"
    )


class Router:
    """One running router: hub, shard pool, listeners. Use :func:`serve`."""

    def __init__(self, settings: Settings, seat: Optional[Seat] = None) -> None:
        self.settings = settings
        #: This router's place in a router tier (``--routers N``), None on its own.
        self.seat = seat
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(_log_loop_error)
        #: Every descriptor the router holds, against its open-file limit (raised to the
        #: hard limit first); client connections are admitted only inside it.
        self.fds = FdBudget(raise_fd_limit())
        limiter = ConnectionLimiter(
            settings.max_connections, settings.max_connections_per_ip, self.fds
        )
        if settings.trusted_proxies:
            limiter.uncapped = settings.trusted_proxies.trusts_key
        self.hub = Hub(self.loop, settings, limiter)
        self.pool: Optional[ShardPool] = None
        self.servers: List[asyncio.AbstractServer] = []
        self.sibling_server: Optional[asyncio.AbstractServer] = None
        self.siblings: Optional[Siblings] = None
        self.stop_requested = asyncio.Event()  # set it (or send SIGINT/SIGTERM) to stop
        self._recounter: Optional[asyncio.TimerHandle] = None
        #: Connections asyncio accepts per wake-up: few under an open-file limit (they
        #: must fit in the reserve until refused); without one, a whole queue's worth.
        self.accept_batch = LISTEN_BACKLOG if self.fds.limit is not None else LISTEN_QUEUE
        #: Both listeners' TLS context (``--tls-cert``), None for plaintext.
        self.tls: Optional[ssl.SSLContext] = None
        if settings.tls_cert:
            self.tls = server_context(settings.tls_cert, settings.tls_key)

    async def bind(self) -> None:
        """Bind every listener (not yet accepting). Raises :class:`PortInUse`."""
        config = self.settings
        batch = self.accept_batch
        tls = self.tls

        def start_tcp(
            hub: Hub, host: str, port: int, **where: Any
        ) -> Awaitable[asyncio.AbstractServer]:
            return start_tcp_server(hub, host, port, backlog=batch, tls=tls, **where)

        listeners = [("tcp", config.tcp_port, start_tcp)]
        if config.http_port is not None:
            from router.http import start_http_server

            def start_http(
                hub: Hub, host: str, port: int, **where: Any
            ) -> Awaitable[asyncio.AbstractServer]:
                return start_http_server(hub, host, port, backlog=batch, tls=tls, **where)

            listeners.append(("http", config.http_port, start_http))
        for kind, port, start in listeners:
            where = self.seat.listener(kind) if self.seat is not None else {}
            if self.seat is not None:
                port = self.seat.ports[kind]
            try:
                self.servers.append(await start(self.hub, config.host, port, **where))
            except OSError as error:
                self.close_listeners()
                raise PortInUse(port_in_use_message(kind, config.host, port, error)) from error

    def start_shards(self) -> None:
        """Start the shard processes. Raises :class:`ShardStartError` (the ones already
        started are closed again; join them with ``pool.join``)."""
        if self.seat is not None:
            self._attach_to_tier(self.seat)
            return
        context = multiprocessing.get_context(self.settings.start_method)
        self.pool = ShardPool(
            self.settings.shard_count(),
            context,
            self.loop,
            self.hub,
            self.settings.log_level,
            self.settings.pipe_io,
            self.fds,
            self.settings.data_dir,
            redis=self.settings.redis,
        )
        if self.settings.crash_shard is not None:
            self.pool.links[self.settings.crash_shard].crash_at_start = True
        self.pool.start()
        self.hub.attach(self.pool)
        self.fds.reconcile()
        self._warn_if_few_connections()
        self._recounter = self.loop.call_later(TIMER_SWEEP_INTERVAL, self._recount)

    def _attach_to_tier(self, seat: Seat) -> None:
        """Use the supervisor's shards (pipes in *seat*), and number our clients so that
        the shards know they are ours (shard/fanout.py)."""
        first = seat.routers * (1 + (seat.incarnation << CID_INCARNATION_BITS)) + seat.index
        self.hub.number_clients(first, seat.routers)
        self.pool = TierShardPool(
            seat.shard_pipes, self.loop, self.hub, self.settings.pipe_io, self.fds
        )
        self.pool.start()
        self.hub.attach(self.pool)
        self.fds.reconcile()
        self._recounter = self.loop.call_later(TIMER_SWEEP_INTERVAL, self._recount)

    def router_lost(self, index: int) -> None:
        """The supervisor gave up on router *index*: its sessions are gone for good."""
        if self.siblings is not None:
            self.siblings.lost(index)

    async def serve_siblings(self) -> None:
        """In a tier: session tokens name this router, and the other routers' requests
        for its sessions are answered on its sibling port (router/siblings.py)."""
        seat = self.seat
        http = next((s for s in self.servers if hasattr(s, "api")), None)
        if seat is None or http is None:
            return
        api = http.api  # type: ignore[attr-defined]
        api.sessions.token_prefix = token_prefix(seat.index)
        # An answer comes within a long-poll's wait (plus its linger and a shard's timeout).
        wait = self.settings.poll_timeout + self.settings.request_timeout + 5.0
        api.siblings = self.siblings = Siblings(
            seat.index, seat.sibling_ports, seat.secret, answer_timeout=wait
        )
        for owner in seat.routers_lost:
            self.siblings.lost(owner)
        self.sibling_server = await serve_siblings(
            seat.sibling_socket, seat.secret, api.answer_forwarded
        )

    def _warn_if_few_connections(self) -> None:
        capacity = self.fds.capacity()
        wanted = self.settings.max_connections
        if capacity is not None and capacity < wanted:
            log.warning(
                "open-file limit %d allows only about %d connections (asked for %d)",
                self.fds.limit,
                capacity,
                wanted,
            )

    def _recount(self) -> None:
        self._recounter = self.loop.call_later(TIMER_SWEEP_INTERVAL, self._recount)
        self.fds.sweep(self.loop.time())

    async def start_serving(self) -> None:
        kinds = ["tcp", "http"]
        ports = [self.settings.tcp_port, self.settings.http_port]
        for kind, port, server in zip(kinds, ports, self.servers):
            try:
                await server.start_serving()
            except OSError as error:  # listen() failed: the port is taken after all
                message = port_in_use_message(kind, self.settings.host, port or 0, error)
                raise PortInUse(message) from error
            for sock in server.sockets:
                if self.accept_batch < LISTEN_QUEUE:
                    _lengthen_listen_queue(sock)
                host, port = sock.getsockname()[:2]
                level = logging.INFO if self.seat is None else logging.DEBUG  # the supervisor's
                tls = " (TLS)" if self.tls else ""
                log.log(level, "listening %s %s:%d%s", kind, host, port, tls)
        if len(self.servers) > 1 and (self.seat is None or self.seat.index == 0):
            self._log_allowed_hosts()  # in a tier, once

    def _log_allowed_hosts(self) -> None:
        config = self.settings
        hosts = config.http_hosts()
        log.info("http answers requests for hosts: %s", hosts.describe())
        if config.allowed_hosts is None and config.host in WILDCARD_ADDRESSES:
            log.info(
                "http on every interface: browsers that reach this machine by another name "
                "or by an IP address get 421 until you pass it, e.g. --allowed-hosts "
                "%s,chat.example.org,192.0.2.10 (or '*' to accept any host, which turns "
                "off the DNS-rebinding protection)",
                hosts.as_flag(),
            )

    def close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        if self.sibling_server is not None:
            self.sibling_server.close()
        if self.siblings is not None:
            self.siblings.close()

    async def shutdown(self) -> None:
        """Stop accepting, tell everyone, let the writes go out, stop the shards."""
        if self.pool is not None:
            self.pool.stopping = True
        if self._recounter is not None:
            self._recounter.cancel()
        self.close_listeners()
        self.hub.shutdown()
        await asyncio.sleep(0.05)  # one or two loop turns: the goodbyes get flushed
        self.hub.close()
        if self.pool is not None:
            self.pool.close()
            await asyncio.to_thread(self.pool.join, SHARD_STOP_TIMEOUT)


def start_problem(settings: Settings) -> Optional[str]:
    """The one line that says why *settings* cannot start (an unusable data directory,
    the same port for both listeners), or None. Reads every slot file: blocking."""
    if settings.redis is not None:
        from common.redis_spec import start_problem as redis_problem

        problem = redis_problem(settings.redis, settings.redis_wait)
        if problem is not None:
            return problem
    if settings.data_dir is not None:
        from shard.journal import prepare_data_dir
        from shard.slot_files import StorageError

        try:
            prepare_data_dir(settings.data_dir)
        except StorageError as error:
            return str(error)
    if settings.http_port is not None and settings.tcp_port == settings.http_port:
        return same_port_message(settings.tcp_port)
    return None


async def serve(
    settings: Settings,
    ready: Optional[Callable[[Router], None]] = None,
    seat: Optional[Seat] = None,
) -> int:
    """Run a router until SIGINT/SIGTERM (or ``router.stop_requested`` is set). Returns the
    exit status: 0 after a clean shutdown, 1 if the data directory is unusable or a port
    could not be bound.

    *ready* is called with the router once it accepts connections. With *seat*, it is
    one router of a tier (router/tier.py): the supervisor checked the data directory, bound
    the ports and started the shards."""
    if seat is None:
        # Before any shard serves, off the loop (it reads every slot file).
        problem = await asyncio.to_thread(start_problem, settings)
        if problem is not None:
            log.error("%s", problem)
            return 1
    try:
        router = Router(settings, seat)
    except TlsError as error:
        log.error("%s", error)
        return 1
    try:
        await router.bind()
    except PortInUse as error:
        log.error("%s", error)
        return 1
    try:
        router.start_shards()
    except ShardStartError as error:
        log.error("cannot start shard %s", start_failure_message(error))
        router.close_listeners()
        if router.pool is not None:
            await asyncio.to_thread(router.pool.join, SHARD_STOP_TIMEOUT)
        return 1
    if seat is not None:
        pass  # the supervisor says where history is kept
    elif settings.redis is not None:
        log.info("rooms shared through Redis at %s as node %s", settings.redis.shown(),
                 settings.redis.node)  # fmt: skip
    elif settings.data_dir is not None:
        log.info("history kept in %s (--in-memory to keep none)", settings.data_dir)
    else:
        log.info("history kept in memory only: it is lost when a shard stops")
    try:
        await router.serve_siblings()  # (before the first request: it may be forwarded)
        await router.start_serving()
    except PortInUse as error:
        log.error("%s", error)
        router.close_listeners()
        router.pool.close()
        await asyncio.to_thread(router.pool.join, SHARD_STOP_TIMEOUT)
        return 1
    _install_signal_handlers(router.loop, router.stop_requested.set)
    if router.tls is not None and settings.tls_cert and hasattr(signal, "SIGHUP"):
        context, cert, key = router.tls, settings.tls_cert, settings.tls_key
        try:
            router.loop.add_signal_handler(signal.SIGHUP, reload_tls, context, cert, key)
        except (NotImplementedError, RuntimeError):
            pass  # no signal handlers on this loop: restart to load a new certificate
    if seat is not None:
        listen_to_supervisor(seat, router)
    if ready is not None:
        ready(router)
    await router.stop_requested.wait()
    log.info("shutting down")
    try:
        await asyncio.wait_for(router.shutdown(), SHUTDOWN_TIMEOUT)
    except asyncio.TimeoutError:
        log.warning("shutdown took longer than %.1fs", SHUTDOWN_TIMEOUT)
    log.info("stopped")
    return 0


def _lengthen_listen_queue(wrapped: Any) -> None:
    """Set the kernel's accept queue of a serving listener to ``LISTEN_QUEUE``. asyncio
    passed its per-wake-up accept batch to listen(); calling listen() again on a listening
    socket only changes the queue length (Windows ignores it; it has no batch to keep
    small). asyncio's wrapper has no listen(): a socket object on the same descriptor,
    detached afterwards, calls it."""
    raw = socket.socket(fileno=wrapped.fileno())
    try:
        raw.listen(LISTEN_QUEUE)
    except OSError as error:
        log.warning("could not lengthen the listen queue: %s", describe_error(error))
    finally:
        raw.detach()


def start_failure_message(error: ShardStartError) -> str:
    """``0 (EMFILE: Too many open files): raise the open-file limit...`` for the boot log."""
    hint = ""
    if error.errno in (errno.EMFILE, errno.ENFILE):
        hint = ": raise the open-file limit (ulimit -n) or use fewer --shards"
    elif error.errno in (errno.EAGAIN, errno.ENOMEM):
        hint = ": the system is out of processes or memory; try fewer --shards"
    return f"{error.index} ({error.reason}){hint}"


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
    """The loop's exception handler: asyncio's own accept() running out of descriptors
    (the budget keeps the router below its limit, but the whole system's table can still
    fill up) is one warning line, not a traceback; anything else goes to the default."""
    error = context.get("exception")
    if context.get("message") == "socket.accept() out of system resource" and isinstance(
        error, OSError
    ):
        log.warning("cannot accept connections (%s); trying again in 1s", describe_error(error))
        return
    loop.default_exception_handler(context)


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    for signame in ("SIGINT", "SIGTERM"):
        signum = getattr(signal, signame, None)
        if signum is None:
            continue
        try:
            loop.add_signal_handler(signum, stop)
        except (NotImplementedError, RuntimeError):
            # Windows' loops have no add_signal_handler: fall back to signal.signal.
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop))


def run(settings: Settings) -> int:
    """Blocking entry point: serve until stopped; returns the process exit status."""
    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:  # a second Ctrl+C during shutdown
        return 0
