"""Rooms kept in Redis, shared by every node on one Redis (``--redis URL``).

The calls a shard makes for its rooms (:class:`RedisRooms`), each queued on a pipeline so
that one batch of commands is one round trip (:mod:`shard.redis_node` drives them), and
the keys they use. Per room, keys sharing one hash tag (so one script may touch them all,
on a single Redis or on Redis Cluster), the tag being a digest of the room's name (any
name, braces included, gives a valid tag):

- ``sc:{T}:meta``   a hash: ``seq`` (the last sequence number given) and ``epoch``.
- ``sc:{T}:log``    a Stream of the last ``HISTORY_SIZE`` entries; an entry's id is
  ``<seq>-1``, so a range of seqs is an ``XRANGE``.
- ``sc:{T}:who``    a hash: member id (``<node>:<cid>``) -> JSON ``[username, key...]``.
- ``sc:{T}:names``  a hash: name key -> member id (what makes a username unique per room
  across nodes: the same keys a shard uses, :func:`common.names.name_keys`).
- ``sc:{T}:alive``  a sorted set: member id -> when (ms) its node's presence expires.
- the channel ``sc:{T}:ch`` carries every entry, with its epoch and seq, to the nodes
  that have members there.

And one key outside the rooms: ``sc:rooms``, a sorted set room -> members (for ``ROOMS``),
written by the nodes after their scripts (never inside one, so scripts touch one slot).

Every change is one Lua script: it gives the next seq, appends to the Stream (trimmed to
``HISTORY_SIZE``) and publishes, so seq order, history and what subscribers see agree; a
chat line is one ``EVALSHA``. A node keeps its members present by moving their expiry
forward (:meth:`RedisRooms.queue_refresh`); members of a node that stopped doing so
(``kill -9``, a power cut, cut off) are removed, with a ``leave`` entry everyone hears, by
the next script that changes the room after their expiry passed, or by the ``expire``
script every node runs for its rooms.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any, Callable, List, Sequence, Tuple

from common import messages as m
from common.limits import HISTORY_SIZE, PRESENCE_SECONDS

#: The sorted set of rooms with members (room -> members, every node's together).
ROOMS_KEY = "sc:rooms"

Clock = Callable[[], float]

# ARGV of every script: maxlen room ts (the entries' time) node (the caller), then its own.
# Times that nodes compare (presence expiry, a new room's epoch) are Redis's own clock, so
# that the nodes' clocks never need to agree. Every script that records entries publishes
# them once, at its end, as one message (``[epoch, node, entry...]``, each entry ``[seq, ts,
# kind, user, text]``) and answers with that same message, last: the caller delivers its
# own entries from the answer, the other nodes from the channel.
_LIB = """
local maxlen, room, ts, node = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local meta, log, who, names, alive, ch = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local recorded = {}

