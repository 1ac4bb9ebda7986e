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

#: Combining marks in a row on one letter of a name (after NFKC). Two cover the names of
#: the living scripts we tried (Devanagari, Thai, Arabic and Hebrew vowel points, Latin
#: diacritics NFKC cannot precompose); more is mark stacking ("Zalgo") that draws over
#: the neighbouring text.
MAX_COMBINING_MARKS = 2

#: Non-ASCII names whose check is remembered (most recently used first). The router checks
#: the room of every ``MSG``; a long Korean or Japanese name costs ~0.2 ms to check, a
#: remembered one ~1 us. Names longer than 4x the longest valid name are never kept, so
#: the cache holds at most ~1 MiB.
NAME_CACHE_SIZE = 1024

#: How many rooms one connection or browser session may be in at once. Bounds the work a
#: single client can make the router do on disconnect.
MAX_ROOMS_PER_CLIENT = 100

#: Longest ``PING`` token echoed back by ``PONG``, in characters.
MAX_PING_TOKEN_CHARS = 64

# --- per client: output buffers, flood control, timeouts, caps (all configurable) --------

#: Bytes queued for one client that it has not read. Over the hard limit the client is cut
#: off at once (``ERROR slow consumer``); over the soft limit for OUTPUT_SOFT_SECONDS in a
#: row, too. Everyone else in the room keeps full speed. Follows Redis'
#: ``client-output-buffer-limit pubsub 32mb 8mb 60``, scaled to chat-sized messages.
OUTPUT_HARD_LIMIT = 1024 * 1024
OUTPUT_SOFT_LIMIT = 256 * 1024
OUTPUT_SOFT_SECONDS = 30.0

#: Unsent bytes above which a connection (TCP or HTTP) is read no further: its next command
#: or request waits until the client has taken its output down to a quarter of this. A
#: client that sends but never reads would otherwise make the router buffer every answer
#: (asyncio's own default high-water mark; configurable).
OUTPUT_PAUSE_BYTES = 64 * 1024

#: Unsent output the router holds for all clients together, and for the clients of one
#: address together. Past either, the biggest holders (of that address first) are cut off
#: as slow consumers until it is back under, so no set of clients can make the router's
#: buffers grow without bound (configurable).
OUTPUT_BUDGET_TOTAL = 256 * 1024 * 1024
OUTPUT_BUDGET_PER_ADDRESS = 64 * 1024 * 1024

#: Bytes a client socket is read into at once: one buffer shared by every connection of a
#: router (router/reading.py), so a read never allocates a fresh 256 KiB (asyncio's default)
#: that glibc maps and unmaps per read.
READ_CHUNK_BYTES = 64 * 1024

#: Bytes of TCP input parsed at once. A read can bring 64 KiB of two-byte lines; parsed in
#: one go that is 32,000 command objects waiting at once. In slices, the next is parsed
#: only when the commands of the last one are done.
PARSE_SLICE_BYTES = 16 * 1024

#: Seconds a cut-off slow consumer gets to take its last bytes before the socket is aborted.
SLOW_CONSUMER_CLOSE_GRACE = 1.0

#: Flood control, a token bucket per connection / browser session: RATE_BURST commands at
#: once, then RATE_LIMIT per second (sized for humans; a paste of 20 lines goes through).
#: ``--rate-limit 0`` turns it off (benchmarks). Over it, a TCP connection is read no
#: further until a token is free; HTTP answers ``429`` with ``Retry-After``.
RATE_LIMIT = 10.0
RATE_BURST = 20

#: A TCP connection whose waiting commands would take more than this many seconds to work
#: off at RATE_LIMIT is cut off with ``ERROR excess flood`` (IRC servers' "excess flood").
FLOOD_PENALTY_SECONDS = 10.0

#: Commands a TCP connection reads ahead while it waits on a shard's answer (its first
#: JOIN's outcome, or a HISTORY/NAMES/ROOMS reply, one of which is outstanding at a time).
#: Reading goes on so that a PING is still answered; past this many it pauses.
MAX_QUEUED_COMMANDS = 256

#: TCP keepalive: after IDLE_PING_SECONDS of silence the server sends ``PING <token>``;
#: with no line at all PING_TIMEOUT_SECONDS later the connection is closed
#: (``ERROR ping timeout``). IRC servers use similar values.
IDLE_PING_SECONDS = 120.0
PING_TIMEOUT_SECONDS = 30.0

#: A TCP connection that has not joined a room this many seconds after connecting is closed
#: (``ERROR no JOIN in time``). Generous: nc users type slowly.
JOIN_TIMEOUT_SECONDS = 600.0

