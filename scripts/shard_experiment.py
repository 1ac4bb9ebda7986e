#!/usr/bin/env python3
"""Shard-count experiment: the cluster at several shard (and router) counts against the
threaded baseline.

For every planned run this starts a fresh server (``scripts/start_cluster.py`` with
``--shards N --routers R``, or ``scripts/baseline_threaded_server.py``) on free loopback
ports, waits until it answers, drives it with one ``scripts/loadgen.py`` scenario (passing
the server's PIDs with ``--pids`` so CPU% and RSS per process are sampled), stops it
(SIGTERM, wait) and goes on to the next run. Runs are sequential and bounded in time.

The router dimension (``--routers``, default 1: one router, as before). One count runs
every cluster run with that many routers; more than one adds the router sweep: fanout and
longpoll (those of ``--scenarios``) at every ``--routers`` count x every shard count
(``--shards``, default 1,2,4). With more than one router the started process is a
supervisor whose children are the routers; its processes are found in /proc by their
names (``/proc/PID/comm``: ``shardchat-rN`` routers, ``shardchat-shN`` shards). Each run
then reports the CPU time per tier over the measured window (user+system, read from
/proc/PID/stat by the loadgen at the window's start and end), as microseconds per
delivery for the router tier (the router itself when there is one) and per published
message for the shard tier: that shows the scaling even though the loadgen shares the
machine's cores. Where there is no /proc those figures stay empty.

Writes, into ``--out`` (default: a new directory ``results/<date>-<time>/`` in the checkout,
which git ignores; the published results in ``docs/perf/`` are replaced only when asked
for with ``--out docs/perf``), and prints the results tables to stdout (progress goes to
stderr):

* ``shard_experiment.csv``  one row per run, every repeat (failed runs too, with their error)
* ``shard_experiment.md``   the median run per configuration, ratios against the baseline,
  the goals, and (``--profile``) the router's top frames
* ``shard_experiment.json`` every loadgen result as received, plus the run metadata
* ``shard_experiment.png``  deliveries/s and p99 latency against the shard count, the
  baseline as a reference line (only if matplotlib is installed; see ``PLOT_HINT``)
* ``router_experiment.png`` (router sweep) deliveries/s and router-tier CPU us per delivery
  against the total number of server processes, one line per scenario and router count
* ``router_profile_<scenario>.txt`` py-spy's raw stacks (``--profile``)

Examples::

    python scripts/shard_experiment.py --quick              # smoke run, about 30 s
    python scripts/shard_experiment.py                      # full run, 39 runs, about 11 min
    python scripts/shard_experiment.py --out docs/perf --profile fanout,longpoll  # publish
    python scripts/shard_experiment.py --scenarios fanout --shards 1,2,4,8,16
    python scripts/shard_experiment.py --scenarios fanout,longpoll --routers 1,2,4 \
        --shards 1,2,4        # router sweep: 20 configurations x 3 = 60 runs, about 16 min
    python scripts/shard_experiment.py --scenarios fanout --routers 1,2 --shards 1,2 \
        --repeats 1 --attempts 1 --duration 3 --warmup 1   # 5 runs, about 40 s (34 s seen)

It says at the start how many runs it plans and about how long they take.

Every number in the output comes from a run made by this invocation. Exit status: 0 when
every run succeeded, 1 when the results were written but some run failed (the failure is
recorded in the results), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
START_CLUSTER = ROOT / "scripts" / "start_cluster.py"
BASELINE = ROOT / "scripts" / "baseline_threaded_server.py"
LOADGEN = ROOT / "scripts" / "loadgen.py"
#: Where runs go by default: ``results/`` of the checkout (git-ignored), a new directory per
#: run; outside a checkout, ``results/`` of the current directory.
RESULTS = ROOT / "results" if (ROOT / "pyproject.toml").exists() else Path("results")
#: What to do for the plot. ``pip install ".[plot]"`` from a checkout would replace the
#: editable install the README's test command makes (``-e ".[test]"``) with a copy, so the
#: hint keeps ``-e`` and the test extra; installing matplotlib alone is the other way.
PLOT_HINT = (
    'matplotlib is not installed: python -m pip install -e ".[test,plot]" in the checkout '
    "(keeps the editable install), or python -m pip install matplotlib"
)
STEM = "shard_experiment"
HOST = "127.0.0.1"

# The cluster logs its ports and shard PIDs at INFO (nothing else is logged at INFO per
# message or per connection), so INFO costs nothing measurable and tells us the ports.
#: Flood control and the per-address limits off: the load generator is one address that
#: opens thousands of connections and sessions and joins them all at once.
CLUSTER_FLAGS = (
    "--rate-limit", "0", "--max-connections-per-ip", "100000", "--join-rate", "0",
    "--session-rate", "0", "--max-sessions-per-address", "100000",
    "--max-rooms-per-address", "1000000", "--log-level", "INFO",
)  # fmt: skip
#: Runs measure the router and shards, not the disk: history in memory (docs/PERFORMANCE.md
#: compares durable history with it).
IN_MEMORY_FLAGS = ("--in-memory",)
LISTENING = re.compile(r"listening (tcp|http) (\S+):(\d+)")
SHARD_PIDS = re.compile(r"started \d+ shard processes \(pids \[([\d, ]*)\]\)")
#: The cluster's process names (``/proc/PID/comm``): ``shardchat`` is the started process
#: (the router, or with several routers the supervisor), then ``shardchat-r<i>`` routers and
#: ``shardchat-sh<j>`` shards. multiprocessing's resource tracker keeps a python name.
TIER_COMM = re.compile(r"shardchat-(r|sh)(\d+)")
PROC = Path("/proc")

#: The router sweep (``--routers`` with more than one count): these scenarios, at every
#: router count x these shard counts (``--shards`` replaces them).
ROUTER_SWEEP_SCENARIOS = ("fanout", "longpoll")
ROUTER_SWEEP_SHARDS = (1, 2, 4)
ROUTER_PLOT = "router_experiment.png"

SERVER_START_TIMEOUT_S = 30.0  # spawn-starting 8 shards on a busy 2-core machine
SERVER_STOP_TIMEOUT_S = 15.0  # the router's own shutdown is bounded well below this
READY_TIMEOUT_S = 20.0  # until every shard answered ROOMS (baseline: PING)
LOADGEN_SLACK_S = 30.0  # beyond the run's own bounded phases before we kill the loadgen
ERROR_TAIL_CHARS = 600  # of a failed process's output, kept in the results
BUSY_OTHERS_PCT = 15.0  # CPU (% of one core) used outside a run that marks it contended
STUCK_RESUME_S = 1.0  # loadgen's stuck scenario reads this long after its drain
#: Seconds a run takes beyond its warmup and measured time (start the server, connect,
#: drain, stop): 1.3 on average in docs/perf's runs (their ``wall_s``). For the estimate.
RUN_OVERHEAD_S = 1.5

GOAL_FANOUT_DELIVERIES = 2.0
GOAL_FANOUT_P99 = 0.5
GOAL_FANOUT200_DELIVERIES = 2.0
GOAL_CONNECT_S = 2.0
GOAL_CONNECTIONS_DELIVERIES = 1.3
GOAL_CONNECTIONS_P99 = 0.5
GOAL_RSS_MB = 100.0
GOAL_LONGPOLL_DELIVERIES = 50.0
GOAL_LONGPOLL_P99_MS = 100.0
GOAL_SHARD_COST = 0.10


# --- what to run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One experiment scenario: a loadgen scenario with a size (rooms, members, publishers)."""

    name: str
    loadgen: str
    size: Tuple[int, int, int]
    quick_size: Tuple[int, int, int]
    title: str


SCENARIOS: Dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("fanout", "fanout", (10, 20, 2), (2, 6, 2), "TCP fan-out 10 rooms x 20 x 2"),
        Scenario("fanout-200", "fanout", (1, 200, 2), (1, 20, 2), "TCP fan-out 1 room x 200 x 2"),
        Scenario(
            "connections",
            "connections",
            (100, 51, 1),
            (5, 11, 1),
            "5,100 connections (100 rooms x 50 members + 1 publisher)",
        ),
        Scenario("longpoll", "longpoll", (10, 20, 2), (2, 5, 2), "HTTP long-poll 10 x 20 x 2"),
        Scenario(
            "stuck",
            "stuck",
            (10, 20, 2),
            (2, 6, 2),
            "fan-out 10 x 20 x 2 with one never-reading member per room",
        ),
    )
}


@dataclass(frozen=True)
class Timing:
    """Loadgen phase lengths in seconds (every phase is bounded)."""

    warmup: float
    duration: float
    drain: float
    connect_timeout: float
    pause: float  # between runs: let the last server's processes and sockets go first
    retry_wait: float  # before running again after a run on a busy machine

    def budget(self) -> float:
        """Seconds after which a loadgen process is considered hung."""
        total = self.warmup + self.duration + self.drain + self.connect_timeout
        return total + STUCK_RESUME_S + LOADGEN_SLACK_S


