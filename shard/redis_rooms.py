"""Rooms kept in Redis, shared by every node on one Redis (issue 12's storage half).

Nothing here runs yet from ``start_cluster.py``: this module is the Redis side of the
design, tested against a real ``redis-server`` (``tests/unit/test_redis_rooms.py``); the
shard loop that will call it per batch is the next step (see docs/ARCHITECTURE.md).

Per room, four keys sharing one hash tag (so one script may touch them all, on a single
Redis or on Redis Cluster), the tag being a digest of the room's name (any name, braces
included, gives a valid tag):

- ``sc:{T}:meta``   a hash: ``seq`` (the last sequence number given) and ``epoch``.
- ``sc:{T}:log``    a Stream of the last ``HISTORY_SIZE`` entries; an entry's id is
  ``<seq>-1``, so ``XRANGE`` by seq is a range read by id.
- ``sc:{T}:who``    a hash: member id (``<node>:<cid>``) -> ``username`` and its name keys.
- ``sc:{T}:names``  a hash: name key -> member id (what makes a username unique per room
  across nodes: the same keys the shard uses, :func:`common.names.name_keys`).
- ``sc:{T}:alive``  a sorted set: member id -> the time (ms) its node's presence expires.
- the channel ``sc:{T}:ch`` carries every entry, as the Stream holds it, to the nodes that
  have members there.

Every change is one Lua script: it gives the next seq, appends to the Stream (trimmed to
``HISTORY_SIZE``) and publishes, so seq order, history and what subscribers see agree. A
node keeps its members alive by moving their expiry forward (:meth:`RedisRooms.refresh`);
members of a node that stopped doing so (``kill -9``, a power cut) are removed, with a
``leave`` entry everyone hears, by the next script that touches the room once their
expiry has passed (:meth:`RedisRooms.expire`, which every node runs for its rooms).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from common import messages as m
from common.limits import HISTORY_SIZE

#: Seconds a node's members stay present without the node refreshing them: a node that
#: dies has its members removed (and their rooms hear them leave) this long after its last
#: refresh. Nodes refresh every ``PRESENCE_SECONDS / 3``.
PRESENCE_SECONDS = 30.0

Clock = Callable[[], float]

_PREFIX = "sc:"

# A leave (or an expiry's leave) and a chat line are entries like any other: seq, then the
# Stream fields ts, kind, username, text. The payload published is the entry with its
# epoch and the publishing node, JSON: [epoch, seq, ts, kind, username, text, node].

_RECORD = """
local function record(meta, log, ch, ts, kind, user, text, node)
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  local epoch = redis.call('HGET', meta, 'epoch')
  redis.call('XADD', log, 'MAXLEN', ARGV[1], seq .. '-1',
             'ts', ts, 'k', kind, 'u', user, 't', text)
  redis.call('PUBLISH', ch,
             cjson.encode({tonumber(epoch), seq, ts, kind, user, text, node}))
  return seq
end

-- A room met for the first time (or whose keys Redis lost) starts a new history.
local function open(meta, log, fresh_epoch)
  if redis.call('HSETNX', meta, 'epoch', fresh_epoch) == 1 then
    redis.call('DEL', log)
    redis.call('HSET', meta, 'seq', 0)
  end
  return tonumber(redis.call('HGET', meta, 'epoch'))
end

-- Remove the members whose presence expired before now, each with a leave entry.
local function expire(meta, log, who, names, alive, ch, now, ts)
  local gone = redis.call('ZRANGEBYSCORE', alive, '-inf', '(' .. now)
  for _, id in ipairs(gone) do
    local info = redis.call('HGET', who, id)
    if info then
      local parts = cjson.decode(info)
      for i = 2, #parts do
        if redis.call('HGET', names, parts[i]) == id then redis.call('HDEL', names, parts[i]) end
      end
      redis.call('HDEL', who, id)
      record(meta, log, ch, ts, 'leave', parts[1], '', 'expired')
    end
    redis.call('ZREM', alive, id)
  end
  return #gone
end
"""

# KEYS: meta log who names alive ch.
# ARGV: maxlen now_ms ts fresh_epoch id username until_ms node key1 [key2 ...]
_JOIN = (
    _RECORD
    + """
