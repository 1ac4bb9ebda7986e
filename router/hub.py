"""The router's core: clients, the membership mirror, requests to shards, and fan-out.

The hub owns every *client* (a TCP connection or a browser session, see :class:`Client`)
and turns their commands into shard commands. Shards own the rooms; the hub keeps a
*mirror* of each room's members, built only from the shards' own ``JOINED``/``LEFT``
events, so it always agrees with the shard (the events come in the shard's order) and lets
the hub fan a room's event out without asking the shard who is in it. The transports
(:mod:`router.tcp`, :mod:`router.http`) are thin adapters on top.

Everything here runs on the event loop thread and never blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from common import messages as m
from common.limits import DROP_TIMEOUT, MAX_ROOMS_PER_CLIENT, REQUEST_TIMEOUT
from common.protocol import user_joined_line, user_left_line
from router.output import OutputBudget
from router.policy import AddressLimits, ConnectionLimiter, Settings
from router.shards import ShardPool
from shard.core import busiest_rooms

log = logging.getLogger(__name__)

#: A request's callback gets the shard's result, or a :class:`Failure`.
Callback = Callable[[Any], None]


class Failure(Tuple[str, str]):
    """A refused request: ``(code, room)``, ``code`` one of the ``ERR_*`` in messages."""

    __slots__ = ()

    def __new__(cls, code: str, room: str) -> Failure:
        return super().__new__(cls, (code, room))

    @property
    def code(self) -> str:
        return self[0]

    @property
    def room(self) -> str:
        return self[1]


class Client:
    """What the hub needs of a member. Transports subclass it.

    The hub sets ``cid`` and maintains ``rooms`` (rooms the shard confirmed),
    ``pending_joins`` and ``shards`` (shard indices this client has sent commands to);
    the transport owns everything else.
    """

    #: True if the username was fixed before the first join (a browser session); False
    #: if the first successful JOIN fixes it (a TCP connection).
    username_fixed = False

    # Slots, not a __dict__: there may be 10,000 clients (subclasses may add a __dict__).
    __slots__ = ("cid", "username", "rooms", "pending_joins", "shards", "address")

    def __init__(self) -> None:
        self.cid = 0
        #: The per-address limits' key of the client's peer (``router.policy.address_key``);
        #: set by the transport before :meth:`Hub.add`.
        self.address = ""
        self.username: Optional[str] = None
        self.rooms: Set[str] = set()
        self.pending_joins: Set[str] = set()
        self.shards: Set[int] = set()

    def deliver(self, room: str, entry: m.Entry, wire: bytes) -> None:
        """A room event for this member (someone else's join/leave, or any chat message).
        *wire* is the line-protocol encoding, *entry* the structured one."""
        raise NotImplementedError

    def deliver_run(self, room: str, entries: List[m.Entry], wire: bytes) -> None:
        """Several chat messages of one room in a row; *wire* is all their lines joined.
        Transports that can, write *wire* in one go."""
        for entry in entries:
            self.deliver(room, entry, wire)

    def on_joined(self, room: str, entry: m.Entry) -> None:
        """This client's own JOIN succeeded."""

    def on_left(self, room: str, entry: m.Entry) -> None:
        """This client's own LEAVE succeeded."""

    def on_failure(self, op: int, failure: Failure) -> None:
        """A fire-and-forget command (``req == 0``) was refused."""

    def on_shutdown(self) -> None:
        """The server is shutting down."""

    def on_room_restarted(self, room: str) -> None:
        """The shard of *room* restarted: the client is still a member, history is lost."""


class Hub:
    """Clients, mirror, pending requests. Create, then :meth:`attach` a shard pool."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Optional[Settings] = None,
        limiter: Optional[ConnectionLimiter] = None,
    ) -> None:
        self.loop = loop
        #: Per-client limits, shared by the transports.
        self.settings = settings or Settings()
        #: Open connections of every transport, counted against the caps.
        self.limiter = limiter or ConnectionLimiter(
            self.settings.max_connections, self.settings.max_connections_per_ip
        )
        #: Unsent output of every connection, per address and in total.
        self.output = OutputBudget(
            self.settings.output_budget_total, self.settings.output_budget_per_address
        )
        #: Per-address session caps and join/session-creation buckets (both transports).
        self.addresses = AddressLimits(self.settings)
        self.pool: Optional[ShardPool] = None
        self.clients: Dict[int, Client] = {}
        self._by_address: Dict[str, Set[Client]] = {}  # address -> its clients
        self.members: Dict[str, Dict[int, Client]] = {}  # the mirror: room -> cid -> client
        self._pending: Dict[int, Tuple[Callback, float, int]] = {}  # req -> (cb, deadline, shard)
        self._cids = itertools.count(1)
        self._reqs = itertools.count(1)
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self._handlers = {
            m.CHAT: self._on_chat,
            m.JOINED: self._on_joined,
            m.LEFT: self._on_left,
            m.DONE: self._on_done,
            m.FAIL: self._on_fail,
        }

    def attach(self, pool: ShardPool) -> None:
        self.pool = pool
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    # --- clients ---------------------------------------------------------------------

    def add(self, client: Client) -> int:
        """Register *client*; returns its new ``cid``."""
        client.cid = next(self._cids)
        self.clients[client.cid] = client
        self._by_address.setdefault(client.address, set()).add(client)
        return client.cid

    def drop(self, client: Client, on_done: Optional[Callable[[], None]] = None) -> None:
        """*client* is leaving: it leaves every room. With *on_done*, the client stays
        registered (and gets the replies still on their way) until every shard it used has
        answered or ``DROP_TIMEOUT`` passed, then *on_done* is called and it is removed.
        Without it, the client is removed now."""
        shards = sorted(client.shards)
        if on_done is None or not shards:
            self._remove(client)
            for index in shards:
                self._send_to(index, (m.DROP, 0, client.cid))
            if on_done is not None:
                on_done()
            return
        remaining = len(shards)

        def one_done(_result: Any) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                self._remove(client)
                on_done()

        for index in shards:
            req = self._expect(one_done, index, DROP_TIMEOUT)
            self._send_to(index, (m.DROP, req, client.cid))

    def _remove(self, client: Client) -> None:
        if self.clients.pop(client.cid, None) is None:
            return
        same = self._by_address.get(client.address)
        if same is not None:
            same.discard(client)
            if not same:
                del self._by_address[client.address]

    def rooms_of_address(self, address: str) -> int:
        """Rooms the clients of *address* are in or joining, counted once per client."""
        return sum(
            len(client.rooms) + len(client.pending_joins)
            for client in self._by_address.get(address, ())
        )

    def shutdown(self) -> None:
        """Tell every client the server is going away."""
        for client in list(self.clients.values()):
            try:
                client.on_shutdown()
            except Exception:  # one broken client must not keep the others from hearing it
                log.exception("telling client %d about the shutdown failed", client.cid)

    # --- commands --------------------------------------------------------------------

    def join(
        self, client: Client, room: str, username: str, callback: Optional[Callback] = None
    ) -> Optional[str]:
        """Ask the room's shard to add *client* as *username*. Returns an error code
        (``ERR_*``) if the router refuses at once; otherwise the outcome arrives as
        ``on_joined`` / *callback* / ``on_failure``."""
        if client.username is not None and username != client.username:
            return m.ERR_WRONG_USERNAME
        # "Already in the room" is the shard's to say: a LEAVE of the room may be ahead of
        # this JOIN in the pipe, and the replies must come back in command order.
        if len(client.rooms) + len(client.pending_joins) >= MAX_ROOMS_PER_CLIENT:
            return m.ERR_TOO_MANY_ROOMS
        if self.rooms_of_address(client.address) >= self.settings.max_rooms_per_address:
            return m.ERR_TOO_MANY_ROOMS_FOR_ADDRESS
        client.username = username
        client.pending_joins.add(room)
        self._send(client, room, m.JOIN, callback, room, username)
        return None

    def say(
        self, client: Client, room: str, text: str, callback: Optional[Callback] = None
    ) -> None:
        """Send a chat message; the shard checks membership (it may still be joining)."""
        self._send(client, room, m.MSG, callback, room, text)

    def leave(self, client: Client, room: str, callback: Optional[Callback] = None) -> None:
        self._send(client, room, m.LEAVE, callback, room)

    def names(
        self, client: Client, room: str, callback: Callback, timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self._send(client, room, m.NAMES, callback, room, timeout=timeout)

    def history(
        self,
        client: Client,
        room: str,
        n: int,
        callback: Callback,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._send(client, room, m.HISTORY, callback, room, n, timeout=timeout)

    def since(
        self, client: Client, room: str, after: int, max_bytes: int, callback: Callback
    ) -> None:
        """The entries of *room* after seq *after*, oldest first, about *max_bytes* of them
        (at least one): ``(entries, first_seq, last_seq)``, or a :class:`Failure`."""
        self._send(client, room, m.SINCE, callback, room, after, max_bytes)

    def rooms(
        self,
        callback: Callable[[List[Tuple[str, int]]], None],
        asker: Optional[Client] = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        """The rooms with members, from every shard, sorted by name: at most
        ``MAX_ROOMS_LISTED``, the ones with the most members. A shard that does not
        answer in time contributes nothing. With *asker*, the request counts as that
        client's (its QUIT waits for the answer)."""
        assert self.pool is not None
        links = self.pool.links
        if asker is not None:
            asker.shards.update(range(len(links)))
        remaining = len(links)
        found: List[Tuple[str, int]] = []

        def one_done(result: Any) -> None:
            nonlocal remaining
            if not isinstance(result, Failure):
                found.extend(result)
            remaining -= 1
            if remaining == 0:
                callback(sorted(busiest_rooms(found)))

        for link in links:
            link.send((m.ROOMS, self._expect(one_done, link.index, timeout), 0))

    def epoch_of(self, room: str) -> int:
        """The epoch of the shard that owns *room* (bumped each time it restarts)."""
        assert self.pool is not None
        return self.pool.link_for(room).epoch

    # --- plumbing --------------------------------------------------------------------

    def _send(
        self,
        client: Client,
        room: str,
        op: int,
        callback: Optional[Callback],
        *args: Any,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        assert self.pool is not None
        index = self.pool.index_of(room)
        client.shards.add(index)
        req = 0 if callback is None else self._expect(callback, index, timeout)
        self.pool.links[index].send((op, req, client.cid, *args))

    def _send_to(self, index: int, command: tuple) -> None:
        assert self.pool is not None
        self.pool.links[index].send(command)

    def _expect(self, callback: Callback, index: int, timeout: float = REQUEST_TIMEOUT) -> int:
        req = next(self._reqs)
        self._pending[req] = (callback, time.monotonic() + timeout, index)
        return req

    def _fail_pending(self, expired: List[int], code: str) -> None:
        for req in expired:
            entry = self._pending.pop(req, None)
            if entry is not None:
                entry[0](Failure(code, ""))

    def _sweep(self) -> None:
        """Fail requests whose shard did not answer in time (stopped or dead shard)."""
        self._sweeper = self.loop.call_later(0.5, self._sweep)
        self.output.refresh()
        self.addresses.prune(self.loop.time())
        now = time.monotonic()
        expired = [req for req, (_, deadline, _) in self._pending.items() if deadline <= now]
        self._fail_pending(expired, m.ERR_TIMEOUT)

    # --- shard supervision (ShardListener) -------------------------------------------

    def _rooms_on(self, index: int) -> List[str]:
        assert self.pool is not None
        return [room for room in self.members if self.pool.index_of(room) == index]

    def on_shard_down(self, index: int) -> None:
        """A shard died: fail what was waiting on it (it will not answer)."""
        assert self.pool is not None
        lost = [req for req, (_, _, shard) in self._pending.items() if shard == index]
        self._fail_pending(lost, m.ERR_UNAVAILABLE)
        for client in list(self.clients.values()):
            for room in [r for r in client.pending_joins if self.pool.index_of(r) == index]:
                self._join_failed(client, room)
                client.on_failure(m.JOIN, Failure(m.ERR_UNAVAILABLE, room))

    def on_shard_restarted(self, index: int) -> None:
        """A shard is back, empty: put the members the mirror knows back in their rooms
        (silently) and tell them the room's history is gone."""
        assert self.pool is not None
        link = self.pool.links[index]
        for room in self._rooms_on(index):
            members = self.members[room]
            for cid in [cid for cid in members if cid not in self.clients]:
                del members[cid]  # left while the shard was down
            for cid, client in members.items():
                link.send((m.REJOIN, 0, cid, room, client.username))
            for client in list(members.values()):
                client.on_room_restarted(room)
            if not members:
                del self.members[room]

    def on_shard_lost(self, index: int) -> None:
        """The pool gave up on a shard: its rooms are gone; tell their members."""
        for room in self._rooms_on(index):
            for client in self.members.pop(room).values():
                client.rooms.discard(room)
                client.on_failure(m.MSG, Failure(m.ERR_UNAVAILABLE, room))

    # --- shard events ----------------------------------------------------------------

    def on_shard_events(self, index: int, events: List[tuple]) -> None:
        """Called on the loop thread with one pipe message's worth of events."""
        handlers = self._handlers
        count = len(events)
        i = 0
        while i < count:
            event = events[i]
            if event[0] != m.CHAT:
                handlers[event[0]](event)
                i += 1
                continue
            end = i + 1
            while end < count and events[end][0] == m.CHAT:
                end += 1
            if end - i == 1:
                self._on_chat(event)
            else:
                self._on_chats(events[i:end])
            i = end

    def _on_chats(self, run: List[tuple]) -> None:
        """A run of CHAT events (nothing else in between, so no membership changes): each
        room's messages go to each member as one write, rooms in their own order."""
        by_room: Dict[str, List[tuple]] = {}
        for event in run:
            by_room.setdefault(event[1], []).append(event)
        for room, events in by_room.items():
            if len(events) == 1:
                self._on_chat(events[0])
                continue
            members = self.members.get(room)
            if members:
                entries = [event[2] for event in events]
                wire = b"".join([event[3] for event in events])
                for client in members.values():
                    client.deliver_run(room, entries, wire)

    def _on_chat(self, event: tuple) -> None:
        _, room, entry, wire = event
        members = self.members.get(room)
        if members:
            for client in members.values():
                client.deliver(room, entry, wire)

    def _on_joined(self, event: tuple) -> None:
        _, room, cid, entry = event
        members = self.members.get(room)
        if members is None:
            members = self.members[room] = {}
        elif members:
            wire = user_joined_line(entry[3], room)
            for client in members.values():
                client.deliver(room, entry, wire)
        joiner = self.clients.get(cid)
        if joiner is None:
            if not members:
                del self.members[room]
            return  # gone already; its DROP is behind this in the pipe
        members[cid] = joiner
        joiner.pending_joins.discard(room)
        joiner.rooms.add(room)
        joiner.on_joined(room, entry)

    def _on_left(self, event: tuple) -> None:
        _, room, cid, entry, explicit = event
        members = self.members.get(room)
        if members is not None:
            members.pop(cid, None)
            if members:
                wire = user_left_line(entry[3], room)
                for client in members.values():
                    client.deliver(room, entry, wire)
            else:
                del self.members[room]
        leaver = self.clients.get(cid)
        if leaver is not None:
            leaver.rooms.discard(room)
            if explicit:
                leaver.on_left(room, entry)

    @staticmethod
    def _join_failed(client: Client, room: str) -> None:
        client.pending_joins.discard(room)
        if not (client.rooms or client.pending_joins or client.username_fixed):
            client.username = None  # the first JOIN failed: the name is not taken yet

    def _on_done(self, event: tuple) -> None:
        pending = self._pending.pop(event[1], None)
        if pending is not None:
            pending[0](event[3])

    def _on_fail(self, event: tuple) -> None:
        _, req, cid, op, code, room = event
        client = self.clients.get(cid)
        if op == m.JOIN and client is not None:
            self._join_failed(client, room)
        failure = Failure(code, room)
        pending = self._pending.pop(req, None) if req else None
        if pending is not None:
            pending[0](failure)
        elif client is not None:
            client.on_failure(op, failure)