FULL_TIMING = Timing(
    warmup=2.0, duration=10.0, drain=3.0, connect_timeout=30.0, pause=2.0, retry_wait=20.0
)
QUICK_TIMING = Timing(
    warmup=0.3, duration=1.0, drain=0.5, connect_timeout=10.0, pause=0.2, retry_wait=1.0
)


@dataclass(frozen=True)
class RunSpec:
    """One planned run: a scenario against the cluster at ``shards`` and ``routers``, or the
    baseline (whose ``routers`` means nothing)."""

    scenario: Scenario
    server: str  # "cluster" or "baseline"
    shards: Optional[int]
    size: Tuple[int, int, int]
    routers: int = 1

    @property
    def label(self) -> str:
        where = f"cluster shards={self.shards}" if self.server == "cluster" else "baseline"
        if self.server == "cluster" and self.routers != 1:
            where += f" routers={self.routers}"
        return f"{self.scenario.name} {where}"


def plan_runs(
    names: Sequence[str],
    shard_counts: Sequence[int],
    sweep: Sequence[str],
    fixed_shards: int,
    quick: bool,
    router_counts: Sequence[int] = (1,),
    router_shards: Sequence[int] = ROUTER_SWEEP_SHARDS,
) -> List[RunSpec]:
    """Return the runs for ``names``, in order: each scenario's cluster runs, then its baseline.

    Scenarios in ``sweep`` run the cluster at every count of ``shard_counts`` plus
    ``fixed_shards``; the others at ``fixed_shards`` only. ``stuck`` is compared with
    ``fanout`` at the same shard count, so choosing ``stuck`` adds those fanout runs. All of
    these run at the fewest of ``router_counts``; with more than one router count, the
    scenarios of ROUTER_SWEEP_SCENARIOS also run at every router count x ``router_shards``.
    The cluster runs are in order of router count, then shard count.
    """
    wanted = list(names)
    if "stuck" in wanted and "fanout" not in wanted:
        wanted.insert(wanted.index("stuck"), "fanout")
    fixed_routers = min(router_counts)
    runs: List[RunSpec] = []
    for name in wanted:
        scenario = SCENARIOS[name]
        size = scenario.quick_size if quick else scenario.size
        counts = sorted(set(shard_counts) | {fixed_shards}) if name in sweep else [fixed_shards]
        if name == "fanout" and "fanout" not in names:
            counts = [fixed_shards]  # only the reference for stuck
        configs = {(fixed_routers, n) for n in counts}
        if len(set(router_counts)) > 1 and name in ROUTER_SWEEP_SCENARIOS and name in names:
            configs |= {(r, n) for r in router_counts for n in router_shards}
        runs += [RunSpec(scenario, "cluster", n, size, r) for r, n in sorted(configs)]
        runs.append(RunSpec(scenario, "baseline", None, size))
    return runs


def server_processes(routers: Optional[int], shards: Optional[int]) -> int:
    """Processes of a server: routers + shards, + the supervisor when there are several
    routers; the baseline (``shards`` None) is one."""
    if shards is None:
        return 1
    tier = routers or 1
    return tier + shards + (1 if tier > 1 else 0)


# --- server processes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Tiers:
    """A server's PIDs by role: the started process, the router tier and the shard tier.

    With one router (and for the baseline) the router tier is the started process itself;
    with several, the started process is the supervisor and belongs to neither tier.
    """

    main: int
    routers: Tuple[int, ...]
    shards: Tuple[int, ...]

    @property
    def pids(self) -> List[int]:
        """Every PID: the started process first, then the routers, then the shards."""
        return [self.main, *(p for p in self.routers if p != self.main), *self.shards]

    @property
    def supervised(self) -> bool:
        """True if the started process is a supervisor (not itself a router)."""
        return self.main not in self.routers

    def as_dict(self) -> Dict[str, Any]:
        """For the JSON file."""
        return {"main": self.main, "routers": list(self.routers), "shards": list(self.shards)}


def read_processes(proc: Path = PROC) -> Dict[int, Tuple[int, str]]:
    """``{pid: (parent pid, comm)}`` of every process readable in ``proc``; {} without it."""
    out: Dict[int, Tuple[int, str]] = {}
    try:
        entries = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return out
    for entry in entries:
        try:
            stat = (proc / entry / "stat").read_text(encoding="ascii", errors="replace")
            comm = (proc / entry / "comm").read_text(encoding="ascii", errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm) state"
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile, or not ours to read
        out[int(entry)] = (ppid, comm.strip())
    return out


def classify_tiers(root: int, processes: Dict[int, Tuple[int, str]], routers: int) -> Tiers:
    """The tiers of the cluster started as ``root``, from ``{pid: (ppid, comm)}``.

    Routers are ``root`` itself when ``routers`` is 1, else its ``shardchat-r<i>``
    descendants; shards are the ``shardchat-sh<j>`` descendants; both in index order.
    Other descendants (the resource tracker) belong to neither.
    """
    children: Dict[int, List[int]] = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    found: Dict[str, List[Tuple[int, int]]] = {"r": [], "sh": []}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        named = TIER_COMM.fullmatch(processes[pid][1])
        if named:
            found[named.group(1)].append((int(named.group(2)), pid))
    router_pids = (root,) if routers == 1 else tuple(p for _, p in sorted(found["r"]))
    return Tiers(root, router_pids, tuple(p for _, p in sorted(found["sh"])))


