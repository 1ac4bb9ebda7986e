"""The shard core against a model: a hypothesis ``RuleBasedStateMachine``.

:class:`shard.core.ShardCore` is driven with random batches of router commands (joins with
colliding names, messages, leaves, drops, requests, bursts past the 500-entry history, a
restart with the router's REJOINs). The model is a dict of room -> members and a list of
entries per room. The events are also fed to a miniature of the router's mirror
(``router/hub.py``: fan-out goes to the members the ``JOINED``/``LEFT`` events say are in the
room), so the check "each member gets each message exactly once, non-members nothing" is
about what the router would really deliver.
"""

from __future__ import annotations

import itertools
from collections import defaultdict, deque
from typing import Deque, Dict, List, Optional, Set, Tuple

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from common import errors
from common import messages as m
from common.limits import HISTORY_SIZE
from shard.core import ShardCore

CIDS = [1, 2, 3, 4, 5]
#: Room names are case-sensitive: "lobby" and "Lobby" are two rooms.
ROOMS = ["lobby", "Lobby", "zoë-room"]
#: Usernames collide ignoring case (casefold: "straße" and "STRASSE" are one name).
USERNAMES = ["alice", "Alice", "ALICE", "bob", "zoë", "ZOË", "straße", "STRASSE"]
TEXTS = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=12)
#: Byte budgets of SINCE: one entry, a few, and no limit in practice.
MAX_BYTES = st.sampled_from([1, 250, 1000, 1 << 30])

Entry = Tuple[int, float, str, str, str]
#: A delivery to a client: (room, shard epoch, seq). Seqs start again after a restart.
Delivery = Tuple[str, int, int]


