"""The shard's state and logic as a pure object: no sockets, no pipes, no clock of its own.

A :class:`ShardCore` owns the rooms that hash to its shard: for each room the members
(client id -> username), the next sequence number, the epoch and the last
``HISTORY_SIZE`` entries. :meth:`ShardCore.apply` takes a batch of commands (see
:mod:`common.messages`) and returns the events they caused, in order: exactly one
*completion* per command, carrying its ``req``. A command whose deadline has passed is
not applied: it completes with ``FAIL shard_timeout``. The process loop in
:mod:`shard.process` is a thin shell around it; tests drive it directly.

History is served from memory and written behind it to a :class:`shard.storage.HistoryStore`
(SQLite, or nothing for ``--in-memory``): a room coming into memory is loaded from the
store, every entry it records is staged, and the batch is committed before ``apply``
returns its events, so an event a client sees is stored unless the commit failed (and then
a ``STORAGE`` event says so, once, until it is stored again).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict, deque
from typing import Callable, Deque, Dict, Iterable, List, Mapping, Optional, Set, Tuple, TypeVar

from common import errors
from common import messages as m
from common.limits import HISTORY_SIZE, MAX_EMPTY_ROOMS_PER_SHARD, MAX_ROOMS_LISTED
from common.names import name_key, name_keys
from common.protocol import msg_line, privmsg_line
from shard.storage import NOTHING_FAILED, CommitReport, HistoryStore, MemoryStore

Clock = Callable[[], float]
K = TypeVar("K")

log = logging.getLogger(__name__)


class Room:
    """One room: members, sequence counter, bounded history."""

    __slots__ = ("name", "members", "keys", "seq", "history", "epoch")

    def __init__(self, name: str, epoch: int) -> None:
        self.name = name
        self.epoch = epoch
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


def recipient(members: Mapping[K, str], keys: Mapping[str, K], to: str) -> Optional[K]:
    """The member a message to *to* is for, of *members* (id -> name) holding *keys* (name
    key -> id): the one of exactly that name, else the one holding its primary key, else
    one holding its other key (``ΝΙΚΕ`` can match both ``nike`` and ``νικε``, two members
    whose names do not collide: the exact and the primary match decide first, always the
    same way). Ids are cids here, Redis member ids in :mod:`shard.redis_node`."""
    exact = next((member for member, name in members.items() if name == to), None)
    if exact is not None:
        return exact
    for key in name_keys(to):
        if key in keys:
            return keys[key]
    return None


def busiest_rooms(listing: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """At most ``MAX_ROOMS_LISTED`` of ``(room, members)``: the most members first, ties
    by name (so every shard and the router agree on which ones make the cut)."""
    if len(listing) <= MAX_ROOMS_LISTED:
        return listing
    return heapq.nsmallest(MAX_ROOMS_LISTED, listing, key=lambda item: (-item[1], item[0]))


class ShardCore:
    """All rooms of one shard. Not thread-safe; one owner (the shard process loop).

    *clock* returns seconds since the epoch (entry times), *monotonic* the clock deadlines
    are on (``time.monotonic``, shared by every process of a machine); inject fake ones in
    tests. *store* keeps the history (default: a :class:`MemoryStore`, nothing kept). For
    that default store, *epoch* names this incarnation's histories: rooms created here get
    it (an in-memory shard that restarts starts new histories under a new epoch); a durable
    store gives each room the epoch it has on disk.
    """

    def __init__(
        self,
        clock: Clock = time.time,
        epoch: Optional[int] = None,
        monotonic: Clock = time.monotonic,
        store: Optional[HistoryStore] = None,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self.epoch = int(clock() * 1000) if epoch is None else epoch
        self.store: HistoryStore = store if store is not None else MemoryStore(clock, self.epoch)
        self._record = self.store.record
        #: Rooms whose history is not being stored, and why (as last reported).
        self.unsaved: Dict[str, str] = {}
        #: Of those, the ones some of whose entries were given up (never to be stored).
        self._lost: Set[str] = set()
        self.rooms: Dict[str, Room] = {}
        # Rooms nobody is in, kept (with their history) for someone coming back, oldest
        # first, at most MAX_EMPTY_ROOMS_PER_SHARD of them.
        self._empty: OrderedDict[str, Room] = OrderedDict()
        self._client_rooms: Dict[int, Set[str]] = {}
        self._handlers: Dict[int, Callable[[List[m.Event], m.Command], None]] = {
            m.JOIN: self._join,
            m.MSG: self._msg,
            m.LEAVE: self._leave,
            m.DROP: self._drop,
            m.NAMES: self._names,
            m.ROOMS: self._rooms,
            m.HISTORY: self._history,
            m.SINCE: self._since,
            m.REJOIN: self._rejoin,
            m.PRIVMSG: self._privmsg,
        }

    # --- public ----------------------------------------------------------------------

    def apply(self, batch: Iterable[m.Command]) -> List[m.Event]:
        """Apply a batch of commands; return the resulting events in order, with exactly
        one completion per command (see :mod:`common.messages`). A command past its
        deadline is not applied: its completion is ``FAIL shard_timeout``.

        Raises ``KeyError`` for an unknown opcode (a router bug, not a peer error).
        """
        events: List[m.Event] = []
        handlers = self._handlers
        now = self._monotonic()
        always = m.ALWAYS_APPLIED
        for command in batch:
            deadline = command[2]  # m.DEADLINE
            if deadline and deadline < now and command[0] not in always:
                events.append(m.fail(command[1], errors.SHARD_TIMEOUT))
            else:
                handlers[command[0]](events, command)
        report = self.store.commit()
        if report is not NOTHING_FAILED:
            self._storage_changes(events, report)
        return events

    def idle(self) -> List[m.Event]:
        """While no commands come: retry storing what waits (a failed commit), so rooms
        recover without new traffic; the ``STORAGE`` events of that, if any."""
        return self.apply(()) if self.store.retry_due() else []

    def close(self) -> None:
        """Close the store (what is staged and not committed is dropped, as a crash would)."""
        self.store.close()

    def members_of(self, room: str) -> List[int]:
        """The cids of *room*'s members now (none if the room has none)."""
        found = self.rooms.get(room)
        return list(found.members) if found is not None else []

    def clients(self) -> List[int]:
        """The cids of every client in some room of this shard."""
        return list(self._client_rooms)

    def rooms_of(self, cid: int) -> Set[str]:
        """Names of the rooms client *cid* is in on this shard (a copy)."""
        return set(self._client_rooms.get(cid, ()))

    # --- handlers --------------------------------------------------------------------

    def _join(self, events: List[m.Event], command: m.Command) -> None:
        _, req, _, cid, name, username = command
        room = self.rooms.get(name) or self._revive(name)
        if cid in room.members:
            events.append(m.fail(req, errors.ALREADY_IN_ROOM))
            return
        keys = name_keys(username)
        if any(key in room.keys for key in keys):
            events.append(m.fail(req, errors.NAME_TAKEN))
            if not room.members:
                self._retire(room)
            return
        room.add(cid, username, keys)
        self._client_rooms.setdefault(cid, set()).add(name)
        entry = room.record(self._clock(), m.KIND_JOIN, username, f"{username} joined {name}")
        self._record((name, room.epoch, entry))
        events.append(m.joined(req, name, cid, entry, room.epoch))

    def _rejoin(self, events: List[m.Event], command: m.Command) -> None:
        _, req, _, cid, name, username = command
        room = self.rooms.get(name) or self._revive(name)
        keys = name_keys(username)
        if cid in room.members:
            events.append(m.done(req, room.epoch))
            return
        if any(key in room.keys for key in keys):
            # Taken meanwhile (in a router tier, another router's JOIN reached the restarted
            # shard first): the member is not put back, and its router is told.
            if not room.members:
                self._retire(room)
            events.append(m.fail(req, errors.NAME_TAKEN))
            return
        room.add(cid, username, keys)
        self._client_rooms.setdefault(cid, set()).add(name)
        events.append(m.done(req, room.epoch))

    def _msg(self, events: List[m.Event], command: m.Command) -> None:
        _, req, _, cid, name, text = command
        room = self._member_room(events, req, cid, name)
        if room is None:
            return
        username = room.members[cid]
        entry = room.record(self._clock(), m.KIND_CHAT, username, text)
        self._record((name, room.epoch, entry))
        events.append(m.chat(req, name, entry, msg_line(name, username, text)))

    def _privmsg(self, events: List[m.Event], command: m.Command) -> None:
        """A direct message between two members: an event for the router, nothing recorded
        (no seq, no history, no storage)."""
        _, req, _, cid, name, to, text = command
        room = self._member_room(events, req, cid, name)
        if room is None:
            return
        to_cid = recipient(room.members, room.keys, to)
        if to_cid is None:
            events.append(m.fail(req, errors.NO_SUCH_MEMBER))
            return
        sender, to = room.members[cid], room.members[to_cid]
        wire = privmsg_line(name, sender, to, text)
        ts = self._clock()
        events.append(m.private(req, name, to_cid, sender, to, ts, room.seq, text, wire))

    def _leave(self, events: List[m.Event], command: m.Command) -> None:
        _, req, _, cid, name = command
        room = self._member_room(events, req, cid, name)
        if room is not None:
            self._remove_member(events, room, cid, req)

    def _drop(self, events: List[m.Event], command: m.Command) -> None:
        _, req, _, cid = command
        for name in sorted(self._client_rooms.get(cid, ())):
            self._remove_member(events, self.rooms[name], cid, 0)
        events.append(m.done(req, None))

    def _names(self, events: List[m.Event], command: m.Command) -> None:
        _, req, _, _, name = command
        room = self.rooms.get(name)
        names = sorted(room.members.values(), key=name_key) if room else []
        events.append(m.done(req, names))

    def _rooms(self, events: List[m.Event], command: m.Command) -> None:
        req = command[m.REQ]
        listing = [(name, len(room.members)) for name, room in self.rooms.items()]
        events.append(m.done(req, busiest_rooms(listing)))

    def _history(self, events: List[m.Event], command: m.Command) -> None:
        _, req, _, cid, name, n = command
        room = self._member_room(events, req, cid, name)
        if room is not None:
            history = room.history
            start = max(0, len(history) - n)
            events.append(m.done(req, [history[i] for i in range(start, len(history))]))

    def _since(self, events: List[m.Event], command: m.Command) -> None:
        _, req, _, cid, name, after, max_bytes = command
        room = self._member_room(events, req, cid, name)
        if room is None:
            return
        first = room.first_seq()
        # Entries are consecutive, so the ones after `after` are the last (seq - after).
        wanted = max(0, min(room.seq - after, len(room.history)))
        history = room.history
        newer = (history[i] for i in range(len(history) - wanted, len(history)))
        entries, _ = m.take_within(newer, max_bytes)
        events.append(m.done(req, (entries, first, room.seq, room.epoch)))

    # --- helpers ---------------------------------------------------------------------

    def _member_room(self, events: List[m.Event], req: int, cid: int, name: str) -> Optional[Room]:
        room = self.rooms.get(name)
        if room is None or cid not in room.members:
            events.append(m.fail(req, errors.NOT_IN_ROOM))
            return None
        return room

    def _remove_member(self, events: List[m.Event], room: Room, cid: int, req: int) -> None:
        username = room.members.pop(cid)
        for key in name_keys(username):
            del room.keys[key]
        rooms = self._client_rooms[cid]
        rooms.discard(room.name)
        if not rooms:
            del self._client_rooms[cid]
        entry = room.record(self._clock(), m.KIND_LEAVE, username, f"{username} left {room.name}")
        self._record((room.name, room.epoch, entry))
        events.append(m.left(req, room.name, cid, entry))
        if not room.members:
            self._retire(room)

    def _revive(self, name: str) -> Room:
        room = self._empty.pop(name, None) or self._load(name)
        self.rooms[name] = room
        return room

    def _load(self, name: str) -> Room:
        """*name* as the store has it (a new, empty history if it has none)."""
        stored = self.store.load(name)
        room = Room(name, stored.epoch)
        room.seq = stored.seq
        room.history.extend(stored.entries)
        if stored.problem:
            log.warning("room %s: stored history not readable, starting anew: %s", name,
                        stored.problem)  # fmt: skip
        return room

    def _storage_changes(self, events: List[m.Event], report: CommitReport) -> None:
        """A ``STORAGE`` event for each room whose history stopped, or started again, being
        stored (not for every batch while it stays so); one that recovers after some of its
        entries were given up says so."""
        unsaved, failed = self.unsaved, report.failed
        for name, problem in failed.items():
            if name not in unsaved:
                log.warning("room %s: history not stored: %s", name, problem)
                events.append(m.storage(name, problem))
            unsaved[name] = problem
        self._lost.update(report.dropped)
        for name in report.recovered:
            if unsaved.pop(name, None) is not None and name not in failed:
                lost = name in self._lost
                self._lost.discard(name)
                log.warning("room %s: history stored again%s", name,
                            " (some entries were given up)" if lost else "")  # fmt: skip
                events.append(m.storage(name, None, lost))

    def _retire(self, room: Room) -> None:
        """Move an empty room to the bounded set of empty rooms (evicting the oldest)."""
        del self.rooms[room.name]
        self._empty[room.name] = room
        while len(self._empty) > MAX_EMPTY_ROOMS_PER_SHARD:
            self._empty.popitem(last=False)