class ServerProcess:
    """A server subprocess whose output names its ports (and, for the cluster, shard PIDs).

    Owns the process: :meth:`stop` (or leaving the ``with`` block) sends SIGTERM, waits and
    kills it if it does not exit in time. Its combined stdout/stderr is read by a thread
    (so the pipe never fills) and kept in :attr:`lines`.
    """

    def __init__(self, argv: List[str], want_shard_pids: bool) -> None:
        self.argv = argv
        self.want_shard_pids = want_shard_pids
        self.proc: Optional[subprocess.Popen[str]] = None
        self.lines: List[str] = []
        self.ports: Dict[str, int] = {}
        self.shard_pids: List[int] = []
        self._ready = threading.Event()
        self._reader: Optional[threading.Thread] = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pids(self) -> List[int]:
        """The server's PIDs: the main process (router or baseline) first, then shards."""
        return [self.pid, *self.shard_pids]

    def tiers(self, routers: int) -> Tiers:
        """The server's processes by tier (call once it answers).

        With one router (or the baseline) the router is this process and the shards are
        the PIDs the cluster logged; with several, both are found in /proc by name (no
        routers or shards where there is no /proc). Processes started later (a router or
        shard restarted during the run) are not included.
        """
        if routers == 1:
            return Tiers(self.pid, (self.pid,), tuple(self.shard_pids))
        return classify_tiers(self.pid, read_processes(), routers)

    def start(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        """Start the process and wait for its ports; raise RuntimeError if they never come."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd=str(ROOT),
            env=env,
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self._has_everything():
            raise RuntimeError(f"server did not start in {timeout:g}s: {self.output_tail()}")

    def _has_everything(self) -> bool:
        ports = "tcp" in self.ports and "http" in self.ports
        return ports and (bool(self.shard_pids) or not self.want_shard_pids)

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            listening = LISTENING.search(line)
            if listening:
                self.ports[listening.group(1)] = int(listening.group(3))
            pids = SHARD_PIDS.search(line)
            if pids:
                self.shard_pids = [int(p) for p in pids.group(1).split(",") if p.strip()]
            if self._has_everything():
                self._ready.set()
        self._ready.set()  # exited: unblock start()

    def output_tail(self) -> str:
        """The end of the process's output so far, on one line."""
        return " | ".join(self.lines)[-ERROR_TAIL_CHARS:] or "(no output)"

    def stop(self, timeout: float = SERVER_STOP_TIMEOUT_S) -> Optional[int]:
        """SIGTERM, wait up to ``timeout``, then kill; return the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_argv(spec: RunSpec) -> Tuple[List[str], bool]:
    """Return the command line of ``spec``'s server and whether it has shards."""
    if spec.server == "cluster":
        argv = [sys.executable, str(START_CLUSTER), "--host", HOST, "--tcp-port", "0"]
        argv += ["--http-port", "0", "--shards", str(spec.shards)]
        argv += ["--routers", str(spec.routers), *CLUSTER_FLAGS]
        return [*argv, *IN_MEMORY_FLAGS], True
    argv = [sys.executable, str(BASELINE), "--host", HOST, "--tcp-port", "0", "--http-port", "0"]
    return argv, False


def wait_ready(port: int, cluster: bool, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until the server answers on ``port``; for the cluster, until every shard does.

    ``ROOMS`` is answered only after every shard replied, so shards still importing at
    start-up are not counted in the first run's connect time. The baseline answers PING.
    Raises OSError (or socket.timeout) if it does not answer in time.
    """
    request, done = (b"ROOMS\n", b"END ROOMS") if cluster else (b"PING ready\n", b"PONG")
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while done not in received:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError(f"server closed the readiness probe: {received[-200:]!r}")
            received += chunk
        sock.sendall(b"QUIT\n")


# --- one run --------------------------------------------------------------------------------


def loadgen_argv(
    spec: RunSpec, server: ServerProcess, timing: Timing, pids: Optional[Sequence[int]] = None
) -> List[str]:
    """Return the loadgen command line for ``spec`` against ``server``, sampling ``pids``
    (default: the server's main process and logged shards)."""
    rooms, members, publishers = spec.size
    return [
        sys.executable,
        str(LOADGEN),
        spec.scenario.loadgen,
        "--host",
        HOST,
        "--tcp-port",
        str(server.ports["tcp"]),
        "--http-port",
        str(server.ports["http"]),
        "--rooms",
        str(rooms),
        "--members",
        str(members),
        "--publishers",
        str(publishers),
        "--window",
        "8",
        "--text-bytes",
        "64",
        "--warmup",
        str(timing.warmup),
        "--duration",
        str(timing.duration),
        "--drain",
        str(timing.drain),
        "--connect-timeout",
        str(timing.connect_timeout),
        "--pids",
        ",".join(str(pid) for pid in (server.pids if pids is None else pids)),
        "--log-level",
        "WARNING",
    ]


def run_loadgen(
    argv: List[str], timeout: float, during: Optional[Callable[[], None]] = None
) -> Dict[str, Any]:
    """Run the loadgen and return its JSON result (``{"error": ...}`` when it failed).

    ``during`` is called once the loadgen has started (it may take a while: the loadgen
    runs on); the loadgen is killed if it has not finished ``timeout`` seconds after start.
    """
    started = time.monotonic()
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        cwd=str(ROOT),
    ) as proc:
        try:
            if during is not None:
                during()
            stdout, stderr = proc.communicate(
                timeout=max(1.0, timeout - (time.monotonic() - started))
            )
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"error": f"loadgen did not finish in {timeout:g}s"}
    return parse_loadgen_output(proc.returncode, stdout, stderr)


def parse_loadgen_output(returncode: int, stdout: str, stderr: str) -> Dict[str, Any]:
    """The loadgen's JSON result (its last stdout line), or ``{"error": ...}``."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    result: Any = {}
    if lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            result = {}
    if not isinstance(result, dict) or not result:
        tail = " | ".join(stderr.splitlines())[-ERROR_TAIL_CHARS:]
        return {"error": f"loadgen exited {returncode} without a result: {tail}"}
    if returncode != 0 and "error" not in result:
        result["error"] = f"loadgen exited {returncode}"
    return result


def execute(
    spec: RunSpec, timing: Timing, during: Optional[Callable[[ServerProcess], None]] = None
) -> Tuple[Dict[str, Any], Optional[Tiers]]:
    """Start the server, run the loadgen against it, stop the server.

    ``during`` is called with the server while the loadgen runs (the profiler). Returns the
    loadgen result (with ``"error"`` if anything failed) and the server's processes (None
    if it never started).
    """
    argv, sharded = server_argv(spec)
    routers = spec.routers if sharded else 1
    # Several routers: the supervisor logs no shard PIDs; they are read from /proc instead.
    server = ServerProcess(argv, want_shard_pids=sharded and routers == 1)
    with server:
        try:
            server.start()
            wait_ready(server.ports["tcp"], cluster=sharded)
        except (RuntimeError, OSError) as exc:
            tiers = server.tiers(routers) if server.proc else None
            return {"error": f"{exc}"[:ERROR_TAIL_CHARS]}, tiers
        tiers = server.tiers(routers)
        hook = None if during is None else (lambda: during(server))
        argv = loadgen_argv(spec, server, timing, tiers.pids)
        result = run_loadgen(argv, timing.budget(), hook)
        if server.proc is not None and server.proc.poll() is not None:
            result.setdefault("error", f"server exited early: {server.output_tail()}")
        return result, tiers


# --- router profile -------------------------------------------------------------------------

PROFILE_SECONDS = 6  # py-spy samples this long, inside the measured window
PROFILE_AFTER_WARMUP_S = 1.0  # margin for connecting before the warmup starts
PROFILE_TOP = 20  # frames listed per table
# Blocking mode (py-spy pauses the router ~100 times a second to read a consistent stack):
# --nonblocking reads the stack while it changes and attributes frames to callers they
# never ran under. Thread names and function-level frames keep the tables short.
PY_SPY_FLAGS = ("-f", "raw", "--threads", "--nolineno", "--rate", "100")


def record_profile(server: ServerProcess, timing: Timing, path: Path) -> Optional[str]:
    """Wait for the measured window, then record the router with py-spy into ``path``.

    Returns why it failed, or None.
    """
    time.sleep(timing.warmup + PROFILE_AFTER_WARMUP_S)
    seconds = max(1, min(PROFILE_SECONDS, int(timing.duration - PROFILE_AFTER_WARMUP_S)))
    argv = ["py-spy", "record", "-p", str(server.pid), "-d", str(seconds), "-o", str(path)]
    try:
        done = subprocess.run(
            [*argv, *PY_SPY_FLAGS], capture_output=True, text=True, timeout=seconds + 30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"py-spy failed: {exc}"
    if done.returncode != 0 or not path.exists():
        return f"py-spy exited {done.returncode}: {done.stderr.strip()[-ERROR_TAIL_CHARS:]}"
    return None


def thread_group(name: str) -> str:
    """'shard-3-writer' -> 'shard-N-writer': one line per kind of thread."""
    return re.sub(r"\d+", "N", name)


def summarize_profile(path: Path) -> Dict[str, Any]:
    """Samples per thread kind, top self frames and top inclusive router frames.

    ``path`` is py-spy's raw (collapsed) output with ``--threads``: one line per distinct
    stack, ``thread (tid): name;outer frame;...;inner frame count``.
    """
    threads: Dict[str, int] = {}
    own: Dict[str, int] = {}
    inclusive: Dict[str, int] = {}
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        head = frames[0].split("): ", 1)
        group = thread_group(head[1]) if len(head) == 2 else "?"
        samples = int(count)
        total += samples
        threads[group] = threads.get(group, 0) + samples
        key = f"{group} | {frames[-1]}"
        own[key] = own.get(key, 0) + samples
        if group == "MainThread":
            for frame in set(frames[1:]):
                if "(router/" in frame or "(common/" in frame:
                    inclusive[frame] = inclusive.get(frame, 0) + samples

    def top(counts: Dict[str, int]) -> List[Tuple[str, int]]:
        return sorted(counts.items(), key=lambda item: -item[1])[:PROFILE_TOP]

    main = threads.get("MainThread", 0)
    return {
        "samples": total,
        "main_samples": main,
        "threads": top(threads),
        "self": top(own),
        "inclusive": top(inclusive),
    }


def profile_run(spec: RunSpec, timing: Timing, out: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """One extra ``spec`` run with py-spy on the router; return (summary, loadgen result)."""
    path = out / f"router_profile_{spec.scenario.name}.txt"
    failure: List[str] = []

    def during(server: ServerProcess) -> None:
        problem = record_profile(server, timing, path)
        if problem:
            failure.append(problem)

    result, tiers = execute(spec, timing, during)
    pids = tiers.pids if tiers else []
    summary: Dict[str, Any] = {"run": spec.label, "file": path.name, "pids": pids}
    summary["scenario"] = spec.scenario.name
    if failure:
        summary["error"] = failure[0]
    elif result.get("error"):
        summary["error"] = f"the profiled run failed: {result['error']}"
    else:
        summary.update(summarize_profile(path))
        summary["deliveries_per_s"] = result.get("deliveries_per_s")
        summary["router_cpu_pct"] = (
            (result.get("resources") or {}).get(str(pids[0]), {}).get("cpu_percent")
        )
    return summary, result


def profile_section(profile: Dict[str, Any]) -> List[str]:
    """The Markdown section of the router profile."""
    lines = [f"## Router profile: {profile['scenario']}", ""]
    if profile.get("error"):
        return [*lines, f"Not recorded: {profile['error']}", ""]
    total = max(1, profile["samples"])
    main = max(1, profile["main_samples"])
    lines += [
        f"py-spy on the router during an extra run ({profile['run']}, "
        f"{fmt(profile.get('deliveries_per_s'), 0)} deliveries/s under the profiler, router "
        f"{fmt(profile.get('router_cpu_pct'), 0)}% CPU; not in the tables above), "
        f"{profile['samples']} non-idle samples at 100/s; raw stacks in `{profile['file']}`.",
        "",
        "| thread | samples | share |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {n} | {100 * n / total:.0f}% |" for name, n in profile["threads"]]
    lines += [
        "",
        "Top self-time frames; *share* is of that thread kind's samples. py-spy may count "
        "a thread blocked inside a C call as busy: `EpollSelector.select` is the loop "
        "waiting for sockets, and pipe threads (Windows, `--pipe-io threads`) waiting in "
        "`SimpleQueue.get` or `Connection._recv` are not using CPU.",
        "",
        "| samples | share | thread | frame |",
        "| --- | --- | --- | --- |",
    ]
    per_thread = dict(profile["threads"])
    for key, n in profile["self"]:
        thread, _, frame = key.partition(" | ")
        share = 100 * n / max(1, per_thread.get(thread, 0))
        lines.append(f"| {n} | {share:.0f}% | {thread} | `{frame}` |")
    lines += ["", "Top inclusive router/common frames on the event-loop thread (MainThread):", ""]
    lines += ["| samples | share of loop thread | frame |", "| --- | --- | --- |"]
    lines += [f"| {n} | {100 * n / main:.0f}% | `{f}` |" for f, n in profile["inclusive"]]
    return [*lines, ""]


# --- rows -----------------------------------------------------------------------------------

COLUMNS = [
    "scenario",
    "server",
    "routers",
    "shards",
    "server_processes",
    "status",
    "rooms",
    "members",
    "publishers",
    "connections",
    "connect_join_s",
    "deliveries_per_s",
    "published_per_s",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "latency_samples",
    "losses",
    "error_lines",
    "disconnected",
    "stuck_closed",
    "router_cpu_pct",
    "max_shard_cpu_pct",
    "shards_cpu_pct",
    "loadgen_cpu_pct",
    "machine_cpu_pct",
    "others_cpu_pct",
    "deliveries",
    "published",
    "measured_s",
    "router_tier_cpu_s",
    "shard_tier_cpu_s",
    "router_us_per_delivery",
    "shard_us_per_message",
    "router_rss_mb",
    "shards_rss_mb",
    "total_rss_mb",
    "load1_before",
    "wall_s",
    "repeat",
    "kept",
    "deliveries_min",
    "deliveries_max",
    "attempts",
    "started_at",
    "error",
]


def kib_to_mb(kib: Optional[float]) -> Optional[float]:
    """KiB -> MB (10^6 bytes), rounded; None stays None."""
    return None if kib is None else round(kib * 1024 / 1e6, 1)


def resource_columns(resources: Dict[str, Any], tiers: Optional[Tiers]) -> Dict[str, Any]:
    """CPU% and RSS columns from the loadgen's ``resources``.

    The router columns are the router tier's (summed over routers when there are several);
    the total RSS also counts a supervisor.
    """
    out: Dict[str, Any] = {}
    if tiers is None or not resources.get(str(tiers.main)):
        return out
    main = resources[str(tiers.main)]
    routers = [resources[str(p)] for p in tiers.routers if str(p) in resources]
    shards = [resources[str(p)] for p in tiers.shards if str(p) in resources]
    if not tiers.supervised:
        out["router_cpu_pct"] = main.get("cpu_percent")
        out["router_rss_mb"] = kib_to_mb(main.get("rss_max_kib"))
    elif routers:
        cpus = [r.get("cpu_percent") for r in routers if r.get("cpu_percent") is not None]
        out["router_cpu_pct"] = round(sum(cpus), 1) if cpus else None
        out["router_rss_mb"] = kib_to_mb(sum(r.get("rss_max_kib") or 0 for r in routers))
    rss_total = main.get("rss_max_kib") or 0
    if tiers.supervised:
        rss_total += sum(r.get("rss_max_kib") or 0 for r in routers)
    if shards:
        cpus = [s.get("cpu_percent") or 0.0 for s in shards]
        rss = sum(s.get("rss_max_kib") or 0 for s in shards)
        out["max_shard_cpu_pct"] = max(cpus)
        out["shards_cpu_pct"] = round(sum(cpus), 1)
        out["shards_rss_mb"] = kib_to_mb(rss)
        rss_total += rss
    out["total_rss_mb"] = kib_to_mb(rss_total)
    out["loadgen_cpu_pct"] = resources.get("loadgen", {}).get("cpu_percent")
    machine = resources.get("machine", {})
    out["machine_cpu_pct"] = machine.get("cpu_percent")
    out["others_cpu_pct"] = machine.get("others_cpu_percent")
    return out


def tier_cpu_seconds(
    resources: Dict[str, Any], pids: Sequence[int], measured_s: Optional[float]
) -> Optional[float]:
    """CPU seconds (user+system) that ``pids`` used in the loadgen's measured window.

    The loadgen reads utime+stime from /proc/PID/stat at the window's start and end and
    reports them as ``cpu_percent`` of one core over ``measured_s``; this undoes that. A
    process without both readings (it exited) adds nothing; None if none has them (no
    /proc, or no such process).
    """
    if not measured_s or measured_s <= 0:
        return None
    shares = [(resources.get(str(p)) or {}).get("cpu_percent") for p in pids]
    known = [share for share in shares if share is not None]
    if not known:
        return None
    return sum(known) * measured_s / 100.0


def us_per(cpu_s: Optional[float], count: Any) -> Optional[float]:
    """Microseconds of CPU per unit of ``count`` (deliveries, messages); None if either is
    missing or there were none."""
    if cpu_s is None or not isinstance(count, (int, float)) or count <= 0:
        return None
    return round(cpu_s * 1e6 / count, 2)


def tier_columns(result: Dict[str, Any], tiers: Optional[Tiers]) -> Dict[str, Any]:
    """CPU per tier in the measured window: seconds, us per delivery (router tier) and us
    per published message (shard tier). Empty where it was not measured."""
    resources = result.get("resources") or {}
    measured = result.get("measured_s")
    if tiers is None or resources.get("available") is False:
        return {}
    router_s = tier_cpu_seconds(resources, tiers.routers, measured)
    shard_s = tier_cpu_seconds(resources, tiers.shards, measured)
    return {
        "router_tier_cpu_s": None if router_s is None else round(router_s, 3),
        "shard_tier_cpu_s": None if shard_s is None else round(shard_s, 3),
        "router_us_per_delivery": us_per(router_s, result.get("deliveries")),
        "shard_us_per_message": us_per(shard_s, result.get("published")),
    }


def make_row(spec: RunSpec, result: Dict[str, Any], tiers: Optional[Tiers]) -> Dict[str, Any]:
    """Flatten one run's loadgen result into a CSV row (missing numbers stay empty)."""
    rooms, members, publishers = spec.size
    row: Dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(scenario=spec.scenario.name, server=spec.server, shards=spec.shards)
    row["routers"] = spec.routers if spec.server == "cluster" else None
    row["server_processes"] = server_processes(row["routers"], spec.shards)
    row.update(rooms=rooms, members=members, publishers=publishers)
    row["status"] = "failed" if result.get("error") else "ok"
    row["error"] = result.get("error")
    for key in ("connections", "connect_join_s", "deliveries_per_s", "published_per_s"):
        row[key] = result.get(key)
    for key in ("deliveries", "published", "measured_s"):
        row[key] = result.get(key)
    for key in ("losses", "error_lines", "disconnected"):
        row[key] = result.get(key)
    latency = result.get("latency_ms") or {}
    row.update(p50_ms=latency.get("p50"), p99_ms=latency.get("p99"), max_ms=latency.get("max"))
    row["latency_samples"] = latency.get("samples")
    row["stuck_closed"] = (result.get("stuck") or {}).get("closed_by_server")
    row.update(resource_columns(result.get("resources") or {}, tiers))
    if spec.server == "cluster":
        row.update(tier_columns(result, tiers))
    return row


