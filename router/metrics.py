"""``GET /metrics``: the router's counters and gauges in the Prometheus text format
(version 0.0.4), written by hand: no runtime dependency.

:class:`Metrics` is the hub's bag of counters, bumped where things happen (a few integer
additions per batch of chat messages, none per delivery); :func:`render` reads them and
the live state (connections, sessions, rooms, shards) at scrape time."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from router.hub import Hub

#: ``(labels, value)`` samples of one metric family.
Samples = Iterable[Tuple[Dict[str, str], float]]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters only ever go up; the gauges are read from the state when scraped."""

    def __init__(self) -> None:
        self.messages = 0  # chat messages fanned out
        self.deliveries = 0  # chat messages times the members they went to
        self.private_messages = 0  # direct messages delivered (once each, echo not counted)
        self.refused: Dict[str, int] = {}  # commands refused, by error code
        self.flood_throttles: Dict[str, int] = {}  # by transport
        self.slow_consumers: Dict[str, int] = {}  # cut off for not reading, by transport
        self.poll_answers: Dict[int, int] = {}  # by HTTP status
        #: transport -> how many connections it has open now (registered by listeners)
        self.connections: Dict[str, Callable[[], int]] = {}
        #: live browser sessions now (registered by the HTTP listener)
        self.sessions: Callable[[], int] = lambda: 0

    def refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def throttled(self, transport: str) -> None:
        self.flood_throttles[transport] = self.flood_throttles.get(transport, 0) + 1

    def cut_off(self, transport: str) -> None:
        self.slow_consumers[transport] = self.slow_consumers.get(transport, 0) + 1

    def poll_answered(self, status: int) -> None:
        self.poll_answers[status] = self.poll_answers.get(status, 0) + 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labelled_family(
    out: List[str], name: str, kind: str, text: str, samples: Samples, common: Dict[str, str]
) -> None:
    out.append(f"# HELP {name} {text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        labels = {**labels, **common}
        label = ",".join(f'{key}="{_escape(val)}"' for key, val in sorted(labels.items()))
        number = repr(float(value)) if isinstance(value, float) else str(int(value))
        out.append(f"{name}{{{label}}} {number}" if label else f"{name} {number}")


def _by(label: str, counts: Dict) -> Samples:  # noqa: ANN401 - str or int keys
    return [({label: str(key)}, value) for key, value in sorted(counts.items())]


def render(hub: Hub, router: Optional[int] = None) -> str:
    """The exposition text of *hub*'s router; in a tier, every sample is labelled with the
    *router* index (see :func:`merge`)."""
    metrics = hub.metrics
    out: List[str] = []
    common = {"router": str(router)} if router is not None else {}
    _family = functools.partial(_labelled_family, common=common)
    connections = [({"transport": t}, count()) for t, count in sorted(metrics.connections.items())]
    _family(out, "shardchat_connections", "gauge", "Open client connections.", connections)
    _family(out, "shardchat_sessions", "gauge", "Live browser sessions.",
            [({}, metrics.sessions())])  # fmt: skip
    _family(out, "shardchat_rooms", "gauge", "Rooms with members on this router.",
            [({}, len(hub.members))])  # fmt: skip
    _family(out, "shardchat_messages_total", "counter", "Chat messages fanned out.",
            [({}, metrics.messages)])  # fmt: skip
    _family(out, "shardchat_deliveries_total", "counter",
            "Chat messages delivered, counted once per member.",
            [({}, metrics.deliveries)])  # fmt: skip
    _family(out, "shardchat_private_messages_total", "counter", "Direct messages delivered.",
            [({}, metrics.private_messages)])  # fmt: skip
    _family(
        out,
        "shardchat_refused_total",
        "counter",
        "Commands refused (not applied), by error code.",
        _by("code", metrics.refused),
    )
    _family(out, "shardchat_flood_throttles_total", "counter",
            "Times a client was held back by flood control (TCP: reading paused; HTTP: 429).",
            _by("transport", metrics.flood_throttles))  # fmt: skip
    slow = dict(metrics.slow_consumers)
    slow["budget"] = hub.output.cut_offs
    _family(out, "shardchat_slow_consumer_cutoffs_total", "counter",
            "Clients cut off for not reading: their own limit (tcp, http) or the budget.",
            _by("kind", slow))  # fmt: skip
    _family(out, "shardchat_poll_answers_total", "counter", "Long-poll answers, by status.",
            _by("status", metrics.poll_answers))  # fmt: skip
    pool = hub.pool
    links = pool.links if pool is not None else []
    _family(out, "shardchat_shard_up", "gauge", "1 while the shard process runs.",
            [({"shard": str(link.index)}, 1 if link.alive else 0) for link in links])  # fmt: skip
    restarts = pool.restarts_done if pool is not None else {}
    _family(out, "shardchat_shard_restarts_total", "counter", "Shard restarts.",
            _by("shard", restarts))  # fmt: skip
    give_ups = pool.give_ups if pool is not None else {}
    _family(
        out,
        "shardchat_shard_give_ups_total",
        "counter",
        "Times a shard was given up on (restarted too often).",
        _by("shard", give_ups),
    )
    _family(out, "shardchat_shard_in_flight", "gauge",
            "Commands sent to the shard and not answered yet.",
            [({"shard": str(i)}, n) for i, n in enumerate(hub.in_flight_counts())])  # fmt: skip
    _family(out, "shardchat_shard_backlog_bytes", "gauge",
            "Bytes waiting to be written to the shard's pipe.",
            [({"shard": str(link.index)}, link.backlog_bytes) for link in links])  # fmt: skip
    return "\n".join(out) + "\n"


def merge(texts: Sequence[str]) -> str:
    """One exposition of several routers' (:func:`render` with their index): each family's
    ``HELP`` and ``TYPE`` once, then every router's samples of it."""
    families: Dict[str, List[str]] = {}
    for text in texts:
        name, head = "", False
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name = line.split(" ", 3)[2]
                head = name not in families
                families.setdefault(name, [])
            elif not line or (line.startswith("# TYPE ") and not head):
                continue
            if line.startswith("#") and not head:
                continue
            families.setdefault(name, []).append(line)
    return "".join(line + "\n" for lines in families.values() for line in lines)
