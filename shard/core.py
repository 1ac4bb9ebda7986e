"""The shard's state and logic as a pure object: no sockets, no pipes, no clock of its own.

A :class:`ShardCore` owns the rooms that hash to its shard: for each room the members
(client id -> username), the next sequence number and the last ``HISTORY_SIZE`` entries.
:meth:`ShardCore.apply` takes a batch of command tuples (see :mod:`common.messages`) and
returns the events they caused, in order. The process loop in :mod:`shard.process` is a
thin shell around it; tests drive it directly.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

from common import messages as m
from common.limits import HISTORY_SIZE, MAX_EMPTY_ROOMS_PER_SHARD, MAX_ROOMS_LISTED
from common.names import name_key, name_keys
from common.protocol import msg_line

Clock = Callable[[], float]


class Room:
    """One room: members, sequence counter, bounded history."""

    __slots__ = ("name", "members", "keys", "seq", "history")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: Dict[int, str] = {}  # cid -> username
        # name_keys(username) -> cid: one or two keys per member, none shared.
        self.keys: Dict[str, int] = {}
        self.seq = 0
        self.history: Deque[m.Entry] = deque(maxlen=HISTORY_SIZE)

    def add(self, cid: int, username: str, keys: Tuple[str, ...]) -> None:
        """Make *cid* a member as *username*, holding *keys* (none of them taken)."""
        self.members[cid] = username
        for key in keys:
            self.keys[key] = cid

    def record(self, ts: float, kind: str, username: str, text: str) -> m.Entry:
        """Append an entry with the next sequence number and return it."""
        self.seq += 1
        entry = (self.seq, ts, kind, username, text)
        self.history.append(entry)
        return entry

    def first_seq(self) -> int:
        """The oldest seq still held (``seq + 1`` when the history is empty)."""
        return self.history[0][0] if self.history else self.seq + 1


def busiest_rooms(listing: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """At most ``MAX_ROOMS_LISTED`` of ``(room, members)``: the most members first, ties
    by name (so every shard and the router agree on which ones make the cut)."""
    if len(listing) <= MAX_ROOMS_LISTED:
        return listing
    return heapq.nsmallest(MAX_ROOMS_LISTED, listing, key=lambda item: (-item[1], item[0]))


class ShardCore:
    """All rooms of one shard. Not thread-safe; one owner (the shard process loop).

    *clock* returns seconds since the epoch; inject a fake one in tests.
    """

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self.rooms: Dict[str, Room] = {}
        # Rooms nobody is in, kept (with their history) for someone coming back, oldest
        # first, at most MAX_EMPTY_ROOMS_PER_SHARD of them.
        self._empty: OrderedDict[str, Room] = OrderedDict()
        self._client_rooms: Dict[int, Set[str]] = {}
        self._handlers: Dict[int, Callable[[List[Any], tuple], None]] = {
            m.JOIN: self._join,
            m.MSG: self._msg,
            m.LEAVE: self._leave,
            m.DROP: self._drop,
            m.NAMES: self._names,
            m.ROOMS: self._rooms,
            m.HISTORY: self._history,
            m.SINCE: self._since,
            m.REJOIN: self._rejoin,
        }

    # --- public ----------------------------------------------------------------------

    def apply(self, batch: Iterable[tuple]) -> List[tuple]:
        """Apply a batch of commands; return the resulting events in order.

        Raises ``KeyError`` for an unknown opcode (a router bug, not a peer error).
        """
        events: List[tuple] = []
        handlers = self._handlers
        for command in batch:
            handlers[command[0]](events, command)
        return events

    def rooms_of(self, cid: int) -> Set[str]:
        """Names of the rooms client *cid* is in on this shard (a copy)."""
        return set(self._client_rooms.get(cid, ()))

    # --- handlers --------------------------------------------------------------------

    def _join(self, events: List[Any], command: tuple) -> None:
        _, req, cid, name, username = command
        room = self.rooms.get(name) or self._revive(name)
        if cid in room.members:
            events.append((m.FAIL, req, cid, m.JOIN, m.ERR_ALREADY_IN_ROOM, name))
            return
        keys = name_keys(username)
        if any(key in room.keys for key in keys):
            events.append((m.FAIL, req, cid, m.JOIN, m.ERR_NAME_TAKEN, name))
            if not room.members:
                self._retire(room)
            return
        room.add(cid, username, keys)
        self._client_rooms.setdefault(cid, set()).add(name)
        entry = room.record(self._clock(), m.KIND_JOIN, username, f"{username} joined {name}")
        events.append((m.JOINED, name, cid, entry))
        if req:
            events.append((m.DONE, req, cid, entry[0]))

    def _rejoin(self, events: List[Any], command: tuple) -> None:
        _, req, cid, name, username = command
        room = self.rooms.get(name) or self._revive(name)
        keys = name_keys(username)
        if cid not in room.members and not any(key in room.keys for key in keys):
            room.add(cid, username, keys)
            self._client_rooms.setdefault(cid, set()).add(name)
        elif not room.members:
            self._retire(room)
        if req:
            events.append((m.DONE, req, cid, None))

    def _msg(self, events: List[Any], command: tuple) -> None:
        _, req, cid, name, text = command
        room = self._member_room(events, command[0], req, cid, name)
        if room is None:
            return
        username = room.members[cid]
        entry = room.record(self._clock(), m.KIND_CHAT, username, text)
        events.append((m.CHAT, name, entry, msg_line(name, username, text)))
        if req:
            events.append((m.DONE, req, cid, entry[0]))

    def _leave(self, events: List[Any], command: tuple) -> None:
        _, req, cid, name = command
        room = self._member_room(events, command[0], req, cid, name)
        if room is None:
            return
        self._remove_member(events, room, cid, explicit=True)
        if req:
            events.append((m.DONE, req, cid, None))

    def _drop(self, events: List[Any], command: tuple) -> None:
        _, req, cid = command
        for name in sorted(self._client_rooms.get(cid, ())):
            self._remove_member(events, self.rooms[name], cid, explicit=False)
        events.append((m.DONE, req, cid, None))

    def _names(self, events: List[Any], command: tuple) -> None:
        _, req, cid, name = command
        room = self.rooms.get(name)
        names = sorted(room.members.values(), key=name_key) if room else []
        events.append((m.DONE, req, cid, names))

    def _rooms(self, events: List[Any], command: tuple) -> None:
        _, req, cid = command
        listing = [(name, len(room.members)) for name, room in self.rooms.items()]
        events.append((m.DONE, req, cid, busiest_rooms(listing)))

    def _history(self, events: List[Any], command: tuple) -> None:
        _, req, cid, name, n = command
        room = self._member_room(events, command[0], req, cid, name)
        if room is not None:
            history = room.history
            start = max(0, len(history) - n)
            events.append((m.DONE, req, cid, [history[i] for i in range(start, len(history))]))

    def _since(self, events: List[Any], command: tuple) -> None:
        _, req, cid, name, after, max_bytes = command
        room = self._member_room(events, command[0], req, cid, name)
        if room is None:
            return
        first = room.first_seq()
        # Entries are consecutive, so the ones after `after` are the last (seq - after).
        wanted = max(0, min(room.seq - after, len(room.history)))
        history = room.history
        newer = (history[i] for i in range(len(history) - wanted, len(history)))
        entries, _ = m.take_within(newer, max_bytes)
        events.append((m.DONE, req, cid, (entries, first, room.seq)))

    # --- helpers ---------------------------------------------------------------------

    def _member_room(
        self, events: List[Any], op: int, req: int, cid: int, name: str
    ) -> Optional[Room]:
        room = self.rooms.get(name)
        if room is None or cid not in room.members:
            events.append((m.FAIL, req, cid, op, m.ERR_NOT_IN_ROOM, name))
            return None
        return room

    def _remove_member(self, events: List[Any], room: Room, cid: int, explicit: bool) -> None:
        username = room.members.pop(cid)
        for key in name_keys(username):
            del room.keys[key]
        rooms = self._client_rooms[cid]
        rooms.discard(room.name)
        if not rooms:
            del self._client_rooms[cid]
        entry = room.record(self._clock(), m.KIND_LEAVE, username, f"{username} left {room.name}")
        events.append((m.LEFT, room.name, cid, entry, explicit))
        if not room.members:
            self._retire(room)

    def _revive(self, name: str) -> Room:
        room = self._empty.pop(name, None) or Room(name)
        self.rooms[name] = room
        return room

    def _retire(self, room: Room) -> None:
        """Move an empty room to the bounded set of empty rooms (evicting the oldest)."""
        del self.rooms[room.name]
        self._empty[room.name] = room
        while len(self._empty) > MAX_EMPTY_ROOMS_PER_SHARD:
            self._empty.popitem(last=False)