def progress_line(label: str, row: Dict[str, Any]) -> str:
    """One stderr line summing up a finished run (``label`` says which)."""
    head = label
    if row["status"] != "ok":
        return f"{head}: FAILED ({row['wall_s']:.1f}s): {row['error']}"
    cpu = f"router/server {fmt(row['router_cpu_pct'])}% CPU"
    if row["max_shard_cpu_pct"] is not None:
        cpu += f", max shard {fmt(row['max_shard_cpu_pct'])}%"
    if row.get("router_us_per_delivery") is not None:
        cpu += f", router tier {fmt(row['router_us_per_delivery'], 2)} us/delivery"
    if row.get("shard_us_per_message") is not None:
        cpu += f", shard tier {fmt(row['shard_us_per_message'], 2)} us/message"
    return (
        f"{head}: {fmt(row['deliveries_per_s'], 0)} deliveries/s, p99 {fmt(row['p99_ms'])} ms, "
        f"connect+join {fmt(row['connect_join_s'], 2)} s, {cpu}, "
        f"RSS {fmt(row['total_rss_mb'])} MB ({row['wall_s']:.1f}s)"
    )


# --- ratios and goals -------------------------------------------------------------------------


def row_routers(row: Dict[str, Any]) -> int:
    """A row's router count (1 when it has none: the baseline, rows from before routers)."""
    return row.get("routers") or 1


def find_row(
    rows: Sequence[Dict[str, Any]],
    scenario: str,
    server: str,
    shards: Optional[int] = None,
    routers: int = 1,
) -> Optional[Dict[str, Any]]:
    """The successful row of ``scenario`` on ``server`` (at ``shards`` and ``routers`` for
    the cluster)."""
    for row in rows:
        same = row["scenario"] == scenario and row["server"] == server
        if not same or row["status"] != "ok":
            continue
        if server == "baseline" or (row["shards"] == shards and row_routers(row) == routers):
            return row
    return None


def several_routers(rows: Sequence[Dict[str, Any]]) -> bool:
    """True if some cluster row ran with more than one router (the tables then say so)."""
    return any(r["server"] == "cluster" and row_routers(r) != 1 for r in rows)


