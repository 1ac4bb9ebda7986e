"""The hub without sockets or processes, over in-memory shards (tests/memory_shards.py):
fan-out follows the shards' completions, runs of CHAT events reach each member in each
room's order, and every command gets exactly one outcome: done, refused at its deadline,
or settled when its shard dies (a JOIN refused, a MSG not delivered, a LEAVE completed)."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from common import errors
from common import messages as m
from common.errors import Refusal
from common.protocol import msg_line
from router.hub import Client, ClientRecord, Hub, Membership
from tests.memory_shards import MemoryPool


class Recorder(Client):
    """A client that writes down what the hub tells it."""

    def __init__(self) -> None:
        self.got: List[Tuple[str, int, bytes]] = []
        self.said: List[Tuple[str, Any]] = []

    def deliver(self, room: str, entry: m.Entry, wire: bytes) -> None:
        self.got.append((room, entry[0], wire))

    def on_joined(self, room: str, entry: m.Entry) -> None:
        self.said.append(("joined", room))

    def on_left(self, room: str) -> None:
        self.said.append(("left", room))

    def on_refused(self, op: int, refusal: Refusal) -> None:
        self.said.append((refusal.code, refusal.room))

    def on_room_restarted(self, room: str) -> None:
        self.said.append(("restarted", room))


class RunTaker(Recorder):
    def deliver_run(self, room: str, entries: List[m.Entry], wire: bytes) -> None:
        self.got.append((room, entries[-1][0], wire))


class Rig:
    """A hub on a fresh loop with two in-memory shards."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.hub = Hub(self.loop)
        self.pool = MemoryPool(self.hub, 2)
        self.hub.attach(self.pool)  # type: ignore[arg-type]

    def run(self, turns: int = 5) -> None:
        """Let the loop run a few turns (the shards answer on the next one)."""
        for _ in range(turns):
            self.loop.run_until_complete(asyncio.sleep(0))

    def member(self, client: Client, room: str, name: str) -> ClientRecord:
        record = self.hub.add(client)
        assert self.hub.join(record, room, name) is None
        self.run()
        assert record.rooms[room] is Membership.JOINED
        return record

    def close(self) -> None:
        self.hub.close()
        self.loop.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.close()


def test_runs_of_chat_keep_each_rooms_order_and_reach_only_members(rig: Rig) -> None:
    plain, runs, outsider = Recorder(), RunTaker(), Recorder()
    a_room, b_room = "a", "b"
    shard_of_a = rig.pool.index_of(a_room)
    # Pick a second room on the same shard, so that the chats come in one pipe message.
    b_room = next(r for r in (f"b{i}" for i in range(100)) if rig.pool.index_of(r) == shard_of_a)
    writer = rig.member(plain, a_room, "plain")
    rig.hub.join(writer, b_room, "plain")
    runs_record = rig.member(runs, a_room, "runs")
    talker = rig.hub.add(Recorder())
    rig.hub.join(talker, a_room, "talker")
    rig.hub.join(talker, b_room, "talker")
    rig.member(outsider, next(r for r in ("z", "y", "x") if r not in (a_room, b_room)), "out")
    rig.run()
    for client in (plain, runs, outsider):
        client.got.clear()
    for room, text in ((a_room, "t1"), (b_room, "t2"), (a_room, "t3"), (a_room, "t4")):
        rig.hub.say(talker, room, text)
    rig.run()
    # The plain client gets every message, room by room, in each room's order.
    a_seqs = [seq for room, seq, _ in plain.got if room == a_room]
    assert [room for room, _, _ in plain.got] == [a_room, a_room, a_room, b_room]
    assert a_seqs == sorted(a_seqs) and len(set(a_seqs)) == 3
    # The run-taker gets room a's three lines as one write, in order.
    assert [wire for _, _, wire in runs.got] == [
        b"".join(msg_line(a_room, "talker", text) for text in ("t1", "t3", "t4"))
    ]
    assert outsider.got == []
    assert runs_record.rooms == {a_room: Membership.JOINED}


def test_a_leave_between_chats_is_respected(rig: Rig) -> None:
    stays, goes = Recorder(), Recorder()
    rig.member(stays, "a", "stays")
    going = rig.member(goes, "a", "goes")
    talker = rig.member(Recorder(), "a", "talker")
    stays.got.clear()
    goes.got.clear()
    rig.hub.say(talker, "a", "one")
    rig.hub.leave(going, "a")
    rig.hub.say(talker, "a", "two")
    rig.run()
    assert [wire for _, _, wire in goes.got] == [msg_line("a", "talker", "one")]
    assert [wire for _, _, wire in stays.got] == [
        msg_line("a", "talker", "one"),
        b"INFO goes left a\n",
        msg_line("a", "talker", "two"),
    ]
    assert goes.said[-1] == ("left", "a") and "a" not in going.rooms