#: Open client connections (TCP and HTTP together), in total and per IP address. Over
#: either: ``ERROR server full`` / HTTP 503, then close. Connections are also refused while
#: they would eat into FD_RESERVE (see the descriptor budget below).
MAX_CONNECTIONS = 10_000
MAX_CONNECTIONS_PER_IP = 64

# --- descriptors (router/policy.py FdBudget) ---------------------------------------------

#: The backlog the router passes to create_server under an open-file limit. asyncio
#: accepts up to this many connections per loop wake-up before any of them can be refused:
#: kept small so that the descriptors of accepted-but-not-yet-closed refusals stay inside
#: FD_RESERVE. (asyncio also passes it to listen(); the router lengthens that queue to
#: LISTEN_QUEUE once the listener is serving.)
LISTEN_BACKLOG = 16

#: The kernel's queue of connections waiting for accept() on each listener (listen()).
#: Long, so that a burst of connects waits there: Linux drops the handshake of a connection
#: that finds the queue full, and with SYN cookies the client then believes it is connected
#: to a server that never heard of it (measured: 2000 connects at once, 256 in flight, with
#: a queue of 16: 7% of the clients never got the welcome line; with 1024 none).
LISTEN_QUEUE = 1024

#: Descriptors one running shard holds in the router: its two pipe ends, the process
#: sentinel and multiprocessing's end of the start pipe. Measured (counting /proc/self/fd
#: before and after ShardLink.start, Python 3.9-3.13, spawn and fork, both --pipe-io): 4.
SHARD_FDS = 4

#: Free descriptors one shard start needs while it runs (the least free descriptors with
#: which ShardLink.start succeeds, found by lowering RLIMIT_NOFILE step by step; Python
#: 3.9-3.13): fork 8 (two pipes of ours, two of multiprocessing's), spawn 10 (and the
#: fork_exec error pipe), 11 for the first spawn, which also starts the resource tracker.
SHARD_START_FDS = 11

#: Descriptors kept free for what the budget does not see coming: a log file rotated, the
#: descriptor-table listing itself, a recount taken while sockets are being accepted.
FD_SPARE = 21

#: Descriptors the router never hands to client connections: a refused socket lives three
#: loop turns after accept (task, connection_made, connection_lost) while each turn may
#: accept LISTEN_BACKLOG more on each of the 2 listeners (3 x 2 x 16 = 96), plus one shard
#: start (restarts run one at a time), plus FD_SPARE: 128. (On a TLS port an admitted
#: socket also holds its ``dup`` for one turn, up to 2 x 16 more in a burst, which the spare
#: covers only in part: a ``dup`` that fails drops that one connection, logged.)
FD_RESERVE = 3 * 2 * LISTEN_BACKLOG + SHARD_START_FDS + FD_SPARE

#: Seconds between recounts of the router's real descriptor table while far from the limit
#: (near it: every second). A recount lists /proc/self/fd on the loop: ~12 ms at 10,000.
FD_RECOUNT_INTERVAL = 30.0

#: Per-address limits. An *address* is an IPv4 address, or an IPv6 /64 prefix (one
#: customer's network: an attacker gets a /64 for free). Live browser sessions created from
#: one address; past it ``/api/join`` answers ``429 too_many_sessions_for_address``. 256
#: covers an office behind one NAT; one address can then hold at most 1/390 of
#: MAX_HTTP_SESSIONS, so it cannot lock others out (configurable).
MAX_SESSIONS_PER_ADDRESS = 256
#: Rooms the clients of one address are in (or joining) together, counted per client:
#: what one address can make the shards keep (each room up to HISTORY_SIZE entries) and
#: the router fan out. Past it: ``ERROR too many rooms for one address`` /
#: HTTP ``429 too_many_rooms_for_address`` (configurable).
MAX_ROOMS_PER_ADDRESS = 1000
#: Token bucket on creating browser sessions, per address: a burst of SESSION_BURST, then
#: SESSION_RATE per second (a page load makes one; configurable, 0 = off).
SESSION_RATE = 2.0
SESSION_BURST = 50
#: Token bucket on joins per address, TCP and HTTP together (each client also has its own
#: RATE_LIMIT bucket): JOIN_BURST at once, then JOIN_RATE per second. TCP waits for a
#: token (as with flood control), HTTP answers ``429`` with ``Retry-After``
#: (configurable, 0 = off).
JOIN_RATE = 20.0
JOIN_BURST = 200
#: Bits of an IPv6 address that name one "address" for the per-address limits.
IPV6_PREFIX_BITS = 64

