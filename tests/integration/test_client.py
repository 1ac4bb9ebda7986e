"""Integration tests for scripts/chat_client.py: the client as a real subprocess on loopback.

The client is driven through piped stdin and, on POSIX, through a pseudo-terminal. The
server is ``FakeChatServer`` below: just enough of docs/PROTOCOL.md's line protocol, in one
thread per connection, recording every line the client sends. It is not the real server;
these tests pin the client's behaviour, not the cluster's.
"""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "scripts" / "chat_client.py"
WAIT = 5.0  # longest any single expected event may take before the test fails
WELCOME = "INFO welcome to shardchat; fake server for client tests"
ON_POSIX = sys.platform != "win32"
needs_pty = pytest.mark.skipif(not ON_POSIX, reason="pseudo-terminals (pty) are POSIX only")


# --------------------------------------------------------------------------- fake server


class FakeChatServer:
    """A tiny line-protocol server on 127.0.0.1, port 0.

    Understands JOIN, MSG (echo to the room), LEAVE, NAMES, ROOMS, HISTORY, QUIT (``INFO
    bye`` and close) and PONG (recorded only). Options: ``ping_token`` sends ``PING <token>``
    after a JOIN; ``echo_delay`` delays every MSG echo; ``say_bye=False`` ignores QUIT;
    ``rooms_delay`` answers ROOMS that much later, in the background, so that a QUIT sent
    right after it is answered first (as a cluster gathering ROOMS from its shards may).
    """

    def __init__(
        self,
        *,
        ping_token: str | None = None,
        echo_delay: float = 0.0,
        say_bye: bool = True,
        rooms_delay: float = 0.0,
        port: int = 0,
        history: dict[str, list[tuple[int, str, str, str]]] | None = None,
    ) -> None:
        self.ping_token = ping_token
        self.echo_delay = echo_delay
        self.say_bye = say_bye
        self.rooms_delay = rooms_delay
        self.received: list[str] = []
        self.connections = 0
        self._changed = threading.Condition()
        self._send_lock = threading.Lock()
        self._members: dict[str, dict[socket.socket, str]] = {}
        # Passing a stopped server's history to a new one on its port is a server that
        # came back with its rooms' history; a new one without is a restart that lost it.
        self.history: dict[str, list[tuple[int, str, str, str]]] = (
            history if history is not None else {}
        )
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.05)  # so the accept loop notices stop()
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    # -- test side

    def wait_for(self, line: str, timeout: float = WAIT) -> bool:
        """Wait until the client's ``line`` has been answered; return whether it was in time."""
        with self._changed:
            return self._changed.wait_for(lambda: line in self.received, timeout)

    def push(self, line: str) -> None:
        """Send ``line`` to every connected client."""
        for conn in list(self._open):
            self._send(conn, line)

    def say(self, room: str, user: str, text: str) -> None:
        """``user`` (not a connection) says ``text`` in ``room``: kept, sent to members."""
        self.record(room, user, text)
        for member in list(self._members.get(room, {})):
            self._send(member, f"MSG {room} {user} {text}")

    def record(self, room: str, user: str, text: str) -> None:
        """Keep ``text`` in ``room``'s history only, as said while nobody listened."""
        self._log(room, user, text)

    def drop_all(self) -> None:
        """Close every client connection, as a crashing server would."""
        for conn in list(self._open):
            _shutdown(conn)

    def stop(self) -> None:
        self._stopping.set()
        self._acceptor.join(WAIT)
        self._listener.close()
        self.drop_all()

    # -- server side

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            self.connections += 1
            self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        session: dict[str, str] = {}
        try:
            self._send(conn, WELCOME)
            with conn.makefile("rb") as lines:
                for raw in lines:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    keep_open = self._handle(conn, session, line)
                    with self._changed:  # recorded once answered, so tests can wait for it
                        self.received.append(line)
                        self._changed.notify_all()
                    if not keep_open:
                        break
        except OSError:
            pass  # the client went away; nothing to clean up beyond the finally
        finally:
            for members in self._members.values():
                members.pop(conn, None)
            self._open.discard(conn)
            _shutdown(conn)
            conn.close()

    def _handle(self, conn: socket.socket, session: dict[str, str], line: str) -> bool:
        """Answer one line; return False to close the connection."""
        verb, _, rest = line.partition(" ")
        args = rest.split(" ")
        if verb == "JOIN":
            room, session["user"] = args
            self._members.setdefault(room, {})[conn] = session["user"]
            self._log(room, "*", f"{session['user']} joined {room}")
            self._send(conn, f"INFO joined room {room}")
            if self.ping_token:
                self._send(conn, f"PING {self.ping_token}")
        elif verb == "MSG":
            room, _, text = rest.partition(" ")
            self._msg(conn, session.get("user", "?"), room, text)
        elif verb == "LEAVE":
            self._members.get(rest, {}).pop(conn, None)
            self._send(conn, f"INFO left room {rest}")
        elif verb == "NAMES":
            names = sorted(self._members.get(rest, {}).values(), key=str.casefold)
            self._send(conn, " ".join(["NAMES", rest, *names]))
        elif verb == "ROOMS":
            rooms = [(room, len(members)) for room, members in self._members.items() if members]
            reply = [f"ROOM {room} {count}" for room, count in sorted(rooms)]
            reply.append(f"END ROOMS {len(rooms)}")
            threading.Timer(self.rooms_delay, self._send_lines, (conn, reply)).start()
        elif verb == "HISTORY":
            self._send_history(conn, args[0], int(args[1]) if len(args) > 1 else 500)
        elif verb == "QUIT":
            if self.say_bye:
                self._send(conn, "INFO bye")
                return False
        elif verb != "PONG":
            self._send(conn, f"ERROR unknown command {verb}")
        return True

    def _msg(self, conn: socket.socket, user: str, room: str, text: str) -> None:
        if conn not in self._members.get(room, {}):
            self._send(conn, f"ERROR not in room {room}")
            return
        time.sleep(self.echo_delay)
        self._log(room, user, text)
        for member in list(self._members[room]):
            self._send(member, f"MSG {room} {user} {text}")

    def _log(self, room: str, user: str, text: str) -> None:
        events = self.history.setdefault(room, [])
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        events.append((len(events) + 1, stamp, user, text))

    def _send_history(self, conn: socket.socket, room: str, count: int) -> None:
        events = self.history.get(room, [])[-count:]
        for seq, stamp, user, text in events:
            self._send(conn, f"HISTORY {room} {seq} {stamp} {user} {text}")
        self._send(conn, f"END HISTORY {room} {len(events)}")

    def _send_lines(self, conn: socket.socket, lines: list[str]) -> None:
        try:
            for line in lines:
                self._send(conn, line)
        except OSError:
            pass  # the connection closed first: the reply is lost, which tests can see

    def _send(self, conn: socket.socket, line: str) -> None:
        with self._send_lock:
            conn.sendall(line.encode("utf-8") + b"\n")


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the other side