local meta, log, who, names, alive, ch = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now, ts, id, user, node = ARGV[2], ARGV[3], ARGV[5], ARGV[6], ARGV[8]
local epoch = open(meta, log, ARGV[4])
expire(meta, log, who, names, alive, ch, now, ts)
if redis.call('HEXISTS', who, id) == 1 then return {'member', epoch} end
for i = 9, #ARGV do
  if redis.call('HEXISTS', names, ARGV[i]) == 1 then return {'taken', epoch} end
end
local info = {user}
for i = 9, #ARGV do
  redis.call('HSET', names, ARGV[i], id)
  table.insert(info, ARGV[i])
end
redis.call('HSET', who, id, cjson.encode(info))
redis.call('ZADD', alive, ARGV[7], id)
return {'joined', epoch, record(meta, log, ch, ts, 'join', user, '', node)}
"""
)

# KEYS: meta log who names alive ch.  ARGV: maxlen now_ms ts fresh_epoch id node
_LEAVE = (
    _RECORD
    + """
local meta, log, who, names, alive, ch = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local epoch = open(meta, log, ARGV[4])
local info = redis.call('HGET', who, ARGV[5])
if not info then return {'absent', epoch} end
local parts = cjson.decode(info)
for i = 2, #parts do
  if redis.call('HGET', names, parts[i]) == ARGV[5] then redis.call('HDEL', names, parts[i]) end
end
redis.call('HDEL', who, ARGV[5])
redis.call('ZREM', alive, ARGV[5])
return {'left', epoch, record(meta, log, ch, ARGV[3], 'leave', parts[1], '', ARGV[6])}
"""
)

# KEYS: meta log who names alive ch.  ARGV: maxlen now_ms ts fresh_epoch id text node
_SAY = (
    _RECORD
    + """
local meta, log, who, names, alive, ch = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local epoch = open(meta, log, ARGV[4])
local info = redis.call('HGET', who, ARGV[5])
if not info then return {'absent', epoch} end
local user = cjson.decode(info)[1]
return {'said', epoch, record(meta, log, ch, ARGV[3], 'msg', user, ARGV[6], ARGV[7])}
"""
)

# KEYS: meta log who names alive ch.  ARGV: maxlen now_ms ts
_EXPIRE = (
    _RECORD
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return expire(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[2], ARGV[3])
"""
)


def room_tag(room: str) -> str:
    """The hash tag of *room*'s keys: 16 hex digits of a digest of its name."""
    return hashlib.blake2b(room.encode("utf-8"), digest_size=8).hexdigest()


def room_keys(room: str) -> Tuple[str, str, str, str, str, str]:
    """``(meta, log, who, names, alive, channel)`` for *room*."""
    base = f"{_PREFIX}{{{room_tag(room)}}}:"
    return (base + "meta", base + "log", base + "who", base + "names", base + "alive", base + "ch")


def channel_of(room: str) -> str:
    """The channel *room*'s entries are published on."""
    return room_keys(room)[5]


def decode_published(payload: Any) -> Tuple[int, m.Entry, str]:
    """``(epoch, entry, node)`` of a message published on a room's channel."""
    epoch, seq, ts, kind, username, text, node = json.loads(payload)
    return int(epoch), (int(seq), float(ts), kind, username, text), node


