"""``GET /metrics`` on a real cluster: the Prometheus text format by its rules (every family
has ``# HELP`` and ``# TYPE`` before its samples, names and labels well formed, counters end
in ``_total``), and the counters move with what happens: messages, deliveries, refusals,
poll answers, flood throttles, shard restarts."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from typing import Dict, Iterator, Tuple

import pytest

from tests.cluster import Cluster
from tests.integration.test_http_api import Api

pytestmark = pytest.mark.timeout(90)

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(
    rf'^({NAME})(?:\{{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\}})? (\S+)$'
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Key = Tuple[str, Tuple[Tuple[str, str], ...]]


def parse(text: str) -> Dict[Key, float]:
    """The samples of *text*, checked against the exposition format's rules."""
    assert text.endswith("\n")
    helped, typed, seen_families = set(), {}, []
    samples: Dict[Key, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(NAME, name) and name not in helped, line
            helped.add(name)
            seen_families.append(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped and name not in typed, line  # HELP, then TYPE, once
            assert kind in ("counter", "gauge"), line
            assert (kind == "counter") == name.endswith("_total"), line
            typed[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample: {line!r}"
            name, labels, value = match.groups()
            assert name == seen_families[-1] and name in typed, line  # inside its family
            pairs = tuple(sorted(LABEL.findall(labels or "")))
            assert (name, pairs) not in samples, f"duplicate sample {line!r}"
            number = float(value)
            assert number >= 0 or typed[name] == "gauge", line
            samples[(name, pairs)] = number
    return samples


def scrape(cluster: Cluster) -> Dict[Key, float]:
    url = f"http://127.0.0.1:{cluster.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(reply.read().decode("utf-8"))


def value(samples: Dict[Key, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(extra_args=["--rate-limit", "5", "--rate-burst", "3"]) as running:
        yield running


def test_metrics_follow_what_happens(cluster: Cluster) -> None:
    before = scrape(cluster)
    alice, bob = cluster.connect(), cluster.connect()
    alice.join("metered", "alice")
    bob.join("metered", "bob")
    alice.expect("INFO bob joined metered")
    alice.send("MSG metered one")
    alice.send("MSG metered two")
    for client in (alice, bob):
        client.expect("MSG metered alice one")
        client.expect("MSG metered alice two")
    bob.send("MSG elsewhere nope")
    bob.expect("ERROR not in room elsewhere")
    web = Api(cluster)
    web.join("metered", "carol")
    web.poll("room=metered&after=0")
    throttled = 0
    for _ in range(10):  # past the burst of 3 at 5/s: some are 429
        throttled += web.post("/api/send", {"room": "metered", "text": "hi"}).status == 429
    assert throttled
    after = scrape(cluster)
    grew = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert grew("shardchat_messages_total") >= 2
    assert grew("shardchat_deliveries_total") >= 4  # two messages, two members each
    assert grew("shardchat_refused_total", code="not_in_room") == 1
    assert grew("shardchat_poll_answers_total", status="200") >= 1
    assert grew("shardchat_flood_throttles_total", transport="http") >= throttled
    assert value(after, "shardchat_connections", transport="tcp") >= 2
    assert value(after, "shardchat_sessions") >= 1
    assert value(after, "shardchat_rooms") >= 1
    assert value(after, "shardchat_shard_up", shard="0") == 1
    # a shard killed and restarted is counted, and is up again
    assert cluster.proc is not None
    os.kill(cluster.shard_pids()[0], signal.SIGKILL)
    cluster.wait_for_log("shard 0 restarted")
    deadline = time.monotonic() + 10
    while value(scrape(cluster), "shardchat_shard_restarts_total", shard="0") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert value(scrape(cluster), "shardchat_shard_up", shard="0") == 1
    alice.close()
    bob.close()
    web.close()