#: How often (seconds) the router checks the idle, ping, join and soft-buffer timers.
TIMER_SWEEP_INTERVAL = 1.0

# --- shard -------------------------------------------------------------------------------

#: Messages kept per room: the last 500 room events (chat, joins, leaves).
HISTORY_SIZE = 500

#: Default and largest ``n`` of ``HISTORY <room> [n]``.
MAX_HISTORY_REPLY = HISTORY_SIZE

#: The most that one reply a TCP client asked for (HISTORY, NAMES, ROOMS) may add on top
#: of the output limits: one full HISTORY of the longest lines. Granted for one reply at a
#: time: the next such command waits until this one is answered and the client has read
#: it down to the pause mark, so allowances never add up.
MAX_REPLY_ALLOWANCE = HISTORY_SIZE * (MAX_LINE_BYTES + 200)

#: Rooms with no members that a shard keeps (with their history) for people coming back;
#: past this the longest-empty room is forgotten, so creating rooms cannot exhaust memory.
MAX_EMPTY_ROOMS_PER_SHARD = 1000

#: Rooms one ``ROOMS`` answer lists at most: the ones with the most members (then by
#: name), so the answer stays bounded however many rooms exist.
MAX_ROOMS_LISTED = 1000

#: Commands a shard applies in one go at most when several batches are waiting (it answers
#: each group with one pipe message). Bounds the size of one answer.
MAX_SHARD_BATCH = 4096

#: With ``--redis``: bytes of chat text (UTF-8) a batch's lines for one room carry in one
#: script call (one ``PUBLISH`` of them all); the line that would pass it starts another.
#: Keeps each published message far below Redis's pub/sub output buffer limits.
REDIS_SAY_MAX_BYTES = 64 * 1024

# --- durable history (shard/storage.py) -------------------------------------------------

#: Fixed virtual slots of the history store: a room hashes to one slot (BLAKE2b of its
#: name), each slot is one SQLite file, and a shard owns a contiguous range of whole slots,
#: so any ``--shards`` count from 1 to MAX_SHARDS finds every room's file. 256 = 4 x
#: MAX_SHARDS: at the usual 2-16 shards the slot ranges differ by at most 1 slot in 16
#: (6%); each open slot file costs its shard 2 descriptors (the file and its WAL), at most
#: 512 with ``--shards 1``. Never change it once history exists: rooms would move to other
#: files (every file records it, and the start check refuses a mismatch).
STORAGE_SLOTS = 256

#: Stored entries past a room's last HISTORY_SIZE are deleted once this many have piled up
#: (in the commit that crosses the mark): a room holds at most HISTORY_SIZE + RETENTION_STEP
#: entries on disk, and a commit does not also rewrite the room's oldest page every time.
RETENTION_STEP = 64

#: Rooms a shard's store remembers the id, epoch and newest seq of, so a commit does not
#: read them back (it is the files' only writer); past it, it starts over (reads again).
STORAGE_ROOM_CACHE = 10_000

#: Seconds a slot file whose commit failed (disk full, I/O error) is left before its
#: entries are tried again: a retry writes everything that waits, and must not be paid by
#: every batch the shard applies meanwhile. The shard retries while idle too.
STORAGE_RETRY_SECONDS = 1.0

#: WAL pages after which a slot file's commit also checkpoints the WAL into the database
#: (and fsyncs both): bounds each slot's WAL file to about 1 MiB (256 x 4 KiB pages), so
#: all 256 WAL files together stay under 256 MiB; SQLite's own default is 1000.
STORAGE_CHECKPOINT_PAGES = 256

#: Seconds a shard opening a slot file waits for another process's lock on it: a killed
#: shard's lock is released by the kernel as it exits, just before its restart. After it,
#: the file is "in use by another process" (e.g. a second cluster on the same data dir).
STORAGE_BUSY_TIMEOUT = 2.0

#: Bits of an entry's key in a slot file that hold its seq; the room's number in the file
#: takes the other 23 (key = room << 40 | seq: one b-tree, entries in room and seq order,
#: 2 pages written per one-message commit where a separate (room, seq) index took 5). So a
#: room's seq stays below 2**40 (a thousand messages a second for 34 years) and a slot file
#: holds at most 2**23 rooms (8 million; 2 billion over all slots). Part of the file format.
STORAGE_SEQ_BITS = 40

#: Free bytes the data directory's device must have at start: with less, the first few
#: thousand messages would already fail to be stored (refused with a clear line instead).
STORAGE_MIN_FREE_BYTES = 1024 * 1024