class Model:
    """What the shard should hold: members per room, entries per room (kept forever here,
    compared against the last HISTORY_SIZE), the next seq, and who should have received
    which chat message."""

    def __init__(self) -> None:
        self.members: Dict[str, Dict[int, str]] = {}  # only rooms with members
        self.entries: Dict[str, Deque[Entry]] = defaultdict(lambda: deque(maxlen=HISTORY_SIZE))
        self.seq: Dict[str, int] = defaultdict(int)
        self.epoch = 1
        self.expected: Dict[int, List[Delivery]] = defaultdict(list)

    def rooms_of(self, cid: int) -> Set[str]:
        return {room for room, members in self.members.items() if cid in members}

    def record(self, room: str, ts: float, kind: str, username: str, text: str) -> Entry:
        self.seq[room] += 1
        entry = (self.seq[room], ts, kind, username, text)
        self.entries[room].append(entry)
        return entry

    def remove(self, room: str, cid: int, ts: float, req: int) -> tuple:
        username = self.members[room].pop(cid)
        if not self.members[room]:
            del self.members[room]
        entry = self.record(room, ts, m.KIND_LEAVE, username, f"{username} left {room}")
        return m.left(req, room, cid, entry)

    def not_in_room(self, req: int, cid: int, room: str) -> Optional[tuple]:
        if cid in self.members.get(room, {}):
            return None
        return m.fail(req, errors.NOT_IN_ROOM)

    # One method per command: update the model, return the events the shard should send
    # (exactly one of them completes the command: it carries its req).

    def join(self, ts: float, req: int, cid: int, room: str, username: str) -> List[tuple]:
        members = self.members.get(room, {})
        if cid in members:
            return [m.fail(req, errors.ALREADY_IN_ROOM)]
        if any(name.casefold() == username.casefold() for name in members.values()):
            return [m.fail(req, errors.NAME_TAKEN)]
        self.members.setdefault(room, {})[cid] = username
        entry = self.record(room, ts, m.KIND_JOIN, username, f"{username} joined {room}")
        return [m.joined(req, room, cid, entry, self.epoch)]

    def msg(self, ts: float, req: int, cid: int, room: str, text: str) -> List[tuple]:
        fail = self.not_in_room(req, cid, room)
        if fail:
            return [fail]
        username = self.members[room][cid]
        entry = self.record(room, ts, m.KIND_CHAT, username, text)
        for member in self.members[room]:
            self.expected[member].append((room, self.epoch, entry[0]))
        wire = f"MSG {room} {username} {text}\n".encode()
        return [m.chat(req, room, entry, wire)]

    def privmsg(self, ts: float, req: int, cid: int, room: str, to: str, text: str) -> List[tuple]:
        """Nothing recorded; found by the name ignoring case, like a JOIN's collision."""
        fail = self.not_in_room(req, cid, room)
        if fail:
            return [fail]
        members = self.members[room]
        found = [c for c, name in members.items() if name.casefold() == to.casefold()]
        if not found:
            return [m.fail(req, errors.NO_SUCH_MEMBER)]
        sender, name = members[cid], members[found[0]]
        wire = f"PRIVMSG {room} {sender} {name} {text}\n".encode()
        return [m.private(req, room, found[0], sender, name, ts, self.seq[room], text, wire)]

    def leave(self, ts: float, req: int, cid: int, room: str) -> List[tuple]:
        fail = self.not_in_room(req, cid, room)
        return [fail] if fail else [self.remove(room, cid, ts, req)]

    def drop(self, ts: float, req: int, cid: int) -> List[tuple]:
        events = [self.remove(room, cid, ts, 0) for room in sorted(self.rooms_of(cid))]
        return events + [m.done(req, None)]

    def names(self, req: int, cid: int, room: str) -> List[tuple]:
        names = sorted(self.members.get(room, {}).values(), key=str.casefold)
        return [m.done(req, names)]

    def history(self, req: int, cid: int, room: str, n: int) -> List[tuple]:
        fail = self.not_in_room(req, cid, room)
        return [fail] if fail else [m.done(req, list(self.entries[room])[-n:])]

    def since(self, req: int, cid: int, room: str, after: int, max_bytes: int) -> List[tuple]:
        fail = self.not_in_room(req, cid, room)
        if fail:
            return [fail]
        held = list(self.entries[room])
        first = held[0][0] if held else self.seq[room] + 1
        newer = [e for e in held if e[0] > after]
        size, cut = 0, len(newer)
        for index, entry in enumerate(newer):  # oldest first, within max_bytes, at least one
            size += m.entry_size(entry)
            if index and size > max_bytes:
                cut = index
                break
        return [m.done(req, (newer[:cut], first, self.seq[room], self.epoch))]

    def restart(self) -> None:
        """The shard died and came back empty; members are put back, history is gone."""
        self.entries.clear()
        self.seq.clear()
        self.epoch += 1


class ShardCoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000.0
        self.model = Model()
        self.core = ShardCore(clock=lambda: self.now, epoch=self.model.epoch)
        self.reqs = itertools.count(1)
        # The router's side: the mirror built from events only, and what each client got.
        self.mirror: Dict[str, Set[int]] = {}
        self.received: Dict[int, List[Delivery]] = defaultdict(list)

    # --- plumbing --------------------------------------------------------------------

    def req(self) -> int:
        return next(self.reqs)

    def run(self, batch: List[tuple], expected: List[tuple]) -> None:
        """Apply *batch* to the core, compare with *expected*, route the events; check that
        every command got exactly one completion, in order."""
        events = self.core.apply(batch)
        assert events == expected
        assert [e[1] for e in events if e[1]] == [command[m.REQ] for command in batch]
        for event in events:
            self.route(event)
        self.now += 1.0

    def route(self, event: tuple) -> None:
        """What router/hub.py does with an event, reduced to who receives a chat."""
        if event[0] == m.JOINED:
            self.mirror.setdefault(event[2], set()).add(event[3])
        elif event[0] == m.LEFT:
            members = self.mirror[event[2]]
            members.discard(event[3])
            if not members:
                del self.mirror[event[2]]
        elif event[0] == m.CHAT:
            room, entry = event[2], event[3]
            for cid in self.mirror.get(room, ()):
                self.received[cid].append((room, self.model.epoch, entry[0]))

    def expect(self, command: tuple) -> List[tuple]:
        """The model's events for one command (and the model updated)."""
        op, req, _deadline, cid, *args = command
        model, ts = self.model, self.now
        if op == m.JOIN:
            return model.join(ts, req, cid, *args)
        if op == m.MSG:
            return model.msg(ts, req, cid, *args)
        if op == m.LEAVE:
            return model.leave(ts, req, cid, *args)
        if op == m.PRIVMSG:
            return model.privmsg(ts, req, cid, *args)
        if op == m.DROP:
            return model.drop(ts, req, cid)
        if op == m.NAMES:
            return model.names(req, cid, *args)
        if op == m.HISTORY:
            return model.history(req, cid, *args)
        if op == m.SINCE:
            return model.since(req, cid, *args)
        raise AssertionError(f"no model for {command}")

    def one(self, command: tuple) -> None:
        self.run([command], self.expect(command))

    # --- rules -----------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        assert self.core.apply([]) == []

    @rule(
        cid=st.sampled_from(CIDS),
        room=st.sampled_from(ROOMS),
        username=st.sampled_from(USERNAMES),
    )
    def join(self, cid: int, room: str, username: str) -> None:
        self.one(m.join(self.req(), 0.0, cid, room, username))

    @rule(cid=st.sampled_from(CIDS), room=st.sampled_from(ROOMS), text=TEXTS)
    def msg(self, cid: int, room: str, text: str) -> None:
        self.one(m.msg(self.req(), 0.0, cid, room, text))

    @rule(
        cid=st.sampled_from(CIDS),
        room=st.sampled_from(ROOMS),
        to=st.sampled_from(USERNAMES),
        text=TEXTS,
    )
    def privmsg(self, cid: int, room: str, to: str, text: str) -> None:
        self.one(m.privmsg(self.req(), 0.0, cid, room, to, text))

    @rule(cid=st.sampled_from(CIDS), room=st.sampled_from(ROOMS))
    def leave(self, cid: int, room: str) -> None:
        self.one(m.leave(self.req(), 0.0, cid, room))

    @rule(cid=st.sampled_from(CIDS))
    def drop(self, cid: int) -> None:
        self.one(m.drop(self.req(), 0.0, cid))

    @rule(cid=st.sampled_from(CIDS), room=st.sampled_from(ROOMS))
    def names(self, cid: int, room: str) -> None:
        self.one(m.names(self.req(), 0.0, cid, room))

    @rule()
    def rooms(self) -> None:
        req = self.req()
        (event,) = self.core.apply([m.rooms(req, 0.0, 0)])
        assert event[:2] == (m.DONE, req)
        expected = [(room, len(members)) for room, members in self.model.members.items()]
        assert sorted(event[2]) == sorted(expected)

    @rule(
        cid=st.sampled_from(CIDS),
        room=st.sampled_from(ROOMS),
        n=st.one_of(st.sampled_from([1, 2, HISTORY_SIZE - 1, HISTORY_SIZE]), st.integers(1, 500)),
    )
    def history(self, cid: int, room: str, n: int) -> None:
        self.one(m.history(self.req(), 0.0, cid, room, n))

    @rule(
        cid=st.sampled_from(CIDS),
        room=st.sampled_from(ROOMS),
        back=st.integers(-3, 600),
        max_bytes=MAX_BYTES,
    )
    def since(self, cid: int, room: str, back: int, max_bytes: int) -> None:
        after = self.model.seq[room] - back
        self.one(m.since(self.req(), 0.0, cid, room, after, max_bytes))

    def draw_member(self, data: st.DataObject) -> Tuple[int, str]:
        room = data.draw(st.sampled_from(sorted(self.model.members)))
        return data.draw(st.sampled_from(sorted(self.model.members[room]))), room

    @precondition(lambda self: bool(self.model.members))
    @rule(data=st.data(), n=st.one_of(st.sampled_from([1, 499, 500]), st.integers(1, 500)))
    def member_history(self, data: st.DataObject, n: int) -> None:
        cid, room = self.draw_member(data)
        self.one(m.history(self.req(), 0.0, cid, room, n))

    @precondition(lambda self: bool(self.model.members))
    @rule(
        data=st.data(),
        back=st.one_of(st.integers(-2, 3), st.integers(4, 600)),
        max_bytes=MAX_BYTES,
    )
    def member_since(self, data: st.DataObject, back: int, max_bytes: int) -> None:
        cid, room = self.draw_member(data)
        after = self.model.seq[room] - back
        self.one(m.since(self.req(), 0.0, cid, room, after, max_bytes))

    @precondition(lambda self: bool(self.model.members))
    @rule(data=st.data(), text=TEXTS)
    def member_msg(self, data: st.DataObject, text: str) -> None:
        cid, room = self.draw_member(data)
        self.one(m.msg(self.req(), 0.0, cid, room, text))

    @precondition(lambda self: bool(self.model.members))
    @rule(data=st.data(), count=st.integers(1, 400))
    def burst(self, data: st.DataObject, count: int) -> None:
        """Many messages from a member in one batch: pushes history past its cap."""
        cid, room = self.draw_member(data)
        batch = [m.msg(self.req(), 0.0, cid, room, f"burst {i}") for i in range(count)]
        expected = [event for command in batch for event in self.expect(command)]
        self.run(batch, expected)

    @rule(
        commands=st.lists(
            st.one_of(
                st.tuples(
                    st.just(m.JOIN),
                    st.sampled_from(CIDS),
                    st.sampled_from(ROOMS),
                    st.sampled_from(USERNAMES),
                ),
                st.tuples(st.just(m.MSG), st.sampled_from(CIDS), st.sampled_from(ROOMS), TEXTS),
                st.tuples(st.just(m.LEAVE), st.sampled_from(CIDS), st.sampled_from(ROOMS)),
                st.tuples(st.just(m.DROP), st.sampled_from(CIDS)),
            ),
            min_size=1,
            max_size=12,
        )
    )
    def mixed_batch(self, commands: List[tuple]) -> None:
        """A batch as the router sends it: events in command order, nothing reordered."""
        batch = [self.command(*spec) for spec in commands]
        expected = [event for command in batch for event in self.expect(command)]
        self.run(batch, expected)

    def command(self, op: int, cid: int, *args: str) -> tuple:
        req = self.req()
        if op == m.DROP:
            return m.drop(req, 0.0, cid)
        return (op, req, 0.0, cid, *args)

    @rule()
    def restart(self) -> None:
        """The shard process died and was restarted: a new core with a new epoch, and the
        router puts the members back from its mirror (router/hub.py on_shard_restarted);
        each REJOIN answers the new epoch."""
        self.model.restart()
        self.core = ShardCore(clock=lambda: self.now, epoch=self.model.epoch)
        batch, expected = [], []
        for room in sorted(self.mirror):
            for cid in sorted(self.mirror[room]):
                req = self.req()
                batch.append(m.rejoin(req, 0.0, cid, room, self.model.members[room][cid]))
                expected.append(m.done(req, self.model.epoch))
        self.run(batch, expected)

    # --- invariants ------------------------------------------------------------------

    @invariant()
    def mirror_agrees_with_the_model(self) -> None:
        assert self.mirror == {room: set(members) for room, members in self.model.members.items()}

    @invariant()
    def every_member_got_every_message_exactly_once(self) -> None:
        # Equal lists: no loss, no duplicate, nothing for non-members, in room order.
        for cid in CIDS:
            assert self.received[cid] == self.model.expected[cid], cid

    @invariant()
    def live_rooms_and_memberships(self) -> None:
        assert set(self.core.rooms) == set(self.model.members)
        for cid in CIDS:
            assert self.core.rooms_of(cid) == self.model.rooms_of(cid)

    @invariant()
    def history_is_bounded_in_seq_order_and_right(self) -> None:
        for name, room in self.core.rooms.items():
            history = list(room.history)
            assert len(history) <= HISTORY_SIZE
            seqs = [entry[0] for entry in history]
            assert seqs == list(range(room.seq - len(seqs) + 1, room.seq + 1))
            assert history == list(self.model.entries[name])
            assert room.seq == self.model.seq[name]


TestShardCoreStateful = ShardCoreMachine.TestCase
TestShardCoreStateful.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
