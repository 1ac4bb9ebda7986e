"""The hub's fan-out of shard events, without sockets or shards: the mirror follows
JOINED/LEFT, and runs of CHAT events reach each member in each room's order (as one write
for transports that take a run)."""

from __future__ import annotations

import asyncio
from typing import Iterator, List, Tuple

import pytest

from common import messages as m
from common.protocol import msg_line
from router.hub import Client, Hub


class Recorder(Client):
    def __init__(self) -> None:
        super().__init__()
        self.got: List[Tuple[str, int, bytes]] = []

    def deliver(self, room: str, entry: m.Entry, wire: bytes) -> None:
        self.got.append((room, entry[0], wire))


class RunTaker(Recorder):
    def deliver_run(self, room: str, entries: List[m.Entry], wire: bytes) -> None:
        self.got.append((room, entries[-1][0], wire))


def chat(room: str, seq: int, user: str = "u") -> tuple:
    entry = (seq, 0.0, m.KIND_CHAT, user, f"t{seq}")
    return (m.CHAT, room, entry, msg_line(room, user, f"t{seq}"))


def joined(room: str, cid: int, seq: int) -> tuple:
    return (m.JOINED, room, cid, (seq, 0.0, m.KIND_JOIN, f"c{cid}", f"c{cid} joined {room}"))


@pytest.fixture
def hub() -> Iterator[Hub]:
    loop = asyncio.new_event_loop()  # the hub needs one, but these tests never run it
    yield Hub(loop)
    loop.close()


def test_runs_of_chat_keep_each_rooms_order_and_reach_only_members(hub: Hub) -> None:
    plain, runs, outsider = Recorder(), RunTaker(), Recorder()
    for client in (plain, runs, outsider):
        hub.add(client)
    hub.on_shard_events(0, [joined("a", plain.cid, 1), joined("a", runs.cid, 2)])
    hub.on_shard_events(0, [joined("b", plain.cid, 1), joined("z", outsider.cid, 1)])
    plain.got.clear()
    runs.got.clear()
    outsider.got.clear()
    hub.on_shard_events(0, [chat("a", 3), chat("b", 2), chat("a", 4), chat("a", 5)])
    # The plain client gets every message, room by room, in each room's order.
    assert [(room, seq) for room, seq, _ in plain.got] == [("a", 3), ("a", 4), ("a", 5), ("b", 2)]
    # The run-taker gets room a's three lines as one write, in order.
    assert runs.got == [
        ("a", 5, msg_line("a", "u", "t3") + msg_line("a", "u", "t4") + msg_line("a", "u", "t5"))
    ]
    assert outsider.got == []


def test_a_leave_between_chats_is_respected(hub: Hub) -> None:
    stays, goes = Recorder(), Recorder()
    hub.add(stays)
    hub.add(goes)
    hub.on_shard_events(0, [joined("a", stays.cid, 1), joined("a", goes.cid, 2)])
    stays.got.clear()
    goes.got.clear()
    left = (m.LEFT, "a", goes.cid, (4, 0.0, m.KIND_LEAVE, "g", "g left a"), True)
    hub.on_shard_events(0, [chat("a", 3), left, chat("a", 5), chat("a", 6)])
    assert [seq for _, seq, _ in goes.got] == [3]
    assert [seq for _, seq, _ in stays.got] == [3, 4, 5, 6]