def test_join_states_and_the_name_of_a_failed_first_join(rig: Rig) -> None:
    rig.member(Recorder(), "a", "alice")
    second = Recorder()
    record = rig.hub.add(second)
    assert rig.hub.join(record, "a", "ALICE") is None
    assert record.rooms == {"a": Membership.JOINING} and record.busy
    rig.run()
    assert second.said == [(errors.NAME_TAKEN, "a")]
    assert record.rooms == {} and not record.busy and record.username is None
    assert rig.hub.join(record, "b", "bob") is None
    rig.run()
    refusal = rig.hub.join(record, "c", "carol")
    assert refusal is not None and refusal.code == errors.WRONG_USERNAME


def test_a_refused_outcome_reaches_the_handler_once(rig: Rig) -> None:
    record = rig.member(Recorder(), "a", "alice")
    outcomes: List[Tuple[str, Any]] = []
    rig.hub.say(record, "nowhere", "x", lambda seq: outcomes.append(("done", seq)),
                lambda refusal: outcomes.append(("fail", refusal.code)))  # fmt: skip
    rig.hub.say(record, "a", "y", lambda seq: outcomes.append(("done", seq)),
                lambda refusal: outcomes.append(("fail", refusal.code)))  # fmt: skip
    rig.run()
    assert outcomes == [("fail", errors.NOT_IN_ROOM), ("done", 2)]


def stop_applying(rig: Rig, index: int) -> List[List[m.Command]]:
    """Make shard *index* swallow its batches (a stopped shard); returns them."""
    held: List[List[m.Command]] = []
    link = rig.pool.links[index]

    def hold() -> None:
        batch, link._pending = link._pending, []
        if batch:
            link.on_flush(index, batch)
            held.append(batch)

    link._apply = hold  # type: ignore[method-assign]
    return held


def test_commands_to_a_dead_shard_each_get_their_outcome(rig: Rig) -> None:
    index = rig.pool.index_of("a")
    client = Recorder()
    record = rig.member(client, "a", "alice")
    other = rig.hub.add(Recorder())
    held = stop_applying(rig, index)
    sent: List[Optional[str]] = []
    rig.hub.say(record, "a", "lost", lambda seq: sent.append("done"),
                lambda refusal: sent.append(refusal.code))  # fmt: skip
    rig.hub.join(other, "a", "bob")
    rig.hub.leave(record, "a")
    rig.run()
    assert held and record.rooms == {"a": Membership.LEAVING}
    rig.hub.on_shard_down(index)
    assert sent == [errors.NOT_DELIVERED]  # not recorded: the sender is told so
    assert other.rooms == {}  # the JOIN in flight is refused: no member left behind
    assert other.client.said == [(errors.ROOM_UNAVAILABLE, "a")]  # type: ignore[attr-defined]
    assert record.rooms == {} and client.said[-1] == ("left", "a")  # the LEAVE completed
    # Back: nobody to put back (alice left, bob never joined).
    rig.pool.links[index] = type(rig.pool.links[index])(index, rig.hub, epoch=2)
    rig.pool.links[index].on_flush = rig.hub._sent
    rig.hub.on_shard_restarted(index)
    rig.run()
    assert rig.pool.links[index].batches == []


def test_rejoins_go_first_and_a_new_epoch_is_told(rig: Rig) -> None:
    index = rig.pool.index_of("a")
    client = Recorder()
    record = rig.member(client, "a", "alice")
    epoch = rig.hub.epoch_of("a")
    rig.hub.on_shard_down(index)
    fresh = type(rig.pool.links[index])(index, rig.hub, epoch=epoch + 5)
    fresh.on_flush = rig.hub._sent
    rig.pool.links[index] = fresh
    rig.hub.say(record, "a", "queued while it restarted")
    rig.hub.on_shard_restarted(index)
    rig.run()
    first = fresh.batches[0]
    assert [command[m.OP] for command in first] == [m.REJOIN, m.MSG]
    assert client.said[-1] == ("restarted", "a")
    assert rig.hub.epoch_of("a") == epoch + 5
    assert client.got[-1][2] == msg_line("a", "alice", "queued while it restarted")


def test_a_stopped_shard_times_out_and_its_late_refusals_change_nothing(rig: Rig) -> None:
    index = rig.pool.index_of("a")
    record = rig.member(Recorder(), "a", "alice")
    held = stop_applying(rig, index)
    outcomes: List[str] = []
    rig.hub.say(record, "a", "frozen", lambda seq: outcomes.append("done"),
                lambda refusal: outcomes.append(refusal.code))  # fmt: skip
    rig.run()
    flight = rig.hub._in_flight[index]
    (command,) = flight.commands
    # Pretend the deadline and its grace passed, and let the sweep run.
    flight.commands[0] = command[:2] + (1.0,) + command[3:]
    rig.hub._sweep()
    assert outcomes == [errors.SHARD_TIMEOUT] and flight.timed_out == 1
    # The shard comes back and refuses the expired command: nothing more happens.
    rig.hub.on_shard_events(index, [m.fail(command[m.REQ], errors.SHARD_TIMEOUT)])
    assert outcomes == [errors.SHARD_TIMEOUT] and not flight.commands and flight.timed_out == 0
    assert held
