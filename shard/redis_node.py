"""A shard whose rooms live in Redis, shared with every node on it (``--redis URL``).

The same contract towards the routers as :class:`shard.core.ShardCore` (the commands and
events of :mod:`common.messages`, one completion per command, in order), but the rooms'
state is Redis's (:mod:`shard.redis_rooms`) and this shard is the node's Redis client for
its rooms:

- **One round trip per batch.** The commands of a batch become one pipeline of scripts and
  reads; a JOIN in a room with no member here first subscribes to the room's channel.
- **One order, the seq order**, for every member on every node: entries of this node's
  scripts are delivered from the scripts' answers (each script answers with the message it
  published), the other nodes' from the channel (this node's own copies there are
  skipped); an entry ahead of the next expected one waits for it. A batch's chat lines
  for one room are one script call. Events and completions leave in one queue, in command
  order; a completion waits for its entry.
- **Gaps** (Redis pub/sub is at-most-once): another node's entry whose seq is past the
  next one expected, or a completion whose entry is still ahead of a missing one after
  ``REDIS_GAP_SECONDS``, makes the shard read the missing range from the room's Stream
  before it delivers anything newer in that room; what is gone (trimmed, or a new epoch) is
  a ``NOTICE missed`` to members.
- **Presence**: the shard refreshes its members' expiry every third of the presence time
  and runs the expiry script for its rooms (a dead node's members leave, and are heard).
- **Redis lost**: every room with members here gets ``NOTICE shared_lost``; commands are
  refused ``room_unavailable`` at once (nothing is queued); the shard reconnects with
  backoff, subscribes again, puts its members back, reads what it missed from the Streams
  (or says ``missed``) and sends ``NOTICE shared_back``.

The process side (pipes, threads, the event loop) is :func:`serve`; :class:`RedisShard`
is the logic, driven by tests with a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

from common import errors, limits
from common import messages as m
from common.hashing import room_to_shard
from common.limits import (
    HISTORY_SIZE,
    MAX_ROOMS_LISTED,
    MAX_SHARD_BATCH,
    REDIS_BACKOFF_MAX_SECONDS,
    REDIS_GAP_SECONDS,
    REDIS_TIMEOUT_SECONDS,
)
from common.names import name_key, name_keys
from common.protocol import msg_line, privmsg_line
from shard.core import recipient
from shard.redis_rooms import (
    ROOMS_KEY,
    RedisRooms,
    channel_of,
    entry_of,
    gap_lost,
    last_seq_of,
    message_of,
    names_of,
    outcome_of,
    published_of,
    room_keys,
    state_of,
    text_of,
)

log = logging.getLogger(__name__)

#: Seconds between checks for an orphaned shard or a router that takes no events.
STALL_CHECK_SECONDS = 0.5

#: The cid of a member on another node in the events this shard sends (no router has it).
REMOTE_CID = -1

#: ``NOTICE`` codes (the router words them: router/hub.py).
SHARED_LOST = "shared_lost"
SHARED_BACK = "shared_back"
MISSED = "missed"
RESTARTED = "restarted"

#: Takes the events ready to go: ``(event, source router or -1, routers it is for)``.
Send = Callable[[List[Tuple[m.Event, int, Tuple[int, ...]]]], None]


class _Room:
    """A room with members on this node (or one being joined)."""

    __slots__ = ("name", "members", "epoch", "expected", "early", "pending", "early_mark")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: Dict[int, str] = {}  # cid -> username
        self.epoch: Optional[int] = None
        #: The next seq to deliver (None: not known yet; the first local JOIN tells).
        self.expected: Optional[int] = None
        #: Entries that came ahead of ``expected``: seq -> (epoch, entry).
        self.early: Dict[int, Tuple[int, m.Entry]] = {}
        #: Local completions waiting for their entry: seq -> (item, since when).
        self.pending: Dict[int, Tuple[_Item, float]] = {}
        #: The lowest seq in ``early`` and since when it has been the lowest (the timer's
        #: view: one that stays there for the gap time is waiting for a lost entry).
        self.early_mark: Optional[Tuple[int, float]] = None


class _Item:
    """One event in the out queue: ready (``event`` set) or waiting for its entry (then
    ``make(entry)`` makes the event, and ``fallback`` is sent if the entry cannot come:
    Redis was lost). ``extra``: routers that get it besides those with members in its room
    (the leaver's, for a LEFT); ``source``: the router whose command it completes."""

    __slots__ = ("event", "source", "extra", "make", "fallback", "on_fallback")

    def __init__(
        self,
        event: Optional[m.Event],
        source: int = -1,
        extra: Tuple[int, ...] = (),
        make: Optional[Callable[[m.Entry], m.Event]] = None,
        fallback: Optional[m.Event] = None,
        on_fallback: Optional[Callable[[], None]] = None,
    ) -> None:
        self.event = event
        self.source = source
        self.extra = extra
        self.make = make
        self.fallback = fallback
        self.on_fallback = on_fallback


class _Lines(list):
    """A batch's chat lines for one room, ``(cid, text)`` each, said in one script call
    (where the first of them is in the batch); ``answer``: that call's answer; ``size``:
    the bytes of their texts (at most ``REDIS_SAY_MAX_BYTES`` but for a first line
    bigger than that)."""

    __slots__ = ("answer", "size")

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


class RedisShard:
    """Shard *index* of *count* of node ``rooms.node``, for *routers* routers.

    *pubsub_factory* makes a :class:`shard.redis_sub.Subscriber` (its own connection);
    *send* takes the events ready to go, each with the routers it is for. Runs on one
    event loop; the process glue (:func:`serve`) feeds it with :meth:`submit`.
    """

    def __init__(
        self,
        rooms: RedisRooms,
        pubsub_factory: Callable[[], Any],
        send: Send,
        index: int = 0,
        count: int = 1,
        routers: int = 1,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
        gap_seconds: float = REDIS_GAP_SECONDS,
    ) -> None:
        self.rooms = rooms
        self._pubsub_factory = pubsub_factory
        self._pubsub: Any = None
        self._send = send
        self.index, self.count, self.routers = index, count, routers
        self._monotonic = monotonic
        self._clock = clock
        self._gap_seconds = gap_seconds
        self.local: Dict[str, _Room] = {}
        self._client_rooms: Dict[int, Set[str]] = {}
        self._out: Deque[_Item] = deque()
        self._channels: Dict[bytes, str] = {}
        self._confirmed: Dict[str, asyncio.Future] = {}
        self._jobs: Deque[Tuple[Any, ...]] = deque()
        self._work_waiting: Optional[asyncio.Event] = None
        self._idle: Optional[asyncio.Event] = None
        self._listening: Optional[asyncio.Event] = None
        self._busy = False
        #: Rooms that got an entry ahead of the next while a job ran (this node's own
        #: entries in flight may be what is missing): checked for a gap once it is done.
        self._ahead: Set[str] = set()
        #: What the scripts of the job running now published, ``(room, epoch, entries)``:
        #: delivered from the answers once the job's completions wait (the channel's copy
        #: is skipped).
        self._heard: List[Tuple[str, int, List[m.Entry]]] = []
        #: Other nodes' entries held until the job running now is done: those of a room
        #: whose epoch they change (the job's own answers are of the epoch it had), and
        #: every one of that room after them.
        self._later: Dict[str, List[Tuple[int, m.Entry]]] = {}
        mark = json.dumps(rooms.node).encode()
        self._own_mark = b"," + mark + b","  # (in a message of ours, right after the epoch)
        self._own_within = 24 + len(self._own_mark)
        self._filling: Set[str] = set()
        #: (room, cid) this node let go of while Redis could not be told: left there when
        #: it is back (a JOIN refused while its script may have run; a DROP while down).
        self._cleanup: Set[Tuple[str, int]] = set()
        self.down = False
        self._stopping = False
        self._tasks: List[asyncio.Task] = []
        self._backoff = 0.0
        #: Counters (tests, the experiment): entries read back from Streams, gaps seen.
        self.refilled = 0
        self.gaps = 0

    # --- life ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the scripts and start the listener, the worker and the timer. Raises the
        client's error if Redis cannot be reached."""
        self._work_waiting = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._listening = asyncio.Event()
        await self.rooms.load()
        self._pubsub = self._pubsub_factory()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(coro) for coro in (self._work(), self._listen(), self._tick())
        ]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except BaseException:  # noqa: BLE001 (cancelled, or failed: stopping anyway)
                pass
        await _close_quietly(self._pubsub)

    def submit(self, batch: List[m.Command], sources: List[int]) -> None:
        """Commands from the routers (``sources[i]``: the router of ``batch[i]``)."""
        self._put(("batch", batch, sources))

    def router_gone(self, router: int) -> None:
        """Router *router* died: its clients leave every room here (heard by all)."""
        self._put(("router_gone", router))

    async def settled(self) -> None:
        """Wait until every job submitted so far is done (tests)."""
        assert self._idle is not None
        while self._jobs or self._busy:
            self._idle.clear()
            await self._idle.wait()

    def _put(self, job: Tuple[Any, ...]) -> None:
        self._jobs.append(job)
        if self._work_waiting is not None:
            self._work_waiting.set()

    # --- the worker: one job at a time -------------------------------------------------

    async def _work(self) -> None:
        assert self._work_waiting is not None and self._idle is not None
        jobs = self._jobs
        while True:
            while not jobs:
                self._idle.set()
                self._work_waiting.clear()
                await self._work_waiting.wait()
            job = jobs.popleft()
            if job[0] == "batch":  # and every batch right behind it: one pipeline
                batch, sources = list(job[1]), list(job[2])
                while jobs and jobs[0][0] == "batch" and len(batch) < MAX_SHARD_BATCH:
                    more = jobs.popleft()
                    batch.extend(more[1])
                    sources.extend(more[2])
                job = ("batch", batch, sources)
            self._busy = True
            try:
                await self._run(job)
            except Exception as error:  # noqa: BLE001 (Redis lost, or a bug: logged)
                if _is_connection_error(error):
                    self._lost(error)
                else:
                    log.exception("redis shard: a %s job failed", job[0])
            finally:
                self._busy = False
                self._heard.clear()
                later, self._later = self._later, {}
                for name, held in later.items():
                    for epoch, entry in held:
                        self._on_entry(name, epoch, entry)
                ahead, self._ahead = self._ahead, set()
                for name in ahead:  # still ahead with the job's own entries in: a gap
                    room = self.local.get(name)
                    if room is not None and room.early and room.expected is not None:
                        self.gaps += 1
                        self._want_fill(name, max(room.early))
                self._flush()

    async def _run(self, job: Tuple[Any, ...]) -> None:
        kind = job[0]
        if kind == "batch":
            await self._batch(job[1], job[2])
        elif kind == "fill":
            await self._fill(job[1], job[2])
        elif kind == "presence":
            await self._presence()
        elif kind == "unsubscribe":
            room = self.local.get(job[1])
            if room is not None and not room.members and not room.pending:
                await self._unsubscribe(job[1])
        elif kind == "router_gone":
            drops = [m.drop(0, 0.0, cid) for cid in sorted(self._client_rooms)
                     if cid % self.routers == job[1]]  # fmt: skip
            if drops:
                await self._batch(drops, [-1] * len(drops))
        elif kind == "reconnect":
            await self._reconnect()
        elif kind == "cleanup":
            await self._clean_up()
        elif kind == "publish":  # a direct message to a member on another node
            await self.rooms.client.publish(channel_of(job[1]), job[2])

    async def _tick(self) -> None:
        """Presence every third of its time; completions waiting too long, every gap time."""
        presence_every = self.rooms.presence_seconds / 3
        next_presence = self._monotonic() + presence_every
        while True:
            await asyncio.sleep(min(self._gap_seconds, presence_every) / 2)
            if self.down:
                continue
            now = self._monotonic()
            for room in self.local.values():
                waits = [since for _, since in room.pending.values()]
                if room.early and room.expected is not None:
                    lowest = min(room.early)
                    if room.early_mark is None or room.early_mark[0] != lowest:
                        room.early_mark = (lowest, now)
                    waits.append(room.early_mark[1])
                else:
                    room.early_mark = None
                if waits and now - min(waits) >= self._gap_seconds:
                    self._want_fill(room.name, max([*room.pending, *room.early]))
            if now >= next_presence:
                next_presence = now + presence_every
                self._put(("presence",))

    # --- a batch ---------------------------------------------------------------------

    async def _batch(self, batch: List[m.Command], sources: List[int]) -> None:
        """Apply *batch*: every command gets exactly one completion, in order, whatever
        happens (Redis lost midway, a bug): what could not be done is refused."""
        if self.down:
            self._refuse_all(batch, sources, maybe_applied=False)
            return
        now = self._monotonic()
        new = sorted({c[m.ROOM] for c in batch if c[0] in (m.JOIN, m.REJOIN)} - set(self.local))
        for room in new:
            self.local[room] = _Room(room)
        try:
            if new:
                await self._subscribe(new)
            plan, answers = await self._execute(batch, sources, now)
        except Exception as error:  # noqa: BLE001 (nothing of the batch is completed yet)
            self._refuse_all(batch, sources, maybe_applied=True)
            self._forget_rooms_without_members(new)
            if not _is_connection_error(error):
                log.error("redis: a batch failed: %r", error)
                self._put(("cleanup",))  # (Redis is there: undo what may have been done)
            raise
        counts: Dict[str, int] = {}
        position = 0
        for step in plan:
            taken = step[-1]
            queued = len(self._out)
            try:
                self._complete(step, answers[position : position + taken], counts)
            except Exception:  # a bug: logged, and the command still gets its one outcome
                log.exception("redis: completing a %s failed", step[0])
                if len(self._out) == queued:
                    self._ready(m.fail(step[1][1], errors.ROOM_UNAVAILABLE), step[2])
            position += taken
        heard, self._heard = self._heard, []
        for name, epoch, entries in heard:
            self._hear(name, epoch, entries)
        for room in new:
            found = self.local.get(room)
            if found is not None and not found.members and not found.pending:
                await self._unsubscribe(room)
        if counts:  # (best effort: ROOMS' listing; the completions are queued already)
            pipe = self.rooms.client.pipeline(transaction=False)
            for room, members in counts.items():
                self.rooms.queue_count(pipe, room, members)
            await pipe.execute(raise_on_error=False)

    def _forget_rooms_without_members(self, names: Sequence[str]) -> None:
        for name in names:
            room = self.local.get(name)
            if room is not None and not room.members and not room.pending:
                del self.local[name]
                self._confirmed.pop(name, None)
                self._channels.pop(channel_of(name).encode(), None)

    async def _execute(
        self, batch: List[m.Command], sources: List[int], now: float
    ) -> Tuple[List[Tuple[Any, ...]], List[Any]]:
        """The batch's pipeline, run (again once if Redis had forgotten the scripts)."""
        for attempt in (1, 2):
            calls: List[Callable[[Any], None]] = []
            joined: Dict[int, Set[str]] = {}  # JOINs earlier in the batch, for its DROPs
            lines: Dict[str, _Lines] = {}  # chat lines of a room said together so far
            plan = []
            for command, source in zip(batch, sources):
                if command[2] and command[2] < now and command[0] not in m.ALWAYS_APPLIED:
                    plan.append(("now", command, source, 0))
                else:
                    plan.append(self._queue(calls, command, source, joined, lines))
            pipe = self.rooms.client.pipeline(transaction=False)
            for call in calls:
                call(pipe)
            answers = await pipe.execute(raise_on_error=False) if calls else []
            for answer in answers:
                if _is_connection_error(answer):
                    raise answer
            if attempt == 1 and any(_is_noscript(answer) for answer in answers):
                await self.rooms.load()  # a restarted Redis: nothing of it was applied
                continue
            return plan, answers
        raise AssertionError("unreachable")

    def _queue(
        self,
        calls: List[Callable[[Any], None]],
        command: m.Command,
        source: int,
        joined: Dict[int, Set[str]],
        lines: Dict[str, _Lines],
    ) -> Tuple[Any, ...]:
        """Add *command*'s Redis calls (each made on the batch's pipeline later); its plan
        step, ending with how many answers it takes. A MSG joins the room's chat lines
        said together (one call, where the first is); any other command on the room
        closes them (a DROP, every room's), so that each is said where it stands."""
        op, cid = command[0], command[3]
        rooms = self.rooms
        if op == m.MSG:
            name, text = command[4], command[5]
            size = len(text) if text.isascii() else len(text.encode())
            said = lines.get(name)
            if said is not None and said.size + size > limits.REDIS_SAY_MAX_BYTES:
                said = None  # (one published message stays small: this one starts another)
            first = said is None
            if said is None:
                said = lines[name] = _Lines()
                calls.append(lambda pipe: rooms.queue_say(pipe, name, said))
            said.append((cid, text))
            said.size += size
            return ("msg", command, source, said, len(said) - 1, 1 if first else 0)
        if op == m.DROP:
            lines.clear()
        elif op != m.ROOMS:
            lines.pop(command[4], None)
        if op == m.JOIN or op == m.REJOIN:
            room, username = command[4], command[5]
            joined.setdefault(cid, set()).add(room)
            keys, quiet = name_keys(username), op == m.REJOIN
            calls.append(lambda pipe: rooms.queue_join(pipe, room, cid, username, keys, quiet))
            return ("join", command, source, 1)
        if op == m.LEAVE:
            calls.append(lambda pipe: rooms.queue_leave(pipe, command[4], cid))
            return ("leave", command, source, 1)
        if op == m.DROP:
            names = sorted(self._client_rooms.get(cid, set()) | joined.pop(cid, set()))
            for room in names:
                calls.append(lambda pipe, room=room: rooms.queue_leave(pipe, room, cid))
            return ("drop", command, source, names, len(names))
        if op == m.NAMES:
            calls.append(lambda pipe: rooms.queue_names(pipe, command[4]))
            return ("names", command, source, 1)
        if op == m.ROOMS:
            calls.append(lambda pipe: pipe.zrevrange(ROOMS_KEY, 0, -1, withscores=True))
            return ("rooms", command, source, 1)
        if op == m.HISTORY or op == m.SINCE:
            room = command[4]
            calls.append(lambda pipe: rooms.queue_state(pipe, room))
            if op == m.HISTORY:
                wanted = min(command[5], HISTORY_SIZE)
                calls.append(lambda pipe: rooms.queue_history(pipe, room, wanted))
            else:
                calls.append(lambda pipe: rooms.queue_range(pipe, room, command[5], HISTORY_SIZE))
            return ("read", command, source, 2)
        if op == m.PRIVMSG:
            calls.append(lambda pipe: pipe.hgetall(room_keys(command[4])[2]))
            return ("privmsg", command, source, 1)
        raise KeyError(op)

    def _complete(self, step: Tuple[Any, ...], answers: List[Any], counts: Dict[str, int]) -> None:
        kind, command, source = step[0], step[1], step[2]
        if kind == "now":
            self._ready(m.fail(command[1], errors.SHARD_TIMEOUT), source)
            return
        if kind == "msg":  # the room's lines were said together, in the first one's call
            if step[5]:
                step[3].answer = answers[0]
            answers = [step[3].answer]
        for answer in answers:
            if isinstance(answer, Exception):
                log.error("redis: %s", answer)
                if kind == "drop":
                    break  # (its rooms are left below as far as they could be)
                self._ready(m.fail(command[1], errors.ROOM_UNAVAILABLE), source)
                return
        getattr(self, "_done_" + kind)(step, answers, counts)

    def _done_msg(self, step: Tuple[Any, ...], answers: List[Any], counts: Dict) -> None:
        _, command, source, _, index, first = step
        seqs, message = answers[0]
        req, room = command[1], command[4]
        if first:
            self._adopt(room, message)
        seq = int(seqs[index])
        if not seq:
            self._ready(m.fail(req, errors.NOT_IN_ROOM), source)
            return

        def make(entry: m.Entry) -> m.Event:
            return m.chat(req, room, entry, msg_line(room, entry[3], entry[4]))

        self._wait_for(room, seq, _Item(None, source, (), make,
                                        m.fail(req, errors.ROOM_UNAVAILABLE)))  # fmt: skip

    def _done_join(self, step: Tuple[Any, ...], answers: List[Any], counts: Dict) -> None:
        _, command, source, _ = step
        outcome, epoch, seq, members = outcome_of(answers[0])
        last = last_seq_of(answers[0])
        op, req, _, cid, name, username = command
        self._adopt(name, message_of(answers[0]))
        room = self.local.get(name)
        if room is None:  # (a JOIN subscribes first)
            room = self.local[name] = _Room(name)
        counts[name] = members
        if outcome == "taken":
            self._ready(m.fail(req, errors.NAME_TAKEN), source)
            return
        if outcome == "member" and op == m.JOIN:
            self._ready(m.fail(req, errors.ALREADY_IN_ROOM), source)
            return
        room.members[cid] = username
        self._client_rooms.setdefault(cid, set()).add(name)
        if room.expected is None:  # the first member here: deliver from its join on
            room.epoch = epoch
            room.expected = seq if op == m.JOIN else last + 1
            room.early = {s: e for s, e in room.early.items() if s >= room.expected}
        if op == m.REJOIN:
            self._ready(m.done(req, epoch), source)
            return

        def make(entry: m.Entry) -> m.Event:
            return m.joined(req, name, cid, entry, epoch)

        def undo() -> None:  # the client is told it did not join: nor is it a member
            self._let_go(name, cid)

        self._wait_for(name, seq, _Item(None, source, (), make,
                                        m.fail(req, errors.ROOM_UNAVAILABLE), undo))  # fmt: skip

    def _done_leave(self, step: Tuple[Any, ...], answers: List[Any], counts: Dict) -> None:
        _, command, source, _ = step
        outcome, _, seq, members = outcome_of(answers[0])
        req, cid, name = command[1], command[3], command[4]
        self._adopt(name, message_of(answers[0]))
        counts[name] = members
        self._forget_member(name, cid)
        if outcome != "left":
            self._ready(m.fail(req, errors.NOT_IN_ROOM), source)
            return

        def make(entry: m.Entry) -> m.Event:
            return m.left(req, name, cid, entry)

        self._wait_for(
            name,
            seq,
            _Item(None, source, (cid % self.routers,), make, m.left(req, name, cid, None)),
        )  # type: ignore[arg-type]

    def _done_drop(self, step: Tuple[Any, ...], answers: List[Any], counts: Dict) -> None:
        _, command, source, names, _ = step
        req, cid = command[1], command[3]
        for name, answer in zip(names, answers):
            self._forget_member(name, cid)
            if isinstance(answer, Exception):
                self._ready(m.left(0, name, cid, None), -1, (cid % self.routers,))  # type: ignore[arg-type]
                continue
            outcome, _, seq, members = outcome_of(answer)
            self._adopt(name, message_of(answer))
            counts[name] = members
            if outcome == "left":
                self._wait_for(name, seq, _Item(
                    None, -1, (cid % self.routers,),
                    lambda entry, name=name: m.left(0, name, cid, entry),
                    m.left(0, name, cid, None),  # type: ignore[arg-type]
                ))  # fmt: skip
        for name in names[len(answers) :]:
            self._forget_member(name, cid)
        self._ready(m.done(req, None), source)

    def _done_names(self, step: Tuple[Any, ...], answers: List[Any], counts: Dict) -> None:
        self._ready(m.done(step[1][1], sorted(names_of(answers[0]), key=name_key)), step[2])

    def _done_rooms(self, step: Tuple[Any, ...], answers: List[Any], counts: Dict) -> None:
        listing = []
        for raw, score in answers[0]:
            room = text_of(raw)
            if int(score) > 0 and room_to_shard(room, self.count) == self.index:
                listing.append((room, int(score)))
                if len(listing) >= MAX_ROOMS_LISTED:
                    break
        self._ready(m.done(step[1][1], listing), step[2])

    def _done_read(self, step: Tuple[Any, ...], answers: List[Any], counts: Dict) -> None:
        _, command, source, _ = step
        op, req, _, cid, name = command[:5]
        room = self.local.get(name)
        if room is None or cid not in room.members:
            self._ready(m.fail(req, errors.NOT_IN_ROOM), source)
            return
        epoch, seq = state_of(answers[0])
        items = answers[1]
        entries = [entry_of(item) for item in (reversed(items) if op == m.HISTORY else items)]
        # What this node has not delivered yet comes live after this answer: not twice.
        if room.expected is not None and epoch == room.epoch:
            entries = [entry for entry in entries if entry[0] < room.expected]
            seq = min(seq, room.expected - 1)
        if op == m.HISTORY:
            wanted = command[5]
            self._ready(m.done(req, entries[-wanted:] if wanted > 0 else []), source)
            return
        taken: List[m.Entry] = []
        if entries:
            taken, _ = m.take_within(entries, command[6])
        first = entries[0][0] if entries else seq + 1
        self._ready(m.done(req, (taken, first, seq, epoch)), source)

    def _done_privmsg(self, step: Tuple[Any, ...], answers: List[Any], counts: Dict) -> None:
        _, command, source, _ = step
        _, req, _, cid, name, to, text = command
        room = self.local.get(name)
        if room is None or cid not in room.members:
            self._ready(m.fail(req, errors.NOT_IN_ROOM), source)
            return
        who = {text_of(k): json.loads(text_of(v)) for k, v in answers[0].items()}
        names = {member: info[0] for member, info in who.items()}  # info: [name, key...]
        keys = {key: member for member, info in who.items() for key in info[1:]}
        member_id = recipient(names, keys, to)
        if member_id is None:
            self._ready(m.fail(req, errors.NO_SUCH_MEMBER), source)
            return
        to_name = names[member_id]
        node, _, to_cid = member_id.rpartition(":")
        sender = room.members[cid]
        after = (room.expected or 1) - 1
        here = node == self.rooms.node
        to_local = int(to_cid) if here else REMOTE_CID
        wire = privmsg_line(name, sender, to_name, text)
        event = m.private(req, name, to_local, sender, to_name, self._clock(), after, text, wire)
        self._ready(event, source, (to_local % self.routers,) if here else ())
        if not here:  # to the recipient's node, on the room's channel (not recorded)
            payload = json.dumps({"p": [member_id, sender, to_name, after, text]})
            self._put(("publish", name, payload))

    # --- the out queue ----------------------------------------------------------------

    def _ready(self, event: m.Event, source: int, extra: Tuple[int, ...] = ()) -> None:
        self._out.append(_Item(event, source, extra))

    def _wait_for(self, name: str, seq: int, item: _Item) -> None:
        """*item* goes out when entry *seq* of *name* comes back (or is read back)."""
        self._out.append(item)
        room = self.local.get(name)
        if room is None or room.expected is None or seq < room.expected:
            # (Delivered already: cannot be, a batch holds the channel's messages back.)
            log.error("room %s: entry %d came before its completion", name, seq)
            self._fall_back(item)
            return
        room.pending[seq] = (item, self._monotonic())

    def _fall_back(self, item: _Item) -> None:
        """*item*'s entry will not come: it goes out as its fallback (and what the
        fallback means for membership is done)."""
        item.event = item.fallback
        if item.on_fallback is not None:
            item.on_fallback()

    def _flush(self) -> None:
        out = self._out
        ready: List[Tuple[m.Event, int, Tuple[int, ...]]] = []
        while out and out[0].event is not None:
            item = out.popleft()
            targets = self._targets(item)
            if targets:
                ready.append((item.event, item.source, targets))  # type: ignore[arg-type]
        if ready:
            self._send(ready)

    def _targets(self, item: _Item) -> Tuple[int, ...]:
        event = item.event
        assert event is not None
        op = event[0]
        if self.routers == 1:
            return () if item.source < 0 and op in (m.DONE, m.FAIL) else (0,)
        targets = set(item.extra)
        if item.source >= 0:
            targets.add(item.source)
        if op in (m.JOINED, m.CHAT, m.LEFT, m.NOTICE):
            room = self.local.get(event[2])
            if room is not None:
                targets.update(cid % self.routers for cid in room.members)
        return tuple(sorted(targets))

    # --- the channel ------------------------------------------------------------------

    async def _subscribe(self, rooms: Sequence[str]) -> None:
        loop = asyncio.get_running_loop()
        waits = []
        for room in rooms:
            self._channels[channel_of(room).encode()] = room
            future = self._confirmed[room] = loop.create_future()
            waits.append(future)
        await self._pubsub.subscribe(*[channel_of(room) for room in rooms])
        assert self._listening is not None
        self._listening.set()
        try:
            await asyncio.wait_for(asyncio.gather(*waits), REDIS_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            raise ConnectionError("Redis did not confirm a subscription") from None

    async def _unsubscribe(self, room: str) -> None:
        self.local.pop(room, None)
        self._confirmed.pop(room, None)
        self._channels.pop(channel_of(room).encode(), None)
        await self._pubsub.unsubscribe(channel_of(room))

    async def _listen(self) -> None:
        """Read the subscription connection while it is up (``_listening``: set once a
        subscribe returned, cleared when Redis is lost), whatever has arrived at once.
        Other nodes' entries are delivered as they come, also while a job runs (this
        node's own come in its answers); one that changes a room's epoch waits until the
        job is done (:meth:`_on_entry`)."""
        assert self._listening is not None
        while True:
            await self._listening.wait()
            pubsub = self._pubsub
            try:
                replies = await pubsub.read()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 (cut off: client-output-buffer-limit)
                if pubsub is self._pubsub and not self.down:
                    self._lost(error)
                continue
            if pubsub is not self._pubsub:
                continue
            for reply in replies:
                self._on_message(*reply)
            self._flush()

    def _on_message(self, kind: bytes, channel: bytes, data: Any) -> None:
        """One reply of the subscription: a confirmation, or a message on a room's channel
        (another node's entries, or a direct message to a member here)."""
        room = self._channels.get(channel)
        if room is None:
            return
        if kind == b"subscribe":
            future = self._confirmed.get(room)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == b"message":
            if data.find(self._own_mark, 0, self._own_within) > 0:
                return  # ours: delivered from its script's answer
            try:
                value = json.loads(data)
                if isinstance(value, dict):
                    fields = value["p"]
                    private = (str(fields[0]), str(fields[1]), str(fields[2]), int(fields[3]),
                               str(fields[4]))  # fmt: skip
                    self._on_private(room, private)
                    return
                epoch, node, entries = published_of(value)
            except (ValueError, TypeError, KeyError, IndexError):
                # Not one of ours (another program, another version): the entry, if it is
                # one, is read from the Stream when the next one shows the gap.
                log.warning("room %s: a message on its channel is not an entry: %.80r", room,
                            data)  # fmt: skip
                return
            if node != self.rooms.node:
                for entry in entries:
                    self._on_entry(room, epoch, entry)

    def _adopt(self, name: str, message: bytes) -> None:
        """Take in what a script of this node published in *name* (its answer's last
        part), to be delivered once the batch's completions wait (:meth:`_hear`). A newer
        epoch than the room's is taken on at once, before the command's completion waits
        for its entry (the old history's entries will not come)."""
        found = self._published(name, message)
        if found is None:
            return
        epoch, entries = found
        room = self.local.get(name)
        if room is not None and room.expected is not None and room.epoch is not None:
            if epoch > room.epoch and entries:
                self._new_epoch(room, epoch, entries[0][0])
        self._heard.append((name, epoch, entries))

    def _published(self, name: str, message: bytes) -> Optional[Tuple[int, List[m.Entry]]]:
        if not message:
            return None
        try:
            epoch, _, entries = published_of(json.loads(message))
        except (ValueError, TypeError, IndexError):
            log.error("room %s: a script answered with %.80r", name, message)
            return None
        return epoch, entries

    def _hear(self, name: str, epoch: int, entries: List[m.Entry]) -> None:
        """Deliver the entries a script of this node published, from its answer."""
        for entry in entries:
            self._on_entry(name, epoch, entry, heard=True)

    def _hear_answer(self, name: str, message: bytes) -> None:
        """:meth:`_hear` what a script run outside a batch (presence, clean-up, putting
        members back) published."""
        found = self._published(name, message)
        if found is not None:
            self._hear(name, *found)

    def _on_entry(self, name: str, epoch: int, entry: m.Entry, heard: bool = False) -> None:
        """Deliver *entry* of room *name* if it is the next one, else keep it until the
        ones before it come (*heard*: from this node's own answer; then what is missing is
        another node's, on its way or lost: the timer tells, after the gap time). Another
        node's entry of a new epoch, while a job runs, waits until it is done."""
        room = self.local.get(name)
        if room is None:
            return
        if not heard and self._busy and (name in self._later or (
                room.epoch is not None and epoch != room.epoch)):  # fmt: skip
            held = self._later.setdefault(name, [])
            if len(held) < HISTORY_SIZE:  # (what does not fit is read back later)
                held.append((epoch, entry))
            return
        seq = entry[0]
        if room.expected is None:
            if len(room.early) < HISTORY_SIZE:  # (what does not fit is read back later)
                room.early[seq] = (epoch, entry)
            return
        if epoch != room.epoch:
            if room.epoch is not None and epoch < room.epoch:
                return  # a late entry of an older history
            self._new_epoch(room, epoch, seq)
        if seq < room.expected:
            return  # read back from the Stream already
        if seq > room.expected:
            if len(room.early) < HISTORY_SIZE:
                room.early[seq] = (epoch, entry)
            if heard:
                return  # (the timer reads the Stream if what is missing does not come)
            if self._busy:  # (the missing ones may be this node's, in the job's answer)
                self._ahead.add(name)
            else:
                self.gaps += 1
                self._want_fill(name, seq - 1)
            return
        self._deliver(room, epoch, entry)
        self._deliver_early(room)

    def _new_epoch(self, room: _Room, epoch: int, seq: int) -> None:
        """The room's history started over in Redis (it lost the room's keys): what waited
        for entries of the old history will not get them (the new one reuses its seqs)."""
        for item, _ in room.pending.values():
            self._fall_back(item)
        room.pending.clear()
        self._out.append(_Item(m.notice(room.name, RESTARTED, epoch)))
        room.epoch = epoch
        room.expected = seq
        room.early = {s: e for s, e in room.early.items() if e[0] == epoch and s >= seq}

    def _deliver(self, room: _Room, epoch: int, entry: m.Entry) -> None:
        seq = entry[0]
        room.expected = seq + 1
        waiting = room.pending.pop(seq, None)
        if waiting is not None:
            item = waiting[0]
            assert item.make is not None
            item.event = item.make(entry)
        else:
            name, kind = room.name, entry[2]
            if kind == m.KIND_CHAT:
                event = m.chat(0, name, entry, msg_line(name, entry[3], entry[4]))
            elif kind == m.KIND_JOIN:
                event = m.joined(0, name, REMOTE_CID, entry, epoch)
            else:
                gone = next((c for c, user in room.members.items() if user == entry[3]), None)
                if gone is not None:  # ours, expired by another node (we were cut off)
                    self._forget_member(name, gone)
                    event = m.left(0, name, gone, entry)
                else:
                    event = m.left(0, name, REMOTE_CID, entry)
            extra = (event[3] % self.routers,) if event[0] == m.LEFT and event[3] >= 0 else ()
            item = _Item(event, -1, extra)
            later = [s for s in room.pending if s > seq]
            if later:  # a local completion of a newer entry is queued: this goes before it
                self._out.insert(self._out.index(room.pending[min(later)][0]), item)
            else:
                self._out.append(item)
        if not room.members and not room.pending:
            self._put(("unsubscribe", room.name))

    def _deliver_early(self, room: _Room) -> None:
        while room.expected in room.early:
            epoch, entry = room.early.pop(room.expected)  # type: ignore[arg-type]
            self._deliver(room, epoch, entry)

    def _on_private(self, name: str, fields: List[Any]) -> None:
        member_id, sender, to, after, text = fields
        node, _, cid_text = str(member_id).rpartition(":")
        if node != self.rooms.node:
            return
        cid = int(cid_text)
        wire = privmsg_line(name, sender, to, text)
        event = m.private(0, name, cid, sender, to, self._clock(), int(after), text, wire)
        self._out.append(_Item(event, -1, (cid % self.routers,)))

    def _want_fill(self, room: str, upto: int) -> None:
        if room not in self._filling:
            self._filling.add(room)
            self._put(("fill", room, upto))

    async def _fill(self, name: str, upto: int) -> None:
        """Read *name*'s entries from the next expected one through *upto* (and whatever
        waits or came early) from its Stream, and deliver them; what is gone is a
        ``missed`` notice."""
        self._filling.discard(name)
        room = self.local.get(name)
        if room is None or room.expected is None:
            return
        top = max([upto, *room.pending, *room.early])
        after = room.expected - 1
        if top <= after:
            return
        pipe = self.rooms.client.pipeline(transaction=False)
        self.rooms.queue_state(pipe, name)
        self.rooms.queue_range(pipe, name, after, min(HISTORY_SIZE, top - after))
        state, items = await pipe.execute()
        epoch, seq = state_of(state)
        if epoch and room.epoch is not None and epoch < room.epoch:
            return  # (an answer from before the room's new history: nothing to do)
        entries = [entry_of(item) for item in items]
        self.refilled += len(entries)
        if epoch != room.epoch:
            self._new_epoch(room, epoch, entries[0][0] if entries else seq + 1)
        elif gap_lost(epoch, seq, epoch, after, entries):
            self._notice(name, MISSED)
            room.expected = entries[0][0] if entries else seq + 1
        for entry in entries:
            if entry[0] == room.expected:
                self._deliver(room, epoch, entry)
        self._deliver_early(room)
        for gone in [s for s in room.pending if s < room.expected]:
            item, _ = room.pending.pop(gone)  # (trimmed before it could be read)
            self._fall_back(item)

    def _notice(self, room: str, code: str) -> None:
        self._out.append(_Item(m.notice(room, code)))

    # --- presence ---------------------------------------------------------------------

    async def _presence(self) -> None:
        names = [name for name, room in self.local.items() if room.members]
        if not names:
            return
        pipe = self.rooms.client.pipeline(transaction=False)
        for name in names:
            self.rooms.queue_refresh(pipe, name, list(self.local[name].members))
            self.rooms.queue_expire(pipe, name)
        answers = await pipe.execute(raise_on_error=False)
        counts = self.rooms.client.pipeline(transaction=False)
        for name, answer in zip(names, answers[1::2]):
            if _is_connection_error(answer):
                raise answer
            if not isinstance(answer, Exception) and int(answer[0]):
                self._hear_answer(name, message_of(answer))  # (the expired members' leaves)
                self.rooms.queue_count(counts, name, int(answer[1]))
        if len(counts):
            await counts.execute()

    # --- Redis lost, and back ----------------------------------------------------------

    def _lost(self, error: BaseException) -> None:
        if self.down or self._stopping:
            return
        log.error("redis lost (%s); its rooms are unavailable until it is back", error)
        self.down = True
        assert self._listening is not None
        self._listening.clear()
        for room in list(self.local.values()):
            for item, _ in list(room.pending.values()):  # their entries will not come now
                self._fall_back(item)
            room.pending.clear()
            room.early.clear()
        for name in list(self.local):
            self._notice(name, SHARED_LOST)
        self._flush()
        self._backoff = 0.0
        self._put(("reconnect",))

    def _refuse_all(self, batch: List[m.Command], sources: List[int], maybe_applied: bool) -> None:
        """Complete *batch* without Redis (it is lost, or failed in the middle of the batch:
        *maybe_applied*, then Redis may have run some of it). Every command gets its one
        outcome; members this node lets go of are left in Redis too once it is back (a
        ``cleanup``), and a REJOIN is put back here (and into Redis when it is back)."""
        for command, source in zip(batch, sources):
            op, req, cid = command[0], command[1], command[3]
            if op == m.DROP:
                for name in sorted(self._client_rooms.get(cid, ())):
                    self._let_go(name, cid)
                    self._ready(m.left(0, name, cid, None), -1, (cid % self.routers,))  # type: ignore[arg-type]
                self._ready(m.done(req, None), source)
            elif op == m.LEAVE:
                name = command[4]
                room = self.local.get(name)
                if room is not None and cid in room.members:
                    self._let_go(name, cid)
                    self._ready(m.left(req, name, cid, None), source, (cid % self.routers,))  # type: ignore[arg-type]
                else:
                    self._ready(m.fail(req, errors.NOT_IN_ROOM), source)
            elif op == m.REJOIN:  # (DONE or name_taken only: it is a member here again)
                name, username = command[4], command[5]
                room = self.local.setdefault(name, _Room(name))
                room.members[cid] = username
                self._client_rooms.setdefault(cid, set()).add(name)
                self._ready(m.done(req, room.epoch or 0), source)
            else:
                if op == m.JOIN and maybe_applied:  # its script may have run
                    self._cleanup.add((command[4], cid))
                self._ready(m.fail(req, errors.ROOM_UNAVAILABLE), source)

    def _let_go(self, name: str, cid: int) -> None:
        """*cid* is no member of *name* here any more; Redis is told when it can be."""
        self._forget_member(name, cid)
        self._cleanup.add((name, cid))

    async def _reconnect(self) -> None:
        """Try once to be back; on failure try again later (backoff)."""
        try:
            await self.rooms.client.ping()
            await self.rooms.load()
            assert self._listening is not None
            self._listening.clear()
            old, self._pubsub = self._pubsub, self._pubsub_factory()
            await _close_quietly(old)
            self._channels.clear()
            self._confirmed.clear()
            self._forget_rooms_without_members(list(self.local))
            names = list(self.local)
            self.down = False
            if names:
                await self._subscribe(names)
            await self._clean_up()
            await self._put_members_back()
            for name in names:
                room = self.local.get(name)
                if room is not None and room.expected is not None:
                    await self._fill(name, room.expected + HISTORY_SIZE)
        except Exception as error:  # noqa: BLE001
            if not _is_connection_error(error):
                log.exception("redis: reconnecting failed")
            self.down = True
            self._backoff = min(REDIS_BACKOFF_MAX_SECONDS, max(0.1, self._backoff * 2))
            asyncio.get_running_loop().call_later(self._backoff, self._put, ("reconnect",))
            return
        log.warning("redis is back; its rooms are available again")
        for name in list(self.local):
            self._notice(name, SHARED_BACK)

    async def _clean_up(self) -> None:
        """Leave, in Redis, the members this node let go of while it could not tell it
        (their rooms hear them leave, if they were still there)."""
        if not self._cleanup:
            return
        pending, self._cleanup = sorted(self._cleanup), set()
        pipe = self.rooms.client.pipeline(transaction=False)
        for name, cid in pending:
            self.rooms.queue_leave(pipe, name, cid)
        try:
            answers = await pipe.execute(raise_on_error=False)
        except Exception:
            self._cleanup.update(pending)  # (tried again when Redis is back)
            raise
        for (name, _), answer in zip(pending, answers):
            if not isinstance(answer, Exception):
                self._hear_answer(name, message_of(answer))

    async def _put_members_back(self) -> None:
        """Every member here present again (Redis may have restarted, or expired them)."""
        pipe = self.rooms.client.pipeline(transaction=False)
        back: List[Tuple[str, int]] = []
        for name, room in self.local.items():
            for cid, username in room.members.items():
                self.rooms.queue_join(pipe, name, cid, username, name_keys(username), quiet=True)
                back.append((name, cid))
        if not back:
            return
        for (name, cid), answer in zip(back, await pipe.execute()):
            room = self.local[name]
            if room.expected is None:  # (put back while Redis was away: deliver from now)
                room.epoch, room.expected = outcome_of(answer)[1], last_seq_of(answer) + 1
            self._hear_answer(name, message_of(answer))  # (members of others that had expired)
            if outcome_of(answer)[0] == "taken":  # someone else took the name meanwhile
                log.warning("room %s: a member's name was taken while Redis was away", name)
                self._forget_member(name, cid)
                self._ready(m.left(0, name, cid, None), -1, (cid % self.routers,))  # type: ignore[arg-type]

    # --- helpers ----------------------------------------------------------------------

    def _forget_member(self, name: str, cid: int) -> None:
        room = self.local.get(name)
        if room is not None:
            room.members.pop(cid, None)
        rooms = self._client_rooms.get(cid)
        if rooms is not None:
            rooms.discard(name)
            if not rooms:
                del self._client_rooms[cid]


async def _close_quietly(pubsub: Any) -> None:
    if pubsub is None:
        return
    try:
        await pubsub.aclose()
    except Exception:  # noqa: BLE001 (closing a connection that is gone)
        pass


def _is_connection_error(error: Any) -> bool:
    import redis.exceptions as rx

    return isinstance(error, (rx.ConnectionError, rx.TimeoutError, ConnectionError,
                              asyncio.TimeoutError))  # fmt: skip


def _is_noscript(answer: Any) -> bool:
    import redis.exceptions as rx

    return isinstance(answer, rx.NoScriptError)


# --- the process ----------------------------------------------------------------------


def fast_connection_class(url: str) -> Dict[str, Any]:
    """``from_url`` keywords for connections that pack commands with hiredis (C, about a
    tenth of redis-py's own asyncio packing per ``EVALSHA``; its sync client does the same),
    or none where hiredis has no ``pack_command``."""
    try:
        import hiredis
        import redis.asyncio.connection as connections
    except ImportError:
        return {}
    pack = getattr(hiredis, "pack_command", None)
    if pack is None:
        return {}
    base = connections.SSLConnection if url.startswith("rediss:") else connections.Connection

    class HiredisPacking(base):  # type: ignore[valid-type, misc]
        def pack_command(self, *args: Any) -> List[bytes]:
            if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD", as redis-py
                args = (*args[0].split(), *args[1:])
            try:
                return [pack(args)]
            except TypeError:  # (an argument hiredis does not take: redis-py's way)
                return super().pack_command(*args)

    return {"connection_class": HiredisPacking}


def serve(
    links: List[Tuple[Any, Any]],
    control: Any,
    index: int,
    count: int,
    spec: Any,
    parent_pid: Optional[int] = None,
) -> None:
    """Run shard *index* of *count* of the node *spec* names (a
    :class:`common.redis_spec.RedisSpec`) until its routers go: ``links[r]`` is router
    *r*'s (commands, events) pipe pair; *control* the supervisor's pipe of a router tier
    (None for one router: then the shard ends with its router's pipe, or when *parent_pid*
    is no longer its parent)."""
    asyncio.run(_serve(links, control, index, count, spec, parent_pid))


async def _serve(
    links: List[Tuple[Any, Any]],
    control: Any,
    index: int,
    count: int,
    spec: Any,
    parent_pid: Optional[int],
) -> None:
    url, node, presence_seconds = spec.url, spec.node, spec.presence_seconds
    import os
    import pickle

    import redis.asyncio as aioredis

    from shard.handoff import read_on_thread
    from shard.looplink import link_class
    from shard.redis_sub import Subscriber

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    # Named, so that CLIENT LIST shows whose connection is whose (docs/DEPLOY.md).
    name = f"shardchat-{node}-sh{index}"
    fast = fast_connection_class(url)
    client = aioredis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                               socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                               client_name=name, **fast)  # fmt: skip
    routers = len(links)
    generations = [0] * routers
    current: List[Any] = [None] * routers  # each router's link now (shard.looplink)
    Link = link_class()

    def stalled(router: int) -> None:  # (the loop, or a sender's thread)
        if control is not None:
            try:
                control.send(("stalled", router, generations[router]))
            except OSError:
                pass  # the supervisor is gone: its pipe's end says so

    def send(ready: List[Tuple[m.Event, int, Tuple[int, ...]]]) -> None:
        per: List[List[m.Event]] = [[] for _ in range(routers)]
        for event, source, targets in ready:
            for router in targets:
                copy = event if router == source or not event[1] else event[:1] + (0,) + event[2:]
                per[router].append(copy)
        for router, events in enumerate(per):
            link = current[router]
            if events and link is not None:
                link.send(pickle.dumps(events, pickle.HIGHEST_PROTOCOL))

    rooms = RedisRooms(client, node, presence_seconds=presence_seconds)

    def subscriber() -> Subscriber:
        return Subscriber(url, name + "-sub", REDIS_TIMEOUT_SECONDS)

    shard = RedisShard(rooms, subscriber, send, index, count, routers)

    def gone(router: int, link: Any) -> None:  # (the loop) a router's pipe ended
        if current[router] is not link:
            return  # replaced already
        current[router] = None
        link.close()
        if control is None:
            done.set()  # our only router is gone: so are we
        else:
            shard.router_gone(router)

    def attach(router: int, commands: Any, events: Any) -> None:
        holder: List[Any] = []

        def on_commands(batch: List[m.Command]) -> None:
            shard.submit(batch, [router] * len(batch))

        link = Link(loop, router, commands, events, on_commands,
                    lambda: gone(router, holder[0]), stalled)  # fmt: skip
        holder.append(link)
        current[router] = link

    def on_control(message: Any) -> None:  # (the loop) the supervisor restarted a router
        _, router, commands, events = message
        old = current[router]
        if old is not None:
            gone(router, old)
        generations[router] += 1
        attach(router, commands, events)

    await shard.start()
    for router, (commands, events) in enumerate(links):
        attach(router, commands, events)
    if control is not None:
        read_on_thread(control, loop, on_control, done.set)
    try:
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), STALL_CHECK_SECONDS)
            except asyncio.TimeoutError:
                if parent_pid is not None and os.getppid() != parent_pid:
                    break  # orphaned: the router died and we were re-parented
                for link in current:  # a router that takes nothing is stalled (tier)
                    if link is not None:
                        link.check()
    finally:
        await shard.stop()
        for link in current:
            if link is not None:
                link.close()
        await client.aclose()