@pytest.fixture
def server() -> Iterator[FakeChatServer]:
    fake = FakeChatServer()
    yield fake
    fake.stop()


def _fake(**options: object) -> FakeChatServer:
    return FakeChatServer(**options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- running the client


def client_env() -> dict[str, str]:
    # UTF-8 pipes on every platform; no user readline configuration; a common terminal type.
    return dict(os.environ, PYTHONIOENCODING="utf-8", INPUTRC=os.devnull, TERM="xterm")


def client_args(port: int, *extra: str) -> list[str]:
    return [sys.executable, str(CLIENT), "--host", "127.0.0.1", "--port", str(port), *extra]


def run_piped(port: int, stdin: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the client with ``stdin`` piped in and wait for it to exit."""
    return subprocess.run(
        client_args(port, *extra),
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=client_env(),
        timeout=WAIT * 2,
    )


def start_piped(port: int, *extra: str) -> subprocess.Popen[str]:
    """Start the client with an open stdin pipe (no end of input until the test closes it)."""
    return subprocess.Popen(
        client_args(port, *extra),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=client_env(),
    )


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- piped stdin


def test_piped_session_prints_plain_lines(server: FakeChatServer) -> None:
    result = run_piped(
        server.port, "hello\n/names\n//starts with a slash\n", "--user", "bob", "--room", "lobby"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "* welcome to shardchat; type to talk in the current room, /help for the commands",
        "* joined room lobby",
        "[lobby] bob: hello",
        "* in lobby (1): bob",
        "[lobby] bob: /starts with a slash",
        "* bye",
    ]
    assert result.stderr == ""
    assert server.received == [
        "JOIN lobby bob",
        "MSG lobby hello",
        "NAMES lobby",
        "MSG lobby /starts with a slash",
        "QUIT",
    ]


def test_piped_answers_to_the_questions_without_printing_prompts(server: FakeChatServer) -> None:
    result = run_piped(server.port, "bob\n\nhello\n")

    assert result.returncode == 0, result.stderr
    assert server.received[:2] == ["JOIN lobby bob", "MSG lobby hello"]
    assert "username" not in result.stdout + result.stderr
    assert "[lobby] bob: hello" in result.stdout.splitlines()


def test_piped_room_answer_replaces_the_default(server: FakeChatServer) -> None:
    result = run_piped(server.port, "bob\ndev\nhi\n")

    assert result.returncode == 0, result.stderr
    assert server.received[:2] == ["JOIN dev bob", "MSG dev hi"]


def test_quit_sends_quit_and_ignores_later_input(server: FakeChatServer) -> None:
    result = run_piped(
        server.port, "hello\n/quit\nnever sent\n", "--user", "bob", "--room", "lobby"
    )

    assert result.returncode == 0, result.stderr
    assert server.received == ["JOIN lobby bob", "MSG lobby hello", "QUIT"]
    assert result.stdout.splitlines()[-1] == "* bye"


def test_room_commands_move_the_current_room(server: FakeChatServer) -> None:
    script = "/join dev\nin dev\n/switch lobby\nin lobby\n/leave\nback in dev\n/rooms\n/history 1\n"

    result = run_piped(server.port, script, "--user", "bob", "--room", "lobby")

    assert result.returncode == 0, result.stderr
    assert server.received == [
        "JOIN lobby bob",
        "JOIN dev bob",
        "MSG dev in dev",
        "MSG lobby in lobby",
        "LEAVE lobby",
        "MSG dev back in dev",
        "ROOMS",
        "HISTORY dev 1",
        "QUIT",
    ]
    lines = result.stdout.splitlines()
    for expected in (
        "* talking in lobby",
        "[dev] bob: in dev",
        "[lobby] bob: in lobby",
        "* left room lobby",
        "[dev] bob: back in dev",
        "* room dev: 1 member",
        "* 1 room",
        "~ [dev] end of history, 1 event",
    ):
        assert expected in lines
    assert any(re.fullmatch(r"~ \[dev\] \d\d:\d\d bob: back in dev", line) for line in lines)


def test_unknown_command_and_help_stay_local(server: FakeChatServer) -> None:
    result = run_piped(server.port, "/nope\n/help\n", "--user", "bob", "--room", "lobby")

    assert result.returncode == 0, result.stderr
    assert server.received == ["JOIN lobby bob", "QUIT"]
    assert "! unknown command /nope; type /help for the commands" in result.stdout
    assert "/switch <room>" in result.stdout


def test_names_in_other_scripts(server: FakeChatServer) -> None:
    result = run_piped(server.port, "ça va\n", "--user", "zoë", "--room", "日本")

    assert result.returncode == 0, result.stderr
    assert "[日本] zoë: ça va" in result.stdout.splitlines()


def test_piped_lines_go_one_at_a_time_so_output_stays_in_order() -> None:
    slow = _fake(echo_delay=0.2)
    try:
        result = run_piped(slow.port, "one\n/help\ntwo\n", "--user", "bob", "--room", "lobby")
    finally:
        slow.stop()

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2] == "[lobby] bob: one"
    assert lines[3] == "* commands:"
    assert lines[-2:] == ["[lobby] bob: two", "* bye"]


def test_end_of_input_waits_for_echoes_of_sent_lines() -> None:
    slow = _fake(echo_delay=0.5)
    try:
        result = run_piped(slow.port, "slow one\n", "--user", "bob", "--room", "lobby")
    finally:
        slow.stop()

    assert result.returncode == 0, result.stderr
    assert "[lobby] bob: slow one" in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1] == "* bye"


@pytest.mark.parametrize("ending", ["", "/quit\n"], ids=["end-of-input", "quit-command"])
def test_quit_waits_for_a_pending_rooms_reply(ending: str) -> None:
    slow = _fake(rooms_delay=0.3)
    try:
        result = run_piped(slow.port, "/rooms\n" + ending, "--user", "bob", "--room", "lobby")
    finally:
        slow.stop()

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-3:] == ["* room lobby: 1 member", "* 1 room", "* bye"]


def test_quit_wait_is_bounded_when_the_server_never_says_bye() -> None:
    mute = _fake(say_bye=False)
    try:
        # run_piped's timeout (well above QUIT_TIMEOUT_SECONDS) fails the test on a hang.
        result = run_piped(mute.port, "hello\n", "--user", "bob", "--room", "lobby")
    finally:
        mute.stop()

    assert result.returncode == 0, result.stderr
    assert "[lobby] bob: hello" in result.stdout
    assert "* bye" not in result.stdout
    assert mute.received == ["JOIN lobby bob", "MSG lobby hello", "QUIT"]


def test_ping_is_answered_with_pong_and_not_shown() -> None:
    pinging = _fake(ping_token="tok-42")
    client = start_piped(pinging.port, "--user", "bob", "--room", "lobby")
    try:
        answered = pinging.wait_for("PONG tok-42")
        stdout, stderr = client.communicate("", timeout=WAIT)
    finally:
        client.kill()
        pinging.stop()

    assert answered, pinging.received
    assert client.returncode == 0, stderr
    assert "PING" not in stdout and "PONG" not in stdout and "pong" not in stdout
    assert pinging.received == ["JOIN lobby bob", "PONG tok-42", "QUIT"]


def test_connect_refused_exits_1_with_a_message() -> None:
    port = free_port()

    result = run_piped(port, "hello\n", "--user", "bob", "--room", "lobby")

    assert result.returncode == 1
    assert result.stdout == ""
    prefix = f"chat_client: cannot connect to 127.0.0.1:{port}: "
    if sys.platform == "win32":
        assert result.stderr.startswith(prefix)
    else:
        assert result.stderr == prefix + "Connection refused\n"


def test_server_closing_an_idle_piped_client_exits_1(server: FakeChatServer) -> None:
    client = start_piped(server.port, "--user", "bob", "--room", "lobby")
    try:
        assert server.wait_for("JOIN lobby bob")
        server.drop_all()
        returncode = client.wait(WAIT)  # stdin is still open: the close alone must end it
        stdout, stderr = client.communicate(timeout=WAIT)
    finally:
        client.kill()

    assert returncode == 1
    assert stderr == "chat_client: server closed the connection\n"
    assert "* joined room lobby" in stdout


def test_invalid_username_exits_2_without_connecting(server: FakeChatServer) -> None:
    result = run_piped(server.port, "hello\n", "--user", "no spaces allowed", "--room", "lobby")

    assert result.returncode == 2
    assert "chat_client: invalid username: 1-32 letters, digits, _ - ." in result.stderr
    assert server.connections == 0


def test_end_of_input_before_a_username_exits_1(server: FakeChatServer) -> None:
    result = run_piped(server.port, "")

    assert result.returncode == 1
    assert "chat_client: end of input before a username" in result.stderr
    assert server.connections == 0


def test_runs_as_a_module_with_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.chat_client", "--help"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=WAIT * 2,
    )

    assert result.returncode == 0, result.stderr
    for flag in ("--host", "--port", "--user", "--room"):
        assert flag in result.stdout


# --------------------------------------------------------------------------- terminal


class PtyClient:
    """The client with stdin and stdout on a pseudo-terminal, stderr on a pipe.

    The test keeps the terminal's slave end open, so that its settings can be read after
    the client exits.
    """

    def __init__(self, args: list[str]) -> None:
        import pty  # noqa: PLC0415 - POSIX only

        self.master, self.slave = pty.openpty()
        self.modes_before = self.local_modes()
        self.proc = subprocess.Popen(
            args,
            stdin=self.slave,
            stdout=self.slave,
            stderr=subprocess.PIPE,
            env=client_env(),
            start_new_session=True,
        )
        self.output = ""
        self._seen = 0

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode("utf-8"))

    def expect(self, text: str, timeout: float = WAIT) -> str:
        """Wait for ``text`` after the previous match; return the output up to its end."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.output.find(text, self._seen)
            if found >= 0:
                self._seen = found + len(text)
                return self.output[: self._seen]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{text!r} not in terminal output: {self.output!r}")
            self._read(remaining)

    def wait(self, timeout: float = WAIT) -> int:
        returncode = self.proc.wait(timeout)
        self._read(0.1)
        return returncode

    def local_modes(self) -> int:
        import termios  # noqa: PLC0415 - POSIX only

        return termios.tcgetattr(self.slave)[3]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        os.close(self.master)
        os.close(self.slave)

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            chunk = os.read(self.master, 65536)
            self.output += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")


@pytest.fixture
def terminal_client(server: FakeChatServer) -> Iterator[PtyClient]:
    client = PtyClient(client_args(server.port))
    yield client
    client.close()


@needs_pty
def test_terminal_prompts_and_keeps_the_typed_line_intact(
    server: FakeChatServer, terminal_client: PtyClient
) -> None:
    import importlib.util  # noqa: PLC0415

    term = terminal_client
    echo_and_canonical = _echo_and_canonical()
    assert term.modes_before & echo_and_canonical == echo_and_canonical

    term.expect("username: ")
    term.type("bob\r")
    term.expect("room [lobby]: ")
    term.type("\r")
    assert server.wait_for("JOIN lobby bob")
    term.expect("* joined room lobby")
    term.expect("lobby> ")

    term.type("hello\r")
    term.expect("[lobby] bob: hello\nlobby> ")

    term.type("wor")
    term.expect("wor")
    server.push("MSG lobby alice hi there")
    shown = term.expect("\x1b[K[lobby] alice: hi there\nlobby> ")
    if importlib.util.find_spec("readline") is not None:
        term.expect("wor", timeout=0)  # redrawn right after the prompt
        assert shown.endswith("\r\x1b[K[lobby] alice: hi there\nlobby> ")
    term.type("ld\r")
    assert server.wait_for("MSG lobby world")
    term.expect("[lobby] bob: world")

    term.type("/quit\r")
    assert term.wait() == 0
    term.expect("* bye")
    assert term.local_modes() & echo_and_canonical == echo_and_canonical


@needs_pty
def test_terminal_server_close_with_no_reconnect_exits_1_and_restores_the_terminal(
    server: FakeChatServer,
) -> None:
    term = PtyClient(client_args(server.port, "--user", "bob", "--room", "lobby", "--no-reconnect"))
    try:
        term.expect("* joined room lobby")
        term.type("half typ")
        term.expect("half typ")
        server.drop_all()
        returncode = term.wait()
        assert term.proc.stderr is not None
        stderr = term.proc.stderr.read().decode("utf-8")
        modes = term.local_modes()
    finally:
        term.close()

    assert returncode == 1
    assert stderr == "chat_client: server closed the connection\n"
    echo_and_canonical = _echo_and_canonical()
    assert modes & echo_and_canonical == echo_and_canonical
    assert server.received == ["JOIN lobby bob"]


def _echo_and_canonical() -> int:
    import termios  # noqa: PLC0415 - POSIX only

    return termios.ECHO | termios.ICANON


# --------------------------------------------------------------------------- coming back


def _back_on(port: int, history: dict | None = None) -> FakeChatServer:
    """A new fake server on ``port`` (the old one stopped), with ``history`` or none."""
    return FakeChatServer(port=port, history=history)


def _lost_line(port: int) -> str:
    return f"! lost the connection to 127.0.0.1:{port}; reconnecting (type /quit to stop)"


@needs_pty
def test_terminal_reconnects_rejoins_and_shows_only_what_it_missed(
    server: FakeChatServer,
) -> None:
    term = PtyClient(client_args(server.port, "--user", "bob", "--room", "lobby"))
    back = None
    try:
        term.expect("* joined room lobby")
        assert server.wait_for("HISTORY lobby 1")  # the silent question for the last seq
        server.say("lobby", "alice", "before the break")
        term.expect("[lobby] alice: before the break")
        port, history = server.port, server.history
        server.stop()
        term.expect(_lost_line(port))
        server.record("lobby", "alice", "while you were out")
        back = _back_on(port, history)
        term.expect(f"* reconnected to 127.0.0.1:{port}")
        term.expect("* joined room lobby")
        caught_up = term.expect("~ [lobby] missed while you were away: 1 event")
        term.expect("alice: while you were out")
        assert back.wait_for("JOIN lobby bob") and back.wait_for("HISTORY lobby")
        term.type("hello again\r")
        assert back.wait_for("MSG lobby hello again")
        term.expect("[lobby] bob: hello again")
        term.type("/quit\r")
        assert term.wait() == 0
    finally:
        term.close()
        if back is not None:
            back.stop()
    after_the_loss = term.output[len(caught_up) :]
    assert "before the break" not in after_the_loss  # seen already: not shown again
    assert "~ [lobby]" not in term.output[: term.output.index("! lost the connection")]
    assert server.received == ["JOIN lobby bob", "HISTORY lobby 1"]


@needs_pty
def test_terminal_says_when_the_servers_history_started_over(server: FakeChatServer) -> None:
    term = PtyClient(client_args(server.port, "--user", "bob", "--room", "lobby"))
    back = None
    try:
        term.expect("* joined room lobby")
        server.say("lobby", "alice", "soon forgotten")
        term.expect("[lobby] alice: soon forgotten")
        port = server.port
        server.stop()
        term.expect(_lost_line(port))
        back = _back_on(port)  # restarted: the old history is gone
        back.record("lobby", "alice", "said after the restart")
        term.expect("* joined room lobby")
        term.expect(
            "! [lobby] the room's history started over while you were away (the server "
            "restarted): what was said meanwhile is lost"
        )
        term.expect("~ [lobby] since it started over: 1 event")
        term.expect("alice: said after the restart")
        term.type("/quit\r")
        assert term.wait() == 0
    finally:
        term.close()
        if back is not None:
            back.stop()


@needs_pty
def test_terminal_says_when_more_was_missed_than_the_server_keeps(
    server: FakeChatServer,
) -> None:
    term = PtyClient(client_args(server.port, "--user", "bob", "--room", "lobby"))
    back = None
    try:
        term.expect("* joined room lobby")
        assert server.wait_for("HISTORY lobby 1")
        port, history = server.port, server.history
        server.stop()
        term.expect(_lost_line(port))
        for number in range(600):  # seq 2..601, then the rejoin is 602
            server.record("lobby", "alice", f"busy {number}")
        back = _back_on(port, history)
        # The last 500 are 103..602: 101 events after bob's seq 1 are gone, 499 are shown.
        term.expect(
            "! [lobby] 101 events from while you were away are lost: the server keeps "
            "only the last 500 of a room"
        )
        term.expect("~ [lobby] missed while you were away: 499 events")
        term.expect("alice: busy 101\n")
        term.expect("alice: busy 599\n")
        term.type("/quit\r")
        assert term.wait() == 0
    finally:
        term.close()
        if back is not None:
            back.stop()
    assert "busy 100\n" not in term.output


@needs_pty
def test_terminal_refuses_to_send_while_reconnecting_and_quits_at_once(
    server: FakeChatServer,
) -> None:
    term = PtyClient(client_args(server.port, "--user", "bob", "--room", "lobby"))
    try:
        term.expect("* joined room lobby")
        port = server.port
        server.stop()
        term.expect(_lost_line(port))
        term.type("anyone there?\r")
        term.expect(f"! not connected: reconnecting to 127.0.0.1:{port}; not sent")
        term.type("/help\r")  # local commands still work
        term.expect("/switch <room>")
        term.type("/quit\r")
        assert term.wait() == 0
    finally:
        term.close()
    assert "anyone there?" not in "".join(server.received)


# --------------------------------------------------------------------------- not shardchat


class FirstLineServer:
    """Accepts connections on 127.0.0.1 and sends each ``first`` (or nothing), then waits."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            self._held.append(conn)
            if self.first:
                conn.sendall(self.first)

    def stop(self) -> None:
        self._listener.close()
        for conn in self._held:
            conn.close()


NOT_SHARDCHAT = "is the port right? the line protocol is on 5000 by default"


@pytest.mark.parametrize(
    ("first", "said"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "it answered 'HTTP/1.1 400 Bad Request'"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "it answered 'SSH-2.0-OpenSSH_9.2'"),
        (b"", "it said nothing within 3 s"),
    ],
    ids=["http", "ssh", "silent"],
)
def test_a_server_that_is_not_shardchat_is_named_before_any_prompt(first: bytes, said: str) -> None:
    other = FirstLineServer(first)
    try:
        result = run_piped(other.port, "hello\n", "--user", "bob", "--room", "lobby")
    finally:
        other.stop()

    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        result.stderr == f"chat_client: this is not a shardchat server ({said}): {NOT_SHARDCHAT}\n"
    )


def test_a_full_shardchat_server_is_reported_as_refusing() -> None:
    full = FirstLineServer(b"ERROR server full\n")
    try:
        result = run_piped(full.port, "hello\n", "--user", "bob", "--room", "lobby")
    finally:
        full.stop()

    assert result.returncode == 1
    assert result.stderr == "chat_client: the server refused the connection: server full\n"


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize("port", ["70000", "0", "abc", "-1", "5000x", "\u0665\u0660\u0660\u0660"])
def test_a_bad_port_is_refused_in_the_users_words(port: str) -> None:
    result = run_piped(5000, "", "--port", port, "--user", "bob")

    assert result.returncode == 2
    assert (
        f"chat_client: error: argument --port: the port must be a whole number from 1 to "
        f"65535, not {port!r} (the line protocol is on 5000 by default)"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_slash_commands() -> None:
    result = subprocess.run(
        [sys.executable, str(CLIENT), "--help"],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
    )

    assert result.returncode == 0, result.stderr
    for command in ("/join <room>", "/leave", "/switch", "/rooms", "/names", "/history [n]"):
        assert command in result.stdout
    assert "/quit" in result.stdout and "//text" in result.stdout
    assert "--no-reconnect" in result.stdout
