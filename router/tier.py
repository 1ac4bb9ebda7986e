"""A router tier (``--routers N``): a supervisor process, N routers, M shards.

The process ``start_cluster.py --routers N`` starts is a small **supervisor**. It binds the
ports, starts the shards and the routers, connects every router to every shard (N × M
pipe pairs, made here and handed to both ends), watches them all, and stops them all.

- **One port, several processes.** Where the kernel balances ``SO_REUSEPORT`` (Linux),
  every router binds the port itself with it and the kernel spreads new connections over
  them; the supervisor keeps a bound, never listening, socket on the port so that it stays
  this cluster's while a router restarts. Elsewhere (``--listener shared``, the default off
  Linux) the supervisor binds and listens, and every router accepts on that one socket.
- **Shards fan out per router**: see :mod:`shard.fanout`.
- **Browser sessions**: a session lives on the router that made it; the others forward its
  requests there (:mod:`router.siblings`), over a loopback *sibling port* per router that
  the supervisor binds (so it outlives the router's restarts).
- **Faults.** A router that dies takes its own connections with it: every shard sees its
  pipes close and makes its clients leave their rooms (the other routers' members hear
  them go). The supervisor restarts it, with the shards' backoff and restart limit, on new
  pipes: the new router gets its ends at start, each shard gets the other end over its
  control pipe. A shard that dies is restarted the same way, each router getting its new
  pipes over its control pipe and putting its members back (``REJOIN``), as a
  one-router cluster does. If the supervisor dies (even ``kill -9``) every control pipe
  reaches end-of-file and every child exits.

The messages on the control pipes (tuples):

- router → supervisor: ``("ready", index)`` once it accepts connections;
- supervisor → router: ``("shard", j, commands_out, events_in)`` (shard *j* is back),
  ``("lost", j)`` (shard *j* given up on), ``("router_lost", r)`` (router *r* given up on:
  forward it nothing), ``("stop",)``;
- supervisor → shard: ``("router", r, commands_in, events_out)`` (router *r* is back);
- shard → supervisor: ``("stalled", r, generation)`` (router *r*, as the shard's
  *generation*-th set of its pipes, takes no events: it is killed and restarted).

Pipe ends in a message reach a running child in its control pipe's socket (see
:mod:`shard.handoff`).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Dict, List, Optional, Sequence, Tuple

from common.limits import LISTEN_QUEUE, SHARD_STOP_TIMEOUT, SHUTDOWN_TIMEOUT
from router.shards import RestartPolicy
from shard.handoff import receive, send_with_ends

log = logging.getLogger(__name__)

#: Seconds the supervisor waits for every router to say it accepts connections.
ROUTER_READY_TIMEOUT = 30.0
#: How the tier shares its ports, by default: ``SO_REUSEPORT`` where the kernel balances
#: it between processes (Linux), else one socket every router accepts on.
LISTENER_MODES = ("reuseport", "shared")


def default_listener_mode() -> str:
    if sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT"):
        return "reuseport"
    return "shared"


@dataclass
class Seat:
    """What one router of a tier is given at start (pickled to its process)."""

    index: int
    routers: int
    #: Per shard, this router's ends: (commands it writes, events it reads).
    shard_pipes: List[Tuple[Connection, Connection]]
    control: Connection
    #: The public ports, "tcp" and "http" (real numbers, never 0).
    ports: Dict[str, int]
    #: The supervisor's listening sockets ("shared" mode); empty: bind with reuse_port.
    sockets: Dict[str, socket.socket] = field(default_factory=dict)
    sibling_socket: Optional[socket.socket] = None
    sibling_ports: List[int] = field(default_factory=list)
    secret: bytes = b""
    #: How many times this router was started before (its clients' ids start past all
    #: of its predecessors', so none is mistaken for a predecessor's client).
    incarnation: int = 0
    #: The routers given up on before this one started: never forwarded to, from its
    #: first request (later ones are told by a ``("router_lost", r)`` message).
    routers_lost: List[int] = field(default_factory=list)

    def listener(self, kind: str) -> Dict[str, Any]:
        """The ``create_server`` keywords for the *kind* listener."""
        if kind in self.sockets:
            return {"sock": self.sockets[kind]}
        return {"reuse_port": True}


# --- in the router ------------------------------------------------------------------------


def listen_to_supervisor(seat: Seat, router: Any) -> None:
    """Say the router is ready; then, on a thread (taking a descriptor passed in a message
    can wait on the supervisor, which the loop must never do), hand each message to the
    loop. The supervisor gone (end-of-file) stops the router."""
    loop = router.loop
    seat.control.send(("ready", seat.index))

    def read() -> None:
        while True:
            try:
                message = receive(seat.control)
            except (EOFError, OSError):
                loop.call_soon_threadsafe(router.stop_requested.set)
                return
            if message[0] == "stop":
                loop.call_soon_threadsafe(router.stop_requested.set)
            elif message[0] == "router_lost":
                loop.call_soon_threadsafe(router.router_lost, message[1])
            else:
                loop.call_soon_threadsafe(router.pool.on_supervisor, message)

    threading.Thread(target=read, name="supervisor", daemon=True).start()


def run_tier_router(settings: Any, seat: Seat) -> None:
    """Process target of router *seat.index*: serve until told to stop."""
    import asyncio

    from common.proctitle import set_process_name
    from router.app import serve

    set_process_name(f"shardchat-r{seat.index}")
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s router-{seat.index} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        code = asyncio.run(serve(settings, seat=seat))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


# --- the supervisor -----------------------------------------------------------------------


class Supervisor:
    """Starts, watches and stops a tier. Blocking; runs in the process that was started."""

    def __init__(self, settings: Any, listener_mode: str) -> None:
        self.settings = settings
        self.routers = settings.routers
        self.shards = settings.shard_count()
        self.mode = listener_mode
        self.context = multiprocessing.get_context("spawn")
        self.secret = secrets.token_bytes(32)
        self.sockets: Dict[str, socket.socket] = {}  # the public ports' sockets
        self.ports: Dict[str, int] = {}
        self.sibling_sockets: List[socket.socket] = []
        self.sibling_ports: List[int] = []
        self.router_procs: List[Any] = [None] * self.routers
        self.router_controls: List[Optional[Connection]] = [None] * self.routers
        self.shard_procs: List[Any] = [None] * self.shards
        self.shard_controls: List[Optional[Connection]] = [None] * self.shards
        self.router_restarts = [RestartPolicy() for _ in range(self.routers)]
        self.router_starts = [0] * self.routers
        self.shard_restarts = [RestartPolicy() for _ in range(self.shards)]
        #: (when, "router" or "shard", index): starts waiting for their backoff.
        self.pending: List[Tuple[float, str, int]] = []
        #: [shard][router]: how many times the shard was given new pipes of the router since
        #: the shard started (its stall reports name it; an older one is not acted on).
        self.generations = [[0] * self.routers for _ in range(self.shards)]
        #: Shards given up on (every router, including one started later, is told).
        self.given_up: List[int] = []
        #: Routers given up on (every other router, including one started later, is told).
        self.routers_given_up: List[int] = []
        self.stopping = False

    # --- ports ----------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the public ports and the sibling ports. Raises ``OSError`` (with
        ``kind``, ``port`` attributes for the message)."""
        config = self.settings
        wanted = [("tcp", config.tcp_port)]
        if config.http_port is not None:
            wanted.append(("http", config.http_port))
        for kind, port in wanted:
            try:
                sock = self._bind_public(config.host, port)
            except OSError as error:
                error.kind, error.port = kind, port  # type: ignore[attr-defined]
                raise
            self.sockets[kind] = sock
            self.ports[kind] = sock.getsockname()[1]
        for _ in range(self.routers):
            sibling = socket.create_server(("127.0.0.1", 0), backlog=LISTEN_QUEUE)
            self.sibling_sockets.append(sibling)
        #: (Kept: a given-up router's socket is closed, its port still names its place.)
        self.sibling_ports = [s.getsockname()[1] for s in self.sibling_sockets]

    def _bind_public(self, host: str, port: int) -> socket.socket:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            if sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.mode == "reuseport":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            if self.mode == "shared":
                sock.listen(LISTEN_QUEUE)
                sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    # --- children -------------------------------------------------------------------

    def start_all(self) -> None:
        """Start every shard, then every router (each with its pipes)."""
        mesh = [[self._pipe_pair() for _ in range(self.shards)] for _ in range(self.routers)]
        for j in range(self.shards):
            self._start_shard(j, [mesh[r][j][0] for r in range(self.routers)])
        for r in range(self.routers):
            self._start_router(r, [mesh[r][j][1] for j in range(self.shards)])

    def _pipe_pair(self) -> Tuple[Tuple[Connection, Connection], Tuple[Connection, Connection]]:
        """One router-shard link: ((shard's commands_in, events_out), (router's
        commands_out, events_in))."""
        commands_in, commands_out = self.context.Pipe(duplex=False)
        events_in, events_out = self.context.Pipe(duplex=False)
        return (commands_in, events_out), (commands_out, events_in)

    def _start_shard(self, j: int, links: List[Tuple[Connection, Connection]]) -> None:
        from shard.process import run_tier_shard

        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=run_tier_shard,
            args=(links, theirs, j, self.settings.log_level, self.settings.data_dir, self.shards),
            kwargs={"redis": self.settings.redis},
            name=f"shardchat-shard-{j}",
        )
        process.start()
        _close(theirs, *[end for link in links for end in link])
        self.shard_procs[j], self.shard_controls[j] = process, ours
        self.generations[j] = [0] * self.routers

    def _start_router(self, r: int, pipes: List[Tuple[Connection, Connection]]) -> None:
        ours, theirs = self.context.Pipe()
        seat = Seat(
            index=r,
            routers=self.routers,
            shard_pipes=pipes,
            control=theirs,
            ports=dict(self.ports),
            sockets=dict(self.sockets) if self.mode == "shared" else {},
            sibling_socket=self.sibling_sockets[r],
            sibling_ports=list(self.sibling_ports),
            secret=self.secret,
            incarnation=self.router_starts[r],
            routers_lost=list(self.routers_given_up),
        )
        self.router_starts[r] += 1
        process = self.context.Process(
            target=run_tier_router, args=(self.settings, seat), name=f"shardchat-router-{r}"
        )
        process.start()
        _close(theirs, *[end for pair in pipes for end in pair])
        self.router_procs[r], self.router_controls[r] = process, ours

    def wait_ready(self) -> bool:
        """Wait until every router accepts connections; False if one exited first."""
        waiting = set(range(self.routers))
        deadline = time.monotonic() + ROUTER_READY_TIMEOUT
        while waiting and time.monotonic() < deadline:
            controls = {self.router_controls[r]: r for r in waiting}
            sentinels = {self.router_procs[r].sentinel: r for r in waiting}
            for ready in wait([*controls, *sentinels], 0.5):
                if ready in sentinels:
                    return False
                try:
                    ready.recv()
                except (EOFError, OSError):
                    return False
                waiting.discard(controls[ready])
            if self.stopping:
                return False
        return not waiting

    def restart_router(self, r: int) -> None:
        """Start router *r* again on new pipes; each shard gets its end."""
        mesh = [self._pipe_pair() for _ in range(self.shards)]
        for j, (shard_end, _) in enumerate(mesh):
            if self.shard_controls[j] is not None:
                self.generations[j][r] += 1
            self._tell(self.shard_controls[j], ("router", r), shard_end)
            _close(*shard_end)
        self._start_router(r, [router_end for _, router_end in mesh])
        for j in self.given_up:  # its pipe to that shard is closed: not to wait for it
            self._tell(self.router_controls[r], ("lost", j))
        log.info("router %d restarted (pid %s)", r, self.router_procs[r].pid)

    def restart_shard(self, j: int) -> None:
        """Start shard *j* again on new pipes; each router gets its end."""
        mesh = [self._pipe_pair() for _ in range(self.routers)]
        self._start_shard(j, [shard_end for shard_end, _ in mesh])
        for r, (_, router_end) in enumerate(mesh):
            self._tell(self.router_controls[r], ("shard", j), router_end)
            _close(*router_end)
        log.info("shard %d restarted (pid %s)", j, self.shard_procs[j].pid)

    def _tell(
        self, control: Optional[Connection], message: tuple, ends: Sequence[Connection] = ()
    ) -> None:
        """Send *message* (and the pipe *ends*, see :mod:`shard.handoff`) to a child."""
        if control is None:
            return
        try:
            send_with_ends(control, message, ends) if ends else control.send(message)
        except OSError:
            log.debug("a control pipe is gone", exc_info=True)

    # --- watching -------------------------------------------------------------------

    def watch(self) -> None:
        """Until stopped: restart what dies (after its backoff), give up as the shards'
        policy says."""
        while not self.stopping:
            now = time.monotonic()
            due = [p for p in self.pending if p[0] <= now]
            self.pending = [p for p in self.pending if p[0] > now]
            for _, what, index in due:
                self._restart(what, index)
            sentinels: Dict[Any, Tuple[str, int]] = {}
            for r, process in enumerate(self.router_procs):
                if process is not None:
                    sentinels[process.sentinel] = ("router", r)
            for j, process in enumerate(self.shard_procs):
                if process is not None:
                    sentinels[process.sentinel] = ("shard", j)
            controls = {c: r for r, c in enumerate(self.router_controls) if c is not None}
            shards = {c: j for j, c in enumerate(self.shard_controls) if c is not None}
            for ready in wait([*sentinels, *controls, *shards], 0.25):
                if ready in controls:
                    self._read_router(controls[ready])
                elif ready in shards:
                    self._read_shard(shards[ready])
                elif not self.stopping:
                    self._died(*sentinels[ready])

    def _read_router(self, r: int) -> None:
        control = self.router_controls[r]
        if control is None:
            return  # its process was found dead in the same wait
        try:
            control.recv()  # ("ready", r) after a restart: nothing to do
        except (EOFError, OSError):
            _close(control)
            self.router_controls[r] = None

    def _restart(self, what: str, index: int) -> None:
        """Start a dead child again; one that cannot be started (no descriptors, no
        memory) counts as having died again."""
        try:
            (self.restart_router if what == "router" else self.restart_shard)(index)
        except OSError as error:
            log.error("%s %d could not be restarted (%s)", what, index, error)
            self._schedule(what, index, None)

    def _read_shard(self, j: int) -> None:
        """``("stalled", r, generation)``: router *r* takes nothing from shard *j*
        (stopped, stuck): it is killed, and restarted like any router that died; unless the
        report is about a predecessor (the shard had not read of its restart yet)."""
        control = self.shard_controls[j]
        if control is None:
            return
        try:
            message = control.recv()
        except (EOFError, OSError):
            return  # the shard died: its sentinel says so
        if message[0] != "stalled":
            return
        _, r, generation = message
        process = self.router_procs[r]
        if generation != self.generations[j][r]:
            return  # about a router that was replaced meanwhile: not its successor
        if process is not None:
            log.error("router %d stalled shard %d's events; killing it", r, j)
            process.kill()

    def _died(self, what: str, index: int) -> None:
        procs = self.router_procs if what == "router" else self.shard_procs
        controls = self.router_controls if what == "router" else self.shard_controls
        process = procs[index]
        process.join(1.0)  # its sentinel says it has ended: this reaps it
        procs[index] = None
        _close(controls[index])
        controls[index] = None
        self._schedule(what, index, process.exitcode)

    def _schedule(self, what: str, index: int, code: Optional[int]) -> None:
        """Restart *what* *index* after its backoff, or give up on it."""
        policy = (self.router_restarts if what == "router" else self.shard_restarts)[index]
        delay = policy.next_delay(time.monotonic())
        if delay is None:
            log.error("%s %d died (exit code %s) too often; giving up on it", what, index, code)
            if what == "shard":
                self.given_up.append(index)
                for control in self.router_controls:
                    self._tell(control, ("lost", index))
                return
            self.routers_given_up.append(index)
            if not any(self.router_procs) and not any(p[1] == "router" for p in self.pending):
                log.error("no router left; stopping")
                self.stopping = True
                return
            # Its sessions are gone: the others stop forwarding to it, and a hop that was
            # on its way finds the port closed (not a queue that nobody accepts from).
            self.sibling_sockets[index].close()
            for control in self.router_controls:
                self._tell(control, ("router_lost", index))
            return
        log.error("%s %d died (exit code %s); restarting in %.1fs", what, index, code, delay)
        self.pending.append((time.monotonic() + delay, what, index))

    # --- stopping -------------------------------------------------------------------

    def stop(self) -> None:
        """Routers first (they tell their clients), then the shards (their control
        pipes close: they exit)."""
        self.stopping = True
        for control in self.router_controls:
            self._tell(control, ("stop",))
        _join_all(self.router_procs, SHUTDOWN_TIMEOUT + 2.0)
        for control in self.shard_controls:
            _close(control)
        _join_all(self.shard_procs, SHARD_STOP_TIMEOUT + 2.0)
        _close(*self.router_controls)
        for sock in [*self.sockets.values(), *self.sibling_sockets]:
            sock.close()


