"""The JSON API and the routes of the HTTP transport, on top of the hub.

:class:`HttpApi` turns one parsed :class:`~router.http_parser.Request` into hub calls and
answers through an :class:`Exchange` (the connection's handle on the request), at once or
later (joins wait for the shard, polls wait for news). It knows nothing about sockets.
Every refusal is an :class:`ApiError`: an HTTP status, a stable ``code`` (clients match
codes, never messages) and a message. See ``docs/PROTOCOL.md``, "JSON API (HTTP)".
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import parse_qs, unquote

from common import errors
from common import messages as m
from common.errors import Refusal
from common.limits import MAX_TEXT_CHARS
from common.names import NameKind, NameRefusal, check_name, check_room, name_key
from common.text import TextProblem, clean_text
from router.http_hosts import host_allowed, origin_allowed
from router.http_parser import Request
from router.http_poll import Poll, encode_poll_payload, parse_cursors, parse_private
from router.http_session import COOKIE_NAME, HttpSession, SessionStore
from router.http_static import StaticFiles
from router.hub import Client, Hub
from router.metrics import CONTENT_TYPE as METRICS_TYPE
from router.metrics import merge as merge_metrics
from router.metrics import render as render_metrics
from router.shards import ShardState
from router.siblings import NO_ANSWER, Siblings

log = logging.getLogger(__name__)

HeaderList = Tuple[Tuple[str, str], ...]

#: Headers on every response. The page has no inline script or style, so the policy needs
#: no ``unsafe-inline``: injected markup could not run even if it reached the DOM.
SECURITY_HEADERS: HeaderList = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
JSON_HEADERS: HeaderList = (
    ("Content-Type", "application/json; charset=utf-8"),
    ("Cache-Control", "no-store"),
)

# Codes of the HTTP API (stable: clients match them); all are in common.errors' catalogue.
BAD_REQUEST = errors.BAD_REQUEST
INVALID_JSON = errors.INVALID_JSON
INVALID_ROOM = errors.INVALID_ROOM
INVALID_USERNAME = errors.INVALID_USERNAME
INVALID_TEXT = errors.INVALID_TEXT
INVALID_CURSOR = errors.INVALID_CURSOR
TEXT_TOO_LONG = errors.TEXT_TOO_LONG
NO_SESSION = errors.NO_SESSION
BAD_ORIGIN = errors.BAD_ORIGIN
MISDIRECTED_REQUEST = errors.MISDIRECTED_REQUEST
NOT_FOUND = errors.NOT_FOUND
METHOD_NOT_ALLOWED = errors.METHOD_NOT_ALLOWED
UNSUPPORTED_MEDIA_TYPE = errors.UNSUPPORTED_MEDIA_TYPE
RATE_LIMITED = errors.RATE_LIMITED
TOO_MANY_SESSIONS = errors.TOO_MANY_SESSIONS
TOO_MANY_SESSIONS_FOR_ADDRESS = errors.TOO_MANY_SESSIONS_FOR_ADDRESS
INTERNAL_ERROR = errors.INTERNAL_ERROR


class Response(NamedTuple):
    status: int
    body: bytes
    headers: HeaderList = ()


class ApiError(Exception):
    """A refused request: answer ``status`` with ``{"error": {"code", "message"}}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: HeaderList = (), **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra

    def response(self) -> Response:
        error = {"code": self.code, "message": self.message, **self.extra}
        return json_response(self.status, {"error": error}, self.headers)


def json_response(status: int, payload: Dict[str, Any], headers: HeaderList = ()) -> Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(status, body, JSON_HEADERS + headers)


def failure_error(refusal: Refusal) -> ApiError:
    """The API error for a refusal: status and message from the catalogue; errors about one
    room also carry ``"room"``."""
    extra = {"room": refusal.room} if refusal.room else {}
    return ApiError(refusal.status, refusal.code, refusal.message, **extra)


