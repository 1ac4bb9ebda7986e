"""The router's core: one record per client, requests to shards with exactly one outcome
each, the membership mirror, and fan-out.

The hub owns a :class:`ClientRecord` for every client (a TCP connection or a browser
session): its username, and for each room one :class:`Membership` state (``JOINING``,
``JOINED``, ``LEAVING``). Only the hub changes it, only from the shards' completions (and
from a shard's death). The transports (:mod:`router.tcp`, :mod:`router.http`) implement
:class:`Client`: they render what the hub tells them and keep no copy of membership.

**Requests.** Every command sent to a shard is a request (see :mod:`common.messages`):
it carries a number, a deadline after which the shard will not apply it, and it gets
exactly one outcome: *done* (applied, with its result) or *refused* (a
:class:`~common.errors.Refusal`: not applied, now or later). Per shard the hub keeps the
commands in flight in the order they went down the pipe; a shard answers in that order, so
each completion is matched to the oldest command in flight. A command still unanswered
``DEADLINE_GRACE`` after its deadline is refused ``shard_timeout`` (the shard will refuse
it too when it gets to it). When a shard dies, every command in flight gets its outcome at
once: a JOIN is refused (``room_unavailable``: the member is not there), a MSG is refused
``not_delivered``, a LEAVE completes as left (and is not undone by the ``REJOIN``), a DROP
is done. When the shard is back, ``REJOIN`` for every member goes down the pipe before any
command queued meanwhile.

Everything here runs on the event loop thread and never blocks.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from common import errors
from common import messages as m
from common.errors import Refusal
from common.limits import MAX_ROOMS_PER_CLIENT
from common.protocol import user_joined_line, user_left_line
from router.metrics import Metrics
from router.output import OutputBudget
from router.policy import AddressLimits, ConnectionLimiter
from router.settings import Settings
from router.shards import ShardPool
from shard.core import busiest_rooms

log = logging.getLogger(__name__)

OnDone = Callable[[Any], None]
OnFail = Callable[[Refusal], None]


class Membership(enum.Enum):
    """One client's state in one room, as the hub knows it."""

    JOINING = "joining"  # its JOIN is in flight
    JOINED = "joined"  # the shard has it as a member
    LEAVING = "leaving"  # its LEAVE is in flight (still a member until it completes)


#: Logged when a shard answers a command the router already refused ``shard_timeout``
#: with "applied": the shard was stopped after applying it and before answering, for longer
#: than the deadline and its grace (docs/ARCHITECTURE.md, requests). The one case in which
#: a refusal is not the truth; the log is how an operator (and the fault test) sees it.
LATE_APPLIED = "shard answered a timed-out %s of room %s late: applied after its refusal"

#: What the members of a room are told when its history stops, or starts again, being
#: stored (docs/PROTOCOL.md).
STORAGE_FAILED = (
    "room {room} history not saved (the server's disk is full or failing); "
    "messages are kept in memory only"
)
STORAGE_RECOVERED = "room {room} history saved again"
#: What members hear when their room's shard, sharing rooms through Redis, says (NOTICE).
ROOM_NOTICES = {
    "shared_lost": "room {room} unavailable: the server lost its connection to Redis; reconnecting",
    "shared_back": "room {room} available again",
    "missed": "room {room} may have missed messages",
}
STORAGE_RECOVERED_WITH_LOSS = (
    "room {room} history saved again; some messages from while it was not were lost"
)


class Client:
    """What the hub tells a client; transports implement it. Every method is called on
    the loop thread, from inside the hub's handling of a shard's events: it must not
    block, and a transport's own bugs must not escape (the hub logs them)."""

    def deliver(self, room: str, entry: m.Entry, wire: bytes) -> None:
        """A room event for this member (someone else's join/leave, or any chat message).
        *wire* is the line-protocol encoding, *entry* the structured one."""
        raise NotImplementedError

    def deliver_run(self, room: str, entries: List[m.Entry], wire: bytes) -> None:
        """Several chat messages of one room in a row; *wire* is all their lines joined."""
        for entry in entries:
            self.deliver(room, entry, wire)

    def deliver_private(self, room: str, event: m.Event) -> None:
        """A direct message in *room* from or to this client (a ``PRIVATE`` event, see
        :mod:`common.messages`: sender, recipient, time, text and the wire line)."""

    def on_joined(self, room: str, entry: m.Entry) -> None:
        """This client's JOIN of *room* succeeded (also for requests with callbacks)."""

    def on_left(self, room: str) -> None:
        """This client's LEAVE of *room* completed (also when the room's shard died with
        the LEAVE in flight)."""

    def on_refused(self, op: int, refusal: Refusal) -> None:
        """A command of this client without a callback of its own was refused (not
        applied). *op* is the command's opcode (``m.JOIN``, ``m.MSG``...)."""

    def on_room_restarted(self, room: str) -> None:
        """The shard of *room* restarted and lost its history; the client is still in it."""

    def on_room_lost(self, room: str) -> None:
        """The shard of *room* was given up on: the client is no longer in it."""

    def on_room_notice(self, room: str, text: str) -> None:
        """Something members of *room* should know, in one line (its history stopped or
        started again being saved)."""

    def on_shutdown(self) -> None:
        """The server is shutting down."""