def _close(*ends: Any) -> None:
    for end in ends:
        if end is not None:
            end.close()


def _join_all(processes: List[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        if process is not None:
            process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process is not None and process.is_alive():
            log.warning("%s did not stop in %.1fs; killing it", process.name, timeout)
            process.kill()
            process.join(1.0)


def run_supervisor(settings: Any, listener_mode: str = "") -> int:
    """Run a tier until SIGINT/SIGTERM; the exit status (0 after a clean stop, 1 if it
    could not start)."""
    from router.app import port_in_use_message, start_problem

    problem = start_problem(settings)
    if problem is not None:
        log.error("%s", problem)
        return 1
    if settings.tls_cert:
        from router.tls import TlsError, server_context

        try:
            server_context(settings.tls_cert, settings.tls_key)
        except TlsError as error:
            log.error("%s", error)
            return 1
    supervisor = Supervisor(settings, listener_mode or default_listener_mode())
    try:
        supervisor.bind()
    except OSError as error:
        kind, port = getattr(error, "kind", "tcp"), getattr(error, "port", 0)
        log.error("%s", port_in_use_message(kind, settings.host, port, error))
        supervisor.stop()
        return 1

    def on_signal(signum: int, frame: Any) -> None:
        supervisor.stopping = True

    def on_hangup(signum: int, frame: Any) -> None:
        for process in supervisor.router_procs:  # each reloads its TLS certificate
            if process is not None and process.exitcode is None:
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGHUP)

    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    if settings.tls_cert and hasattr(signal, "SIGHUP"):  # routers handle it only then
        signal.signal(signal.SIGHUP, on_hangup)
    supervisor.start_all()
    if not supervisor.wait_ready():
        log.error("a router could not start (see its lines above)")
        supervisor.stop()
        return 1
    for kind, port in supervisor.ports.items():
        log.info("listening %s %s:%d", kind, settings.host, port)
    where = settings.data_dir or "memory only (it is lost when a shard stops)"
    if settings.redis is not None:
        where = f"Redis at {settings.redis.shown()}, shared as node {settings.redis.node}"
    log.info(
        "%d routers (%s listener) and %d shards; history kept in %s",
        supervisor.routers,
        supervisor.mode,
        supervisor.shards,
        where,
    )
    supervisor.watch()
    log.info("shutting down")
    supervisor.stop()
    log.info("stopped")
    return 0
