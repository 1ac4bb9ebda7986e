#!/usr/bin/env python3
"""Thread-per-connection chat server: the classic design shardchat replaces.

This is a *reference to measure against*, not part of shardchat. It is deliberately the
straightforward design, written the way a sensible developer would write it:

* TCP: one thread per connection (``socketserver.ThreadingTCPServer``), ``TCP_NODELAY``,
  a global room table behind a lock, and each sender writing the line to every member in
  turn with a blocking ``sendall`` while holding the room's lock (so that every member
  sees one order per room, the same order the HTTP side numbers messages in).
* HTTP: ``ThreadingHTTPServer`` long-poll, one thread per connection, a per-room list of
  messages and a condition variable that pollers wait on for up to 25 s.

TCP and HTTP users share rooms. The line protocol covers JOIN, MSG, LEAVE, QUIT and PING
with the reply lines of docs/PROTOCOL.md; NAMES, ROOMS and HISTORY are not implemented
(answered with ``ERROR unknown command``). Rooms are never deleted and HTTP sessions
never leave (there is no /api/leave); each room keeps its last ``LOG_KEEP`` events.

Usage::

    python scripts/baseline_threaded_server.py --tcp-port 0 --http-port 0

prints ``listening tcp HOST:PORT`` and ``listening http HOST:PORT`` on stdout, one line
per listener, with the real ports.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("baseline")

MAX_LINE_BYTES = 4096  # same as shardchat: bounds what we buffer for one unfinished line
MAX_TEXT_CHARS = 2000  # same as shardchat: longest MSG text
MAX_BODY_BYTES = 16384  # an HTTP JSON body is a room, a name and a text; refuse more
POLL_TIMEOUT_S = 25.0  # long-poll wait; under the usual 30 s proxy idle timeout
LOG_KEEP = 1000  # events kept per room for pollers; older ones are dropped
LISTEN_BACKLOG = 1024  # accept queue; load tests open thousands of connections at once
COOKIE_NAME = "sc_session"

NAME_RE = re.compile(r"[\w.\-]+")
CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
ROOM_ERROR = "ERROR invalid room name: 1-64 letters, digits, _ - ."
USER_ERROR = "ERROR invalid username: 1-32 letters, digits, _ - ."
UNKNOWN_HINT = "commands: JOIN MSG LEAVE QUIT PING"
WELCOME = "INFO welcome to shardchat; " + UNKNOWN_HINT


def valid_name(name: str, limit: int) -> bool:
    """Return True if ``name`` is 1..limit letters, digits, ``_``, ``-`` or ``.``."""
    return 0 < len(name) <= limit and NAME_RE.fullmatch(name) is not None


class Client:
    """One TCP connection: its socket, its username and the rooms it is in.

    ``write_lock`` serialises writers: the connection's own thread and the threads of
    every sender in every room it is in all write to the same socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.write_lock = threading.Lock()
        self.username: str | None = None
        self.rooms: set[str] = set()

    def send(self, line: str) -> None:
        """Send one line (blocking)."""
        self.send_bytes((line + "\n").encode("utf-8"))

    def send_bytes(self, data: bytes) -> None:
        """Send encoded bytes (blocking). A dead peer is left to its own thread to clean up."""
        with self.write_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                logger.debug("send failed: %s", exc)