class ClientRecord:
    """What the hub knows of one client. Owned by the hub; transports may read it
    (``rooms``, :attr:`busy`) but never change it."""

    __slots__ = (
        "cid", "client", "username", "username_fixed", "address", "rooms", "shards",
        "changing", "gone",
    )  # fmt: skip

    def __init__(self, cid: int, client: Client, address: str, username: Optional[str]):
        self.cid = cid
        self.client = client
        #: None until a JOIN claims it (TCP); a browser session's is fixed at once. A JOIN
        #: in flight claims it; once one succeeds it is fixed, even after every LEAVE.
        self.username = username
        self.username_fixed = username is not None
        self.address = address
        self.rooms: Dict[str, Membership] = {}
        self.shards: Set[int] = set()  # shard indexes it has sent commands to
        #: JOINs and LEAVEs in flight (the TCP rule: the next command waits for them).
        self.changing = 0
        self.gone = False  # dropped: outcomes still arriving update the mirror only

    @property
    def busy(self) -> bool:
        """True while a JOIN or a LEAVE of this client is in flight."""
        return self.changing > 0

    def joined_rooms(self) -> List[str]:
        """The rooms the shard has this client in (``JOINED`` or ``LEAVING``), sorted."""
        return sorted(room for room, state in self.rooms.items() if state is not JOINING)

    def is_member(self, room: str) -> bool:
        state = self.rooms.get(room)
        return state is JOINED or state is LEAVING


JOINING, JOINED, LEAVING = Membership.JOINING, Membership.JOINED, Membership.LEAVING


class InFlight:
    """The commands sent to one shard and not completed yet, in the order they went down
    its pipe (the commands themselves: nothing is built per command on the hot path)."""

    __slots__ = ("commands", "timed_out")

    def __init__(self) -> None:
        self.commands: Deque[m.Command] = deque()
        #: How many at the head were already refused ``shard_timeout`` (they stay until
        #: the shard completes them, so completions keep matching).
        self.timed_out = 0


