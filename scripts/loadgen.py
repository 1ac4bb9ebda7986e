#!/usr/bin/env python3
"""Closed-loop load generator for shardchat (and the threaded baseline).

Scenarios (each prints ONE JSON object of results on stdout; progress goes to stderr):

``fanout``
    R rooms x M members (TCP connections), P publishers per room (members 0..P-1), one
    *probe* member per room (the first member that is not a publisher). Each publisher
    keeps at most W messages that its room's probe has not received yet: a closed loop,
    so this measures capacity, not a fixed rate. Texts carry ``lg:<publisher>:<counter>:
    <monotonic_ns>:`` padded to ``--text-bytes``; the probe computes latency from them.
``connections``
    ``fanout`` with defaults of 100 rooms x 51 members (50 listeners + 1 publisher each,
    5,100 connections); the point is ``connect_join_s``, reported by every scenario.
``longpoll``
    the same closed loop over the HTTP long-poll API: M pollers per room (POST /api/join,
    then GET /api/poll?room=R&after=<last id> in a loop), publishers posting via
    POST /api/send on a second keep-alive connection of the same session.
``stuck``
    ``fanout`` where the last member of each room joins and then never reads again (with
    a small receive buffer, ``--stuck-rcvbuf``). The server's own send buffer for that
    connection (Linux autotunes it up to tcp_wmem's max, 4 MB by default) still fills
    first: at 64-byte texts that is ~45,000 messages per room, so use a long
    ``--duration`` or a large ``--text-bytes`` to reach the point where it matters.

A *delivery* is one MSG line (or one of our messages in a poll response) received by one
member; every member counts, by counting ``b"\\nMSG "`` in whole received chunks, and only
probes parse lines. ``losses`` = published x reading members - delivered, after a drain.

Result keys: ``deliveries``/``published`` (and ``_per_s``) over the measured window;
``latency_ms`` {p50, p99, max, mean, samples} from the probes over that window;
``connect_join_s`` (connect + JOIN confirmed for everyone); ``published_total``,
``delivered_total``, ``expected_total``, ``losses`` over the whole run; ``probe_gaps`` and
``probe_reordered`` (per-publisher counters seen out of sequence by a probe; refused
messages also leave gaps);
``error_lines``, ``send_failures`` (refused messages: not published, not losses),
``disconnected``; ``timeline_deliveries_per_s``; ``stuck`` {members, received after
resuming, closed_by_server}; ``resources`` {loadgen, <pid>: cpu_percent over the window,
rss_kib, rss_max_kib; machine: cores, cpu_percent, others_cpu_percent}. A run that cannot
start prints ``{"scenario": ..., "error": ...}`` and exits 1.

Example::

    python scripts/loadgen.py fanout --rooms 10 --members 20 --publishers 2 --window 8 \\
        --duration 10 --tcp-port 5100

Only loopback targets are accepted, and every phase is bounded in time. One process:
all member sockets sit in one epoll set read in a tight loop (see ``ReadMux``); check
``resources.loadgen.cpu_percent`` to see that the load generator is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import secrets
import select
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

logger = logging.getLogger("loadgen")

MARKER = "lg:"  # prefix of every text we publish; other lines are not ours
MSG_PATTERN = b"\nMSG "  # a delivery: an MSG line (we count it at line starts)
ERROR_PATTERN = b"\nERROR "  # a refusal seen by a member during the run
TAIL_BYTES = len(ERROR_PATTERN) - 1  # bytes kept per connection to count across chunks
READ_BUFFER_BYTES = 256 * 1024  # one shared receive buffer; big reads keep us cheap
PROGRESS_EVERY_S = 1.0  # stderr progress interval
SAMPLE_EVERY_S = 0.5  # RSS sampling interval for --pids
REFUSED_BACKOFF_S = 0.05  # pause after the server refused a message (e.g. a rate limit)
STUCK_RESUME_S = 1.0  # after the drain, how long stuck members read to see what is left


# --- counting ---------------------------------------------------------------------------


def count_across(tail: bytes, data: Any, n: int, pattern: bytes) -> int:
    """Count ``pattern`` in ``data[:n]``, including matches that start in ``tail``.

    ``tail`` is the end of the stream before ``data`` (at least ``len(pattern) - 1``
    bytes, or the whole stream so far). ``data`` is bytes or a bytearray; it is not
    copied except for its first few bytes.
    """
    k = len(pattern) - 1
    edge = tail[-k:] + bytes(data[: min(k, n)])
    return data.count(pattern, 0, n) + edge.count(pattern)


def next_tail(tail: bytes, data: Any, n: int) -> bytes:
    """Return the last TAIL_BYTES of the stream after appending ``data[:n]`` to ``tail``."""
    if n >= TAIL_BYTES:
        return bytes(data[n - TAIL_BYTES : n])
    return (tail + bytes(data[:n]))[-TAIL_BYTES:]


def count_lines(tail: bytes, data: Any, n: int) -> tuple[int, int, bytes]:
    """Count MSG and ERROR lines in ``data[:n]``; return them and the new tail.

    ``tail`` is what ``next_tail`` returned for the stream so far, or ``b"\\n"`` when
    the stream so far ended a line (the usual case: servers write whole lines), which
    makes the line-start check a cheap ``startswith``.
    """
    if tail == b"\n" and n >= TAIL_BYTES:
        delivered = data.count(MSG_PATTERN, 0, n) + data.startswith(MSG_PATTERN[1:], 0, n)
        errors = data.count(ERROR_PATTERN, 0, n) + data.startswith(ERROR_PATTERN[1:], 0, n)
    else:
        delivered = count_across(tail, data, n, MSG_PATTERN)
        errors = count_across(tail, data, n, ERROR_PATTERN)
    if n and data[n - 1] == 10:  # ends with LF: a line starts next
        return delivered, errors, b"\n"
    return delivered, errors, next_tail(tail, data, n)


def make_text(pid: int, counter: int, now_ns: int, pad: str) -> str:
    """Return the text of message ``counter`` of publisher ``pid`` sent at ``now_ns``."""
    head = f"{MARKER}{pid}:{counter}:{now_ns}:"
    return head + pad[len(head) :]


def parse_text(text: bytes) -> tuple[int, int, int] | None:
    """Return (publisher id, counter, send time ns) of one of our texts, else None."""
    if not text.startswith(b"lg:"):
        return None
    parts = text.split(b":", 4)
    if len(parts) < 5:
        return None
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of a non-empty sorted list."""
    index = max(0, min(len(sorted_values) - 1, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


# --- shared run state ---------------------------------------------------------------------


class Stats:
    """Counters shared by every connection of one run (single event loop, no locks)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.published = 0
        self.error_lines = 0
        self.send_failures = 0
        self.disconnected = 0
        self.measuring = False
        self.latencies_ns: list[int] = []
        self.probe_gaps = 0
        self.probe_reordered = 0
        self.timeline: list[int] = []  # deliveries in each second since publishing began


class Publisher:
    """One publisher's closed-loop window; subclasses know how to send."""

    def __init__(self, pid: int, room: RoomPlan, run: Run) -> None:
        self.pid = pid
        self.room = room
        self.run = run
        self.inflight = 0
        self.counter = 0

    def start(self) -> None:
        """Begin publishing (fill the window)."""
        raise NotImplementedError

    def ack(self) -> None:
        """The probe received one of our messages: a window slot is free."""
        self.inflight -= 1

    def stop(self) -> None:
        """Stop publishing (messages in flight are left to drain)."""

    def refused(self, k: int) -> None:
        """The server refused ``k`` of our messages: they were not published.

        Their window slots are freed (the probe will never see them) and they are taken
        out of the published counts, so that losses count only accepted messages.
        """
        self.inflight -= k
        self.room.published -= k
        self.run.stats.published -= k
        self.run.stats.send_failures += k

    def take(self, k: int) -> list[str]:
        """Account for ``k`` new messages and return their texts."""
        now = time.monotonic_ns()
        pad = self.run.pad
        texts = [make_text(self.pid, self.counter + i, now, pad) for i in range(k)]
        self.counter += k
        self.inflight += k
        self.room.published += k
        self.run.stats.published += k
        return texts


class RoomPlan:
    """One room of the run: its name and what was published to it."""

    def __init__(self, index: int, name: str, readers: int) -> None:
        self.index = index
        self.name = name
        self.readers = readers  # members expected to receive every message
        self.published = 0


class Run:
    """Everything one scenario run shares: parameters, stats, publishers, probes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stats = Stats()
        self.publishing = False
        self.pad = "x" * args.text_bytes
        self.publishers: list[Publisher] = []
        self.rooms: list[RoomPlan] = []
        self.next_counter: dict[int, int] = {}
        self.touched: set[Publisher] = set()
        self.read_buffer = bytearray(READ_BUFFER_BYTES)
        self.readers = ReadMux(asyncio.get_running_loop())

    def on_probe(self, pid: int, counter: int, sent_ns: int, now_ns: int) -> None:
        """A probe received message ``counter`` of publisher ``pid``."""
        if not 0 <= pid < len(self.publishers):
            return
        expected = self.next_counter.get(pid, 0)
        if counter > expected:
            self.stats.probe_gaps += counter - expected
        elif counter < expected:
            self.stats.probe_reordered += 1
        self.next_counter[pid] = max(expected, counter + 1)
        if self.stats.measuring:
            self.stats.latencies_ns.append(now_ns - sent_ns)
        publisher = self.publishers[pid]
        publisher.ack()
        self.touched.add(publisher)

    def flush_acks(self) -> None:
        """Let publishers whose window slots were freed send again."""
        if self.touched:
            touched, self.touched = self.touched, set()
            for publisher in touched:
                publisher.start()

    def expected(self) -> int:
        """Deliveries expected so far: published x reading members, per room."""
        return sum(room.published * room.readers for room in self.rooms)


# --- TCP members ------------------------------------------------------------------------


class ReadMux:
    """Read callbacks for many sockets, watched by the event loop as ONE file descriptor.

    The sockets sit in an epoll set of our own whose descriptor is registered with the
    event loop; when it is readable, ``sweep`` runs the callbacks of every ready socket
    in one tight loop. Sockets are still read as soon as data arrives; what this saves is
    the loop's per-socket bookkeeping (a handle, a context switch into it) on the hot
    path. Without epoll (not Linux) each socket is simply registered with the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.callbacks: dict[int, Callable[[], None]] = {}
        self.epoll = select.epoll() if hasattr(select, "epoll") else None
        if self.epoll is not None:
            loop.add_reader(self.epoll.fileno(), self.sweep)

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable (or has an error or hang-up)."""
        if self.epoll is None:
            self.loop.add_reader(fd, callback)
            return
        self.callbacks[fd] = callback
        self.epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""
        if self.epoll is None:
            self.loop.remove_reader(fd)
        elif self.callbacks.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def sweep(self) -> None:
        """Run the callback of every ready socket once."""
        assert self.epoll is not None
        callbacks = self.callbacks
        for fd, _ in self.epoll.poll(0):
            callback = callbacks.get(fd)
            if callback is not None:
                callback()

    def close(self) -> None:
        """Release the epoll set."""
        if self.epoll is not None:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()
            self.epoll = None


class JoinError(Exception):
    """The server refused a JOIN or closed the connection before confirming it."""


class Member:
    """A TCP member: joins one room, then counts MSG lines in whole received chunks.

    Reading is a plain callback (``on_readable``, run by ``ReadMux``) on a non-blocking
    socket rather than an asyncio transport and protocol: this is the load generator's
    hot path (one call per received chunk, hundreds of thousands a second), and the
    callback does one ``recv_into`` into the run's shared buffer and two ``count`` calls.
    The member owns its socket; ``close`` releases it.
    """

    def __init__(self, run: Run, room: RoomPlan, username: str, counts: bool = True) -> None:
        self.run = run
        self.room = room
        self.counts = counts
        self.loop = asyncio.get_running_loop()
        self.join_line = f"JOIN {room.name} {username}\n".encode()
        self.joined_marker = f"\nINFO joined room {room.name}\n".encode()
        self.joined: asyncio.Future[None] = self.loop.create_future()
        self.sock: socket.socket | None = None
        self.pending: bytearray | None = bytearray(b"\n")  # None once joined
        self.outbuf = bytearray()
        self.tail = b"\n"
        self.received = 0
        self.publisher: Publisher | None = None  # set if this member publishes
        self.lost = False
        self.reading = False
        self.port = 0  # --tcp-ports: the node this member connects to (0: --tcp-port)

    async def open(self, rcvbuf: int = 0) -> None:
        """Connect, send JOIN and wait for ``INFO joined room R``; raise JoinError/OSError."""
        args = self.run.args
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        self.sock = sock
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await self.loop.sock_connect(sock, (args.host, self.port or args.tcp_port))
        self.resume()
        self.write(self.join_line)
        await self.joined

    def on_readable(self) -> None:
        """Read one chunk; count it (or, while joining, look for the join reply)."""
        assert self.sock is not None
        buf = self.run.read_buffer
        try:
            n = self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.on_lost(exc)
            return
        if n == 0:
            self.on_lost(None)
        elif self.pending is None:
            self.consume(buf, n)
        else:
            self.pending += buf[:n]
            self.check_joined()

    def check_joined(self) -> None:
        """Finish the join when ``INFO joined room R`` has arrived; fail on an ERROR."""
        assert self.pending is not None
        index = self.pending.find(self.joined_marker)
        if index < 0:
            error_at = self.pending.find(b"\nERROR ")
            if error_at >= 0 and self.pending.find(b"\n", error_at + 1) >= 0:
                line = bytes(self.pending[error_at + 1 :]).split(b"\n", 1)[0]
                self.fail_join(JoinError(line.decode("utf-8", "replace")))
            return
        rest = bytes(self.pending[index + len(self.joined_marker) :])
        self.pending = None
        if not self.joined.done():
            self.joined.set_result(None)
        self.consume(rest, len(rest))

    def fail_join(self, exc: Exception) -> None:
        """Fail the pending join with ``exc``."""
        if not self.joined.done():
            self.joined.set_exception(exc)

    def consume(self, data: Any, n: int) -> None:
        """Count MSG and ERROR lines in ``data[:n]`` (bytes or the shared bytearray)."""
        delivered, errors, self.tail = count_lines(self.tail, data, n)
        self.received += delivered
        if self.counts:
            self.run.stats.delivered += delivered
        if errors:
            self.run.stats.error_lines += errors
            if self.publisher is not None:
                self.publisher.refused(errors)

    def write(self, data: bytes) -> None:
        """Send ``data`` now, queueing what the socket does not take at once."""
        if self.sock is None or self.lost:
            return
        if self.outbuf:
            self.outbuf += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.on_lost(exc)
            return
        if sent < len(data):
            self.outbuf += data[sent:]
            self.loop.add_writer(self.sock.fileno(), self.on_writable)

    def on_writable(self) -> None:
        """Send queued bytes; stop watching for writability once they are all gone."""
        assert self.sock is not None
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.on_lost(exc)
            return
        del self.outbuf[:sent]
        if not self.outbuf:
            self.loop.remove_writer(self.sock.fileno())

    def pause(self) -> None:
        """Stop reading (the kernel buffers fill, then the server's sends stall)."""
        if self.sock is not None and self.reading:
            self.run.readers.remove(self.sock.fileno())
            self.reading = False

    def resume(self) -> None:
        """Start (or restart) reading."""
        if self.sock is not None and not self.reading and not self.lost:
            self.run.readers.add(self.sock.fileno(), self.on_readable)
            self.reading = True

    def on_lost(self, exc: Exception | None) -> None:
        """The server closed or reset the connection: record it and stop watching."""
        if self.lost:
            return
        self.fail_join(JoinError(f"connection closed while joining: {exc!r}"))
        self.release()
        self.lost = True
        self.run.stats.disconnected += 1

    def release(self) -> None:
        """Unregister from the loop."""
        if self.sock is None:
            return
        self.pause()
        if self.outbuf:
            self.loop.remove_writer(self.sock.fileno())
            self.outbuf.clear()

    def close(self) -> None:
        """Close the connection (ours, so not counted as a disconnect)."""
        if self.sock is not None:
            self.release()
            self.sock.close()
            self.sock = None
        self.fail_join(JoinError("closed"))
        if not self.joined.cancelled() and self.joined.done():
            self.joined.exception()  # retrieved: no "never retrieved" warning


class Probe(Member):
    """A member that also parses its MSG lines for latency and window acknowledgements."""

    def __init__(self, run: Run, room: RoomPlan, username: str) -> None:
        super().__init__(run, room, username)
        self.partial = b""

    def consume(self, data: Any, n: int) -> None:
        """Count, then parse complete lines of ``data[:n]``."""
        super().consume(data, n)
        now_ns = time.monotonic_ns()
        lines = (self.partial + bytes(data[:n])).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line.startswith(b"MSG "):
                fields = line.split(b" ", 3)
                parsed = parse_text(fields[3]) if len(fields) == 4 else None
                if parsed is not None:
                    self.run.on_probe(parsed[0], parsed[1], parsed[2], now_ns)
        self.run.flush_acks()


class TcpPublisher(Publisher):
    """A publisher writing ``MSG`` lines on its member's connection."""

    def __init__(self, pid: int, room: RoomPlan, run: Run, member: Member) -> None:
        super().__init__(pid, room, run)
        self.member = member
        self.prefix = f"MSG {room.name} "

    def refused(self, k: int) -> None:
        """Free the refused messages' slots; refill after a pause, not in a tight loop."""
        super().refused(k)
        asyncio.get_running_loop().call_later(REFUSED_BACKOFF_S, self.start)

    def start(self) -> None:
        """Send enough messages, in one write, to fill the window."""
        free = self.run.args.window - self.inflight
        if free <= 0 or not self.run.publishing or self.member.lost:
            return
        prefix = self.prefix
        data = "".join(f"{prefix}{text}\n" for text in self.take(free))
        self.member.write(data.encode())


# --- resource sampling ------------------------------------------------------------------


class ProcSampler:
    """Samples CPU time and RSS of processes from /proc (Linux only; else reports nothing)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.available = os.path.isdir("/proc/self")
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start_cpu: dict[str, float] = {}
        self.end_cpu: dict[str, float] = {}
        self.rss_max: dict[str, int] = {}
        self.rss_last: dict[str, int] = {}
        self.t0 = self.t1 = 0.0
        self.busy: list[tuple[float, float]] = []  # (busy, total) jiffies at begin, end

    def cpu_seconds(self, pid: int) -> float | None:
        """Return user+system CPU seconds of ``pid``, or None if unreadable."""
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / self.ticks  # utime, stime

    def rss_kib(self, pid: int) -> int | None:
        """Return the resident set size of ``pid`` in KiB, or None if unreadable."""
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            return None
        return None

    def sample_rss(self) -> None:
        """Record the current RSS of every pid."""
        for name, pid in self.pids.items():
            rss = self.rss_kib(pid) if self.available else None
            if rss is not None:
                self.rss_last[name] = rss
                self.rss_max[name] = max(rss, self.rss_max.get(name, 0))

    def machine_jiffies(self) -> tuple[float, float] | None:
        """Return (busy, total) CPU jiffies of the whole machine from /proc/stat."""
        try:
            with open("/proc/stat", encoding="ascii") as f:
                values = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
        total = sum(values[:8])  # guest time is already counted in user
        return total - idle, total

    def mark(self, into: dict[str, float]) -> float:
        """Record CPU seconds of every pid into ``into``; return the time."""
        jiffies = self.machine_jiffies() if self.available else None
        if jiffies is not None:
            self.busy.append(jiffies)
        for name, pid in self.pids.items():
            cpu = self.cpu_seconds(pid) if self.available else None
            if cpu is not None:
                into[name] = cpu
        return time.monotonic()

    def begin(self) -> None:
        """Start of the measured window."""
        self.t0 = self.mark(self.start_cpu)

    def end(self) -> None:
        """End of the measured window."""
        self.t1 = self.mark(self.end_cpu)

    async def run_sampling(self) -> None:
        """Sample RSS periodically until cancelled."""
        while True:
            self.sample_rss()
            await asyncio.sleep(SAMPLE_EVERY_S)

    def report(self) -> dict[str, Any]:
        """Return per-process CPU% over the window, last and max RSS."""
        if not self.available:
            return {"available": False}
        out: dict[str, Any] = {}
        wall = max(self.t1 - self.t0, 1e-9)
        for name, pid in self.pids.items():
            entry: dict[str, Any] = {"pid": pid}
            if name in self.start_cpu and name in self.end_cpu:
                used = self.end_cpu[name] - self.start_cpu[name]
                entry["cpu_percent"] = round(100.0 * used / wall, 1)
            entry["rss_kib"] = self.rss_last.get(name)
            entry["rss_max_kib"] = self.rss_max.get(name)
            out[name] = entry
        if len(self.busy) == 2:
            busy = self.busy[1][0] - self.busy[0][0]
            total = max(self.busy[1][1] - self.busy[0][1], 1e-9)
            cores = os.cpu_count() or 1
            # Busy share of all cores, in "percent of one core" like the per-pid numbers.
            machine = 100.0 * cores * busy / total
            ours = sum(entry.get("cpu_percent", 0.0) for entry in out.values())
            out["machine"] = {
                "cores": cores,
                "cpu_percent": round(machine, 1),
                "others_cpu_percent": round(max(0.0, machine - ours), 1),  # contention
            }
        return out


# --- scenario driving -------------------------------------------------------------------


def make_rooms(args: argparse.Namespace, readers: int) -> list[RoomPlan]:
    """Return the run's rooms, named with a random tag so runs never share a room."""
    tag = args.tag or secrets.token_hex(3)
    return [RoomPlan(r, f"lg{tag}r{r}", readers) for r in range(args.rooms)]


def probe_index(args: argparse.Namespace) -> int:
    """Return the member index of each room's probe (the first non-publisher if any)."""
    return args.publishers if args.publishers < args.members else 0


async def gather_bounded(jobs: list[Callable[[], Awaitable[Any]]], limit: int) -> None:
    """Run ``jobs`` with at most ``limit`` at a time; raise the first failure."""
    semaphore = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with semaphore:
            await job()

    tasks = [asyncio.ensure_future(one(job)) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def progress(run: Run, started: float) -> None:
    """Log deliveries/s and published/s every second, keep the timeline, until cancelled."""
    stats = run.stats
    last_d, last_p, last_t = stats.delivered, stats.published, time.monotonic()
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        now = time.monotonic()
        span = now - last_t
        stats.timeline.append(round((stats.delivered - last_d) / span))
        logger.info(
            "t=%.1fs deliveries/s=%.0f published/s=%.0f errors=%d disconnected=%d",
            now - started,
            (stats.delivered - last_d) / span,
            (stats.published - last_p) / span,
            stats.error_lines,
            stats.disconnected,
        )
        last_d, last_p, last_t = stats.delivered, stats.published, now


async def drain(run: Run, limit_s: float) -> float:
    """Wait until every expected delivery arrived or ``limit_s`` passed; return the wait."""
    started = time.monotonic()
    # Polled: the condition is a sum of counters that every connection updates.
    while run.stats.delivered < run.expected() and time.monotonic() - started < limit_s:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def measure(run: Run, sampler: ProcSampler) -> dict[str, Any]:
    """Publish through warmup and the measured window, then drain; return the numbers."""
    args, stats = run.args, run.stats
    started = time.monotonic()
    tasks = [
        asyncio.ensure_future(progress(run, started)),
        asyncio.ensure_future(sampler.run_sampling()),
    ]
    run.publishing = True
    for publisher in run.publishers:
        publisher.start()
    try:
        await asyncio.sleep(args.warmup)
        d0, p0 = stats.delivered, stats.published
        r0 = redis_calls(args.host, args.redis_port)
        stats.measuring = True
        sampler.begin()
        t0 = time.monotonic()
        await asyncio.sleep(args.duration)
        d1, p1 = stats.delivered, stats.published
        stats.measuring = False
        sampler.end()
        r1 = redis_calls(args.host, args.redis_port)
        t1 = time.monotonic()
        run.publishing = False
        for publisher in run.publishers:
            publisher.stop()
        drained = await drain(run, args.drain)
    finally:
        for task in tasks:
            task.cancel()
    span = t1 - t0
    commands = {}
    if r0 is not None and r1 is not None:
        delta = {name: r1[name] - r0.get(name, 0) for name in r1}
        delta["info"] -= 1  # the reading itself
        commands = {"redis_commands": {name: n for name, n in delta.items() if n}}
    return {
        **commands,
        "measured_s": round(span, 3),
        "deliveries": d1 - d0,
        "deliveries_per_s": round((d1 - d0) / span, 1),
        "published": p1 - p0,
        "published_per_s": round((p1 - p0) / span, 1),
        "drain_s": round(drained, 3),
    }


def redis_calls(host: str, port: int) -> dict[str, int] | None:
    """Per command, how many times a Redis on *port* ran it so far (``INFO commandstats``,
    commands inside scripts included; this INFO too), or None without ``--redis-port``."""
    if not port:
        return None
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        data = b""
        while True:
            data += sock.recv(65536)
            header, _, body = data.partition(b"\r\n")
            if header.startswith(b"$") and len(body) >= int(header[1:]):
                break
    calls: dict[str, int] = {}
    for line in body.decode().split("\r\n"):  # cmdstat_get:calls=2,usec=...,...
        name, _, fields = line.partition(":")
        for field in fields.split(","):
            if name.startswith("cmdstat_") and field.startswith("calls="):
                calls[name[8:]] = int(field[6:])
    return calls


def summarize(run: Run, window: dict[str, Any], connect_s: float, conns: int) -> dict[str, Any]:
    """Build the result object (minus resources and scenario extras)."""
    args, stats = run.args, run.stats
    lat = sorted(stats.latencies_ns)
    latency: dict[str, Any] = {"samples": len(lat)}
    if lat:
        latency.update(
            p50=round(percentile(lat, 0.50) / 1e6, 3),
            p99=round(percentile(lat, 0.99) / 1e6, 3),
            max=round(lat[-1] / 1e6, 3),
            mean=round(sum(lat) / len(lat) / 1e6, 3),
        )
    expected = run.expected()
    return {
        "scenario": args.scenario,
        "target": {"host": args.host, "tcp_port": args.tcp_port, "http_port": args.http_port},
        "params": {
            k: getattr(args, k)
            for k in ("rooms", "members", "publishers", "window", "text_bytes")
            + ("warmup", "duration", "drain")
        },
        "connections": conns,
        "connect_join_s": round(connect_s, 3),
        **window,
        "latency_ms": latency,
        "published_total": stats.published,
        "delivered_total": stats.delivered,
        "expected_total": expected,
        "losses": expected - stats.delivered,
        "probe_gaps": stats.probe_gaps,
        "probe_reordered": stats.probe_reordered,
        "error_lines": stats.error_lines,
        "send_failures": stats.send_failures,
        "disconnected": stats.disconnected,
        "timeline_deliveries_per_s": stats.timeline,
    }


# --- TCP scenarios ----------------------------------------------------------------------


def plan_tcp(run: Run, stuck: bool) -> tuple[list[Member], list[Member]]:
    """Create every member and publisher; return (all members, stuck members)."""
    args = run.args
    stuck_at = args.members - 1 if stuck else -1
    run.rooms = make_rooms(args, args.members - (1 if stuck else 0))
    members: list[Member] = []
    stuck_members: list[Member] = []
    for room in run.rooms:
        for i in range(args.members):
            name = f"u{i}"
            if i == probe_index(args):
                member: Member = Probe(run, room, name)
            else:
                member = Member(run, room, name, counts=i != stuck_at)
            if args.tcp_ports:  # members (publishers too) spread over several nodes
                member.port = args.tcp_ports[i % len(args.tcp_ports)]
            if i == stuck_at:
                stuck_members.append(member)
            if i < args.publishers:
                member.publisher = TcpPublisher(len(run.publishers), room, run, member)
                run.publishers.append(member.publisher)
            members.append(member)
    return members, stuck_members


async def connect_all(run: Run, members: list[Member], stuck: list[Member]) -> float:
    """Connect and join every member; stop stuck members reading; return the time taken."""
    args = run.args
    started = time.monotonic()
    stuck_set = set(stuck)
    jobs = [(lambda m=m: m.open(args.stuck_rcvbuf if m in stuck_set else 0)) for m in members]
    await asyncio.wait_for(gather_bounded(jobs, args.connect_concurrency), args.connect_timeout)
    elapsed = time.monotonic() - started
    for member in stuck:
        member.pause()
    logger.info("connected and joined %d members in %.2fs", len(members), elapsed)
    return elapsed


async def stuck_report(stuck: list[Member]) -> dict[str, Any]:
    """Resume reading on stuck members; report what reached them and who was closed."""
    for member in stuck:
        member.resume()
    await asyncio.sleep(STUCK_RESUME_S)
    return {
        "members": len(stuck),
        "received": sum(m.received for m in stuck),
        "closed_by_server": sum(1 for m in stuck if m.lost),
    }


async def run_tcp(run: Run, sampler: ProcSampler, stuck: bool) -> dict[str, Any]:
    """Run ``fanout``/``connections``/``stuck``; return the result object."""
    members, stuck_members = plan_tcp(run, stuck)
    try:
        connect_s = await connect_all(run, members, stuck_members)
        window = await measure(run, sampler)
        result = summarize(run, window, connect_s, len(members))
        if stuck:
            result["stuck"] = await stuck_report(stuck_members)
        return result
    finally:
        for member in members:
            member.close()
        await asyncio.sleep(0)


# --- HTTP long-poll scenario --------------------------------------------------------------


class HttpError(Exception):
    """The HTTP server answered something we cannot use."""


# What a dropped or garbled HTTP connection raises.
CONNECTION_FAILURES = (
    OSError,
    HttpError,
    ValueError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
)


class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client connection (JSON bodies, cookie jar).

    ``cookies`` is shared by the connections of one session and updated from
    ``Set-Cookie``. Reconnects when the server closed the connection.
    """

    def __init__(self, host: str, port: int, cookies: dict[str, str]) -> None:
        self.host = host
        self.port = port
        self.cookies = cookies
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, payload: Any = None) -> tuple[int, bytes]:
        """Send one request and return (status, body)."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.encode_request(method, target, payload))
        status, headers = await self.read_head(self.reader)
        body = await self.read_body(self.reader, headers)
        for value in headers.get("set-cookie", []):
            name, _, rest = value.split(";", 1)[0].partition("=")
            self.cookies[name.strip()] = rest.strip()
        if "close" in headers.get("connection", [""])[0].lower():
            self.close()
        return status, body

    def encode_request(self, method: str, target: str, payload: Any) -> bytes:
        """Return the request bytes."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        body = b""
        if payload is not None:
            body = json.dumps(payload, separators=(",", ":")).encode()
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        if self.cookies:
            lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    @staticmethod
    async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, list[str]]]:
        """Read the status line and headers (names lower-cased, values listed)."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HttpError(f"bad status line {lines[0]!r}")
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers.setdefault(name.strip().lower(), []).append(value.strip())
        return int(parts[1]), headers

    @staticmethod
    async def read_body(reader: asyncio.StreamReader, headers: dict[str, list[str]]) -> bytes:
        """Read a Content-Length, chunked or read-to-EOF body."""
        if "chunked" in headers.get("transfer-encoding", [""])[0].lower():
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return b"".join(chunks)
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"][0]))
        return await reader.read()

    def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Poller:
    """An HTTP member: one session that joins a room, then long-polls it."""

    def __init__(self, run: Run, room: RoomPlan, username: str, probe: bool) -> None:
        self.run = run
        self.room = room
        self.username = username
        self.probe = probe
        self.cookies: dict[str, str] = {}
        self.conn = HttpConnection(run.args.host, run.args.http_port, self.cookies)
        self.last_id = 0

    async def join(self) -> None:
        """POST /api/join; raise JoinError unless it succeeded."""
        payload = {"room": self.room.name, "username": self.username}
        status, body = await self.conn.request("POST", "/api/join", payload)
        if status != 200:
            raise JoinError(f"/api/join -> {status} {body[:200]!r}")

    async def poll_forever(self) -> None:
        """Long-poll the room until cancelled, counting our messages."""
        target = f"/api/poll?room={quote(self.room.name)}&after="
        while True:
            try:
                status, body = await self.conn.request("GET", target + str(self.last_id))
            except CONNECTION_FAILURES as exc:
                logger.warning("poller %s/%s: %r", self.room.name, self.username, exc)
                self.run.stats.disconnected += 1
                return
            if status != 200:
                self.run.stats.send_failures += 1
                await asyncio.sleep(0.1)
                continue
            self.take(json.loads(body).get("messages", []))

    def take(self, messages: list[dict[str, Any]]) -> None:
        """Count the new messages of one poll response (and, for a probe, parse them)."""
        run = self.run
        now_ns = time.monotonic_ns()
        count = 0
        for message in messages:
            mid = message.get("id", 0)
            if mid <= self.last_id:
                continue
            self.last_id = mid
            text = message.get("text") or ""
            if not text.startswith(MARKER):
                continue
            count += 1
            if self.probe:
                parsed = parse_text(text.encode())
                if parsed is not None:
                    run.on_probe(parsed[0], parsed[1], parsed[2], now_ns)
        run.stats.delivered += count
        run.flush_acks()

    def close(self) -> None:
        """Close the poll connection."""
        self.conn.close()


class HttpPublisher(Publisher):
    """A publisher posting /api/send, one request at a time, within its window."""

    def __init__(self, pid: int, room: RoomPlan, run: Run, poller: Poller) -> None:
        super().__init__(pid, room, run)
        self.conn = HttpConnection(run.args.host, run.args.http_port, poller.cookies)
        self.wakeup = asyncio.Event()
        self.task: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Start the sending task (once) or wake it after an ack."""
        if self.task is None:
            self.task = asyncio.ensure_future(self.send_loop())
        self.wakeup.set()

    def stop(self) -> None:
        """Let the sending task notice that publishing stopped."""
        self.wakeup.set()

    async def send_loop(self) -> None:
        """Send while publishing and the window has room."""
        payload = {"room": self.room.name, "text": ""}
        while self.run.publishing:
            if self.inflight >= self.run.args.window:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            payload["text"] = self.take(1)[0]
            try:
                status, _ = await self.conn.request("POST", "/api/send", payload)
            except CONNECTION_FAILURES as exc:
                logger.warning("publisher %d: %r", self.pid, exc)
                self.refused(1)
                self.run.stats.disconnected += 1
                return
            if status != 200:
                self.refused(1)
                await asyncio.sleep(REFUSED_BACKOFF_S)

    def close(self) -> None:
        """Stop the task and close the connection."""
        if self.task is not None:
            self.task.cancel()
        self.conn.close()


async def run_longpoll(run: Run, sampler: ProcSampler) -> dict[str, Any]:
    """Run ``longpoll``; return the result object."""
    args = run.args
    run.rooms = make_rooms(args, args.members)
    pollers = [
        Poller(run, room, f"u{i}", i == probe_index(args))
        for room in run.rooms
        for i in range(args.members)
    ]
    for poller in pollers:
        if int(poller.username[1:]) < args.publishers:
            run.publishers.append(HttpPublisher(len(run.publishers), poller.room, run, poller))
    tasks: list[asyncio.Future[None]] = []
    try:
        started = time.monotonic()
        jobs = [poller.join for poller in pollers]
        await asyncio.wait_for(gather_bounded(jobs, args.connect_concurrency), args.connect_timeout)
        connect_s = time.monotonic() - started
        logger.info("joined %d pollers in %.2fs", len(pollers), connect_s)
        tasks = [asyncio.ensure_future(p.poll_forever()) for p in pollers]
        window = await measure(run, sampler)
        conns = len(pollers) + len(run.publishers)
        return summarize(run, window, connect_s, conns)
    finally:
        for task in tasks:
            task.cancel()
        for poller in pollers:
            poller.close()
        for publisher in run.publishers:
            assert isinstance(publisher, HttpPublisher)
            publisher.close()
        await asyncio.sleep(0)


# --- command line -----------------------------------------------------------------------


SCENARIOS: dict[str, tuple[str, dict[str, int]]] = {
    "fanout": ("TCP fan-out capacity", {"rooms": 10, "members": 20, "publishers": 2}),
    "connections": (
        "connect+join time for many connections, then fan-out",
        {"rooms": 100, "members": 51, "publishers": 1},
    ),
    "longpoll": ("HTTP long-poll fan-out", {"rooms": 10, "members": 20, "publishers": 2}),
    "stuck": (
        "fan-out with one never-reading member per room",
        {"rooms": 10, "members": 20, "publishers": 2},
    ),
}


def add_options(parser: argparse.ArgumentParser, defaults: dict[str, int]) -> None:
    """Add the options every scenario takes."""
    parser.add_argument("--host", default="127.0.0.1", help="loopback address of the server")
    parser.add_argument("--tcp-port", type=int, default=5100)
    parser.add_argument("--http-port", type=int, default=8100)
    parser.add_argument("--rooms", type=int, default=defaults["rooms"])
    parser.add_argument("--members", type=int, default=defaults["members"], help="per room")
    parser.add_argument("--publishers", type=int, default=defaults["publishers"], help="per room")
    parser.add_argument("--window", type=int, default=8, help="unreceived messages per publisher")
    parser.add_argument("--text-bytes", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--drain", type=float, default=3.0, help="max seconds to drain at the end")
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--connect-concurrency", type=int, default=256)
    parser.add_argument(
        "--stuck-rcvbuf", type=int, default=4096, help="SO_RCVBUF of stuck members (0 = OS default)"
    )
    parser.add_argument(
        "--tcp-ports",
        type=lambda text: [int(port) for port in text.split(",") if port],
        default=[],
        help="TCP scenarios: member i of each room connects to port i %% len (several nodes "
        "sharing rooms through Redis); default --tcp-port for all",
    )
    parser.add_argument(
        "--redis-port",
        type=int,
        default=0,
        help="count the commands this Redis (on --host) runs in the measured window",
    )
    parser.add_argument("--pids", default="", help="comma-separated server PIDs to sample")
    parser.add_argument("--tag", default="", help="room name tag (default random)")
    parser.add_argument("--log-level", default="INFO")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line (exits with status 2 on bad arguments)."""
    parser = argparse.ArgumentParser(
        description="Closed-loop load generator for shardchat.",
        epilog="Each scenario prints one JSON object on stdout.",
    )
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, (help_text, defaults) in SCENARIOS.items():
        add_options(sub.add_parser(name, help=help_text, description=help_text), defaults)
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    return args


def check_args(args: argparse.Namespace) -> str | None:
    """Return a description of what is wrong with ``args``, or None."""
    if args.rooms < 1 or args.members < 1 or args.window < 1:
        return "--rooms, --members and --window must be at least 1"
    if not 1 <= args.publishers <= args.members:
        return "--publishers must be between 1 and --members"
    if args.scenario == "stuck" and args.members < args.publishers + 2:
        return "stuck needs --members >= --publishers + 2 (publishers, a probe, a stuck one)"
    if args.duration <= 0 or args.warmup < 0 or args.drain < 0:
        return "--duration must be positive, --warmup and --drain not negative"
    if not is_loopback(args.host):
        return f"--host {args.host} is not a loopback address"
    return None


def is_loopback(host: str) -> bool:
    """Return True if every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos
    )


def raise_fd_limit() -> None:
    """Raise the soft open-files limit to the hard limit (thousands of connections)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def sampler_for(args: argparse.Namespace) -> ProcSampler:
    """Return a sampler for this process and the --pids."""
    pids = {"loadgen": os.getpid()}
    for item in filter(None, (p.strip() for p in args.pids.split(","))):
        pids[item] = int(item)
    return ProcSampler(pids)


async def run_scenario(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen scenario and return its result object."""
    run = Run(args)
    sampler = sampler_for(args)
    try:
        if args.scenario == "longpoll":
            result = await run_longpoll(run, sampler)
        else:
            result = await run_tcp(run, sampler, stuck=args.scenario == "stuck")
    finally:
        run.readers.close()
    result["resources"] = sampler.report()
    return result


# What ends a run with an "error" result instead of numbers. asyncio.TimeoutError is
# only the builtin TimeoutError from 3.11 on.
RUN_FAILURES = (
    OSError,
    JoinError,
    HttpError,
    asyncio.TimeoutError,  # noqa: UP041
    asyncio.IncompleteReadError,
)


def main(argv: list[str] | None = None) -> int:
    """Run one scenario, print its JSON result; return 0, or 1 if the run failed."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s loadgen %(levelname)s %(message)s",
    )
    raise_fd_limit()
    try:
        result = asyncio.run(run_scenario(args))
    except RUN_FAILURES as exc:
        logger.error("run failed: %r", exc)
        print(json.dumps({"scenario": args.scenario, "error": repr(exc)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