def ratio(a: Any, b: Any) -> Optional[float]:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def baseline_ratios(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """For every successful cluster row with a baseline: deliveries and p99 ratios."""
    out = []
    for row in rows:
        if row["server"] != "cluster" or row["status"] != "ok":
            continue
        base = find_row(rows, row["scenario"], "baseline")
        if base is None:
            continue
        out.append(
            {
                "scenario": row["scenario"],
                "routers": row_routers(row),
                "shards": row["shards"],
                "deliveries_ratio": ratio(row["deliveries_per_s"], base["deliveries_per_s"]),
                "p99_ratio": ratio(row["p99_ms"], base["p99_ms"]),
            }
        )
    return out


@dataclass(frozen=True)
class Goal:
    """One goal's outcome: ``verdict`` is "met", "not met" or "not measured"."""

    name: str
    target: str
    measured: str
    verdict: str


def judge(name: str, target: str, value: Optional[float], ok: Callable[[float], bool]) -> Goal:
    """A goal on one number (``value`` None: not measured)."""
    if value is None:
        return Goal(name, target, "-", "not measured")
    return Goal(name, target, f"{value:.2f}", "met" if ok(value) else "not met")


def vs_baseline(
    rows: Sequence[Dict[str, Any]], scenario: str, shards: int, key: str, routers: int = 1
) -> Optional[float]:
    """Cluster ``key`` at ``shards`` (and ``routers``) divided by the baseline's, for
    ``scenario``."""
    cluster = find_row(rows, scenario, "cluster", shards, routers)
    base = find_row(rows, scenario, "baseline")
    if cluster is None or base is None:
        return None
    return ratio(cluster[key], base[key])


def shard_cost(rows: Sequence[Dict[str, Any]], routers: int = 1) -> Tuple[Optional[float], str]:
    """(1 - fanout deliveries/s at the most shards / at the fewest, "1->8") or (None, ""),
    at ``routers`` routers."""
    fanout = [r for r in rows if r["scenario"] == "fanout" and r["server"] == "cluster"]
    fanout = [r for r in fanout if row_routers(r) == routers]
    fanout = sorted((r for r in fanout if r["status"] == "ok"), key=lambda r: r["shards"])
    if len(fanout) < 2:
        return None, ""
    low, high = fanout[0], fanout[-1]
    kept = ratio(high["deliveries_per_s"], low["deliveries_per_s"])
    label = f"{low['shards']}->{high['shards']}"
    return (None if kept is None else 1.0 - kept), label


def stuck_kept(
    rows: Sequence[Dict[str, Any]], server: str, shards: Optional[int], routers: int = 1
) -> Dict[str, Any]:
    """Deliveries/s of ``stuck`` over ``fanout`` on the same server: raw and per reader.

    ``stuck`` has one member per room that never reads (it is not counted), so a server
    that is not slowed down at all keeps (members - 1) / members of the raw deliveries;
    the per-reader ratio corrects for that and is 1.0 for no slow-down.
    """
    stuck = find_row(rows, "stuck", server, shards, routers)
    fanout = find_row(rows, "fanout", server, shards, routers)
    if stuck is None or fanout is None:
        return {}
    raw = ratio(stuck["deliveries_per_s"], fanout["deliveries_per_s"])
    per_reader = ratio(
        stuck["deliveries_per_s"] / (stuck["members"] - 1),
        fanout["deliveries_per_s"] / fanout["members"],
    )
    return {"raw": raw, "per_reader": per_reader}


def evaluate_goals(rows: Sequence[Dict[str, Any]], shards: int, routers: int = 1) -> List[Goal]:
    """Judge the issue's goals, the cluster at ``shards`` (and ``routers``) against the
    baseline."""
    at = goal_at(shards, routers)
    goals = [
        judge(
            "fan-out 10x20x2 deliveries/s vs baseline" + at,
            f">= {GOAL_FANOUT_DELIVERIES}x",
            vs_baseline(rows, "fanout", shards, "deliveries_per_s", routers),
            lambda v: v >= GOAL_FANOUT_DELIVERIES,
        ),
        judge(
            "fan-out 10x20x2 p99 vs baseline" + at,
            f"<= {GOAL_FANOUT_P99}x",
            vs_baseline(rows, "fanout", shards, "p99_ms", routers),
            lambda v: v <= GOAL_FANOUT_P99,
        ),
        judge(
            "1 room x 200 deliveries/s vs baseline" + at,
            f">= {GOAL_FANOUT200_DELIVERIES}x",
            vs_baseline(rows, "fanout-200", shards, "deliveries_per_s", routers),
            lambda v: v >= GOAL_FANOUT200_DELIVERIES,
        ),
    ]
    goals += connection_goals(rows, shards, routers)
    goals += [
        judge(
            "long-poll 10x20x2 deliveries/s vs baseline" + at,
            f">= {GOAL_LONGPOLL_DELIVERIES:g}x",
            vs_baseline(rows, "longpoll", shards, "deliveries_per_s", routers),
            lambda v: v >= GOAL_LONGPOLL_DELIVERIES,
        ),
        judge(
            "long-poll p99 ms" + at,
            f"< {GOAL_LONGPOLL_P99_MS:g} ms",
            (find_row(rows, "longpoll", "cluster", shards, routers) or {}).get("p99_ms"),
            lambda v: v < GOAL_LONGPOLL_P99_MS,
        ),
    ]
    cost, label = shard_cost(rows, routers)
    goals.append(
        judge(
            f"fan-out cost of {label or '1->8'} shards (1 - deliveries ratio)",
            f"<= {GOAL_SHARD_COST:.2f}",
            cost,
            lambda v: v <= GOAL_SHARD_COST,
        )
    )
    return goals


def goal_at(shards: int, routers: int) -> str:
    """' (2 shards)', or ' (2 shards, 4 routers)' with more than one router."""
    return f" ({shards} shards)" if routers == 1 else f" ({shards} shards, {routers} routers)"


def connection_goals(rows: Sequence[Dict[str, Any]], shards: int, routers: int = 1) -> List[Goal]:
    """The 5,100-connection goals (connect time, throughput, p99, memory)."""
    at = goal_at(shards, routers)
    cluster = find_row(rows, "connections", "cluster", shards, routers) or {}
    connect = cluster.get("connect_join_s")
    if connect is not None and (cluster.get("disconnected") or cluster.get("error_lines")):
        connect = float("inf")  # not all of them stayed connected: not met
    return [
        judge(
            f"{cluster.get('connections') or 'all'} connections connected+joined, s" + at,
            f"<= {GOAL_CONNECT_S:g} s",
            connect,
            lambda v: v <= GOAL_CONNECT_S,
        ),
        judge(
            "connections deliveries/s vs baseline" + at,
            f">= {GOAL_CONNECTIONS_DELIVERIES}x",
            vs_baseline(rows, "connections", shards, "deliveries_per_s", routers),
            lambda v: v >= GOAL_CONNECTIONS_DELIVERIES,
        ),
        judge(
            "connections p99 vs baseline" + at,
            f"<= {GOAL_CONNECTIONS_P99}x",
            vs_baseline(rows, "connections", shards, "p99_ms", routers),
            lambda v: v <= GOAL_CONNECTIONS_P99,
        ),
        judge(
            "connections router + shards RSS, MB" + at,
            f"<= {GOAL_RSS_MB:g} MB",
            cluster.get("total_rss_mb"),
            lambda v: v <= GOAL_RSS_MB,
        ),
    ]


# --- output files -----------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    """A number for a table: thousands separators, ``digits`` decimals; '-' when missing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float) and digits == 0:
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def fmt_ratio(value: Optional[float]) -> str:
    """A ratio as ``2.31x`` ('-' when missing)."""
    return "-" if value is None else f"{value:.2f}x"


def write_csv(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """One row per run, columns :data:`COLUMNS`; missing values are empty."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})


RUN_TABLE = (
    ("scenario", "scenario", None),
    ("server", "server", None),
    ("shards", "shards", None),
    ("conns", "connections", None),
    ("connect+join s", "connect_join_s", 2),
    ("deliveries/s", "deliveries_per_s", 0),
    ("p50 ms", "p50_ms", 2),
    ("p99 ms", "p99_ms", 2),
    ("losses", "losses", None),
    ("router (baseline) CPU%", "router_cpu_pct", 0),
    ("max shard CPU%", "max_shard_cpu_pct", 0),
    ("loadgen CPU%", "loadgen_cpu_pct", 0),
    ("others CPU%", "others_cpu_pct", 0),
    ("RSS MB (router+shards)", "total_rss_mb", 1),
    ("status", "status", None),
)


def runs_note(meta: Dict[str, Any]) -> List[str]:
    """What a row of the runs table is when configurations ran more than once."""
    if meta["repeats"] < 2:
        return []
    return [
        f"Each configuration ran {meta['repeats']} times (in rounds over the whole plan); "
        "a row is the run with the median deliveries/s, with all of its own numbers, and "
        "*range* is the lowest and highest deliveries/s of its runs. Every run is in the "
        "CSV.",
        "",
    ]


def run_table(rows: Sequence[Dict[str, Any]], kept: Sequence[Dict[str, Any]]) -> List[str]:
    """The Markdown table of the kept run per configuration, and every failure."""
    columns = list(RUN_TABLE)
    ranged = any(r.get("deliveries_min") != r.get("deliveries_max") for r in kept)
    if ranged:
        columns.insert(6, ("range", "deliveries_range", None))
    if several_routers(rows):
        columns.insert(2, ("routers", "routers", None))
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |"]
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    for row in kept:
        shown = dict(row, deliveries_range=deliveries_range(row))
        cells = [fmt(shown.get(key), 1 if d is None else d) for _, key, d in columns]
        if contended(row):
            cells[-1] = "ok, **busy machine**"
        lines.append("| " + " | ".join(cells) + " |")
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        lines.append("")
        lines += [
            f"- **{r['scenario']} {r['server']} {fmt(r['shards'])}{routers_suffix(r)} "
            f"(round {r.get('repeat')}) failed:** {r['error']}"
            for r in failures
        ]
    return lines


def routers_suffix(row: Dict[str, Any]) -> str:
    """' x 4 routers' for a cluster row with more than one router, else ''."""
    n = row_routers(row)
    return f" x {n} routers" if row["server"] == "cluster" and n != 1 else ""


def deliveries_range(row: Dict[str, Any]) -> Optional[str]:
    """'1,086,667-1,168,782' from the row's lowest and highest repeat, if it has them."""
    low, high = row.get("deliveries_min"), row.get("deliveries_max")
    if low is None or high is None:
        return None
    return f"{fmt(low, 0)}-{fmt(high, 0)}"


def ratio_table(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The Markdown table of cluster/baseline ratios, plus stuck's kept deliveries."""
    routed = several_routers(rows)
    head = "| scenario | routers | shards |" if routed else "| scenario | shards |"
    lines = [f"{head} deliveries/s ratio | p99 ratio |"]
    lines.append("|" + " --- |" * (head.count("|") + 1))
    for r in baseline_ratios(rows):
        where = f"{r['routers']} | {r['shards']}" if routed else f"{r['shards']}"
        lines.append(
            f"| {r['scenario']} | {where} | {fmt_ratio(r['deliveries_ratio'])} "
            f"| {fmt_ratio(r['p99_ratio'])} |"
        )
    stuck = [
        (
            row["server"],
            row["shards"],
            stuck_kept(rows, row["server"], row["shards"], row_routers(row)),
        )
        for row in rows
        if row["scenario"] == "stuck"
    ]
    if any(kept for _, _, kept in stuck):
        lines += ["", "Deliveries/s kept with one stuck member per room (stuck / fanout):", ""]
        lines += [
            "| server | shards | raw ratio | per reading member |",
            "| --- | --- | --- | --- |",
        ]
        for server, shards, kept in stuck:
            lines.append(
                f"| {server} | {fmt(shards)} | {fmt_ratio(kept.get('raw'))} "
                f"| {fmt_ratio(kept.get('per_reader'))} |"
            )
    return lines


ROUTER_TABLE = (
    ("scenario", "scenario", None),
    ("routers", "routers", None),
    ("shards", "shards", None),
    ("server processes", "server_processes", None),
    ("deliveries/s", "deliveries_per_s", 0),
    ("p99 ms", "p99_ms", 2),
    ("router tier CPU%", "router_cpu_pct", 0),
    ("shards CPU%", "shards_cpu_pct", 0),
    ("router us/delivery", "router_us_per_delivery", 2),
    ("shard us/message", "shard_us_per_message", 2),
    ("status", "status", None),
)


def router_rows(kept: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The kept cluster rows, by scenario (in plan order), router count and shard count."""
    order = {name: i for i, name in enumerate(SCENARIOS)}
    cluster = [r for r in kept if r["server"] == "cluster"]
    return sorted(
        cluster, key=lambda r: (order.get(r["scenario"], 99), row_routers(r), r["shards"] or 0)
    )


def router_table(kept: Sequence[Dict[str, Any]]) -> List[str]:
    """The Markdown table of the router dimension: per configuration, throughput, p99 and
    CPU per delivery (router tier) and per message (shard tier)."""
    lines = [
        "Deliveries/s, p99 and CPU% are the kept (median) run's; *server processes* counts "
        "routers and shards, and the supervisor when there is more than one router. CPU per "
        "tier is user+system time over the measured window (read from /proc/PID/stat by the "
        "loadgen at its start and end): the router tier's per delivery, the shard tier's per "
        "published message.",
        "",
        "| " + " | ".join(h for h, _, _ in ROUTER_TABLE) + " |",
        "|" + "|".join(" --- " for _ in ROUTER_TABLE) + "|",
    ]
    for row in router_rows(kept):
        cells = [fmt(row.get(key), 1 if d is None else d) for _, key, d in ROUTER_TABLE]
        if contended(row):
            cells[-1] = "ok, **busy machine**"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goal_table(goals: Sequence[Goal]) -> List[str]:
    """The Markdown table of the goals."""
    lines = ["| goal | target | measured | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {g.name} | {g.target} | {g.measured} | **{g.verdict}** |" for g in goals]
    return lines


def write_markdown(
    path: Path,
    rows: Sequence[Dict[str, Any]],
    kept: Sequence[Dict[str, Any]],
    meta: Dict[str, Any],
    profiles: Sequence[Dict[str, Any]] = (),
) -> None:
    """The results as Markdown: how they were made, the runs, the ratios and the goals."""
    lines = [
        "# Shard experiment results",
        "",
        f"Command: `{meta['command']}`  ",
        f"Code: {meta['code']}.  ",
        f"Finished {meta['finished_at']} on {meta['machine']}; "
        f"load average before the first run: {meta['load_before']}.  ",
        f"Each run: warmup {meta['timing']['warmup']:g} s, measured "
        f"{meta['timing']['duration']:g} s, window 8, 64-byte texts, `--rate-limit 0`; "
        "loadgen on the same machine. CPU% is percent of one core over the measured "
        "window; *others* is CPU used by processes outside this run (contention); RSS is "
        "the maximum sampled, summed over router and shards (the baseline: its process). "
        f"A run during which other processes used more than {BUSY_OTHERS_PCT:g}% CPU was "
        f"repeated (up to {meta['attempts']} attempts, the least contended kept); "
        "*busy machine* marks one that never ran on a quiet machine.",
        "",
        *summary_lines(rows, kept, meta),
        "",
    ]
    for profile in profiles:
        lines += profile_section(profile)
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(
    path: Path, rows: Sequence[Dict[str, Any]], cores: int, routers: int = 1
) -> Optional[str]:
    """Deliveries/s and p99 against the shard count (the cluster at ``routers`` routers);
    return why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_HINT
    rows = [r for r in rows if r["server"] != "cluster" or row_routers(r) == routers]
    swept = sorted(
        {r["scenario"] for r in rows if r["server"] == "cluster" and r["status"] == "ok"}
    )
    swept = [s for s in swept if len(cluster_points(rows, s)) > 1]
    if not swept:
        return "no scenario ran at more than one shard count"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, scenario in enumerate(swept):
        plot_scenario(left, right, rows, scenario, colors[i % len(colors)])
    left.set_ylabel("deliveries/s")
    right.set_ylabel("p99 latency, ms")
    for axis in (left, right):
        axis.set_xlabel("shard processes")
        axis.set_xscale("log", base=2)
        ticks = sorted({r["shards"] for r in rows if r["server"] == "cluster"})
        axis.set_xticks(ticks)
        axis.set_xticklabels([str(t) for t in ticks])
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    title = "shardchat cluster vs threaded baseline"
    if routers != 1:
        title += f", {routers} routers"
    fig.suptitle(f"{title} ({cores}-core machine, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def cluster_points(
    rows: Sequence[Dict[str, Any]], scenario: str, routers: Optional[int] = None
) -> List[Dict[str, Any]]:
    """Successful cluster rows of ``scenario`` (at ``routers`` if given), by shard count."""
    points = [r for r in rows if r["scenario"] == scenario and r["server"] == "cluster"]
    if routers is not None:
        points = [r for r in points if row_routers(r) == routers]
    return sorted((r for r in points if r["status"] == "ok"), key=lambda r: r["shards"])


def router_lines(rows: Sequence[Dict[str, Any]]) -> List[Tuple[str, int, List[Dict[str, Any]]]]:
    """(scenario, routers, successful rows by shard count) of every scenario that ran at
    more than one router count: the router plot's lines."""
    out = []
    for scenario in SCENARIOS:
        counts = sorted({row_routers(r) for r in cluster_points(rows, scenario)})
        if len(counts) > 1:
            out += [(scenario, n, cluster_points(rows, scenario, n)) for n in counts]
    return out


def write_router_plot(path: Path, rows: Sequence[Dict[str, Any]], cores: int) -> Optional[str]:
    """Deliveries/s and router-tier CPU us per delivery against the total number of server
    processes, a line per scenario and router count (its points are the shard counts);
    return why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_HINT
    lines = router_lines(rows)
    if not lines:
        return "no scenario ran at more than one router count"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    router_counts = sorted({n for _, n, _ in lines})
    styles = ["-", "--", ":", "-."]
    scenarios = list(dict.fromkeys(name for name, _, _ in lines))
    for scenario, routers, points in lines:
        color = colors[router_counts.index(routers) % len(colors)]
        style = styles[scenarios.index(scenario) % len(styles)]
        xs = [r["server_processes"] for r in points]
        label = f"{scenario}, {routers} router{'s' if routers > 1 else ''}"
        for axis, key in ((left, "deliveries_per_s"), (right, "router_us_per_delivery")):
            shown = [(x, r[key], r["shards"]) for x, r in zip(xs, points) if r[key] is not None]
            if not shown:
                continue
            axis.plot(
                [x for x, _, _ in shown],
                [y for _, y, _ in shown],
                marker="o",
                linestyle=style,
                color=color,
                label=label,
            )
            for x, y, shards in shown:
                axis.annotate(
                    f"{shards}sh", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    left.set_ylabel("deliveries/s")
    right.set_ylabel("router tier CPU us per delivery")
    for axis in (left, right):
        axis.set_xlabel("server processes (routers + shards + supervisor)")
        ticks = sorted({r["server_processes"] for _, _, points in lines for r in points})
        axis.set_xticks(ticks)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"shardchat routers x shards ({cores}-core machine, loopback; point: shards)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_scenario(
    left: Any, right: Any, rows: Sequence[Dict[str, Any]], scenario: str, color: str
) -> None:
    """Draw one scenario's cluster line and its baseline reference on both axes."""
    points = cluster_points(rows, scenario)
    xs = [r["shards"] for r in points]
    base = find_row(rows, scenario, "baseline")
    for axis, key in ((left, "deliveries_per_s"), (right, "p99_ms")):
        ys = [r[key] for r in points]
        axis.plot(xs, ys, marker="o", color=color, label=f"{scenario}: cluster (median run)")
        if key == "deliveries_per_s" and all(r.get("deliveries_min") for r in points):
            low = [y - r["deliveries_min"] for y, r in zip(ys, points)]
            high = [r["deliveries_max"] - y for y, r in zip(ys, points)]
            axis.errorbar(
                xs, ys, yerr=[low, high], fmt="none", ecolor=color, capsize=4, label="range of runs"
            )
        if base is not None and base[key] is not None:
            axis.axhline(
                base[key], color=color, linestyle="--", label=f"{scenario}: threaded baseline"
            )


# --- main -------------------------------------------------------------------------------------


def parse_counts(text: str) -> List[int]:
    """'1,2,4' -> [1, 2, 4] (argparse type)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("counts must be at least 1")
    return counts


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {text!r}")
    return value


def seconds(text: str) -> float:
    """argparse type: a number of seconds, not negative."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds: {text!r}")
    return value


#: The scenario of several nodes on one Redis (scripts/nodes_experiment.py), run on its own.
NODES = "nodes"


def parse_scenarios(text: str) -> List[str]:
    """'fanout,stuck' -> ['fanout', 'stuck'] (argparse type)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in SCENARIOS and n != NODES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join([*SCENARIOS, NODES])}"
        )
    return names


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse the command line (exits with status 2 on bad arguments)."""
    parser = argparse.ArgumentParser(
        description="Run the cluster at several shard counts and the threaded baseline "
        "under the load generator; write CSV, Markdown and (with matplotlib) a PNG plot "
        "into a new results/<date>-<time>/ and print the tables. The full run takes about "
        "11 minutes; --quick about 30 s.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seconds-long smoke run: tiny sizes, ~1 s runs, shards 1,2",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default: a new results/<date>-<time>/; --out docs/perf "
        "replaces the published results)",
    )
    parser.add_argument(
        "--scenarios",
        type=parse_scenarios,
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default all)",
    )
    parser.add_argument(
        "--shards",
        type=parse_counts,
        help="shard counts for the swept scenarios (default 1,2,4,8; --quick 1,2); also "
        "those of the router sweep (default 1,2,4)",
    )
    parser.add_argument(
        "--routers",
        type=parse_counts,
        default=[1],
        help="router counts (default 1). One count: every cluster run has that many "
        "routers. Several: the other runs use the fewest, and "
        f"{' and '.join(ROUTER_SWEEP_SCENARIOS)} (those of --scenarios) also run at every "
        "router count x every shard count (--shards, default "
        f"{','.join(map(str, ROUTER_SWEEP_SHARDS))}), reporting CPU us per delivery (router "
        "tier) and per message (shard tier) and plotting deliveries/s against the number "
        "of server processes",
    )
    parser.add_argument(
        "--sweep",
        type=parse_scenarios,
        default=["fanout"],
        help="scenarios run at every --shards count (default fanout)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        help="runs of every configuration; the tables show the one with the median "
        "deliveries/s (default 3; --quick 1)",
    )
    parser.add_argument(
        "--attempts",
        type=positive_int,
        help=f"runs of each configuration while other processes use more than "
        f"{BUSY_OTHERS_PCT:g}%% CPU during it; the least contended is kept "
        "(default 3; --quick 1)",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        type=parse_scenarios,
        const=["fanout"],
        default=[],
        metavar="SCENARIOS",
        help="after the runs, one more run of each scenario (default fanout) at "
        "--fixed-shards with py-spy recording the router; top frames go into the "
        "Markdown, raw stacks into router_profile_<scenario>.txt",
    )
    parser.add_argument(
        "--fixed-shards",
        type=positive_int,
        help="shard count for the other scenarios and the goals (default: the cluster's "
        "default, the CPU count but at least 2; --quick 2)",
    )
    parser.add_argument(
        "--duration", type=seconds, help="measured seconds per run (default 10; --quick 1)"
    )
    parser.add_argument(
        "--warmup", type=seconds, help="seconds before measuring (default 2; --quick 0.3)"
    )
    args = parser.parse_args(argv)
    if args.duration == 0:
        parser.error("--duration must be more than 0")
    return args


def machine_description() -> str:
    """CPU model, core count, OS and Python version of this machine."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass  # not Linux: platform.processor() will do
    return (
        f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def load_average() -> Optional[str]:
    """The 1/5/15-minute load averages as text, or None where the OS has none."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return None


def one_run(spec: RunSpec, timing: Timing) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Execute ``spec``; return its CSV row and its raw record for the JSON file."""
    load = load_average()
    started_at = datetime.datetime.now().isoformat(timespec="seconds")
    t0 = time.monotonic()
    result, tiers = execute(spec, timing)
    row = make_row(spec, result, tiers)
    row.update(load1_before=(load or "").split("/")[0] or None, started_at=started_at)
    row["wall_s"] = round(time.monotonic() - t0, 1)
    raw = {"run": spec.label, "shards": spec.shards, "routers": row["routers"]}
    raw.update(pids=tiers.pids if tiers else [], result=result)
    if tiers is not None and spec.server == "cluster":
        raw["tiers"] = tiers.as_dict()
    return row, raw


def resolve(args: argparse.Namespace) -> Tuple[Timing, List[int], int, Path]:
    """Timing, swept shard counts, fixed shard count and output directory for ``args``."""
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    if args.duration is not None:
        timing = replace(timing, duration=args.duration)
    if args.warmup is not None:
        timing = replace(timing, warmup=args.warmup)
    counts = args.shards or ([1, 2] if args.quick else [1, 2, 4, 8])
    fixed = args.fixed_shards or (2 if args.quick else max(2, os.cpu_count() or 1))
    out = args.out
    if out is None:
        out = fresh_directory(RESULTS, args.quick, datetime.datetime.now())
    return timing, counts, fixed, out


def resolve_routers(args: argparse.Namespace) -> Tuple[List[int], List[int]]:
    """Router counts and the router sweep's shard counts for ``args``."""
    shards = args.shards or ([1, 2] if args.quick else list(ROUTER_SWEEP_SHARDS))
    return sorted(set(args.routers)), shards


def fresh_directory(base: Path, quick: bool, now: datetime.datetime) -> Path:
    """Create and return a directory under ``base`` that no earlier run used.

    Named after ``now`` (``2026-11-26-142501``, ``-quick`` for a smoke run), with ``-2``,
    ``-3``... if that exists already.
    """
    name = now.strftime("%Y-%m-%d-%H%M%S") + ("-quick" if quick else "")
    base.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = base / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"no fresh directory for {name} in {base}")


def estimate_seconds(runs: int, timing: Timing, profiles: int) -> float:
    """About how long ``runs`` runs and ``profiles`` profile runs take (not counting the
    repeats a busy machine causes)."""
    per_run = timing.warmup + timing.duration + RUN_OVERHEAD_S + timing.pause
    return (runs + profiles) * per_run


def about(seconds: float) -> str:
    """``about 40 s`` / ``about 11 minutes``."""
    if seconds < 90:
        return f"about {max(5, round(seconds / 5) * 5):.0f} s"
    return f"about {round(seconds / 60):.0f} minutes"


def log(message: str) -> None:
    """Progress for the person running the experiment (stderr; stdout stays quiet)."""
    print(message, file=sys.stderr, flush=True)


def contended(row: Dict[str, Any]) -> bool:
    """True if processes outside the run used more than BUSY_OTHERS_PCT of CPU during it."""
    others = row.get("others_cpu_pct")
    return row["status"] == "ok" and others is not None and others > BUSY_OTHERS_PCT


def attempt_run(
    spec: RunSpec, timing: Timing, attempts: int, label: str
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Run ``spec`` up to ``attempts`` times until the machine was quiet during it.

    Keeps the least contended attempt (a failed one only if all failed); the others'
    headline numbers stay in the raw record, so nothing measured is hidden.
    """
    tries: List[Tuple[Dict[str, Any], Dict[str, Any]]] = []
    for attempt in range(1, attempts + 1):
        row, raw = one_run(spec, timing)
        tries.append((row, raw))
        if not contended(row) or attempt == attempts:
            break
        log(
            f"{label}: machine busy ({fmt(row['others_cpu_pct'], 0)}% CPU outside the run, "
            f"{fmt(row['deliveries_per_s'], 0)} deliveries/s); waiting {timing.retry_wait:g} s "
            f"for attempt {attempt + 1}/{attempts}"
        )
        time.sleep(timing.retry_wait)
    row, raw = min(tries, key=lambda t: (t[0]["status"] != "ok", t[0]["others_cpu_pct"] or 0))
    row["attempts"] = len(tries)
    raw["other_attempts"] = [
        {k: r[k] for k in ("deliveries_per_s", "p99_ms", "others_cpu_pct", "status", "error")}
        for r, _ in tries
        if r is not row
    ]
    return row, raw


def run_all(
    runs: Sequence[RunSpec], timing: Timing, attempts: int, repeats: int
) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Execute ``runs`` ``repeats`` times, one after another, logging a line for each.

    The repeats are rounds over the whole plan rather than back to back, so a slow drift
    of the machine touches every configuration alike.
    """
    total = len(runs) * repeats
    index = 0
    for round_ in range(1, repeats + 1):
        for spec in runs:
            index += 1
            if index > 1:
                time.sleep(timing.pause)
            label = f"[{index}/{total}] {spec.label}"
            if repeats > 1:
                label += f" (round {round_}/{repeats})"
            row, raw = attempt_run(spec, timing, attempts, label)
            row["repeat"] = round_
            log(progress_line(label, row))
            yield row, raw


def mark_kept(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mark one row per configuration as ``kept``: the repeat with the median deliveries/s.

    The kept row keeps all its own numbers (nothing is averaged across runs) and gains
    the lowest and highest deliveries/s of its configuration's successful repeats. A
    configuration whose repeats all failed keeps its first failure. Returns the kept rows.
    """
    groups: Dict[Tuple[Any, Any, Any, Any], List[Dict[str, Any]]] = {}
    for row in rows:
        row["kept"] = False
        key = (row["scenario"], row["server"], row["shards"], row.get("routers"))
        groups.setdefault(key, []).append(row)
    kept = []
    for group in groups.values():
        ok = sorted(
            (r for r in group if r["status"] == "ok"), key=lambda r: r["deliveries_per_s"] or 0
        )
        chosen = ok[(len(ok) - 1) // 2] if ok else group[0]
        chosen["kept"] = True
        if ok:
            chosen["deliveries_min"] = ok[0]["deliveries_per_s"]
            chosen["deliveries_max"] = ok[-1]["deliveries_per_s"]
        kept.append(chosen)
    return kept


def write_results(
    out: Path,
    rows: List[Dict[str, Any]],
    kept: List[Dict[str, Any]],
    raws: List[Dict[str, Any]],
    meta: Dict[str, Any],
    profiles: List[Dict[str, Any]],
) -> List[Path]:
    """Write CSV, Markdown, JSON and (if possible) the PNG into ``out``; return the paths."""
    paths = [out / f"{STEM}.csv", out / f"{STEM}.md", out / f"{STEM}.json"]
    write_csv(paths[0], rows)
    write_markdown(paths[1], rows, kept, meta, profiles)
    document = {"meta": meta, "rows": rows, "runs": raws, "profiles": profiles}
    paths[2].write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    png = out / f"{STEM}.png"
    skipped = write_plot(png, kept, os.cpu_count() or 1, meta.get("fixed_routers", 1))
    if skipped:
        log(f"no plot: {skipped}")
    else:
        paths.append(png)
    if len(meta.get("router_counts", [1])) > 1:
        routers_png = out / ROUTER_PLOT
        skipped = write_router_plot(routers_png, kept, os.cpu_count() or 1)
        if skipped:
            log(f"no router plot: {skipped}")
        else:
            paths.append(routers_png)
    return paths


def profile_all(
    names: Sequence[str], shards: int, timing: Timing, out: Path, quick: bool
) -> List[Dict[str, Any]]:
    """With ``--profile``: one more run per scenario with py-spy on the router; summaries."""
    if not names:
        return []
    if shutil.which("py-spy") is None:
        log("no profile: py-spy is not installed (pip install py-spy)")
        return [{"scenario": n, "error": "py-spy is not installed"} for n in names]
    summaries = []
    for name in names:
        scenario = SCENARIOS[name]
        spec = RunSpec(scenario, "cluster", shards, scenario.quick_size if quick else scenario.size)
        time.sleep(timing.pause)
        summary, result = profile_run(spec, timing, out)
        summary["result"] = result
        if summary.get("error"):
            log(f"[profile] {spec.label}: FAILED: {summary['error']}")
        else:
            log(f"[profile] {spec.label}: {summary['samples']} samples in {out / summary['file']}")
        summaries.append(summary)
    return summaries


def code_version() -> str:
    """The checkout's commit, and which of the measured programs differ from it."""
    measured = ["router", "shard", "common", "scripts/start_cluster.py", "scripts/loadgen.py"]
    measured.append("scripts/baseline_threaded_server.py")
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *measured],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    except OSError:
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changed = sorted({line[3:].strip() for line in dirty.stdout.splitlines() if line.strip()})
    suffix = f" plus uncommitted changes to {', '.join(changed)}" if changed else ""
    return f"commit {head.stdout.strip()}{suffix}"


def main(argv: Optional[List[str]] = None) -> int:
    """Run the experiment and write its results; see the module docstring for exit codes."""
    args = parse_args(argv)
    timing, counts, fixed, out = resolve(args)
    if NODES in args.scenarios:  # a Redis and one or two nodes per run: its own table
        if str(ROOT) not in sys.path:  # (run as a script: the checkout, not an install)
            sys.path.insert(0, str(ROOT))
        from scripts.nodes_experiment import run_nodes, table

        rows = run_nodes(out, timing, args.repeats or (1 if args.quick else 3), fixed)
        print("\n".join(table(rows)), flush=True)
        args.scenarios = [name for name in args.scenarios if name != NODES]
        if not args.scenarios:
            return 0 if all(row["status"] == "ok" for row in rows) else 1
    router_counts, router_shards = resolve_routers(args)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(
        args.scenarios, counts, args.sweep, fixed, args.quick, router_counts, router_shards
    )
    attempts = args.attempts or (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 3)
    load_before = load_average()
    estimate = estimate_seconds(len(runs) * repeats, timing, len(args.profile))
    log(
        f"{len(runs)} configurations x {repeats} = {len(runs) * repeats} runs "
        f"({timing.duration:g} s measured each): {about(estimate)}, longer if a busy "
        f"machine makes runs repeat; load average {load_before}; results into {out}"
    )
    rows: List[Dict[str, Any]] = []
    raws: List[Dict[str, Any]] = []
    for row, raw in run_all(runs, timing, attempts, repeats):
        rows.append(row)
        raws.append(raw)
    kept = mark_kept(rows)
    meta = {
        "command": " ".join(
            ["python scripts/shard_experiment.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_description(),
        "code": code_version(),
        "load_before": load_before,
        "load_after": load_average(),
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "timing": timing.__dict__,
        "shard_counts": counts,
        "busy_others_pct": BUSY_OTHERS_PCT,
        "attempts": attempts,
        "repeats": repeats,
        "fixed_shards": fixed,
        "router_counts": router_counts,
        "router_shards": router_shards if len(router_counts) > 1 else [],
        "fixed_routers": min(router_counts),
        "quick": args.quick,
    }
    profiles = profile_all(args.profile, fixed, timing, out, args.quick)
    for path in write_results(out, rows, kept, raws, meta, profiles):
        log(f"wrote {path}")
    print("\n".join(summary_lines(rows, kept, meta)), flush=True)
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def summary_lines(
    rows: Sequence[Dict[str, Any]], kept: Sequence[Dict[str, Any]], meta: Dict[str, Any]
) -> List[str]:
    """The tables of the Markdown file (runs, routers, ratios, goals), for stdout."""
    routers = meta.get("fixed_routers", 1)
    where = f"{meta['fixed_shards']} shards" + (f", {routers} routers" if routers != 1 else "")
    lines = ["## Runs", "", *runs_note(meta), *run_table(rows, kept), ""]
    if meta.get("router_counts", [1]) != [1]:
        lines += ["## Routers x shards", "", *router_table(kept), ""]
    return [
        *lines,
        "## Cluster against the threaded baseline",
        "",
        *ratio_table(kept),
        "",
        f"## Goals (cluster at {where})",
        "",
        *goal_table(evaluate_goals(kept, meta["fixed_shards"], routers)),
    ]


if __name__ == "__main__":
    sys.exit(main())