class Hub:
    """Client records, requests, membership mirror. Create, then :meth:`attach` a pool."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Optional[Settings] = None,
        limiter: Optional[ConnectionLimiter] = None,
    ) -> None:
        self.loop = loop
        #: Every limit and timeout, shared by the transports.
        self.settings = settings or Settings()
        #: Open connections of every transport, counted against the caps.
        self.limiter = limiter or ConnectionLimiter(
            self.settings.max_connections, self.settings.max_connections_per_ip
        )
        #: Unsent output of every connection, per address and in total.
        #: Counters for ``/metrics`` (router/metrics.py).
        self.metrics = Metrics()
        self.output = OutputBudget(
            self.settings.output_budget_total, self.settings.output_budget_per_address
        )
        #: Per-address session caps and join/session-creation buckets (both transports).
        self.addresses = AddressLimits(self.settings)
        self.pool: Optional[ShardPool] = None
        self._shard_of: Callable[[str], int] = lambda room: 0  # pool.index_of, once attached
        self._links: List[Any] = []
        self.records: Dict[int, ClientRecord] = {}
        self._by_address: Dict[str, Set[ClientRecord]] = {}
        #: The mirror: room -> cid -> client, for fan-out. Built only from completions.
        self.members: Dict[str, Dict[int, Client]] = {}
        #: The epoch of each room with members, as its shard last reported it.
        self.epochs: Dict[str, int] = {}
        self._in_flight: List[InFlight] = []
        #: Outcome handlers of the commands that have their own, by req: set when a
        #: command is queued, moved into its in-flight entry when it goes down the pipe.
        self._handlers_of: Dict[int, Tuple[Optional[OnDone], Optional[OnFail]]] = {}
        #: Per shard, the epochs its rooms had when it died: a REJOIN's answer says whether
        #: the room's history survived the restart.
        self._epochs_before: Dict[int, Dict[str, int]] = {}
        self._cids = itertools.count(1)
        self._reqs = itertools.count(1)
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self._handlers: Dict[int, Callable[..., None]] = {
            m.JOIN: self._complete_join,
            m.MSG: self._complete_msg,
            m.LEAVE: self._complete_leave,
            m.DROP: self._complete_drop,
            m.NAMES: self._complete_request,
            m.ROOMS: self._complete_request,
            m.HISTORY: self._complete_request,
            m.SINCE: self._complete_since,
            m.REJOIN: self._complete_rejoin,
            m.PRIVMSG: self._complete_privmsg,
        }

    def number_clients(self, first: int, step: int) -> None:
        """Give clients the ids *first*, *first* + *step*, ... (router *r* of a tier of *N*:
        ``N + r`` and steps of *N*, so that a shard knows each client's router)."""
        self._cids = itertools.count(first, step)

    def attach(self, pool: ShardPool) -> None:
        self.pool = pool
        self._shard_of = pool.index_of
        self._links = pool.links
        self._in_flight = [InFlight() for _ in pool.links]
        for link in pool.links:
            link.on_flush = self._sent
        self._sweeper = self.loop.call_later(0.5, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    # --- clients ---------------------------------------------------------------------

    def add(
        self, client: Client, address: str = "", username: Optional[str] = None
    ) -> ClientRecord:
        """Register *client* (from *address*; with *username* fixed from the start, as a
        browser session's is). Returns its record; its ``cid`` names it to the shards."""
        record = ClientRecord(next(self._cids), client, address, username)
        self.records[record.cid] = record
        self._by_address.setdefault(address, set()).add(record)
        return record

    def drop(self, record: ClientRecord, on_done: Optional[Callable[[], None]] = None) -> None:
        """The client is going: it leaves every room. With *on_done*, its record stays (and
        its replies still arrive) until every shard it used has answered, or
        ``DROP_TIMEOUT`` passed; then *on_done* is called. Without, it is removed now."""
        if record.gone:
            return
        shards = sorted(record.shards)
        if on_done is None or not shards:
            self._remove(record)
            for index in shards:
                self._send(index, m.drop(next(self._reqs), self._drop_deadline(), record.cid))
            if on_done is not None:
                on_done()
            return
        remaining = len(shards)

        def one_done(_result: Any) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                self._remove(record)
                on_done()

        deadline = self._drop_deadline()
        for index in shards:
            self._send(index, m.drop(next(self._reqs), deadline, record.cid), one_done, one_done)

    def _remove(self, record: ClientRecord) -> None:
        record.gone = True
        if self.records.pop(record.cid, None) is None:
            return
        same = self._by_address.get(record.address)
        if same is not None:
            same.discard(record)
            if not same:
                del self._by_address[record.address]

    def rooms_of_address(self, address: str) -> int:
        """Rooms the clients of *address* are in or joining, counted once per client."""
        return sum(len(record.rooms) for record in self._by_address.get(address, ()))

    def shutdown(self) -> None:
        """Tell every client the server is going away."""
        for record in list(self.records.values()):
            self._tell(record.client.on_shutdown)

    # --- commands --------------------------------------------------------------------

    def join(
        self,
        record: ClientRecord,
        room: str,
        username: str,
        on_done: Optional[OnDone] = None,
        on_fail: Optional[OnFail] = None,
        refuse_joining: bool = False,
    ) -> Optional[Refusal]:
        """Ask the room's shard to add the client as *username*. Returns a
        :class:`Refusal` if the router refuses at once; otherwise the outcome comes as
        ``on_done(entry)`` / ``on_fail(refusal)``, or ``client.on_joined`` /
        ``client.on_refused``. With *refuse_joining*, a room the client is in or joining
        is refused here (``already_in_room``); otherwise the shard says so, in order."""
        if record.username is not None and username != record.username:
            return self._refused_here(
                Refusal(errors.WRONG_USERNAME, room, username=record.username)
            )
        state = record.rooms.get(room)
        if state is not None and (refuse_joining or state is not JOINED):
            return self._refused_here(Refusal(errors.ALREADY_IN_ROOM, room))
        if state is None:
            if len(record.rooms) >= MAX_ROOMS_PER_CLIENT:
                return self._refused_here(Refusal(errors.TOO_MANY_ROOMS, room))
            if self.rooms_of_address(record.address) >= self.settings.max_rooms_per_address:
                return self._refused_here(Refusal(errors.TOO_MANY_ROOMS_FOR_ADDRESS, room))
            record.rooms[room] = JOINING
            record.changing += 1
        record.username = username
        command = m.join(next(self._reqs), self._deadline(), record.cid, room, username)
        self._send_for(record, room, command, on_done, on_fail)
        return None

    def say(
        self,
        record: ClientRecord,
        room: str,
        text: str,
        on_done: Optional[OnDone] = None,
        on_fail: Optional[OnFail] = None,
    ) -> None:
        """Send a chat message. The shard checks membership; the outcome is the message
        itself (fan-out, ``on_done(seq)``) or a refusal."""
        deadline = self.loop.time() + self.settings.request_timeout
        command = m.msg(next(self._reqs), deadline, record.cid, room, text)
        index = self._shard_of(room)  # _send_for, inlined: every chat message comes here
        record.shards.add(index)
        if on_done is not None or on_fail is not None:
            self._handlers_of[command[1]] = (on_done, on_fail)
        self._links[index].send(command)

    def privmsg(
        self,
        record: ClientRecord,
        room: str,
        to: str,
        text: str,
        on_done: Optional[OnDone] = None,
        on_fail: Optional[OnFail] = None,
    ) -> None:
        """Send a direct message to the member of *room* named *to*, through the room's
        shard (which checks both are members). The outcome: the message to both
        (``client.deliver_private``; ``on_done(to)`` with the name as the room has it) or a
        refusal (``no_such_member``, ``not_in_room``...)."""
        command = m.privmsg(next(self._reqs), self._deadline(), record.cid, room, to, text)
        self._send_for(record, room, command, on_done, on_fail)

    def leave(
        self,
        record: ClientRecord,
        room: str,
        on_done: Optional[OnDone] = None,
        on_fail: Optional[OnFail] = None,
    ) -> Optional[Refusal]:
        """Leave *room*. Returns a :class:`Refusal` at once if a JOIN or a LEAVE of it is in
        flight (``not_in_room`` while joining, for HTTP; TCP never gets there, its next
        command waits for them)."""
        state = record.rooms.get(room)
        if state is JOINING or state is LEAVING:
            return self._refused_here(Refusal(errors.NOT_IN_ROOM, room))
        if state is JOINED:
            record.rooms[room] = LEAVING
            record.changing += 1
        command = m.leave(next(self._reqs), self._deadline(), record.cid, room)
        self._send_for(record, room, command, on_done, on_fail)
        return None

    def names(
        self, record: ClientRecord, room: str, on_done: OnDone, on_fail: OnFail,
        deadline: Optional[float] = None,
    ) -> None:  # fmt: skip
        command = m.names(next(self._reqs), self._deadline(deadline), record.cid, room)
        self._send_for(record, room, command, on_done, on_fail)

    def history(
        self, record: ClientRecord, room: str, n: int, on_done: OnDone, on_fail: OnFail,
        deadline: Optional[float] = None,
    ) -> None:  # fmt: skip
        command = m.history(next(self._reqs), self._deadline(deadline), record.cid, room, n)
        self._send_for(record, room, command, on_done, on_fail)

    def since(
        self, record: ClientRecord, room: str, after: int, max_bytes: int,
        on_done: OnDone, on_fail: OnFail,
    ) -> None:  # fmt: skip
        """The entries of *room* after seq *after*, oldest first, about *max_bytes* of them
        (at least one): ``on_done((entries, first_seq, last_seq, epoch))``."""
        deadline = self._deadline()
        command = m.since(next(self._reqs), deadline, record.cid, room, after, max_bytes)
        self._send_for(record, room, command, on_done, on_fail)

    def rooms(
        self,
        on_done: Callable[[List[Tuple[str, int]]], None],
        asker: Optional[ClientRecord] = None,
        deadline: Optional[float] = None,
    ) -> None:
        """The rooms with members, from every shard, sorted by name: at most
        ``MAX_ROOMS_LISTED``, the ones with the most members. A shard that does not
        answer in time contributes nothing. With *asker*, the request counts as that
        client's (its QUIT waits for the answer)."""
        assert self.pool is not None
        count = len(self.pool.links)
        if asker is not None:
            asker.shards.update(range(count))
        remaining = count
        found: List[Tuple[str, int]] = []
        cid = asker.cid if asker is not None else 0

        def one_done(result: Any) -> None:
            nonlocal remaining
            if not isinstance(result, Refusal):
                found.extend(result)
            remaining -= 1
            if remaining == 0:
                on_done(sorted(busiest_rooms(found)))

        deadline = self._deadline(deadline)
        for index in range(count):
            self._send(index, m.rooms(next(self._reqs), deadline, cid), one_done, one_done)

    def epoch_of(self, room: str) -> int:
        """The epoch of *room*'s history as its shard last reported it (0 if unknown)."""
        return self.epochs.get(room, 0)

    # --- sending -----------------------------------------------------------------------

    def _drop_deadline(self) -> float:
        """A DROP's deadline: when the router stops waiting for it (the shard applies a
        DROP whatever the time: a client that is gone must leave its rooms)."""
        return self.loop.time() + self.settings.drop_timeout - self.settings.deadline_grace

    def _deadline(self, deadline: Optional[float] = None) -> float:
        if deadline is None:
            return self.loop.time() + self.settings.request_timeout
        return deadline

    def _send_for(
        self,
        record: ClientRecord,
        room: str,
        command: m.Command,
        on_done: Optional[OnDone],
        on_fail: Optional[OnFail],
    ) -> None:
        index = self._shard_of(room)
        record.shards.add(index)
        self._send(index, command, on_done, on_fail)

    def _send(
        self,
        index: int,
        command: m.Command,
        on_done: Optional[OnDone] = None,
        on_fail: Optional[OnFail] = None,
    ) -> None:
        if on_done is not None or on_fail is not None:
            self._handlers_of[command[m.REQ]] = (on_done, on_fail)
        self._links[index].send(command)

    def _sent(self, index: int, batch: List[m.Command]) -> None:
        """A shard link is about to write (or refuse) *batch*: they are in flight now, in
        this order."""
        self._in_flight[index].commands.extend(batch)

    def _handlers_for(self, command: m.Command) -> Tuple[Optional[OnDone], Optional[OnFail]]:
        """The command's own outcome handlers (taken: an outcome is given once)."""
        handlers_of = self._handlers_of
        if handlers_of:
            handlers = handlers_of.pop(command[1], None)
            if handlers is not None:
                return handlers
        return None, None

    # --- timeouts -----------------------------------------------------------------------

    def _sweep(self) -> None:
        """Twice a second: refuse the commands whose shard has not answered in time (a
        stopped shard: they will not be applied, the shard refuses them past their
        deadline), re-read unsent output, forget idle addresses."""
        self._sweeper = self.loop.call_later(0.5, self._sweep)
        self.output.refresh()
        now = self.loop.time()
        self.addresses.prune(now)
        late = now - self.settings.deadline_grace  # answered by us if its deadline is before
        for flight in self._in_flight:
            commands = flight.commands
            while flight.timed_out < len(commands):
                command = commands[flight.timed_out]
                if command[m.DEADLINE] > late:
                    break
                flight.timed_out += 1
                self._resolve_timeout(command)

    def _resolve_timeout(self, command: m.Command) -> None:
        on_done, on_fail = self._handlers_for(command)
        op = command[m.OP]
        if op == m.DROP:
            self._outcome(on_done, None)  # the client goes anyway; its LEFTs come later
        elif op == m.REJOIN:
            log.warning("a REJOIN of room %s got no answer in time", command[m.ROOM])
        else:
            self._refuse(command, on_fail, Refusal(errors.SHARD_TIMEOUT, m.command_room(command)))

    # --- shard supervision (ShardListener) -------------------------------------------

    def on_shard_down(self, index: int) -> None:
        """A shard died: every command in flight to it gets its outcome now (it will not
        answer), in the order they were sent."""
        flight = self._in_flight[index]
        commands = list(flight.commands)[flight.timed_out :]
        flight.commands.clear()
        flight.timed_out = 0
        for command in commands:
            on_done, on_fail = self._handlers_for(command)
            op = command[m.OP]
            room = m.command_room(command)
            if op == m.LEAVE:
                self._left(command[m.CID], room, None, command, on_done)
            elif op == m.DROP:
                self._outcome(on_done, None)
            elif op == m.MSG or op == m.PRIVMSG:
                self._refuse(command, on_fail, Refusal(errors.NOT_DELIVERED, room))
            elif op != m.REJOIN:
                self._refuse(command, on_fail, Refusal(errors.ROOM_UNAVAILABLE, room))

    def on_shard_restarted(self, index: int) -> None:
        """A shard is back: put every member it had back in its rooms, before anything
        else goes down its pipe (REJOIN, silent); members hear of lost history when the
        answers show the epoch changed."""
        assert self.pool is not None
        rejoins: List[m.Command] = []
        rooms = self._rooms_on(index)
        self._epochs_before[index] = {
            room: self.epochs[room] for room in rooms if room in self.epochs
        }
        for room in rooms:
            for cid in self.members[room]:
                record = self.records.get(cid)
                if record is not None and record.username is not None:
                    rejoins.append(
                        m.rejoin(next(self._reqs), self._deadline(), cid, room, record.username)
                    )
        self.pool.links[index].send_first(rejoins)

    def on_shard_lost(self, index: int) -> None:
        """The pool gave up on a shard: its rooms are gone; tell their members."""
        for room in self._rooms_on(index):
            for cid, client in self.members.pop(room).items():
                record = self.records.get(cid)
                if record is not None:
                    self._forget_room(record, room)
                self._tell(client.on_room_lost, room)
            self.epochs.pop(room, None)

    def _rooms_on(self, index: int) -> List[str]:
        assert self.pool is not None
        return [room for room in self.members if self.pool.index_of(room) == index]

    # --- shard events ----------------------------------------------------------------

    def on_shard_events(self, index: int, events: List[m.Event]) -> None:
        """One pipe message's worth of events from shard *index* (loop thread)."""
        commands = self._in_flight[index].commands
        flight = self._in_flight[index]
        count = len(events)
        i = 0
        while i < count:
            event = events[i]
            op = event[0]
            if op == m.CHAT:
                end = i + 1
                while end < count and events[end][0] == m.CHAT:
                    end += 1
                self._on_chats(flight, events[i:end])
                i = end
                continue
            i += 1
            if not event[m.EVENT_REQ]:
                if op == m.LEFT:  # part of a DROP, or another router's client's LEAVE
                    self._left(event[3], event[2], event[4], None, None)
                elif op == m.JOINED:  # another router's client (a router tier)
                    self._member_joined(event, None, None)
                elif op == m.PRIVATE:  # from another router's client to one of ours
                    self._deliver_private_to(event[3], event)
                elif op == m.NOTICE:  # rooms shared through Redis (--redis)
                    self._on_notice(event[2], event[3], event[4])
                else:
                    self._on_storage(event[2], event[3], event[4])
                continue
            command = commands.popleft()
            if command[m.REQ] != event[m.EVENT_REQ]:
                log.error("shard %d answered req %s, expected %s", index, event[1], command[1])
            if flight.timed_out:
                flight.timed_out -= 1
                self._late(command, event)
                continue
            self._handlers[command[m.OP]](command, event)

    def _refused_here(self, refusal: Refusal) -> Refusal:
        """A refusal the router answers itself, counted like the shards' ones."""
        self.metrics.refuse(refusal.code)
        return refusal

    def in_flight_counts(self) -> List[int]:
        """Per shard, the commands sent and not answered yet."""
        return [len(flight.commands) for flight in self._in_flight]

    def _on_storage(self, room: str, problem: Optional[str], lost: bool) -> None:
        """*room*'s shard stopped (or started again) storing its history: tell its members.
        What went wrong (a file name, an SQLite error) is the shard's log's, not theirs."""
        if problem is not None:
            text = STORAGE_FAILED
        else:
            text = STORAGE_RECOVERED_WITH_LOSS if lost else STORAGE_RECOVERED
        for client in list(self.members.get(room, {}).values()):
            self._tell(client.on_room_notice, room, text.format(room=room))

    def _on_notice(self, room: str, code: str, epoch: int) -> None:
        """Tell *room*'s members what its shard says about the shared store. ``restarted``:
        Redis lost the room, whose history goes on under *epoch* (as a restarted in-memory
        shard's: ``INFO room R restarted, history lost``, polls say ``missed``)."""
        if code == "restarted":
            if room in self.members:
                self.epochs[room] = epoch
            for client in list(self.members.get(room, {}).values()):
                self._tell(client.on_room_restarted, room)
            return
        text = ROOM_NOTICES.get(code)
        if text is None:
            log.warning("room %s: unknown notice %r from a shard", room, code)
            return
        for client in list(self.members.get(room, {}).values()):
            self._tell(client.on_room_notice, room, text.format(room=room))

    def _late(self, command: m.Command, event: m.Event) -> None:
        """A completion for a command already refused ``shard_timeout``: the shard refuses
        commands past their deadline, so this is a ``FAIL`` and changes nothing. If the
        shard applied it (it stalled between applying and answering, past the grace), the
        membership follows the shard; the client was told otherwise: log it."""
        op = event[0]
        if op == m.FAIL:
            return
        log.warning(LATE_APPLIED, f"command {command[m.OP]}", m.command_room(command))
        if op == m.CHAT:
            self.metrics.messages += 1
            self._on_chat(event)
        elif op == m.JOINED:
            self._member_joined(event, self.records.get(command[m.CID]), None)
        elif op == m.LEFT:
            self._left(event[3], event[2], event[4], None, None)
        elif op == m.PRIVATE:
            self._deliver_private(command, event)

    def _on_chats(self, flight: InFlight, run: List[m.Event]) -> None:
        """A run of CHAT events (completions of MSGs, nothing else in between, so no
        membership changes): each room's messages go to each member as one write, rooms
        in their own order; then each MSG's own handlers, if any."""
        commands = flight.commands
        handlers_of = self._handlers_of
        metrics = self.metrics
        metrics.messages += len(run)
        by_room: Dict[str, List[m.Event]] = {}
        for event in run:
            by_room.setdefault(event[2], []).append(event)
            if not event[1]:
                continue  # another router's client's message (a router tier)
            command = commands.popleft()
            if flight.timed_out:
                flight.timed_out -= 1
                log.warning(LATE_APPLIED, "MSG", event[2])
            elif handlers_of:
                on_done, _ = self._handlers_for(command)
                if on_done is not None:
                    self._outcome(on_done, event[3][0])
        for room, events in by_room.items():
            if len(events) == 1:
                self._on_chat(events[0])
                continue
            members = self.members.get(room)
            if members:
                entries = [event[3] for event in events]
                wire = b"".join([event[4] for event in events])
                metrics.deliveries += len(members) * len(events)
                for client in members.values():
                    client.deliver_run(room, entries, wire)

    def _on_chat(self, event: m.Event) -> None:
        _, _, room, entry, wire = event
        members = self.members.get(room)
        if members:
            self.metrics.deliveries += len(members)
            for client in members.values():
                client.deliver(room, entry, wire)

    # --- completions: (in-flight entry, event) -------------------------------------------

    def _complete_join(self, command: m.Command, event: m.Event) -> None:
        on_done, on_fail = self._handlers_for(command)
        record = self.records.get(command[m.CID])
        if event[0] == m.FAIL:
            self._refuse(command, on_fail, Refusal(event[2], command[m.ROOM]))
            return
        self._member_joined(event, record, on_done)

    def _member_joined(
        self, event: m.Event, record: Optional[ClientRecord], on_done: Optional[OnDone]
    ) -> None:
        _, _, room, cid, entry, epoch = event
        members = self.members.get(room)
        if members is None:
            members = self.members[room] = {}
        elif members:
            wire = user_joined_line(entry[3], room)
            for client in members.values():
                client.deliver(room, entry, wire)
        self.epochs[room] = epoch
        if record is None or record.gone:
            if not members:
                del self.members[room]
            return  # gone already; its DROP is behind this in the pipe
        if record.rooms.get(room) is JOINING:
            record.changing -= 1
        record.rooms[room] = JOINED
        record.username_fixed = True  # a JOIN under it succeeded: the connection's for good
        members[cid] = record.client
        if on_done is not None:
            self._outcome(on_done, entry)
        self._tell(record.client.on_joined, room, entry)

    def _complete_msg(self, command: m.Command, event: m.Event) -> None:
        _, on_fail = self._handlers_for(command)
        self._refuse(command, on_fail, Refusal(event[2], command[m.ROOM]))  # a CHAT: _on_chats

    def _complete_privmsg(self, command: m.Command, event: m.Event) -> None:
        on_done, on_fail = self._handlers_for(command)
        _, _, _, _, room, to, _ = command
        if event[0] == m.FAIL:
            self._refuse(command, on_fail, Refusal(event[2], room, username=to))
            return
        self._deliver_private(command, event)
        self._outcome(on_done, event[5])  # the recipient's name as the room has it

    def _deliver_private(self, command: m.Command, event: m.Event) -> None:
        """A direct message to its recipient, and to its sender (the echo: its outcome),
        once if they are the same client. Either may be gone by now."""
        sender_cid, to_cid = command[m.CID], event[3]
        self.metrics.private_messages += 1
        for cid in (sender_cid, to_cid) if sender_cid != to_cid else (to_cid,):
            self._deliver_private_to(cid, event)

    def _deliver_private_to(self, cid: int, event: m.Event) -> None:
        """A direct message to client *cid*, if it is still here."""
        record = self.records.get(cid)
        if record is not None and not record.gone:
            self._tell(record.client.deliver_private, event[2], event)

    def _complete_leave(self, command: m.Command, event: m.Event) -> None:
        on_done, on_fail = self._handlers_for(command)
        room = command[m.ROOM]
        if event[0] == m.FAIL:
            self._refuse(command, on_fail, Refusal(event[2], room))
            return
        self._left(event[3], room, event[4], command, on_done)

    def _left(
        self,
        cid: int,
        room: str,
        entry: Optional[m.Entry],
        command: Optional[m.Command],
        on_done: Optional[OnDone],
    ) -> None:
        """*cid* is no longer in *room* (*entry* None: its shard died with the LEAVE in
        flight). With *command*, it was that client's LEAVE: it is told."""
        members = self.members.get(room)
        if members is not None:
            members.pop(cid, None)
            if members and entry is not None:
                wire = user_left_line(entry[3], room)
                for client in members.values():
                    client.deliver(room, entry, wire)
            if not members:
                del self.members[room]
                self.epochs.pop(room, None)
        record = self.records.get(cid)
        if record is None:
            return
        state = record.rooms.get(room)
        if state is not None:
            self._forget_room(record, room)
        if command is not None:
            if on_done is not None:
                self._outcome(on_done, None)
            self._tell(record.client.on_left, room)

    def _complete_drop(self, command: m.Command, event: m.Event) -> None:
        self._outcome(self._handlers_for(command)[0], None)

    def _complete_request(self, command: m.Command, event: m.Event) -> None:
        on_done, on_fail = self._handlers_for(command)
        if event[0] == m.FAIL:
            self._refuse(command, on_fail, Refusal(event[2], m.command_room(command)))
        else:
            self._outcome(on_done, event[2])

    def _complete_since(self, command: m.Command, event: m.Event) -> None:
        if event[0] == m.DONE:
            room = command[m.ROOM]
            if room in self.members:
                self.epochs[room] = event[2][3]
        self._complete_request(command, event)

    def _complete_rejoin(self, command: m.Command, event: m.Event) -> None:
        room, cid = command[m.ROOM], command[m.CID]
        if event[0] != m.DONE:
            if event[0] == m.FAIL and event[2] == errors.NAME_TAKEN:
                # Its name was taken before it was put back (a router tier): it is out.
                client = self.members.get(room, {}).get(cid)
                self._left(cid, room, None, None, None)
                if client is not None:
                    self._tell(client.on_room_lost, room)
            return
        epoch = event[2]
        previous = self._epochs_before.get(self.pool.index_of(room) if self.pool else 0, {})
        if room in self.members:
            self.epochs[room] = epoch
        if previous.get(room, epoch) != epoch:
            client = self.members.get(room, {}).get(cid)
            if client is not None:
                self._tell(client.on_room_restarted, room)

    # --- outcomes ------------------------------------------------------------------------

    def _refuse(self, command: m.Command, on_fail: Optional[OnFail], refusal: Refusal) -> None:
        """*command* was not applied: undo what the record expected of it (a JOIN's room
        is not joined, a LEAVE's room is still joined), then tell whoever waits: its own
        handler, or the client."""
        self.metrics.refuse(refusal.code)
        op = command[m.OP]
        if op == m.JOIN or op == m.LEAVE:
            record = self.records.get(command[m.CID])
            if record is not None:
                self._undo(record, op, command[m.ROOM], refusal.code)
        if on_fail is not None:
            self._outcome(on_fail, refusal)
            return
        record = self.records.get(command[m.CID])
        if record is not None and not record.gone:
            self._tell(record.client.on_refused, command[m.OP], refusal)

    def _undo(self, record: ClientRecord, op: int, room: str, code: str) -> None:
        state = record.rooms.get(room)
        if op == m.JOIN and state is JOINING:
            self._forget_room(record, room)
        elif op == m.LEAVE and state is LEAVING:
            if code == errors.NOT_IN_ROOM:
                self._forget_room(record, room)  # the shard had no such member
            else:
                record.changing -= 1
                record.rooms[room] = JOINED  # not applied: still a member

    def _forget_room(self, record: ClientRecord, room: str) -> None:
        state = record.rooms.pop(room, None)
        if state is JOINING or state is LEAVING:
            record.changing -= 1
        if not (record.rooms or record.username_fixed):
            record.username = None  # its first JOIN failed: the name is not taken yet

    def _outcome(self, handler: Optional[Callable[[Any], None]], result: Any) -> None:
        if handler is not None:
            self._tell(handler, result)

    def _tell(self, handler: Callable[..., None], *args: Any) -> None:
        """Call a client's or a request's handler from inside the event handling: a bug
        in it is logged and must not keep the other clients from their events."""
        try:
            handler(*args)
        except Exception:
            log.exception("a client's handler failed")