local function record(kind, user, text)
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  redis.call('XADD', log, 'MAXLEN', maxlen, seq .. '-1', 'ts', ts, 'k', kind, 'u', user,
             't', text)
  recorded[#recorded + 1] = {seq, ts, kind, user, text}
  return seq
end

-- What the script recorded, published: the message (the script's last answer), or ''.
local function published()
  if #recorded == 0 then return '' end
  local message = {tonumber(redis.call('HGET', meta, 'epoch')), node}
  for _, entry in ipairs(recorded) do message[#message + 1] = entry end
  local payload = cjson.encode(message)
  redis.call('PUBLISH', ch, payload)
  return payload
end

-- A room met for the first time (or whose keys Redis lost) starts a new history.
local function open()
  if redis.call('HSETNX', meta, 'epoch', now) == 1 then
    redis.call('DEL', log)
    redis.call('HSET', meta, 'seq', 0)
  end
  return tonumber(redis.call('HGET', meta, 'epoch'))
end

local function remove(id)
  local info = redis.call('HGET', who, id)
  redis.call('ZREM', alive, id)
  if not info then return nil end
  local parts = cjson.decode(info)
  for i = 2, #parts do
    if redis.call('HGET', names, parts[i]) == id then redis.call('HDEL', names, parts[i]) end
  end
  redis.call('HDEL', who, id)
  return record('leave', parts[1], parts[1] .. ' left ' .. room)
end

-- Remove the members whose presence expired, each with a leave entry.
local function expire()
  local gone = redis.call('ZRANGEBYSCORE', alive, '-inf', '(' .. now)
  for _, id in ipairs(gone) do remove(id) end
  return #gone
end
"""

# ARGV 5..: id username presence_ms quiet key1 [key2 ...]   (quiet: no entry: a REJOIN).
# Answer: outcome epoch seq members last_seq message.
_JOIN = (
    _LIB
    + """
local id, user, quiet = ARGV[5], ARGV[6], ARGV[8]
local expiry = now + tonumber(ARGV[7])
local epoch = open()
expire()
local function now_seq() return tonumber(redis.call('HGET', meta, 'seq')) end
local function answer(outcome, seq)
  return {outcome, epoch, seq, redis.call('HLEN', who), now_seq(), published()}
end
if redis.call('HEXISTS', who, id) == 1 then
  redis.call('ZADD', alive, expiry, id)
  return answer('member', 0)
end
for i = 9, #ARGV do
  if redis.call('HEXISTS', names, ARGV[i]) == 1 then return answer('taken', 0) end
end
local info = {user}
for i = 9, #ARGV do
  redis.call('HSET', names, ARGV[i], id)
  table.insert(info, ARGV[i])
end
redis.call('HSET', who, id, cjson.encode(info))
redis.call('ZADD', alive, expiry, id)
local seq = 0
if quiet == '0' then seq = record('join', user, user .. ' joined ' .. room) end
return answer('joined', seq)
"""
)

# ARGV 5: id.  Answer: outcome epoch seq members 0 message.
_LEAVE = (
    _LIB
    + """
local epoch = open()
local seq = remove(ARGV[5])
local members = redis.call('HLEN', who)
if not seq then return {'absent', epoch, 0, members, 0, published()} end
return {'left', epoch, seq, members, 0, published()}
"""
)

# ARGV 5..: id text [id text ...]: chat lines, in order. The hot path: no open() (a room
# without meta has no members). Answer: {seq of each line, 0 where its sender is not a
# member} message.
_SAY = (
    _LIB
    + """
local users, seqs = {}, {}
for i = 5, #ARGV, 2 do
  local id = ARGV[i]
  local user = users[id]
  if user == nil then
    local info = redis.call('HGET', who, id)
    user = info and cjson.decode(info)[1] or false
    users[id] = user
  end
  seqs[#seqs + 1] = user and record('chat', user, ARGV[i + 1]) or 0
end
return {seqs, published()}
"""
)

# Answer: removed members message.
_EXPIRE = (
    _LIB
    + """
if redis.call('EXISTS', meta) == 0 then return {0, 0, ''} end
local removed = expire()
return {removed, redis.call('HLEN', who), published()}
"""
)

# KEYS: alive.  ARGV: presence_ms id [id ...]: move their expiry on (ZADD XX: a member
# expired already is not brought back).
_REFRESH = """
local clock = redis.call('TIME')
local expiry = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
return #ARGV - 1
"""

SCRIPTS = {"join": _JOIN, "leave": _LEAVE, "say": _SAY, "expire": _EXPIRE, "refresh": _REFRESH}


def room_tag(room: str) -> str:
    """The hash tag of *room*'s keys: 16 hex digits of a digest of its name."""
    return hashlib.blake2b(room.encode("utf-8"), digest_size=8).hexdigest()


@functools.lru_cache(maxsize=4096)  # (every command of a room needs them)
def room_keys(room: str) -> Tuple[str, str, str, str, str, str]:
    """``(meta, log, who, names, alive, channel)`` for *room*."""
    base = f"sc:{{{room_tag(room)}}}:"
    return tuple(base + part for part in ("meta", "log", "who", "names", "alive", "ch"))  # type: ignore[return-value]


def channel_of(room: str) -> str:
    """The channel *room*'s entries are published on."""
    return room_keys(room)[5]


def text_of(value: Any) -> str:
    """*value* (bytes from Redis, or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_published(payload: Any) -> Tuple[int, str, List[m.Entry]]:
    """``(epoch, node, entries)`` of a message a script published (and answered with).
    Raises ``ValueError``, ``TypeError`` or ``IndexError`` for one that is not."""
    return published_of(json.loads(payload))


def published_of(value: Any) -> Tuple[int, str, List[m.Entry]]:
    """:func:`decode_published` of the message's JSON value."""
    epoch, node, *raw = value
    entries = [(int(seq), float(ts), str(kind), str(user), str(text))
               for seq, ts, kind, user, text in raw]  # fmt: skip
    return int(epoch), str(node), entries


def entry_of(item: Tuple[Any, Any]) -> m.Entry:
    """One Stream item ``(id, fields)`` as an entry."""
    raw_id, fields = item
    get = {text_of(k): text_of(v) for k, v in fields.items()}
    return (int(text_of(raw_id).split("-", 1)[0]), float(get["ts"]), get["k"], get["u"], get["t"])


def last_seq_of(result: Sequence[Any]) -> int:
    """The room's last seq as a join script's answer says (its own entry included)."""
    return int(result[4])


def outcome_of(result: Sequence[Any]) -> Tuple[str, int, int, int]:
    """``(outcome, epoch, seq, members)`` of a join/leave script's answer (seq 0: no
    entry)."""
    return text_of(result[0]), int(result[1]), int(result[2]), int(result[3])


def message_of(result: Sequence[Any]) -> bytes:
    """What a script's answer says it published (``b""``: nothing); see
    :func:`decode_published`."""
    last = result[-1]
    return last if isinstance(last, bytes) else str(last).encode()


class RedisRooms:
    """The rooms of every node, in one Redis: the calls a shard makes for its rooms.

    *client* is a ``redis.asyncio.Redis``; *node* names this node (member ids are
    ``<node>:<cid>``). *clock* gives seconds since the epoch for entry times (presence
    expiry and new epochs use Redis's clock, ``TIME``, the same for every node). Call
    :meth:`load` once
    connected (and again after ``NOSCRIPT``: a restarted Redis forgot the scripts).
    """

    def __init__(
        self,
        client: Any,
        node: str,
        clock: Clock = time.time,
        presence_seconds: float = PRESENCE_SECONDS,
        history_size: int = HISTORY_SIZE,
    ) -> None:
        self.client = client
        self.node = node
        self._clock = clock
        self.presence_seconds = presence_seconds
        self._maxlen = str(history_size)
        self._sha: dict = {}

    async def load(self) -> None:
        """Load the scripts into Redis (``SCRIPT LOAD``, idempotent)."""
        for name, body in SCRIPTS.items():
            self._sha[name] = await self.client.script_load(body)

    def member_id(self, cid: int) -> str:
        return f"{self.node}:{cid}"

    def _call(self, pipe: Any, script: str, room: str, *args: str) -> None:
        ts = repr(round(self._clock(), 6))  # the entry's time (the node's, as without Redis)
        pipe.evalsha(self._sha[script], 6, *room_keys(room), self._maxlen, room, ts, self.node,
                     *args)  # fmt: skip

    def _presence_ms(self) -> str:
        return str(int(self.presence_seconds * 1000))

    # --- queued on a pipeline: read the answers with outcome_of (message_of: what was
    # --- published, for the caller to deliver) -----------------------------------------

    def queue_join(
        self, pipe: Any, room: str, cid: int, username: str, keys: Sequence[str],
        quiet: bool = False,
    ) -> None:  # fmt: skip
        """Make *cid* a member as *username* holding name *keys*, none held on any node:
        ``joined`` (with the join entry's seq; none if *quiet*, a member put back), or
        ``taken``, or ``member`` (already in: its presence is refreshed)."""
        self._call(
            pipe, "join", room, self.member_id(cid), username, self._presence_ms(),
            "1" if quiet else "0", *keys,
        )  # fmt: skip

    def queue_leave(self, pipe: Any, room: str, cid: int) -> None:
        """``left`` (with the leave entry's seq) or ``absent``."""
        self._call(pipe, "leave", room, self.member_id(cid))

    def queue_say(self, pipe: Any, room: str, lines: Sequence[Tuple[int, str]]) -> None:
        """Chat *lines* ``(cid, text)`` from members of *room*, in order, in one script
        call: answer ``[seqs, message]``, a seq per line, 0 where *cid* is not a member."""
        args: List[str] = []
        for cid, text in lines:
            args += (self.member_id(cid), text)
        self._call(pipe, "say", room, *args)

    def queue_expire(self, pipe: Any, room: str) -> None:
        """Remove *room*'s members whose node stopped refreshing them (each leaves, heard
        by all). Answer: ``[removed, members, message]``."""
        self._call(pipe, "expire", room)

    def queue_refresh(self, pipe: Any, room: str, cids: Sequence[int]) -> None:
        """Keep this node's members *cids* of *room* present another ``presence_seconds``
        of Redis's clock (a member expired already is not brought back)."""
        ids = [self.member_id(cid) for cid in cids]
        pipe.evalsha(self._sha["refresh"], 1, room_keys(room)[4], self._presence_ms(), *ids)

    def queue_count(self, pipe: Any, room: str, members: int) -> None:
        """Record *room*'s member count in the rooms listing."""
        if members > 0:
            pipe.zadd(ROOMS_KEY, {room: members})
        else:
            pipe.zrem(ROOMS_KEY, room)

    # --- reads ---------------------------------------------------------------------

    @staticmethod
    def queue_names(pipe: Any, room: str) -> None:
        """Answer: the ``who`` values; :func:`names_of` makes them usernames."""
        pipe.hvals(room_keys(room)[2])

    @staticmethod
    def queue_history(pipe: Any, room: str, n: int) -> None:
        """Answer: the last *n* Stream items, newest first (:func:`entry_of` each)."""
        pipe.xrevrange(room_keys(room)[1], count=max(1, n))

    @staticmethod
    def queue_range(pipe: Any, room: str, after: int, count: int) -> None:
        """Answer: up to *count* Stream items with seq > *after*, oldest first."""
        pipe.xrange(room_keys(room)[1], min=f"{after + 1}-1", count=max(1, count))

    @staticmethod
    def queue_state(pipe: Any, room: str) -> None:
        """Answer: ``[epoch, seq]`` (``None`` each for a room Redis does not have)."""
        pipe.hmget(room_keys(room)[0], ["epoch", "seq"])

    # --- one call each (tests, tools) ----------------------------------------------

    async def run(self, queue: Callable[..., None], *args: Any) -> Any:
        pipe = self.client.pipeline(transaction=False)
        queue(pipe, *args)
        (answer,) = await pipe.execute()
        return answer

    async def join(self, room: str, cid: int, username: str, keys: Sequence[str]) -> Tuple:
        return outcome_of(await self.run(self.queue_join, room, cid, username, keys))

    async def leave(self, room: str, cid: int) -> Tuple:
        return outcome_of(await self.run(self.queue_leave, room, cid))

    async def say(self, room: str, cid: int, text: str) -> Tuple[str, int]:
        """``("said", seq)`` or ``("absent", 0)``."""
        seq = int((await self.run(self.queue_say, room, [(cid, text)]))[0][0])
        return ("said" if seq else "absent", seq)

    async def expire(self, room: str) -> int:
        return int((await self.run(self.queue_expire, room))[0])

    async def refresh(self, room: str, cids: Sequence[int]) -> None:
        await self.run(self.queue_refresh, room, cids)

    async def names(self, room: str) -> List[str]:
        return names_of(await self.run(self.queue_names, room))

    async def state(self, room: str) -> Tuple[int, int]:
        return state_of(await self.run(self.queue_state, room))

    async def history(self, room: str, n: int = HISTORY_SIZE) -> Tuple[int, List[m.Entry]]:
        """``(epoch, the last n entries, oldest first)``."""
        epoch, _ = await self.state(room)
        items = await self.run(self.queue_history, room, n)
        return epoch, [entry_of(item) for item in reversed(items)]

    async def since(
        self, room: str, epoch: int, after: int, limit: int = HISTORY_SIZE
    ) -> Tuple[int, List[m.Entry], bool]:
        """What a node that last saw seq *after* of *epoch* missed: ``(epoch, entries,
        missed)``; *missed* when part of it is gone (trimmed, or a new epoch)."""
        now, seq = await self.state(room)
        entries = [entry_of(item) for item in await self.run(self.queue_range, room, after, limit)]
        return now, entries, gap_lost(now, seq, epoch, after, entries)


def names_of(values: Sequence[Any]) -> List[str]:
    """The usernames of a room's ``who`` values."""
    return [json.loads(text_of(value))[0] for value in values]


def state_of(answer: Sequence[Any]) -> Tuple[int, int]:
    """``(epoch, seq)`` of a ``queue_state`` answer; ``(0, 0)`` for a room Redis lacks."""
    epoch, seq = answer
    return (int(epoch) if epoch is not None else 0, int(seq) if seq is not None else 0)


def gap_lost(epoch: int, seq: int, seen_epoch: int, after: int, entries: List[m.Entry]) -> bool:
    """Whether some entry after seq *after* of *seen_epoch* is gone, given the room's
    *epoch* and last *seq* now and the *entries* read from seq ``after + 1`` on."""
    if epoch != seen_epoch:
        return True
    first = entries[0][0] if entries else seq + 1
    return first > after + 1
