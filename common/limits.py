"""Every limit in shardchat, in one place, each with the reason it exists.

The values here are defaults; the ones marked *configurable* can be changed with a flag on
``start_cluster.py``. ``docs/LIMITS.md`` lists each limit and what happens when a client
crosses it.
"""

from __future__ import annotations

# --- line protocol -----------------------------------------------------------------------

#: Longest accepted line, in bytes, not counting the line ending. A security feature: the
#: parser never holds more than this for an unfinished line (asyncio's StreamReader uses a
#: 64 KiB limit for the same reason; IRC uses 512 bytes). Crossing it closes the connection.
MAX_LINE_BYTES = 4096

#: Longest chat message text, in characters. Keeps one message well inside one line and
#: bounds history memory (500 x 2000 characters per room at most).
MAX_TEXT_CHARS = 2000

#: Username length, in characters (letters, digits, ``_ - .``).
MAX_USERNAME_CHARS = 32

#: Room name length, in characters (letters, digits, ``_ - .``).
MAX_ROOM_CHARS = 64

#: How many rooms one connection or browser session may be in at once. Bounds the work a
#: single client can make the router do on disconnect.
MAX_ROOMS_PER_CLIENT = 100

#: Longest ``PING`` token echoed back by ``PONG``, in characters.
MAX_PING_TOKEN_CHARS = 64

# --- shard -------------------------------------------------------------------------------

#: Messages kept per room: the last 500 room events (chat, joins, leaves).
HISTORY_SIZE = 500

#: Default and largest ``n`` of ``HISTORY <room> [n]``.
MAX_HISTORY_REPLY = HISTORY_SIZE

#: Rooms with no members that a shard keeps (with their history) for people coming back;
#: past this the longest-empty room is forgotten, so creating rooms cannot exhaust memory.
MAX_EMPTY_ROOMS_PER_SHARD = 1000

#: Commands a shard applies in one go at most when several batches are waiting (it answers
#: each group with one pipe message). Bounds the size of one answer.
MAX_SHARD_BATCH = 4096

# --- cluster -----------------------------------------------------------------------------

#: Default number of shard processes is the CPU count, but at least this many, so that the
#: cross-shard path is always exercised (configurable: ``--shards``).
MIN_DEFAULT_SHARDS = 2

#: Largest accepted ``--shards``. More processes than this only adds pipe overhead.
MAX_SHARDS = 64

#: Seconds the router waits for a shard to answer a request (NAMES, HISTORY, a browser's
#: join...) before it answers the client with an error: a stopped shard must not leave
#: clients waiting forever.
REQUEST_TIMEOUT = 5.0

#: Seconds the router waits for shards to answer a connection's final ``drop`` before it
#: closes the connection anyway (a stopped shard must not keep a socket open forever).
DROP_TIMEOUT = 2.0

#: Bytes of command batches queued for one shard but not yet written to its pipe. Past it
#: (the shard is stopped or far behind) its commands are refused with ``room_unavailable``
#: instead of piling up in the router's memory.
MAX_SHARD_BACKLOG_BYTES = 8 * 1024 * 1024

#: Shard supervision: a dead shard is restarted after a delay that starts at
#: RESTART_BACKOFF_MIN and doubles up to RESTART_BACKOFF_MAX seconds; after more than
#: MAX_RESTARTS restarts within RESTART_WINDOW seconds the router gives up on it (a shard
#: that crashes at start must not be restarted forever) and its rooms answer
#: ``ERROR room unavailable``. The values follow systemd's ``StartLimitBurst=5`` /
#: ``StartLimitIntervalSec`` idea and Erlang supervisors' intensity/period.
RESTART_BACKOFF_MIN = 0.1
RESTART_BACKOFF_MAX = 5.0
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0

#: Seconds a shard gets to exit on its own after its pipe is closed before it is killed.
SHARD_STOP_TIMEOUT = 2.0

#: Seconds from SIGINT/SIGTERM to a finished shutdown (the issue asks for at most 5 s).
SHUTDOWN_TIMEOUT = 4.0