#: Entries a shard keeps in memory for a retry after their commit failed (disk full, I/O
#: error), over all rooms. Past it the rooms whose entries waited longest are given up
#: (the shard is told, and their stored history restarts after the gap), so a long outage
#: cannot grow the shard's memory beyond its own rooms' history.
MAX_UNSTORED_ENTRIES = 100_000

#: Seconds between moves of a durable shard's journal into its slot files (shard/journal.py),
#: while entries wait: what a restart reads back, and what a power cut can lose, is at
#: most this much traffic. A move writes only each room's last HISTORY_SIZE entries, so
#: under heavy traffic in few rooms the longer the interval, the less is written twice.
JOURNAL_MOVE_SECONDS = 2.0

#: Entries journaled since the last move after which the next batch moves them at once:
#: bounds the memory they wait in (~15 MB at 64-character texts) and a move's pause when
#: they are spread over many rooms (about 1.2 us an entry written: ~60 ms; in few rooms a
#: move writes only their last HISTORY_SIZE entries each).
JOURNAL_MOVE_ENTRIES = 50_000

#: Bytes of records journaled since the last move after which the next batch moves them:
#: bounds the journal file (and a restart's reading) under long texts, where the entry
#: count would allow 20,000 x 8 KiB.
JOURNAL_MAX_BYTES = 8 * 1024 * 1024

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

#: Seconds past a command's deadline before the router answers it ``shard_timeout`` by
#: itself. The shard refuses every command past its deadline, so a command the router
#: gave up on is not applied later; the grace covers the time between a shard applying a
#: batch and its answer arriving (a busy or paused shard).
DEADLINE_GRACE = 1.0

#: Seconds the router waits for shards to answer a connection's final ``drop`` before it
#: closes the connection anyway (a stopped shard must not keep a socket open forever).
DROP_TIMEOUT = 2.0

#: Bytes of command batches queued for one shard but not yet written to its pipe. Past it
#: (the shard is stopped or far behind) its commands are refused with ``room_unavailable``
#: instead of piling up in the router's memory.
MAX_SHARD_BACKLOG_BYTES = 8 * 1024 * 1024

#: In a router tier, a shard's events waiting for one router: past MAX_SHARD_BACKLOG_BYTES
#: that router counts as stalled (and the supervisor restarts it) once it has taken none of
#: them for ROUTER_STALL_SECONDS (stopped, stuck), and at once past MAX_ROUTER_BACKLOG_BYTES
#: (it takes them, but more slowly than they come): a router that is only slow for a while
#: catches up, and what waits for one stays bounded either way.
ROUTER_STALL_SECONDS = 2.0
MAX_ROUTER_BACKLOG_BYTES = 4 * MAX_SHARD_BACKLOG_BYTES

#: Routers plus shards of a router tier on Windows, at most: its supervisor waits on each
#: child's process and control pipe in one ``WaitForMultipleObjects``, which takes at most
#: 63 handles (so 2 x 31, and one to spare).
MAX_TIER_CHILDREN_WINDOWS = 31

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

# --- HTTP (router/http*.py) --------------------------------------------------------------

#: Longest request line (method, target, version), in bytes. Same order as nginx's
#: ``large_client_header_buffers`` (8k); a longer one is answered ``414``.
MAX_HTTP_REQUEST_LINE_BYTES = 8 * 1024

#: Most header fields in one request (Apache's ``LimitRequestFields`` is 100). More: ``431``.
MAX_HTTP_HEADERS = 100

#: Largest header section (all field lines together), in bytes. Bounds what the parser holds
#: for an unfinished request; more is answered ``431``.
MAX_HTTP_HEADER_BYTES = 16 * 1024

#: Largest request body, in bytes. A JSON command is a room, a name and at most
#: ``MAX_TEXT_CHARS`` characters of text; ``413`` is decided on ``Content-Length`` alone,
#: before any of the body is read.
MAX_HTTP_BODY_BYTES = 16 * 1024

#: Bytes of later (pipelined) requests an HTTP connection buffers while one is being
#: answered or its answers are unread, before reading pauses: one complete request of the
#: largest size.
MAX_PIPELINED_BYTES = MAX_HTTP_REQUEST_LINE_BYTES + MAX_HTTP_HEADER_BYTES + MAX_HTTP_BODY_BYTES

#: Seconds from connect (or from the first byte of a later request) until the whole request
#: must have arrived: an absolute deadline, so a client sending one byte at a time
#: (slowloris) cannot hold a connection open. Answered ``408`` and closed.
HTTP_REQUEST_TIMEOUT = 10.0