def session_cookie(token: str, secure: bool = False) -> Tuple[str, str]:
    """The session cookie; ``Secure`` when the page was served over TLS."""
    flags = "; Secure" if secure else ""
    return ("Set-Cookie", f"{COOKIE_NAME}={token}; HttpOnly; SameSite=Strict; Path=/{flags}")


def expired_cookie(secure: bool = False) -> Tuple[str, str]:
    flags = "; Secure" if secure else ""
    return ("Set-Cookie", f"{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{flags}")


def cookie_value(request: Request, name: str) -> Optional[str]:
    """The value of cookie *name* from the request's ``Cookie`` headers, or None."""
    for key, value in request.headers:
        if key != "cookie":
            continue
        for part in value.split(";"):
            cookie, _, content = part.strip().partition("=")
            if cookie == name:
                return content.strip('"')
    return None


class Exchange:
    """One request in flight: the API answers through it exactly once. The transport
    calls :meth:`cancel` if the client goes away first; a later answer is ignored."""

    def __init__(
        self, send: Callable[[Response], None], address: str = "", https: bool = False
    ) -> None:
        self._send = send
        #: The per-address limits' key of the client (``router.policy.address_key``): behind
        #: a trusted proxy, of the client it names.
        self.address = address
        #: The page is served over TLS, here or at a trusted proxy (``X-Forwarded-Proto``).
        self.https = https
        self._on_cancel: Optional[Callable[[], None]] = None
        self.finished = False
        #: True for a request that only waits (a poll): if the client closes its side,
        #: nobody wants the answer. Other requests are answered even after the client's EOF.
        self.abandon_on_eof = False
        #: Another router of the tier took the request and forwarded it here.
        self.forwarded = False

    def respond(self, response: Response) -> None:
        if not self.finished:
            self.finished = True
            self._send(response)

    def on_cancel(self, callback: Callable[[], None], abandon_on_eof: bool = False) -> None:
        """Call *callback* if the client goes away before the answer."""
        self._on_cancel = callback
        self.abandon_on_eof = abandon_on_eof

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            if self._on_cancel is not None:
                self._on_cancel()


#: The admission hook: ``admit(session, action)`` is called before each API command
#: (``action`` is ``"join"``, ``"send"``, ``"leave"`` or ``"poll"``; *session* is None for
#: a join that would create one). Return None to go on, or seconds to wait: the request is
#: then refused with ``429 rate_limited`` and that ``Retry-After``. Rate limiting plugs in
#: here (``HttpApi.admit = ...``).
Admit = Callable[[Optional[HttpSession], str], Optional[float]]


def admit_everything(session: Optional[HttpSession], action: str) -> Optional[float]:
    return None


