"""The shard's pure core (shard/core.py): rooms, membership, sequence numbers, history."""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from common import messages as m
from common.limits import HISTORY_SIZE, MAX_EMPTY_ROOMS_PER_SHARD
from common.names import name_key
from common.protocol import msg_line
from shard.core import ShardCore

pytestmark = pytest.mark.timeout(60)

T0 = 1_764_116_599.0


class FakeClock:
    """Starts at T0 and moves one second per reading, so every entry's time is known (and
    exact: whole seconds add up without float rounding)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def core(clock: FakeClock) -> ShardCore:
    return ShardCore(clock=clock)


def join(core: ShardCore, cid: int, room: str, username: str, req: int = 0) -> List[tuple]:
    return core.apply([(m.JOIN, req, cid, room, username)])


def say(core: ShardCore, cid: int, room: str, text: str, req: int = 0) -> List[tuple]:
    return core.apply([(m.MSG, req, cid, room, text)])


def done(core: ShardCore, command: tuple) -> object:
    """Apply one request and return its DONE result."""
    (event,) = core.apply([command])
    assert event[0] == m.DONE and event[1] == command[1], event
    return event[3]


def history(core: ShardCore, cid: int, room: str, n: int = HISTORY_SIZE) -> List[m.Entry]:
    return done(core, (m.HISTORY, 9, cid, room, n))  # type: ignore[return-value]


def since(
    core: ShardCore, cid: int, room: str, after: int, max_bytes: int = 1 << 30
) -> Tuple[list, int, int]:
    return done(core, (m.SINCE, 9, cid, room, after, max_bytes))  # type: ignore[return-value]


# --- join --------------------------------------------------------------------------------


def test_first_join_creates_the_room(core: ShardCore) -> None:
    entry = (1, T0 + 1, m.KIND_JOIN, "alice", "alice joined lobby")
    assert join(core, 1, "lobby", "alice") == [(m.JOINED, "lobby", 1, entry)]
    assert core.rooms_of(1) == {"lobby"}


def test_second_join_gets_the_next_seq(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    entry = (2, T0 + 2, m.KIND_JOIN, "bob", "bob joined lobby")
    assert join(core, 2, "lobby", "bob") == [(m.JOINED, "lobby", 2, entry)]


def test_join_with_a_req_is_answered_done_after_joined(core: ShardCore) -> None:
    # JOINED tells the members; the DONE that follows answers the request (its seq).
    joined, done = join(core, 1, "lobby", "alice", req=5)
    assert joined[0] == m.JOINED
    assert done == (m.DONE, 5, 1, joined[3][0])
    (only,) = join(core, 2, "lobby", "bob")  # no req: no DONE
    assert only[0] == m.JOINED


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("alice", "alice"),
        ("Alice", "alice"),
        ("ZOË", "zoë"),
        ("STRASSE", "straße"),
        ("ape", "\u0430\u0440\u0435"),  # all-Cyrillic look-alike
        ("\u0430\u0440\u0435", "APE"),
        ("alice", "\u1d00\u029f\u026a\u1d04\u1d07"),  # Latin small capitals
        ("al\u0131ce", "alice"),  # dotless i
        ("\u039d\u0399\u039a\u0395", "nike"),  # Greek capitals: the key read as written
        ("vox", "\u03bd\u03bf\u03c7"),  # Greek small nu looks like v
    ],
    ids=[
        "same",
        "case",
        "unicode-case",
        "casefold",
        "cyrillic",
        "cyrillic-case",
        "small-caps",
        "dotless-i",
        "greek-capitals",
        "greek-small",
    ],
)
def test_name_taken_ignoring_case(core: ShardCore, first: str, second: str) -> None:
    join(core, 1, "lobby", first)
    assert join(core, 2, "lobby", second, req=4) == [
        (m.FAIL, 4, 2, m.JOIN, m.ERR_NAME_TAKEN, "lobby")
    ]
    assert core.rooms_of(2) == set()
    assert history(core, 1, "lobby") == [(1, T0 + 1, m.KIND_JOIN, first, f"{first} joined lobby")]


def test_leaving_frees_every_key_of_a_name(core: ShardCore) -> None:
    # "ΝΙΚΕ" holds two keys: its case-folded form and "nike" (its look-alikes as written).
    join(core, 1, "lobby", "\u039d\u0399\u039a\u0395")
    assert join(core, 2, "lobby", "nike")[0][1:5] == (0, 2, m.JOIN, m.ERR_NAME_TAKEN)
    assert join(core, 2, "lobby", "\u03bd\u03b9\u03ba\u03b5")[0][4] == m.ERR_NAME_TAKEN
    core.apply([(m.LEAVE, 0, 1, "lobby")])
    assert join(core, 2, "lobby", "nike")[0][0] == m.JOINED
    assert join(core, 3, "lobby", "\u03bd\u03b9\u03ba\u03b5")[0][0] == m.JOINED  # not nike


def test_same_name_in_another_room_is_fine(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    assert join(core, 2, "other", "Alice")[0][0] == m.JOINED


def test_room_names_are_case_sensitive(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    assert join(core, 2, "Lobby", "alice")[0][0] == m.JOINED
    assert done(core, (m.NAMES, 1, 0, "lobby")) == ["alice"]


def test_already_in_room(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    assert join(core, 1, "lobby", "alice") == [
        (m.FAIL, 0, 1, m.JOIN, m.ERR_ALREADY_IN_ROOM, "lobby")
    ]
    assert join(core, 1, "lobby", "other") == [
        (m.FAIL, 0, 1, m.JOIN, m.ERR_ALREADY_IN_ROOM, "lobby")
    ]
    assert len(history(core, 1, "lobby")) == 1


def test_name_freed_by_leave_can_be_taken(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    join(core, 2, "lobby", "bob")
    core.apply([(m.LEAVE, 0, 1, "lobby")])
    assert join(core, 3, "lobby", "ALICE")[0][0] == m.JOINED


# --- msg ---------------------------------------------------------------------------------


def test_msg_to_members(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    entry = (2, T0 + 2, m.KIND_CHAT, "alice", " hi  there ")
    wire = msg_line("lobby", "alice", " hi  there ")
    assert wire == b"MSG lobby alice  hi  there \n"
    assert say(core, 1, "lobby", " hi  there ") == [(m.CHAT, "lobby", entry, wire)]


def test_msg_with_req_is_also_answered(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    events = say(core, 1, "lobby", "hi", req=7)
    assert [e[0] for e in events] == [m.CHAT, m.DONE]
    assert events[1] == (m.DONE, 7, 1, 2)  # the new entry's seq


@pytest.mark.parametrize("situation", ["no-room", "other-member-only", "after-leave"])
def test_msg_when_not_in_room(core: ShardCore, situation: str) -> None:
    if situation == "other-member-only":
        join(core, 2, "lobby", "bob")
    elif situation == "after-leave":
        join(core, 1, "lobby", "alice")
        join(core, 2, "lobby", "bob")
        core.apply([(m.LEAVE, 0, 1, "lobby")])
    assert say(core, 1, "lobby", "hi", req=3) == [(m.FAIL, 3, 1, m.MSG, m.ERR_NOT_IN_ROOM, "lobby")]


# --- leave and drop ----------------------------------------------------------------------


def test_leave(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    join(core, 2, "lobby", "bob")
    entry = (3, T0 + 3, m.KIND_LEAVE, "alice", "alice left lobby")
    assert core.apply([(m.LEAVE, 8, 1, "lobby")]) == [
        (m.LEFT, "lobby", 1, entry, True),
        (m.DONE, 8, 1, None),
    ]
    assert core.rooms_of(1) == set()
    assert done(core, (m.NAMES, 1, 0, "lobby")) == ["bob"]


def test_leave_without_req_is_not_answered(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    assert [e[0] for e in core.apply([(m.LEAVE, 0, 1, "lobby")])] == [m.LEFT]


@pytest.mark.parametrize("room_exists", [False, True], ids=["no-room", "room-exists"])
def test_leave_when_not_in_room(core: ShardCore, room_exists: bool) -> None:
    if room_exists:
        join(core, 2, "lobby", "bob")
    assert core.apply([(m.LEAVE, 0, 1, "lobby")]) == [
        (m.FAIL, 0, 1, m.LEAVE, m.ERR_NOT_IN_ROOM, "lobby")
    ]


def test_drop_leaves_every_room_in_name_order(core: ShardCore) -> None:
    for room in ("c", "a", "b"):
        join(core, 1, room, "alice")
    join(core, 2, "b", "bob")
    events = core.apply([(m.DROP, 6, 1)])
    assert [(e[0], e[1], e[2], e[4]) for e in events[:3]] == [
        (m.LEFT, room, 1, False) for room in ("a", "b", "c")
    ]
    assert [e[3][2:] for e in events[:3]] == [
        (m.KIND_LEAVE, "alice", f"alice left {room}") for room in ("a", "b", "c")
    ]
    assert events[3] == (m.DONE, 6, 1, None)
    assert core.rooms_of(1) == set()
    assert done(core, (m.NAMES, 1, 0, "b")) == ["bob"]


def test_drop_of_unknown_client_is_answered(core: ShardCore) -> None:
    assert core.apply([(m.DROP, 3, 42)]) == [(m.DONE, 3, 42, None)]


# --- names and rooms ---------------------------------------------------------------------


def test_names_sorted_ignoring_case(core: ShardCore) -> None:
    for cid, name in enumerate(["carol", "Bob", "alice", "Dave", "émile"], start=1):
        join(core, cid, "lobby", name)
    assert done(core, (m.NAMES, 1, 99, "lobby")) == ["alice", "Bob", "carol", "Dave", "émile"]


def test_names_of_unknown_or_empty_room(core: ShardCore) -> None:
    assert done(core, (m.NAMES, 1, 0, "nowhere")) == []
    join(core, 1, "lobby", "alice")
    core.apply([(m.LEAVE, 0, 1, "lobby")])
    assert done(core, (m.NAMES, 1, 0, "lobby")) == []


def test_rooms_lists_rooms_with_members(core: ShardCore) -> None:
    assert done(core, (m.ROOMS, 1, 0)) == []
    join(core, 1, "a", "alice")
    join(core, 2, "a", "bob")
    join(core, 1, "b", "alice")
    join(core, 3, "c", "carol")
    core.apply([(m.LEAVE, 0, 3, "c")])
    assert sorted(done(core, (m.ROOMS, 1, 0))) == [("a", 2), ("b", 1)]


# --- history -----------------------------------------------------------------------------


def test_history_has_joins_leaves_and_chat_oldest_first(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    join(core, 2, "lobby", "bob")
    say(core, 2, "lobby", "hi")
    core.apply([(m.LEAVE, 0, 2, "lobby")])
    assert history(core, 1, "lobby") == [
        (1, T0 + 1, m.KIND_JOIN, "alice", "alice joined lobby"),
        (2, T0 + 2, m.KIND_JOIN, "bob", "bob joined lobby"),
        (3, T0 + 3, m.KIND_CHAT, "bob", "hi"),
        (4, T0 + 4, m.KIND_LEAVE, "bob", "bob left lobby"),
    ]


@pytest.mark.parametrize("n", [1, 2, 5, 6, HISTORY_SIZE])
def test_history_n(core: ShardCore, n: int) -> None:
    join(core, 1, "lobby", "alice")
    for i in range(4):
        say(core, 1, "lobby", f"m{i}")
    entries = history(core, 1, "lobby", n)
    assert [e[0] for e in entries] == list(range(1, 6))[-n:]


def test_history_when_not_in_room(core: ShardCore) -> None:
    join(core, 2, "lobby", "bob")
    assert core.apply([(m.HISTORY, 4, 1, "lobby", 10)]) == [
        (m.FAIL, 4, 1, m.HISTORY, m.ERR_NOT_IN_ROOM, "lobby")
    ]
    assert core.apply([(m.HISTORY, 5, 1, "nowhere", 10)]) == [
        (m.FAIL, 5, 1, m.HISTORY, m.ERR_NOT_IN_ROOM, "nowhere")
    ]


def test_history_is_capped_and_seq_keeps_increasing(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")  # seq 1
    total = HISTORY_SIZE + 120
    for i in range(2, total + 1):
        (event,) = say(core, 1, "lobby", f"m{i}")
        assert event[2][0] == i  # seq is never reused or reset
    entries = history(core, 1, "lobby")
    assert len(entries) == HISTORY_SIZE
    assert [e[0] for e in entries] == list(range(total - HISTORY_SIZE + 1, total + 1))
    assert entries[-1][4] == f"m{total}"
    assert history(core, 1, "lobby", 3)[0][0] == total - 2


def test_seq_is_per_room(core: ShardCore) -> None:
    join(core, 1, "a", "alice")
    join(core, 1, "b", "alice")
    say(core, 1, "a", "x")
    assert say(core, 1, "b", "y")[0][2][0] == 2
    assert say(core, 1, "a", "z")[0][2][0] == 3


# --- since -------------------------------------------------------------------------------


def test_since(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")  # 1
    for i in range(4):
        say(core, 1, "lobby", f"m{i}")  # 2..5
    entries, first, last = since(core, 1, "lobby", 3)
    assert [e[0] for e in entries] == [4, 5]
    assert (first, last) == (1, 5)
    assert since(core, 1, "lobby", 0)[0] == history(core, 1, "lobby")
    assert since(core, 1, "lobby", 5) == ([], 1, 5)
    assert since(core, 1, "lobby", 99) == ([], 1, 5)


def test_since_after_eviction(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    total = HISTORY_SIZE + 50
    for i in range(2, total + 1):
        say(core, 1, "lobby", f"m{i}")
    first_kept = total - HISTORY_SIZE + 1
    entries, first, last = since(core, 1, "lobby", 10)  # 11..50 are gone
    assert (first, last) == (first_kept, total)
    assert [e[0] for e in entries] == list(range(first_kept, total + 1))
    entries, _, _ = since(core, 1, "lobby", total - 2)
    assert [e[0] for e in entries] == [total - 1, total]


def test_since_when_not_in_room(core: ShardCore) -> None:
    assert core.apply([(m.SINCE, 2, 1, "lobby", 0, 1 << 30)]) == [
        (m.FAIL, 2, 1, m.SINCE, m.ERR_NOT_IN_ROOM, "lobby")
    ]


# --- empty rooms -------------------------------------------------------------------------


def test_empty_room_keeps_its_history_for_someone_coming_back(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")  # 1
    say(core, 1, "lobby", "remember me")  # 2
    core.apply([(m.LEAVE, 0, 1, "lobby")])  # 3
    assert done(core, (m.ROOMS, 1, 0)) == []
    (event,) = join(core, 2, "lobby", "bob")
    assert event[3][0] == 4
    assert [e[4] for e in history(core, 2, "lobby")][1] == "remember me"


def test_empty_rooms_are_bounded(core: ShardCore) -> None:
    """Past MAX_EMPTY_ROOMS_PER_SHARD empty rooms, the longest-empty one is forgotten."""

    def visit(room: str) -> int:
        (event,) = join(core, 1, room, "alice")
        core.apply([(m.LEAVE, 0, 1, room)])
        return event[3][0]

    assert visit("r0") == 1
    for i in range(1, MAX_EMPTY_ROOMS_PER_SHARD + 1):
        visit(f"r{i}")
    # r0 was the longest empty and one room too many: forgotten, it starts over at 1.
    assert visit("r0") == 1
    # r2 is still remembered (r1 was pushed out when r0 came back empty).
    assert visit("r2") == 3


def test_failed_join_does_not_keep_a_room_alive(core: ShardCore) -> None:
    join(core, 1, "lobby", "alice")
    assert join(core, 2, "lobby", "ALICE")[0][0] == m.FAIL
    core.apply([(m.LEAVE, 0, 1, "lobby")])
    assert done(core, (m.ROOMS, 1, 0)) == []


# --- batches and clock -------------------------------------------------------------------


def test_batch_events_are_in_command_order(core: ShardCore) -> None:
    events = core.apply(
        [
            (m.JOIN, 0, 1, "lobby", "alice"),
            (m.MSG, 0, 1, "lobby", "one"),
            (m.NAMES, 3, 1, "lobby"),
            (m.MSG, 0, 2, "lobby", "not a member"),
            (m.MSG, 0, 1, "lobby", "two"),
            (m.LEAVE, 0, 1, "lobby"),
        ]
    )
    assert [e[0] for e in events] == [m.JOINED, m.CHAT, m.DONE, m.FAIL, m.CHAT, m.LEFT]
    assert [e[2][0] for e in events if e[0] == m.CHAT] == [2, 3]
    assert events[2][3] == ["alice"]


def test_times_come_from_the_injected_clock() -> None:
    times = iter([10.0, 20.5, 33.25])
    core = ShardCore(clock=lambda: next(times))
    join(core, 1, "lobby", "alice")
    say(core, 1, "lobby", "hi")
    join(core, 2, "lobby", "bob")
    assert [e[1] for e in history(core, 1, "lobby")] == [10.0, 20.5, 33.25]


def test_unknown_opcode_is_a_router_bug(core: ShardCore) -> None:
    with pytest.raises(KeyError):
        core.apply([(999, 0, 1)])


# --- model-based -------------------------------------------------------------------------

CIDS = st.integers(min_value=1, max_value=4)
ROOMS = st.sampled_from(["a", "b", "B"])
USERS = st.sampled_from(["ann", "Ann", "bob", "cy", "ΝΙΚΕ", "nike", "νικε", "vike"])
#: The pairs of USERS that are one name in a room, written out by hand: case, and Greek
#: look-alikes read either as case-folded (ΝΙΚΕ ~ νικε) or as written (ΝΙΚΕ ~ nike,
#: νικε ~ vike). Not transitive: nike and vike are two names.
SAME_USERS = {
    frozenset(pair)
    for pair in [("ann", "Ann"), ("ΝΙΚΕ", "nike"), ("ΝΙΚΕ", "νικε"), ("νικε", "vike")]
}


def same_user(a: str, b: str) -> bool:
    return a == b or frozenset((a, b)) in SAME_USERS


class ShardModel(RuleBasedStateMachine):
    """ShardCore against a dict-of-lists model: members, seq and history per room."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.core = ShardCore(clock=self.clock)
        self.now = T0  # the time the model expects the core's next entry to have
        self.members: Dict[str, Dict[int, str]] = {}
        self.entries: Dict[str, List[m.Entry]] = {}

    def record(self, room: str, kind: str, username: str, text: str) -> m.Entry:
        entries = self.entries.setdefault(room, [])
        self.now += 1.0  # the same steps as FakeClock
        entry = (len(entries) + 1, self.now, kind, username, text)
        entries.append(entry)
        return entry

    def check(self, command: tuple, expected: List[tuple]) -> None:
        assert self.core.apply([command]) == expected

    def not_member(self, cid: int, room: str) -> bool:
        return cid not in self.members.get(room, {})

    @rule(cid=CIDS, room=ROOMS, user=USERS, req=st.sampled_from([0, 1]))
    def join(self, cid: int, room: str, user: str, req: int) -> None:
        members = self.members.setdefault(room, {})
        if cid in members:
            expected = [(m.FAIL, req, cid, m.JOIN, m.ERR_ALREADY_IN_ROOM, room)]
        elif any(same_user(u, user) for u in members.values()):
            expected = [(m.FAIL, req, cid, m.JOIN, m.ERR_NAME_TAKEN, room)]
        else:
            members[cid] = user
            entry = self.record(room, m.KIND_JOIN, user, f"{user} joined {room}")
            expected = [(m.JOINED, room, cid, entry)]
            if req:
                expected.append((m.DONE, req, cid, entry[0]))
        self.check((m.JOIN, req, cid, room, user), expected)

    @rule(cid=CIDS, room=ROOMS, text=st.sampled_from(["hi", " spaced  ", "é"]))
    def msg(self, cid: int, room: str, text: str) -> None:
        if self.not_member(cid, room):
            expected = [(m.FAIL, 0, cid, m.MSG, m.ERR_NOT_IN_ROOM, room)]
        else:
            user = self.members[room][cid]
            entry = self.record(room, m.KIND_CHAT, user, text)
            expected = [(m.CHAT, room, entry, msg_line(room, user, text))]
        self.check((m.MSG, 0, cid, room, text), expected)

    @rule(cid=CIDS, room=ROOMS)
    def leave(self, cid: int, room: str) -> None:
        if self.not_member(cid, room):
            expected = [(m.FAIL, 0, cid, m.LEAVE, m.ERR_NOT_IN_ROOM, room)]
        else:
            user = self.members[room].pop(cid)
            entry = self.record(room, m.KIND_LEAVE, user, f"{user} left {room}")
            expected = [(m.LEFT, room, cid, entry, True)]
        self.check((m.LEAVE, 0, cid, room), expected)

    @rule(cid=CIDS)
    def drop(self, cid: int) -> None:
        expected = []
        for room in sorted(self.members):
            if cid in self.members[room]:
                user = self.members[room].pop(cid)
                entry = self.record(room, m.KIND_LEAVE, user, f"{user} left {room}")
                expected.append((m.LEFT, room, cid, entry, False))
        self.check((m.DROP, 2, cid), [*expected, (m.DONE, 2, cid, None)])

    @rule(cid=CIDS, room=ROOMS, n=st.integers(min_value=1, max_value=8))
    def history(self, cid: int, room: str, n: int) -> None:
        if self.not_member(cid, room):
            expected = [(m.FAIL, 3, cid, m.HISTORY, m.ERR_NOT_IN_ROOM, room)]
        else:
            expected = [(m.DONE, 3, cid, self.entries[room][-n:])]
        self.check((m.HISTORY, 3, cid, room, n), expected)

    @rule(
        cid=CIDS,
        room=ROOMS,
        after=st.integers(min_value=0, max_value=30),
        max_bytes=st.sampled_from([1, 150, 400, 1 << 30]),
    )
    def since(self, cid: int, room: str, after: int, max_bytes: int) -> None:
        if self.not_member(cid, room):
            expected = [(m.FAIL, 4, cid, m.SINCE, m.ERR_NOT_IN_ROOM, room)]
        else:
            entries = self.entries[room]
            newer = [e for e in entries if e[0] > after]
            taken = []
            for entry in newer:  # oldest first, within max_bytes, at least one
                if taken and sum(map(m.entry_size, taken + [entry])) > max_bytes:
                    break
                taken.append(entry)
            result = (taken, 1, len(entries))
            expected = [(m.DONE, 4, cid, result)]
        self.check((m.SINCE, 4, cid, room, after, max_bytes), expected)

    @rule(room=ROOMS)
    def names(self, room: str) -> None:
        names = sorted(self.members.get(room, {}).values(), key=name_key)
        self.check((m.NAMES, 5, 0, room), [(m.DONE, 5, 0, names)])

    @invariant()
    def rooms_match(self) -> None:
        ((_, _, _, listing),) = self.core.apply([(m.ROOMS, 6, 0)])
        expected = [(room, len(members)) for room, members in self.members.items() if members]
        assert sorted(listing) == sorted(expected)
        for cid in range(1, 5):
            assert self.core.rooms_of(cid) == {r for r, ms in self.members.items() if cid in ms}


TestShardModel = ShardModel.TestCase
TestShardModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
