"""The shard experiment's ``nodes`` scenario: what sharing rooms through Redis costs.

    python scripts/shard_experiment.py --scenarios nodes [--repeats 3] [--duration 8]

Four configurations, alternating round by round, each with a fresh ``redis-server`` on a
free loopback port (Debian's ``redis-server``; no persistence) and the fan-out load of
``loadgen.py fanout`` (10 rooms × 20 members, 2 publishers a room, window 8):

- ``1 node, memory``: one cluster, ``--in-memory``, no Redis (the reference);
- ``1 node, Redis``: one cluster with ``--redis``;
- ``2 nodes, Redis``: two clusters on the same Redis, each room's members (and its two
  publishers) split between them;
- ``pub/sub alone``: the same rooms, members and publishers straight on Redis pub/sub (one
  subscriber connection per member, ``PUBLISH`` with the same window): the anchor, what
  Redis itself does with this load on this machine.

Reported per run: deliveries/s, messages/s, p99 (loadgen's probe), messages lost (by seq:
expected − delivered), Redis CPU µs per published message and Redis commands per
published message (``INFO commandstats`` over the measured window), and the nodes' CPU µs
per delivery. Written as ``nodes.md`` / ``nodes.json`` into the run's directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import shard_experiment as se  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402 (the same server the tests use)

#: Commands only shard/redis_rooms.py's scripts run (never a node directly, in this load).
SCRIPT_INSIDE = frozenset(
    {"hincrby", "hget", "xadd", "publish", "hsetnx", "del", "hset", "hexists", "zadd",
     "zrangebyscore", "hdel", "zrem", "hlen", "exists", "time"}
)  # fmt: skip
CONFIGS = ("1 node, memory", "1 node, Redis", "2 nodes, Redis", "pub/sub alone")
SIZE = (10, 20, 2)  # rooms, members a room, publishers a room


def cpu_seconds(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def node_argv(redis_url: Optional[str], shards: int) -> List[str]:
    argv = [sys.executable, str(se.START_CLUSTER), "--host", se.HOST, "--tcp-port", "0"]
    argv += ["--http-port", "0", "--shards", str(shards), *se.CLUSTER_FLAGS]
    return [*argv, *(["--redis", redis_url] if redis_url else list(se.IN_MEMORY_FLAGS))]


def loadgen_argv(
    ports: Sequence[int], pids: Sequence[int], timing: Any, redis_port: int
) -> List[str]:
    rooms, members, publishers = SIZE
    argv = [sys.executable, str(se.LOADGEN), "fanout", "--host", se.HOST]
    argv += ["--tcp-port", str(ports[0]), "--tcp-ports", ",".join(map(str, ports))]
    argv += ["--rooms", str(rooms), "--members", str(members), "--publishers", str(publishers)]
    argv += ["--window", "8", "--text-bytes", "64", "--warmup", str(timing.warmup)]
    argv += ["--duration", str(timing.duration), "--drain", str(timing.drain)]
    argv += ["--connect-timeout", str(timing.connect_timeout), "--log-level", "WARNING"]
    argv += ["--pids", ",".join(map(str, pids))]
    if redis_port:
        argv += ["--redis-port", str(redis_port)]
    return argv


def one_run(config: str, timing: Any, shards: int) -> Dict[str, Any]:
    """Run *config* once; its row."""
    redis = RedisServer()
    try:
        redis.start()
        redis_pid = redis.process.pid if redis.process else 0
        if config == "pub/sub alone":
            return anchor_run(redis, redis_pid, timing)
        url = None if config == "1 node, memory" else redis.url
        count = 2 if config.startswith("2 nodes") else 1
        servers = [se.ServerProcess(node_argv(url, shards), want_shard_pids=True)
                   for _ in range(count)]  # fmt: skip
        try:
            for server in servers:
                server.start()
                se.wait_ready(server.ports["tcp"], cluster=True)
            node_pids = [pid for server in servers for pid in server.pids]
            ports = [server.ports["tcp"] for server in servers]
            pids = [*node_pids, *([redis_pid] if url else [])]
            result = se.run_loadgen(
                loadgen_argv(ports, pids, timing, redis.port if url else 0), timing.budget()
            )
        finally:
            for server in servers:
                server.stop()
        return row(config, result, node_pids, redis_pid if url else None)
    finally:
        redis.close()


def row(
    config: str, result: Dict[str, Any], node_pids: List[int], redis_pid: Optional[int]
) -> Dict[str, Any]:
    resources = result.get("resources") or {}
    measured = result.get("measured_s")
    published = result.get("published")
    nodes_s = se.tier_cpu_seconds(resources, node_pids, measured)
    redis_s = se.tier_cpu_seconds(resources, [redis_pid], measured) if redis_pid else None
    calls = result.get("redis_commands") or {}
    commands = sum(calls.values()) if calls else None
    # What the nodes send: a script call counts once (the commands inside it are Redis's).
    sent = sum(n for name, n in calls.items() if name not in SCRIPT_INSIDE) if calls else None
    return {
        "config": config,
        "status": "error: " + result["error"] if "error" in result else "ok",
        "deliveries_per_s": result.get("deliveries_per_s"),
        "messages_per_s": result.get("published_per_s"),
        "p99_ms": (result.get("latency_ms") or {}).get("p99"),
        "lost": result.get("losses"),
        "probe_gaps": result.get("probe_gaps"),
        "nodes_us_per_delivery": se.us_per(nodes_s, result.get("deliveries")),
        "redis_us_per_message": se.us_per(redis_s, published),
        "redis_commands_per_message": round(commands / published, 2)
        if commands is not None and published
        else None,
        "redis_sent_per_message": round(sent / published, 2)
        if sent is not None and published
        else None,
        "redis_commands": calls,
    }


# --- the anchor: the same load on Redis pub/sub, no shardchat ---------------------------


def anchor_run(redis: RedisServer, redis_pid: int, timing: Any) -> Dict[str, Any]:
    started_cpu: List[float] = []
    result = asyncio.run(anchor(redis.port, timing, redis_pid, started_cpu))
    return {
        "config": "pub/sub alone",
        "status": "ok",
        "deliveries_per_s": round(result["deliveries"] / result["measured_s"], 1),
        "messages_per_s": round(result["published"] / result["measured_s"], 1),
        "p99_ms": result["p99_ms"],
        "lost": result["lost"],
        "probe_gaps": None,
        "nodes_us_per_delivery": None,
        "redis_us_per_message": se.us_per(result["redis_cpu_s"], result["published"]),
        "redis_commands_per_message": 1.0,  # one PUBLISH, nothing else
        "redis_sent_per_message": 1.0,
    }


MARK = b"$7\r\nmessage\r\n"


async def anchor(port: int, timing: Any, redis_pid: int, _: List[float]) -> Dict[str, Any]:
    """Subscribers and closed-loop publishers on raw RESP sockets (as lean as the
    shardchat load generator's members): deliveries counted by frame, latency by the
    publish time in the payload, measured by one subscriber a room."""
    rooms, members, publishers = SIZE
    loop = asyncio.get_running_loop()
    delivered = [0]
    latencies: List[float] = []
    measuring = [False]
    pad = b"x" * 40

    async def subscriber(channel: bytes, probe: bool) -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection(se.HOST, port)
        writer.write(b"SUBSCRIBE " + channel + b"\r\n")
        await writer.drain()
        await reader.readuntil(b":1\r\n")  # the confirmation

        async def read() -> None:
            tail = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                chunk = tail + data
                count = chunk.count(MARK)
                tail = chunk[-(len(MARK) - 1) :]
                if measuring[0]:
                    delivered[0] += count
                if probe and measuring[0]:
                    now = time.monotonic()
                    for part in chunk.split(b"T=")[1:]:
                        try:
                            latencies.append(now - float(part.split(b";", 1)[0]))
                        except ValueError:
                            pass

        loop.create_task(read())
        return writer

    writers = []
    for r in range(rooms):
        channel = f"anchor-{r}".encode()
        for i in range(members):
            writers.append(await subscriber(channel, probe=i == members - 1))
    published = [0]
    running = [True]

    async def publisher(channel: bytes) -> None:
        reader, writer = await asyncio.open_connection(se.HOST, port)
        writers.append(writer)
        outstanding = 0
        while running[0]:
            while outstanding < 8:
                payload = b"T=%.6f;" % time.monotonic() + pad
                writer.write(b"PUBLISH %s %s\r\n" % (channel, payload))
                outstanding += 1
            await writer.drain()
            await reader.readline()  # ":N" for each PUBLISH, in order
            outstanding -= 1
            if measuring[0]:
                published[0] += 1

    tasks = [loop.create_task(publisher(f"anchor-{r}".encode()))
             for r in range(rooms) for _ in range(publishers)]  # fmt: skip
    await asyncio.sleep(timing.warmup)
    cpu0, d0 = cpu_seconds(redis_pid), delivered[0]
    measuring[0] = True
    t0 = time.monotonic()
    await asyncio.sleep(timing.duration)
    measuring[0] = False
    span = time.monotonic() - t0
    cpu1 = cpu_seconds(redis_pid)
    running[0] = False
    await asyncio.sleep(0.2)
    for task in tasks:
        task.cancel()
    for writer in writers:
        writer.close()
    lat = sorted(latencies)
    return {
        "measured_s": span,
        "deliveries": delivered[0] - d0,
        "published": published[0],
        "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
        "lost": None,  # pub/sub has no seq to count losses by
        "redis_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
    }


# --- the scenario ----------------------------------------------------------------------


def run_nodes(out: Path, timing: Any, repeats: int, shards: int) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for round_number in range(repeats):
        for config in CONFIGS:
            found = one_run(config, timing, shards)
            found["round"] = round_number + 1
            rows.append(found)
            se.log(f"nodes: {config}, round {round_number + 1}: "
                   f"{found['deliveries_per_s']} deliveries/s, p99 {found['p99_ms']} ms, "
                   f"{found['status']}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "nodes.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (out / "nodes.md").write_text("\n".join(table(rows)) + "\n", encoding="utf-8")
    return rows


def median(rows: List[Dict[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return round(statistics.median(values), 2) if values else None


def table(rows: List[Dict[str, Any]]) -> List[str]:
    lines = [
        "| configuration | deliveries/s (median) | each run | × 1 node, memory | p99 ms |"
        " lost | nodes µs/delivery | Redis µs/message | Redis commands/message (sent, run) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    reference = median([r for r in rows if r["config"] == CONFIGS[0]], "deliveries_per_s")
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        dps = median(mine, "deliveries_per_s")
        runs = " / ".join(
            f"{r['deliveries_per_s']:,.0f}" for r in mine if r.get("deliveries_per_s")
        )
        ratio = f"{dps / reference:.2f}×" if dps and reference else "–"
        lost = (
            sum(r["lost"] for r in mine if isinstance(r.get("lost"), int))
            if config != CONFIGS[3]
            else "–"
        )
        lines.append(
            f"| {config} | {dps:,.0f} | {runs} | {ratio} |"
            f" {se.fmt(median(mine, 'p99_ms'), 2)} | {lost} |"
            f" {se.fmt(median(mine, 'nodes_us_per_delivery'), 2)} |"
            f" {se.fmt(median(mine, 'redis_us_per_message'), 2)} |"
            f" {se.fmt(median(mine, 'redis_sent_per_message'), 2)},"
            f" {se.fmt(median(mine, 'redis_commands_per_message'), 2)} |"
            if dps
            else f"| {config} | – | {mine[0]['status'] if mine else 'no run'} | | | | | | |"
        )
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args(argv)
    timing = se.Timing(
        warmup=args.warmup,
        duration=args.duration,
        drain=3.0,
        connect_timeout=60.0,
        pause=1.0,
        retry_wait=5.0,
    )
    out = args.out or ROOT / "results" / time.strftime("%Y-%m-%d-%H%M%S-nodes")
    rows = run_nodes(out, timing, args.repeats, args.shards)
    print("\n".join(table(rows)))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
