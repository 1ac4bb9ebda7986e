"""shard/fanout.py: which router gets which event (pure, over a real ShardCore)."""

from __future__ import annotations

from typing import List, Set, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from common import messages as m
from shard.core import ShardCore
from shard.fanout import NO_ROUTER, RouterFanout, router_of

ROUTERS = 3


def cid(router: int, n: int) -> int:
    """The n-th client id of *router* (as the hub numbers them: N + r, steps of N)."""
    return ROUTERS + router + n * ROUTERS


def apply(
    core: ShardCore, fanout: RouterFanout, commands: List[Tuple[int, m.Command]]
) -> List[List[m.Event]]:
    batch = [command for _, command in commands]
    sources = [source for source, _ in commands]
    return fanout.split(batch, sources, core.apply(batch))


def make() -> Tuple[ShardCore, RouterFanout]:
    core = ShardCore(clock=lambda: 1000.0, epoch=1)
    return core, RouterFanout(ROUTERS, core.members_of)


def test_router_of_is_the_residue() -> None:
    assert [router_of(cid(r, 5), ROUTERS) for r in range(ROUTERS)] == [0, 1, 2]


def test_a_message_goes_once_to_each_router_with_members_and_completes_only_at_its_own() -> None:
    core, fanout = make()
    a, b, c = cid(0, 1), cid(1, 1), cid(1, 2)
    apply(core, fanout, [(0, m.join(1, 0.0, a, "r", "a"))])
    apply(core, fanout, [(1, m.join(1, 0.0, b, "r", "b")), (1, m.join(2, 0.0, c, "r", "c"))])
    out = apply(core, fanout, [(0, m.msg(2, 0.0, a, "r", "hi"))])
    assert [event[0] for event in out[0]] == [m.CHAT] and out[0][0][1] == 2
    assert [event[0] for event in out[1]] == [m.CHAT] and out[1][0][1] == 0  # once, not twice
    assert out[2] == []  # no members there


def test_a_leaver_hears_its_own_leave_and_the_others_are_told() -> None:
    core, fanout = make()
    a, b = cid(0, 1), cid(2, 1)
    apply(core, fanout, [(0, m.join(1, 0.0, a, "r", "a")), (2, m.join(1, 0.0, b, "r", "b"))])
    out = apply(core, fanout, [(2, m.leave(2, 0.0, b, "r"))])
    assert [(e[0], e[1]) for e in out[2]] == [(m.LEFT, 2)]
    assert [(e[0], e[1]) for e in out[0]] == [(m.LEFT, 0)]
    out = apply(core, fanout, [(0, m.msg(3, 0.0, a, "r", "alone"))])
    assert out[2] == [] and len(out[0]) == 1
    assert fanout.routers_in("r") == (0,)


def test_a_gone_routers_drops_come_from_no_router_and_tell_the_others() -> None:
    core, fanout = make()
    a, b = cid(0, 1), cid(1, 1)
    apply(core, fanout, [(0, m.join(1, 0.0, a, "r", "a")), (1, m.join(1, 0.0, b, "r", "b"))])
    out = apply(core, fanout, [(NO_ROUTER, m.drop(-1, 0.0, b))])
    assert [(e[0], e[1]) for e in out[0]] == [(m.LEFT, 0)]
    assert out[1] == [] or all(e[0] == m.LEFT for e in out[1])  # nobody completes the DROP
    assert not any(e[0] == m.DONE for events in out for e in events)


def test_a_direct_message_goes_to_the_recipients_router_only() -> None:
    core, fanout = make()
    a, b, c = cid(0, 1), cid(1, 1), cid(2, 1)
    for router, client, name in ((0, a, "a"), (1, b, "b"), (2, c, "c")):
        apply(core, fanout, [(router, m.join(1, 0.0, client, "r", name))])
    out = apply(core, fanout, [(0, m.privmsg(5, 0.0, a, "r", "b", "psst"))])
    assert [(e[0], e[1]) for e in out[0]] == [(m.PRIVATE, 5)]
    assert [(e[0], e[1]) for e in out[1]] == [(m.PRIVATE, 0)]
    assert out[2] == []


def test_a_rejoin_is_counted_from_the_core() -> None:
    core, fanout = make()
    a, b = cid(0, 1), cid(1, 1)
    apply(core, fanout, [(0, m.rejoin(1, 0.0, a, "r", "a")), (1, m.rejoin(1, 0.0, b, "r", "b"))])
    assert fanout.routers_in("r") == (0, 1)


operation = st.tuples(
    st.sampled_from(["join", "leave", "msg"]), st.integers(0, ROUTERS - 1), st.integers(0, 3)
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(operation, min_size=1, max_size=6), min_size=1, max_size=12))
def test_every_member_gets_every_message_once_through_its_router(batches: list) -> None:
    """Model: the members at each message; each router's CHAT copies must reach exactly
    the routers holding a member at that moment, and each at most once."""
    core, fanout = make()
    members: Set[int] = set()
    req = 0
    for operations in batches:
        commands = []
        expected: List[Set[int]] = []  # per MSG of a member: the routers that must get it
        for kind, router, n in operations:
            client = cid(router, n)
            req += 1
            if kind == "join":
                commands.append((router, m.join(req, 0.0, client, "room", f"u{client}")))
                members.add(client)
            elif kind == "leave":
                commands.append((router, m.leave(req, 0.0, client, "room")))
                members.discard(client)
            else:
                commands.append((router, m.msg(req, 0.0, client, "room", f"t{req}")))
                if client in members:
                    expected.append({router_of(x, ROUTERS) for x in members})
        out = apply(core, fanout, commands)
        got = []
        for _, command in commands:
            if command[0] != m.MSG:
                continue
            text = command[5]
            receivers = [
                r for r in range(ROUTERS) for e in out[r] if e[0] == m.CHAT and e[3][4] == text
            ]
            if receivers:
                assert len(receivers) == len(set(receivers)), "a router got a message twice"
                got.append(set(receivers))
        assert got == expected