class Room:
    """A room: its TCP members, its HTTP members and its numbered event log.

    ``cond`` (and its lock) guards everything here; broadcasts happen while holding it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.cond = threading.Condition()
        self.members: dict[str, Client] = {}  # lower-cased username -> client
        self.web_members: dict[str, str] = {}  # lower-cased username -> session token
        self.log: list[dict[str, Any]] = []
        self.last_id = 0

    def taken(self, username: str) -> bool:
        """Return True if ``username`` (ignoring case) is in the room (caller holds cond)."""
        key = username.lower()
        return key in self.members or key in self.web_members

    def publish(self, kind: str, username: str, text: str, line: str) -> None:
        """Log an event, wake pollers and write ``line`` to every TCP member (holds cond)."""
        self.last_id += 1
        self.log.append(
            {
                "id": self.last_id,
                "room": self.name,
                "username": username,
                "text": text,
                "type": kind,
                "ts": time.time(),
            }
        )
        if len(self.log) > 2 * LOG_KEEP:
            del self.log[:-LOG_KEEP]
        self.cond.notify_all()
        data = (line + "\n").encode("utf-8")  # once, not once per member
        for member in list(self.members.values()):
            member.send_bytes(data)

    def events_after(self, after: int) -> list[dict[str, Any]]:
        """Return the logged events with id > ``after`` (caller holds cond)."""
        if not self.log:
            return []
        start = max(0, after - self.log[0]["id"] + 1)
        return self.log[start:]


class Chat:
    """The global room table behind a lock, shared by every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rooms: dict[str, Room] = {}
        self.sessions: dict[str, str] = {}  # HTTP session token -> username

    def room(self, name: str) -> Room:
        """Return the room called ``name``, creating it."""
        with self.lock:
            room = self.rooms.get(name)
            if room is None:
                room = self.rooms[name] = Room(name)
            return room

    def existing_room(self, name: str) -> Room | None:
        """Return the room called ``name`` if it exists."""
        with self.lock:
            return self.rooms.get(name)

    # --- TCP commands -------------------------------------------------------------

    def join(self, client: Client, args: list[str]) -> None:
        """Handle ``JOIN <room> <username>``."""
        if len(args) != 2:
            client.send("ERROR usage: JOIN <room> <username>")
            return
        name, username = args
        if not valid_name(name, 64):
            client.send(ROOM_ERROR)
        elif not valid_name(username, 32):
            client.send(USER_ERROR)
        elif client.username is not None and client.username != username:
            client.send(f"ERROR username is {client.username} on this connection")
        elif name in client.rooms:
            client.send(f"ERROR already in room {name}")
        else:
            self._join_room(client, self.room(name), username)

    def _join_room(self, client: Client, room: Room, username: str) -> None:
        with room.cond:
            if room.taken(username):
                client.send(f"ERROR name taken in {room.name}")
                return
            client.username = username
            client.rooms.add(room.name)
            client.send(f"INFO joined room {room.name}")
            room.publish("join", username, "", f"INFO {username} joined {room.name}")
            room.members[username.lower()] = client

    def msg(self, client: Client, rest: str) -> None:
        """Handle ``MSG <room> <text...>``."""
        parts = rest.split(" ", 1)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            client.send("ERROR usage: MSG <room> <text>")
            return
        name, text = parts
        if len(text) > MAX_TEXT_CHARS:
            client.send("ERROR message too long")
            return
        room = self.existing_room(name) if name in client.rooms else None
        if room is None or client.username is None:
            client.send(f"ERROR not in room {name}")
            return
        with room.cond:
            room.publish("msg", client.username, text, f"MSG {name} {client.username} {text}")

    def leave(self, client: Client, args: list[str]) -> None:
        """Handle ``LEAVE <room>``."""
        if len(args) != 1:
            client.send("ERROR usage: LEAVE <room>")
            return
        name = args[0]
        if name not in client.rooms:
            client.send(f"ERROR not in room {name}")
            return
        self.leave_room(client, name, f"INFO left room {name}")

    def leave_room(self, client: Client, name: str, goodbye: str | None = None) -> None:
        """Remove ``client`` from room ``name``, send it ``goodbye`` and tell the others."""
        client.rooms.discard(name)
        room = self.existing_room(name)
        if room is None or client.username is None:
            return
        with room.cond:
            room.members.pop(client.username.lower(), None)
            if goodbye is not None:
                client.send(goodbye)
            room.publish("leave", client.username, "", f"INFO {client.username} left {name}")

    def leave_all(self, client: Client) -> None:
        """Remove ``client`` from every room (QUIT or a dropped connection)."""
        for name in sorted(client.rooms):
            self.leave_room(client, name)

    # --- HTTP commands ------------------------------------------------------------

    def web_join(self, token: str | None, name: str, username: str) -> tuple[int, dict, str]:
        """Join ``name`` as ``username``; return (status, body, session token)."""
        if not valid_name(name, 64):
            return 400, {"ok": False, "error": "invalid room name"}, ""
        if not valid_name(username, 32):
            return 400, {"ok": False, "error": "invalid username"}, ""
        with self.lock:
            if token is None or self.sessions.get(token) != username:
                token = secrets.token_urlsafe(16)
                self.sessions[token] = username
        room = self.room(name)
        with room.cond:
            key = username.lower()
            if room.web_members.get(key) == token:
                return 200, {"ok": True}, token
            if room.taken(username):
                return 409, {"ok": False, "error": f"name taken in {name}"}, token
            room.web_members[key] = token
            room.publish("join", username, "", f"INFO {username} joined {name}")
        return 200, {"ok": True}, token

    def web_send(self, token: str | None, name: str, text: str) -> tuple[int, dict]:
        """Post ``text`` to room ``name`` for the session ``token``."""
        username = self.session_user(token)
        if username is None:
            return 401, {"ok": False, "error": "no session"}
        if not text or len(text) > MAX_TEXT_CHARS or CONTROL_RE.search(text):
            return 400, {"ok": False, "error": "invalid text"}
        room = self.existing_room(name)
        if room is None:
            return 403, {"ok": False, "error": f"not in room {name}"}
        with room.cond:
            if room.web_members.get(username.lower()) != token:
                return 403, {"ok": False, "error": f"not in room {name}"}
            room.publish("msg", username, text, f"MSG {name} {username} {text}")
        return 200, {"ok": True}

    def web_poll(self, name: str, after: int) -> list[dict[str, Any]]:
        """Wait up to POLL_TIMEOUT_S for events of ``name`` with id > ``after``."""
        room = self.room(name)
        with room.cond:
            room.cond.wait_for(lambda: room.last_id > after, timeout=POLL_TIMEOUT_S)
            return room.events_after(after)

    def session_user(self, token: str | None) -> str | None:
        """Return the username of session ``token``, if any."""
        if token is None:
            return None
        with self.lock:
            return self.sessions.get(token)


