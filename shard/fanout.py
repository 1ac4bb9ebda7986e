"""Which routers get which events, when a shard serves a router tier (``--routers N``).

Every router gives its clients ids (``cid``) in its own residue class: router *r* of *N*
only uses cids with ``cid % N == r`` (:func:`router_of`). A shard then knows, without being
told, which router each member of a room is on, and it sends each room event **once per
router** that has members in the room; that router fans it out to its own members, as the
only router of a one-router cluster does today.

:class:`RouterFanout` is pure (no pipes): the shard process gives it the batch it applied
(each command tagged with the router it came from) and the events, and gets back one event
list per router:

- a command's completion goes to the router that sent it, unchanged (its ``req`` is that
  router's);
- a room event (``JOINED``, ``CHAT``, ``LEFT``, ``STORAGE``) also goes, with ``req`` 0 so
  that it completes nothing there, to every other router with members in the room at that
  point of the batch; a ``PRIVATE`` to the recipient's router instead.

Membership counts per router are kept from the events themselves (a ``JOINED`` adds one, a
``LEFT`` takes one away after it was sent, so the leaver's router hears it, a ``REJOIN``'s
``DONE`` adds one) and recomputed from the shard's rooms after a batch with ``REJOIN`` s,
which may count a member already there twice.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from common import messages as m

#: Commands that the shard makes itself (a dead router's clients leaving) come from here:
#: their completions go nowhere.
NO_ROUTER = -1

MembersOf = Callable[[str], Iterable[int]]


def router_of(cid: int, routers: int) -> int:
    """The router a client id belongs to (see the module docstring)."""
    return cid % routers


class RouterFanout:
    """Per-router event lists for a shard serving *routers* routers. *members_of* returns
    the cids in a room now (the shard core's view), used after ``REJOIN`` s."""

    def __init__(self, routers: int, members_of: MembersOf) -> None:
        self.routers = routers
        self._members_of = members_of
        #: room -> members per router (a list of *routers* counts); rooms with none dropped.
        self._counts: Dict[str, List[int]] = {}
        #: room -> the routers with members, cached until the counts change.
        self._with_members: Dict[str, Tuple[int, ...]] = {}

    def routers_in(self, room: str) -> Tuple[int, ...]:
        """The routers with members in *room*."""
        cached = self._with_members.get(room)
        if cached is None:
            counts = self._counts.get(room)
            cached = tuple(r for r, n in enumerate(counts) if n) if counts else ()
            self._with_members[room] = cached
        return cached

    def split(
        self, batch: Sequence[m.Command], sources: Sequence[int], events: Sequence[m.Event]
    ) -> List[List[m.Event]]:
        """The events of one applied *batch* (``sources[i]`` the router of ``batch[i]``),
        as one list per router (see the module docstring)."""
        out: List[List[m.Event]] = [[] for _ in range(self.routers)]
        position = 0  # the command whose completion comes next
        rejoined = set()
        for event in events:
            source = NO_ROUTER
            if event[1]:  # a completion: of the next command, in order
                command = batch[position]
                source = sources[position]
                position += 1
                if command[m.OP] == m.REJOIN:
                    rejoined.add(command[m.ROOM])
                    if event[0] == m.DONE:  # put back (or already there): counts from now
                        self._change(command[m.ROOM], router_of(command[m.CID], self.routers), 1)
            self._send(out, event, source)
        for room in rejoined:
            self.recount(room)
        return out

    def recount(self, room: str) -> None:
        """Count *room*'s members per router again from the shard's rooms."""
        counts = [0] * self.routers
        for cid in self._members_of(room):
            counts[router_of(cid, self.routers)] += 1
        self._set(room, counts if any(counts) else None)

    def _send(self, out: List[List[m.Event]], event: m.Event, source: int) -> None:
        if source != NO_ROUTER:
            out[source].append(event)
        op = event[0]
        if op == m.DONE or op == m.FAIL:
            return
        copy = None
        if op == m.PRIVATE:
            target = router_of(event[3], self.routers)
            if target != source:
                out[target].append(event[:1] + (0,) + event[2:])
            return
        room = event[2]
        if op == m.JOINED:
            self._change(room, router_of(event[3], self.routers), 1)
        for router in self.routers_in(room):
            if router != source:
                if copy is None:
                    copy = event[:1] + (0,) + event[2:] if event[1] else event
                out[router].append(copy)
        if op == m.LEFT:
            self._change(room, router_of(event[3], self.routers), -1)

    def _change(self, room: str, router: int, delta: int) -> None:
        counts = self._counts.get(room)
        if counts is None:
            counts = [0] * self.routers
        counts[router] = max(0, counts[router] + delta)
        self._set(room, counts if any(counts) else None)

    def _set(self, room: str, counts: Optional[List[int]]) -> None:
        self._with_members.pop(room, None)
        if counts is None:
            self._counts.pop(room, None)
        else:
            self._counts[room] = counts