def _entry_of(item: Tuple[Any, Any]) -> m.Entry:
    """One Stream item (id, fields) as an entry."""
    raw_id, fields = item
    entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
    get = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    return (int(entry_id.split("-", 1)[0]), float(get["ts"]), get["k"], get["u"], get["t"])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisRooms:
    """The rooms of every node, in one Redis: the calls a shard makes for its rooms.

    *client* is a ``redis.asyncio.Redis``; *node* names this node (member ids are
    ``<node>:<cid>``). *clock* gives seconds since the epoch (entry times, presence
    expiry; inject a fake one in tests). *fresh_epoch* gives the epoch a room gets when
    its history starts (again).
    """

    def __init__(
        self,
        client: Any,
        node: str,
        clock: Clock = time.time,
        presence_seconds: float = PRESENCE_SECONDS,
        history_size: int = HISTORY_SIZE,
    ) -> None:
        self._client = client
        self.node = node
        self._clock = clock
        self.presence_seconds = presence_seconds
        self._maxlen = str(history_size)
        self._join = client.register_script(_JOIN)
        self._leave = client.register_script(_LEAVE)
        self._say = client.register_script(_SAY)
        self._expire = client.register_script(_EXPIRE)

    def member_id(self, cid: int) -> str:
        return f"{self.node}:{cid}"

    def _common(self) -> List[str]:
        now = self._clock()
        return [self._maxlen, str(int(now * 1000)), repr(round(now, 6)), str(int(now * 1000))]

    async def join(
        self, room: str, cid: int, username: str, keys: Sequence[str]
    ) -> Tuple[str, int, Optional[int]]:
        """Make *cid* a member as *username* holding name *keys* (none taken anywhere).

        Returns ``(outcome, epoch, seq)``: ``joined`` with the join entry's seq, or
        ``taken`` (a key is held by a member on any node) or ``member`` (already in) with
        seq ``None``."""
        until = int((self._clock() + self.presence_seconds) * 1000)
        result = await self._join(
            keys=room_keys(room),
            args=[*self._common(), self.member_id(cid), username, str(until), self.node, *keys],
        )
        return _outcome(result)

    async def leave(self, room: str, cid: int) -> Tuple[str, int, Optional[int]]:
        """Remove *cid* from *room*: ``('left', epoch, seq)`` or ``('absent', epoch, None)``."""
        result = await self._leave(
            keys=room_keys(room), args=[*self._common(), self.member_id(cid), self.node]
        )
        return _outcome(result)

    async def say(self, room: str, cid: int, text: str) -> Tuple[str, int, Optional[int]]:
        """A chat line from member *cid*: ``('said', epoch, seq)`` or ``('absent', …)``."""
        result = await self._say(
            keys=room_keys(room), args=[*self._common(), self.member_id(cid), text, self.node]
        )
        return _outcome(result)

    async def refresh(self, members: Sequence[Tuple[str, int]]) -> None:
        """Keep ``(room, cid)`` *members* of this node present for another
        ``presence_seconds`` (one pipelined ``ZADD XX`` each)."""
        until = int((self._clock() + self.presence_seconds) * 1000)
        pipe = self._client.pipeline(transaction=False)
        for room, cid in members:
            pipe.zadd(room_keys(room)[4], {self.member_id(cid): until}, xx=True)
        await pipe.execute()

    async def expire(self, room: str) -> int:
        """Remove *room*'s members whose node stopped refreshing them (each leaves, heard
        by all); the number removed."""
        return int(await self._expire(keys=room_keys(room), args=self._common()))

    async def names(self, room: str) -> List[str]:
        """The usernames in *room*, on every node, sorted."""
        infos = await self._client.hvals(room_keys(room)[2])
        return sorted(json.loads(_text(info))[0] for info in infos)

    async def state(self, room: str) -> Tuple[int, int]:
        """``(epoch, seq)`` of *room*: ``(0, 0)`` if it has no history in Redis."""
        epoch, seq = await self._client.hmget(room_keys(room)[0], ["epoch", "seq"])
        return (int(epoch) if epoch is not None else 0, int(seq) if seq is not None else 0)

    async def history(self, room: str, n: int = HISTORY_SIZE) -> Tuple[int, List[m.Entry]]:
        """``(epoch, the last n entries, oldest first)``."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hget(room_keys(room)[0], "epoch")
        pipe.xrevrange(room_keys(room)[1], count=max(0, n))
        epoch, items = await pipe.execute()
        return (
            int(epoch) if epoch is not None else 0,
            [_entry_of(item) for item in reversed(items)],
        )

    async def since(
        self, room: str, epoch: int, after: int, limit: int = HISTORY_SIZE
    ) -> Tuple[int, List[m.Entry], bool]:
        """What a node that last saw seq *after* of *epoch* missed: ``(epoch, entries,
        missed)``, *missed* true when part of it is gone (trimmed, or a new epoch)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hmget(room_keys(room)[0], ["epoch", "seq"])
        pipe.xrange(room_keys(room)[1], min=f"{after + 1}-1", count=max(1, limit))
        (now_epoch, seq), items = await pipe.execute()
        now = int(now_epoch) if now_epoch is not None else 0
        entries = [_entry_of(item) for item in items]
        if now != epoch:
            return now, [], True
        first = entries[0][0] if entries else int(seq or 0) + 1
        return now, entries, first > after + 1


def _outcome(result: Sequence[Any]) -> Tuple[str, int, Optional[int]]:
    outcome = _text(result[0])
    seq = int(result[2]) if len(result) > 2 else None
    return outcome, int(result[1]), seq