def decode_line(raw: bytes) -> tuple[str | None, str | None]:
    """Turn one raw line (without its line ending) into (text, None) or (None, error)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "ERROR invalid UTF-8"
    if CONTROL_RE.search(line):
        return None, "ERROR control characters are not allowed"
    return line, None


class LineHandler(socketserver.StreamRequestHandler):
    """One thread per TCP connection: read lines, run commands, clean up on exit."""

    chat: Chat  # set on the subclass built by make_tcp_server

    def setup(self) -> None:
        """Enable TCP_NODELAY before the buffered files are made."""
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def handle(self) -> None:
        """Serve the connection until QUIT, EOF or an oversize line."""
        client = Client(self.request)
        client.send(WELCOME)
        try:
            while self.serve_line(client):
                pass
        except OSError as exc:
            logger.debug("connection error: %s", exc)
        finally:
            self.chat.leave_all(client)

    def serve_line(self, client: Client) -> bool:
        """Read and run one line; return False when the connection should close."""
        raw = self.rfile.readline(MAX_LINE_BYTES + 2)
        if not raw:
            return False
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > MAX_LINE_BYTES:
            client.send("ERROR line too long")
            return False
        line, error = decode_line(raw)
        if error is not None:
            client.send(error)
            return True
        if line is None or not line.strip(" \t"):
            return True
        return self.run(client, line)

    def run(self, client: Client, line: str) -> bool:
        """Run one decoded command line; return False after QUIT."""
        verb, _, rest = line.partition(" ")
        verb = verb.upper()
        if verb == "MSG":
            self.chat.msg(client, rest)
        elif verb == "JOIN":
            self.chat.join(client, rest.split(" ") if rest else [])
        elif verb == "LEAVE":
            self.chat.leave(client, rest.split(" ") if rest else [])
        elif verb == "QUIT":
            if rest:
                client.send("ERROR usage: QUIT")
                return True
            self.chat.leave_all(client)
            client.send("INFO bye")
            return False
        elif verb == "PING":
            client.send(f"PONG {rest}" if rest else "PONG")
        elif verb != "PONG":
            client.send(f"ERROR unknown command {verb}; {UNKNOWN_HINT}")
        return True


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """The long-poll API: POST /api/join, POST /api/send, GET /api/poll."""

    protocol_version = "HTTP/1.1"  # keep-alive
    chat: Chat  # set on the subclass built by make_http_server

    def setup(self) -> None:
        """Enable TCP_NODELAY: headers and body are separate writes (no Nagle stalls)."""
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Send the access log to logging at DEBUG instead of stderr."""
        logger.debug("http %s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        """Serve GET /api/poll?room=R&after=N."""
        url = urlsplit(self.path)
        if url.path != "/api/poll":
            self.reply(404, {"ok": False, "error": "not found"})
            return
        query = parse_qs(url.query)
        name = query.get("room", [""])[0]
        try:
            after = int(query.get("after", ["0"])[0])
        except ValueError:
            self.reply(400, {"ok": False, "error": "after must be a whole number"})
            return
        if not valid_name(name, 64):
            self.reply(400, {"ok": False, "error": "invalid room name"})
            return
        self.reply(200, {"messages": self.chat.web_poll(name, after)})

    def do_POST(self) -> None:
        """Serve POST /api/join and POST /api/send."""
        body = self.read_json()
        if body is None:
            return
        token = self.session_token()
        if self.path == "/api/join":
            status, reply, token = self.chat.web_join(
                token, str(body.get("room", "")), str(body.get("username", ""))
            )
            cookie = f"{COOKIE_NAME}={token}; Path=/; HttpOnly" if token else None
            self.reply(status, reply, cookie)
        elif self.path == "/api/send":
            status, reply = self.chat.web_send(
                token, str(body.get("room", "")), str(body.get("text", ""))
            )
            self.reply(status, reply)
        else:
            self.reply(404, {"ok": False, "error": "not found"})

    def read_json(self) -> dict[str, Any] | None:
        """Read the JSON object body; reply 400/413 and return None if it is not one."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            self.reply(413, {"ok": False, "error": "body too large"})
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.reply(400, {"ok": False, "error": "body must be a JSON object"})
            return None
        return body

    def session_token(self) -> str | None:
        """Return the sc_session cookie value, if sent."""
        try:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return None
        morsel = cookie.get(COOKIE_NAME)
        return morsel.value if morsel is not None else None

    def reply(self, status: int, body: dict[str, Any], cookie: str | None = None) -> None:
        """Send a JSON response with Content-Length (keep-alive)."""
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        self.wfile.write(data)


def make_tcp_server(chat: Chat, host: str, port: int) -> socketserver.ThreadingTCPServer:
    """Bind the line-protocol listener (not yet serving)."""
    handler = type("BoundLineHandler", (LineHandler,), {"chat": chat})
    server_cls = type(
        "LineServer",
        (socketserver.ThreadingTCPServer,),
        {
            "daemon_threads": True,
            "allow_reuse_address": True,
            "request_queue_size": LISTEN_BACKLOG,
        },
    )
    return server_cls((host, port), handler)


def make_http_server(chat: Chat, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """Bind the long-poll HTTP listener (not yet serving)."""
    handler = type("BoundApiHandler", (ApiHandler,), {"chat": chat})
    server_cls = type(
        "ApiServer",
        (http.server.ThreadingHTTPServer,),
        {"request_queue_size": LISTEN_BACKLOG},
    )
    return server_cls((host, port), handler)


def raise_fd_limit() -> None:
    """Raise the soft open-files limit to the hard limit (thousands of connections)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tcp-port", type=int, default=5100, help="0 = pick a free port")
    parser.add_argument("--http-port", type=int, default=8100, help="0 = pick a free port")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT or SIGTERM; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise_fd_limit()
    chat = Chat()
    servers: list[tuple[str, socketserver.BaseServer]] = [
        ("tcp", make_tcp_server(chat, args.host, args.tcp_port)),
        ("http", make_http_server(chat, args.host, args.http_port)),
    ]
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    for kind, server in servers:
        threading.Thread(target=server.serve_forever, name=f"serve-{kind}", daemon=True).start()
        host, port = server.server_address[:2]
        print(f"listening {kind} {host}:{port}", flush=True)
        logger.info("listening %s %s:%s", kind, host, port)
    while not stop.wait(0.5):
        pass
    for _, server in servers:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