#: Seconds an idle keep-alive connection stays open between requests.
HTTP_KEEPALIVE_IDLE = 15.0

#: Seconds the router keeps reading (and discarding) after it half-closed a connection it
#: answered with ``Connection: close``: closing with unread input would send a TCP reset,
#: which can destroy the answer (a 413 for a body still on its way) before the client reads
#: it (Apache's and nginx's "lingering close").
HTTP_LINGER = 2.0

#: Default seconds a long poll waits for news before it returns an empty list; under the
#: 30 s idle timeout of common proxies (configurable: ``--poll-timeout``).
POLL_TIMEOUT = 25.0

#: Seconds a woken long poll waits before it answers, so that the news arriving meanwhile
#: goes in the same answer. Measured with the load generator (10 rooms x 20 pollers): at 0
#: a poll carried ~2 messages and the router was saturated by requests; 20 ms doubled the
#: messages delivered per second and kept p99 under 100 ms (docs/PERFORMANCE.md).
POLL_LINGER = 0.02

#: Default seconds a browser session lives without a request; then it leaves its rooms and
#: the members hear it left (configurable: ``--session-ttl``).
SESSION_TTL = 60.0

#: Room events a session keeps per room for its next poll. Past it the oldest go; the next
#: poll then reads them from the shard's history (the shard keeps the same number).
MAX_SESSION_BACKLOG = HISTORY_SIZE

#: Notices (history not saved, saved again) a browser session holds per room until its
#: next poll answer; older ones go first.
MAX_ROOM_NOTICES = 8

#: Direct messages a browser session keeps for its polls (the newest), and their text's
#: characters together: past either the oldest go, and a poll whose ``private=`` cursor is
#: older gets ``private_missed``. Each is the session's own copy, unlike room events (one
#: shared by every member), so they are bounded by size too: 256 sessions of one address
#: hold at most 256 x 16 Ki characters of them.
MAX_PRIVATE_KEPT = 32
MAX_PRIVATE_KEPT_CHARS = 16 * 1024

#: Seconds a client has to finish its TLS handshake (``--tls-handshake-timeout``); past it
#: the connection is closed. asyncio's default is 60 s, a long time to hold a descriptor
#: for a client that may be speaking plaintext to a TLS port.
TLS_HANDSHAKE_TIMEOUT = 10.0

#: Largest poll answer, in bytes of message JSON (about; at least one message always goes).
#: The rest waits for the next poll: the answer says ``"more": true``. Without it one poll
#: of 100 rooms with ``after=0`` could ask for 100 x 500 messages at once (configurable).
MAX_POLL_ANSWER_BYTES = 256 * 1024

#: Long polls one session may have waiting at once (several tabs); one more answers the
#: oldest at once with what it has.
MAX_POLLS_PER_SESSION = 4

#: Browser sessions the router keeps at most; past it ``/api/join`` answers ``503``, so
#: creating sessions cannot exhaust the router's memory.
MAX_HTTP_SESSIONS = 100_000


# --- a router tier (--routers N) -------------------------------------------------------------

#: Bytes of one forwarded request or answer between two routers of a tier (a request's
#: body is at most MAX_HTTP_BODY_BYTES, a poll answer about MAX_POLL_ANSWER_BYTES): a
#: frame past it is refused, so a bad frame cannot make a router hold more.
MAX_FORWARDED_BYTES = 8 * 1024 * 1024
#: Routers at most (``--routers``): each is a process with a pipe pair to every shard.
MAX_ROUTERS = 64


# --- many nodes on one Redis (--redis; shard/redis_node.py) ----------------------------------

#: Seconds a node's members stay present in Redis without the node refreshing them
#: (``--redis-presence``): a node that dies (``kill -9``, a power cut, cut off) has its
#: members removed, and their rooms hear them leave, at most this long after its last
#: refresh. Nodes refresh every third of it.
PRESENCE_SECONDS = 30.0

#: Seconds a local command's completion waits for its entry to come back on the room's
#: channel before the shard reads it from the room's Stream instead (a lost pub/sub message).
REDIS_GAP_SECONDS = 0.5

#: Seconds one Redis command (or a subscription's confirmation) may take before Redis
#: counts as lost: the rooms' members are told, commands refused until it is back.
REDIS_TIMEOUT_SECONDS = 5.0

#: The longest wait between two attempts to reach a lost Redis (0.1 s, doubling, up to it).
REDIS_BACKOFF_MAX_SECONDS = 5.0