def guarded(exchange: Exchange, callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """*callback* for a hub outcome, made safe to run inside the hub's event handling: a
    bug in it is logged and answered 500 instead of interrupting the other clients'
    events."""

    def run(result: Any) -> None:
        try:
            callback(result)
        except Exception:
            log.error("error answering an HTTP request", exc_info=True)
            exchange.respond(ApiError(500, INTERNAL_ERROR, "internal error").response())

    return run


def answer_refusal(exchange: Exchange) -> Callable[[Refusal], None]:
    """An ``on_fail`` handler that answers the request with the refusal."""
    return guarded(exchange, lambda refusal: exchange.respond(failure_error(refusal).response()))


class _Anonymous(Client):
    """The client behind requests that need no session (``members``): registered once,
    never a member of anything."""

    def deliver(self, room: str, entry: m.Entry, wire: bytes) -> None:
        pass


Handler = Callable[[Request, Exchange, Dict[str, Any]], None]
#: What a request resolved to: call it with the exchange to answer.
Action = Callable[[Exchange], None]


#: Seconds a tier's /metrics waits for each other router's samples (router/siblings.py).
METRICS_GATHER_TIMEOUT = 2.0


class HttpApi:
    """Routes, JSON commands and the static page. One per HTTP listener."""

    def __init__(self, hub: Hub, static: StaticFiles) -> None:
        self.hub = hub
        self.static = static
        settings = hub.settings
        self.poll_timeout = settings.poll_timeout
        self.allowed_hosts = settings.http_hosts()
        self.sessions = SessionStore(hub, hub.loop, settings.session_ttl)
        self.admit: Admit = admit_everything
        #: The listener speaks TLS: session cookies get ``Secure``.
        self.secure_cookies = False
        self._anonymous = hub.add(_Anonymous())
        #: The tier's other routers (``--routers N``), None for a router on its own.
        self.siblings: Optional[Siblings] = None
        self._routes: Dict[str, Dict[str, Handler]] = {
            "/healthz": {"GET": self._healthz},
            "/metrics": {"GET": self._metrics},
            "/api/session": {"GET": self._session_info},
            "/api/join": {"POST": self._join},
            "/api/send": {"POST": self._send},
            "/api/privmsg": {"POST": self._privmsg},
            "/api/leave": {"POST": self._leave},
            "/api/poll": {"GET": self._poll},
            "/api/rooms": {"GET": self._rooms},
        }

    # --- dispatch --------------------------------------------------------------------

    def handle(self, request: Request, exchange: Exchange) -> None:
        """Answer *request* through *exchange* (now or later). Never raises: refusals
        become error responses, and anything unexpected is logged and answered 500.
        In a router tier, a request of another router's session is answered by that
        router (router/siblings.py)."""
        if self.siblings is not None and request.path.startswith("/api/"):
            owner = self.siblings.foreign_owner(cookie_value(request, COOKIE_NAME))
            if owner is not None:
                self._forward(owner, request, exchange)
                return
        self._handle_here(request, exchange)

    def answer_forwarded(
        self, request: Request, address: str, https: bool, respond: Callable[[Response], None]
    ) -> Callable[[], None]:
        """Answer a request another router of the tier took for one of our sessions;
        returns what to call if that router stops waiting."""
        exchange = Exchange(respond, address, https)
        exchange.forwarded = True
        self._handle_here(request, exchange)
        return exchange.cancel

    def _forward(self, owner: int, request: Request, exchange: Exchange) -> None:
        assert self.siblings is not None
        hop = self.hub.loop.create_task(
            self.siblings.forward(owner, request, exchange.address, exchange.https)
        )
        exchange.on_cancel(hop.cancel, abandon_on_eof=request.path == "/api/poll")

        def answered(task: asyncio.Task) -> None:
            if task.cancelled() or exchange.finished:
                return
            error = task.exception()
            if error is not None:
                log.error("forwarding to router %d failed", owner, exc_info=error)
            response = task.result() if error is None else None
            if response is NO_ANSWER:  # it may have applied it: not to be done here too
                exchange.respond(failure_error(Refusal(errors.ROUTER_TIMEOUT)).response())
            elif response is not None:
                exchange.respond(response)
            else:  # the owner is gone, and its sessions with it: unknown here too
                self._handle_here(request, exchange)

        hop.add_done_callback(answered)

    def _handle_here(self, request: Request, exchange: Exchange) -> None:
        try:
            self._dispatch(request, exchange)
        except ApiError as error:
            exchange.respond(error.response())
        except Exception:
            log.error("error handling %s %s", request.method, request.target, exc_info=True)
            exchange.respond(ApiError(500, INTERNAL_ERROR, "internal error").response())

    def refusal(self, request: Request) -> Optional[Response]:
        """The answer to *request* if its head alone refuses it (host, origin, path,
        method, content type), else None. For a head whose body has not been read yet
        (``Expect: 100-continue``): *request* has an empty body. Never raises."""
        try:
            self._resolve(request)
        except ApiError as error:
            return error.response()
        except Exception:
            log.error("error checking %s %s", request.method, request.target, exc_info=True)
            return ApiError(500, INTERNAL_ERROR, "internal error").response()
        return None

    def _dispatch(self, request: Request, exchange: Exchange) -> None:
        self._resolve(request)(exchange)

    def _resolve(self, request: Request) -> Action:
        """What answers *request*, from its head alone; raises :class:`ApiError` for a
        refusal. Every request, the page and ``/healthz`` too, must name an allowed host."""
        self._check_host(request)
        path = request.path
        method = "GET" if request.method == "HEAD" else request.method
        if path == "*":  # OPTIONS * asks what the server supports
            raise _method_not_allowed(("GET", "HEAD", "POST"))
        handlers, params = self._route(path)
        if handlers is None:
            static = self.static.lookup(path)
            if static is None:
                raise ApiError(404, NOT_FOUND, f"no such resource {path}")
            if method != "GET":
                raise _method_not_allowed(("GET", "HEAD"))
            return lambda exchange: self._static(request, exchange, static)
        handler = handlers.get(method)
        if handler is None:
            raise _method_not_allowed(tuple(handlers) + (("HEAD",) if "GET" in handlers else ()))
        if method == "POST":
            self._check_post(request)
        params["query"] = request.query
        return lambda exchange: handler(request, exchange, params)

    def _check_host(self, request: Request) -> None:
        """The host the request names must be allowed (DNS rebinding, see
        :mod:`router.http_hosts`): ``421 misdirected_request`` otherwise."""
        if not host_allowed(self.allowed_hosts, request.authority):
            host = request.authority.host if request.authority is not None else ""
            raise ApiError(
                421,
                MISDIRECTED_REQUEST,
                f"this server does not answer for host {host!r}; to allow it, start the "
                "router with --allowed-hosts naming it",
            )

    def _check_post(self, request: Request) -> None:
        """From this origin, and JSON only: a cross-site script's fetch carries a foreign
        ``Origin`` (compared with the allowed hosts and the request's own host and port,
        never with ``Host`` alone), and a cross-site form cannot send JSON."""
        if not origin_allowed(
            self.allowed_hosts, request.header_values("origin"), request.authority
        ):
            raise ApiError(403, BAD_ORIGIN, "cross-origin requests are not accepted")
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json")

    def _route(self, path: str) -> Tuple[Optional[Dict[str, Handler]], Dict[str, Any]]:
        handlers = self._routes.get(path)
        if handlers is not None:
            return handlers, {}
        if path.startswith("/api/rooms/") and path.endswith("/members"):
            room = path[len("/api/rooms/") : -len("/members")]
            return {"GET": self._members}, {"room": room}
        if path.startswith("/api/"):
            raise ApiError(404, NOT_FOUND, f"no such endpoint {path}")
        return None, {}

    # --- helpers ---------------------------------------------------------------------

    def _session(self, request: Request) -> HttpSession:
        session = self.sessions.get(cookie_value(request, COOKIE_NAME))
        if session is None:
            raise ApiError(401, NO_SESSION, "no session: join a room first")
        return session

    def _admit(self, session: Optional[HttpSession], action: str) -> None:
        wait = self.admit(session, action)
        if wait is not None:
            self._too_fast(wait)

    # --- endpoints -------------------------------------------------------------------

    def _static(self, request: Request, exchange: Exchange, file: Any) -> None:
        headers = self.static.headers(file)
        if self.static.not_modified(file, request.header("if-none-match")):
            exchange.respond(Response(304, b"", headers))
        else:
            exchange.respond(Response(200, file.body, headers))

    def _too_fast(self, wait: Optional[float]) -> None:
        """:func:`_too_fast`, counted as a flood throttle."""
        if wait:
            self.hub.metrics.throttled("http")
        _too_fast(wait)

    def _metrics(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        siblings = self.siblings
        if siblings is None:
            body = render_metrics(self.hub).encode("utf-8")
            exchange.respond(Response(200, body, (("Content-Type", METRICS_TYPE),)))
        elif exchange.forwarded:  # another router gathers the tier's: ours only
            body = render_metrics(self.hub, siblings.index).encode("utf-8")
            exchange.respond(Response(200, body, (("Content-Type", METRICS_TYPE),)))
        else:
            self._gather_metrics(request, exchange)

    def _gather_metrics(self, request: Request, exchange: Exchange) -> None:
        """A tier's metrics: every router's samples, labelled ``router="i"``, in one
        answer (a scrape lands on any router: each must see the whole tier)."""
        assert self.siblings is not None
        siblings, own = self.siblings, render_metrics(self.hub, self.siblings.index)

        async def gather() -> None:
            others = [
                siblings.forward(index, request, exchange.address, exchange.https)
                for index in range(len(siblings.ports))
                if index != siblings.index and not siblings.is_lost(index)
            ]
            # A router that is down (restarting) is left out, not waited for.
            answers = await asyncio.gather(
                *(asyncio.wait_for(other, METRICS_GATHER_TIMEOUT) for other in others),
                return_exceptions=True,
            )
            good = [a for a in answers if isinstance(a, Response) and a.status == 200]
            texts = [own] + [answer.body.decode("utf-8") for answer in good]
            body = merge_metrics(texts).encode("utf-8")
            exchange.respond(Response(200, body, (("Content-Type", METRICS_TYPE),)))

        task = self.hub.loop.create_task(gather())
        exchange.on_cancel(task.cancel)

    def _healthz(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        pool = self.hub.pool
        links = pool.links if pool is not None else []
        alive = sum(1 for link in links if link.alive)
        ok = bool(links) and alive == len(links)
        sessions = self.sessions.sessions.values()
        limiter = self.hub.limiter
        payload = {
            "ok": ok,
            "shards": len(links),
            "shards_alive": alive,
            "shards_restarting": pool.in_state(ShardState.RESTARTING) if pool else [],
            "shards_given_up": pool.in_state(ShardState.GIVEN_UP) if pool else [],
            "sessions": len(sessions),
            "polls_waiting": sum(len(session.polls) for session in sessions),
            "unsent_bytes": self.hub.output.total,
            "output_cut_offs": self.hub.output.cut_offs,
            "connections": limiter.total,
            "connections_refused": limiter.refused,
            "fds_in_use": limiter.fds.in_use,
            "fd_limit": limiter.fds.limit,
        }
        exchange.respond(json_response(200 if ok else 503, payload))

    def _session_info(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        # 200 either way: "no session yet" is the normal start of a page, not an error.
        session = self.sessions.get(cookie_value(request, COOKIE_NAME))
        if session is None:
            exchange.respond(json_response(200, {"username": None, "rooms": [], "epochs": {}}))
            return
        rooms = session.record.joined_rooms()
        payload = {
            "username": session.username,
            "rooms": rooms,
            "epochs": {room: self.hub.epoch_of(room) for room in rooms},
        }
        exchange.respond(json_response(200, payload))

    def _session_for_join(
        self, request: Request, username: str, address: str
    ) -> Tuple[HttpSession, bool]:
        """The session a join acts for, and whether it is new. A session in no room that
        asks for another name is replaced; one in a room keeps its name. Every join takes
        a token of the session's bucket (if it has one) and of its address's join bucket;
        a new session also passes the address's session cap and creation bucket."""
        session = self.sessions.get(cookie_value(request, COOKIE_NAME))
        if session is not None and session.username != username:
            if session.record.rooms:
                raise failure_error(Refusal(errors.WRONG_USERNAME, username=session.username))
            self.sessions.end(session)
            session = None
        self._admit(session, "join")
        now = self.hub.loop.time()
        self._too_fast(self.hub.addresses.join_wait(address, now))
        if session is not None:
            return session, False
        if len(self.sessions) >= self.hub.settings.max_sessions:
            raise failure_error(Refusal(errors.TOO_MANY_SESSIONS))
        wait = self.hub.addresses.session_refusal(address, now)
        if wait == float("inf"):
            limit = self.hub.settings.max_sessions_per_address
            error = failure_error(Refusal(errors.TOO_MANY_SESSIONS_FOR_ADDRESS, limit=limit))
            error.headers = (("Retry-After", str(max(1, int(self.sessions.ttl)))),)
            raise error
        self._too_fast(wait)
        return self.sessions.create(username, address), True

    def _join(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        body = _json_object(request)
        room = _room_field(body)
        username = _username_field(body)
        joined, new = self._session_for_join(request, username, exchange.address)

        def done(entry: m.Entry) -> None:
            payload = {
                "ok": True,
                "room": room,
                "username": joined.username,
                "id": entry[0],
                "epoch": self.hub.epoch_of(room),
            }
            cookie = session_cookie(joined.token, self.secure_cookies or exchange.https)
            exchange.respond(json_response(200, payload, (cookie,)))

        def failed(refusal: Refusal) -> None:
            if new and not joined.record.rooms:
                self.sessions.end(joined)  # its first join failed: no session, no cookie
            exchange.respond(failure_error(refusal).response())

        refusal = joined.join(room, guarded(exchange, done), guarded(exchange, failed))
        if refusal is not None:
            failed(refusal)

    def _send(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        session = self._session(request)
        body = _json_object(request)
        room = _room_field(body)
        text = _text_field(body, room)
        # Optional, but when present it must be a valid name (400) and the session's (403).
        if "username" in body and name_key(_username_field(body)) != name_key(
            session.username or ""
        ):
            raise ApiError(403, errors.WRONG_USERNAME, "username does not match the session")
        if not session.in_room(room):
            raise failure_error(Refusal(errors.NOT_IN_ROOM, room))
        self._admit(session, "send")

        def done(seq: int) -> None:
            exchange.respond(json_response(200, {"ok": True, "room": room, "id": seq}))

        self.hub.say(session.record, room, text, guarded(exchange, done), answer_refusal(exchange))

    def _privmsg(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        session = self._session(request)
        body = _json_object(request)
        room = _room_field(body)
        to = _name_field(body, "to", NameKind.USERNAME)
        text = _text_field(body, room)
        if not session.in_room(room):
            raise failure_error(Refusal(errors.NOT_IN_ROOM, room))
        self._admit(session, "send")

        def done(name: str) -> None:
            exchange.respond(json_response(200, {"ok": True, "room": room, "to": name}))

        self.hub.privmsg(session.record, room, to, text, guarded(exchange, done),
                         answer_refusal(exchange))  # fmt: skip

    def _leave(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        session = self._session(request)
        body = _json_object(request)
        if "room" not in body:  # only {} ends the session; "room": null is a bad room
            self.sessions.end(session)
            payload = {"ok": True, "ended": True}
            exchange.respond(
                json_response(
                    200, payload, (expired_cookie(self.secure_cookies or exchange.https),)
                )
            )
            return
        room = _room_field(body)
        self._admit(session, "leave")

        def done(_result: Any) -> None:
            exchange.respond(json_response(200, {"ok": True, "room": room}))

        failed = answer_refusal(exchange)
        refusal = self.hub.leave(session.record, room, guarded(exchange, done), failed)
        if refusal is not None:
            failed(refusal)

    def _poll(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        session = self._session(request)
        query = _poll_query(params["query"])
        cursors = parse_cursors(query)
        if isinstance(cursors, str):
            raise ApiError(400, INVALID_CURSOR, cursors)
        private = parse_private(query)
        if isinstance(private, str):
            raise ApiError(400, INVALID_CURSOR, private)
        for cursor in cursors:
            if not session.in_room(cursor.room):
                raise failure_error(Refusal(errors.NOT_IN_ROOM, cursor.room))
        self._admit(session, "poll")

        def respond(status: int, payload: Dict[str, Any], headers: HeaderList) -> None:
            self.hub.metrics.poll_answered(status)
            body = encode_poll_payload(payload)
            exchange.respond(Response(status, body, JSON_HEADERS + headers))

        def charge() -> Optional[float]:
            return self.admit(session, "fetch")

        max_bytes = self.hub.settings.poll_max_bytes
        poll = Poll(self.hub, session, cursors, self.poll_timeout, respond, max_bytes, charge,
                    private)  # fmt: skip
        exchange.on_cancel(poll.cancel, abandon_on_eof=True)
        poll.start()

    def _rooms(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        def done(listing: List[Tuple[str, int]]) -> None:
            rooms = [{"room": room, "members": count} for room, count in listing]
            exchange.respond(json_response(200, {"rooms": rooms}))

        self.hub.rooms(guarded(exchange, done))

    def _members(self, request: Request, exchange: Exchange, params: Dict[str, Any]) -> None:
        try:
            checked = check_room(unquote(params["room"], errors="strict"))
        except UnicodeDecodeError:
            raise ApiError(400, INVALID_ROOM, "room name is not UTF-8") from None
        if isinstance(checked, NameRefusal):
            raise ApiError(400, INVALID_ROOM, checked.message)
        room = checked

        def done(names: List[str]) -> None:
            exchange.respond(json_response(200, {"room": room, "members": names}))

        self.hub.names(self._anonymous, room, guarded(exchange, done), answer_refusal(exchange))

    def close(self) -> None:
        self.sessions.close()


# --- request checks ----------------------------------------------------------------------


def _poll_query(query: str) -> Dict[str, List[str]]:
    """A poll's query string as ``parse_qs`` reads it. The page's own form,
    ``cursors=...`` with nothing to unquote, is read without it: every poll has one."""
    if query.startswith("cursors=") and not any(char in query for char in "&%+"):
        return {"cursors": [query[8:]]}
    return parse_qs(query, keep_blank_values=True)


def _too_fast(wait: Optional[float]) -> None:
    """Raise ``429 rate_limited`` with ``Retry-After`` if *wait* (seconds) is positive."""
    if wait:
        seconds = str(max(1, int(wait + 0.999)))
        raise ApiError(429, RATE_LIMITED, "too many requests", headers=(("Retry-After", seconds),))


def _method_not_allowed(allowed: Sequence[str]) -> ApiError:
    allow = ", ".join(dict.fromkeys(allowed))
    return ApiError(405, METHOD_NOT_ALLOWED, f"allowed: {allow}", headers=(("Allow", allow),))


def _json_object(request: Request) -> Dict[str, Any]:
    try:
        value = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, INVALID_JSON, "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, INVALID_JSON, "the body must be a JSON object")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON "\ud800" escapes
        return False
    return True


#: The HTTP error code of each kind of name.
_NAME_CODES = {NameKind.ROOM: INVALID_ROOM, NameKind.USERNAME: INVALID_USERNAME}


def _name_field(body: Dict[str, Any], key: str, kind: NameKind) -> str:
    """The normalised name in ``body[key]``; ``400 invalid_room`` / ``invalid_username``
    unless it follows the name rule, with the line protocol's text as the message."""
    value = body.get(key)
    if not isinstance(value, str) or not _encodable(value):
        raise ApiError(400, _NAME_CODES[kind], f"{key} must be a string")
    checked = check_name(value, kind)
    if isinstance(checked, NameRefusal):
        raise ApiError(400, _NAME_CODES[kind], checked.message)
    return checked


def _room_field(body: Dict[str, Any]) -> str:
    return _name_field(body, "room", NameKind.ROOM)


def _username_field(body: Dict[str, Any]) -> str:
    return _name_field(body, "username", NameKind.USERNAME)


#: The answer to each refused text (the line protocol's rule: common.text.clean_text).
_TEXT_ERRORS = {
    TextProblem.CONTROL: (400, INVALID_TEXT, "control characters (newlines too) are not allowed"),
    TextProblem.BLANK: (400, INVALID_TEXT, "text is blank: only spaces or invisible characters"),
    TextProblem.TOO_LONG: (
        413,
        TEXT_TOO_LONG,
        f"message too long (at most {MAX_TEXT_CHARS} characters)",
    ),
}


def _text_field(body: Dict[str, Any], room: str) -> str:
    """The chat text in ``body["text"]``, bidi controls neutralised; ``400 invalid_text``
    or ``413 text_too_long`` as the line protocol refuses it."""
    text = body.get("text")
    if not isinstance(text, str) or not text or not _encodable(text):
        raise ApiError(400, INVALID_TEXT, "text must be a non-empty string")
    cleaned = clean_text(text, room)
    if isinstance(cleaned, TextProblem):
        raise ApiError(*_TEXT_ERRORS[cleaned])
    return cleaned
