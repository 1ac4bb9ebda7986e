"""HTTP/1.1 requests, sans-IO: bytes in -> :class:`Request` events out; responses -> bytes.

Nothing here touches a socket or a loop. A transport feeds what it read to
:meth:`HttpRequestParser.receive_data` (``b""`` at end of stream) and asks
:meth:`HttpRequestParser.next_event` for the next complete request. Only what this server
needs is supported: ``Content-Length`` bodies (no chunked request bodies), keep-alive,
pipelining (requests are handed out one at a time, in order), ``Expect: 100-continue``
(the :class:`Continue` event says when to send ``100 Continue``). The request target is
split and checked here (:func:`router.http_target.split_target`), so the API gets a path
and a query that are well formed, and the host the request names
(:attr:`Request.authority`). Every limit comes from
:mod:`common.limits`; a peer that crosses one, or sends something malformed, gets a
:class:`ProtocolError` carrying the status and stable code to answer with, after which the
parser is dead and the transport closes the connection once the answer is out.
"""

from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from common.limits import (
    MAX_HTTP_BODY_BYTES,
    MAX_HTTP_HEADER_BYTES,
    MAX_HTTP_HEADERS,
    MAX_HTTP_REQUEST_LINE_BYTES,
)
from router.http_target import Authority, Target, parse_authority, split_target

Headers = List[Tuple[str, str]]


class Request(NamedTuple):
    """One complete request. Header names are lower-case; values are ISO-8859-1 decoded
    and stripped of surrounding whitespace. ``path`` and ``query`` are the split target
    (still percent-encoded, every ``%`` starting a ``%XX``; ``path`` is ``*`` for
    ``OPTIONS *``); ``authority`` is the host the request names: the absolute-form
    target's if it has one (RFC 9112 3.2.2), else the ``Host`` field's, None only for
    HTTP/1.0 without ``Host``."""

    method: str
    target: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: Headers
    body: bytes
    keep_alive: bool
    path: str = "/"
    query: str = ""
    authority: Optional[Authority] = None

    def header(self, name: str) -> Optional[str]:
        """The value of the first field called *name* (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> List[str]:
        """The values of every field called *name* (lower-case), in order."""
        return [value for key, value in self.headers if key == name]


class Continue(NamedTuple):
    """The head of ``request`` (its body still empty) is complete, asks for
    ``Expect: 100-continue``, and its body has not all arrived: send ``100 Continue``
    (:data:`CONTINUE_RESPONSE`) now, or refuse the request on its head alone. Given at
    most once per request; the :class:`Request` follows when its body is complete."""

    request: Request


class ProtocolError(NamedTuple):
    """The peer sent something we refuse: answer ``status`` with ``code``, then close."""

    status: int
    code: str
    message: str


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


class _Closed:
    def __repr__(self) -> str:
        return "CLOSED"


#: :meth:`HttpRequestParser.next_event`: no complete request yet; feed more bytes.
NEED_DATA = _NeedData()
#: :meth:`HttpRequestParser.next_event`: the peer closed the stream between requests.
CLOSED = _Closed()

Event = Union[Request, Continue, ProtocolError, _NeedData, _Closed]

#: The interim response a :class:`Continue` event asks for.
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)\Z")
# Field values: visible ASCII, obs-text, SP and HTAB; no other control characters.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(rb"[^\x21-\x7e]")  # raw non-ASCII must be percent-encoded

ERR_BAD_REQUEST_LINE = ProtocolError(400, "bad_request", "malformed request line")
ERR_URI_TOO_LONG = ProtocolError(
    414, "uri_too_long", f"request line over {MAX_HTTP_REQUEST_LINE_BYTES} bytes"
)
ERR_HEADERS_TOO_LARGE = ProtocolError(
    431,
    "headers_too_large",
    f"header section over {MAX_HTTP_HEADER_BYTES} bytes or {MAX_HTTP_HEADERS} fields",
)
ERR_BODY_TOO_LARGE = ProtocolError(413, "body_too_large", f"body over {MAX_HTTP_BODY_BYTES} bytes")
ERR_BAD_VERSION = ProtocolError(505, "http_version_not_supported", "only HTTP/1.0 and 1.1")
ERR_LENGTH_REQUIRED = ProtocolError(
    411, "length_required", "request bodies need Content-Length (no Transfer-Encoding)"
)
ERR_CL_AND_TE = ProtocolError(
    400, "bad_request", "both Content-Length and Transfer-Encoding (request smuggling?)"
)
ERR_BAD_LENGTH = ProtocolError(400, "bad_request", "invalid Content-Length")
ERR_NO_HOST = ProtocolError(400, "bad_request", "HTTP/1.1 request without exactly one Host")
ERR_BAD_HOST = ProtocolError(400, "bad_request", "invalid Host field (host[:port] expected)")
ERR_EXPECTATION = ProtocolError(
    417, "expectation_failed", "the only expectation supported is Expect: 100-continue"
)
ERR_TRUNCATED = ProtocolError(400, "bad_request", "connection closed mid-request")


def _header_error(why: str) -> ProtocolError:
    return ProtocolError(400, "bad_request", f"malformed header field: {why}")


def _target_error(why: str) -> ProtocolError:
    return ProtocolError(400, "bad_request", f"malformed request target: {why}")


class HttpRequestParser:
    """Turns a byte stream into :class:`Request` events (sans-IO).

    Call :meth:`receive_data` with every chunk read (``b""`` at end of stream), then
    :meth:`next_event` until it returns :data:`NEED_DATA`. Never holds more than one
    request's head plus ``MAX_HTTP_BODY_BYTES`` of body beyond what it was fed in one go:
    a head that grows past the limits is refused before it completes.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the head already searched for its end
        self._head: Optional[Request] = None  # a parsed head waiting for its body
        self._body_length = 0
        self._continue = False  # the head asked for 100-continue and was not told yet
        self._eof = False
        self._dead = False

    @property
    def in_progress(self) -> bool:
        """True once bytes of a request that is not yet complete have arrived."""
        return self._head is not None or bool(self._buffer.lstrip(b"\r\n"))

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as part of a request."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` means the peer will send no more."""
        if not data:
            self._eof = True
        elif not self._dead:
            self._buffer += data

    def next_event(self) -> Event:
        """The next complete request, :data:`NEED_DATA`, :data:`CLOSED` (end of stream
        between requests) or a :class:`ProtocolError` (after which only ``CLOSED``)."""
        if self._dead:
            return CLOSED
        if self._head is None:
            result = self._parse_head()
            if result is not None:
                return self._fail(result) if isinstance(result, ProtocolError) else result
        if self._head is not None:
            if len(self._buffer) >= self._body_length:
                return self._take_request()
            if self._eof:
                return self._fail(ERR_TRUNCATED)
            if self._continue:
                self._continue = False
                return Continue(self._head)
        return NEED_DATA

    # --- internals -------------------------------------------------------------------

    def _fail(self, error: ProtocolError) -> ProtocolError:
        self._dead = True
        self._buffer = bytearray()
        return error

    def _parse_head(self) -> Union[ProtocolError, _NeedData, _Closed, None]:
        """Parse the request line and header section if complete. Returns None when the
        head was parsed (``self._head`` is set), otherwise what :meth:`next_event` returns."""
        buffer = self._buffer
        # RFC 9112 2.2: ignore empty lines before the request line.
        skip = 0
        while skip < len(buffer) and buffer[skip] in b"\r\n":
            skip += 1
        if skip:
            del buffer[:skip]
            self._scanned = 0
        line_end = buffer.find(b"\n")
        if line_end < 0:
            if len(buffer) > MAX_HTTP_REQUEST_LINE_BYTES + 1:  # +1: a CR waiting for its LF
                return ERR_URI_TOO_LONG
            return self._need_more()
        request_line = bytes(buffer[:line_end]).rstrip(b"\r")
        if len(request_line) > MAX_HTTP_REQUEST_LINE_BYTES:
            return ERR_URI_TOO_LONG
        head_end, body_start = self._find_head_end(line_end)
        if head_end < 0:
            if len(buffer) - line_end - 1 > MAX_HTTP_HEADER_BYTES + 2:
                return ERR_HEADERS_TOO_LARGE
            return self._need_more()
        if head_end - line_end - 1 > MAX_HTTP_HEADER_BYTES:
            return ERR_HEADERS_TOO_LARGE
        field_block = bytes(buffer[line_end + 1 : head_end])
        del buffer[:body_start]
        self._scanned = 0
        return self._parse_fields(request_line, field_block)

    def _need_more(self) -> Union[ProtocolError, _NeedData, _Closed]:
        if self._eof:
            return self._fail(ERR_TRUNCATED) if self._buffer else CLOSED
        return NEED_DATA

    def _find_head_end(self, line_end: int) -> Tuple[int, int]:
        """``(end of the field block, start of the body)``, or ``(-1, -1)``. The field
        block is empty when the request line is followed directly by a blank line."""
        buffer = self._buffer
        start = max(line_end, self._scanned - 3)
        while True:
            newline = buffer.find(b"\n", start)
            if newline < 0:
                self._scanned = len(buffer)
                return -1, -1
            after = newline + 1
            if buffer[after : after + 1] == b"\n":
                return newline, after + 1
            if buffer[after : after + 2] == b"\r\n":
                return newline, after + 2
            if after >= len(buffer) - 1:  # the blank line may still be on its way
                self._scanned = newline
                return -1, -1
            start = after

    def _parse_fields(
        self, request_line: bytes, field_block: bytes
    ) -> Union[ProtocolError, Request, None]:
        parts = request_line.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]):
            return ERR_BAD_REQUEST_LINE
        method, target, version = parts
        if not target or _BAD_TARGET.search(target):
            return ERR_BAD_REQUEST_LINE
        match = _VERSION.match(version)
        if match is None:
            return ERR_BAD_REQUEST_LINE
        if match.group(1) != b"1" or match.group(2) not in (b"0", b"1"):
            return ERR_BAD_VERSION
        split = split_target(method.decode("ascii"), target.decode("ascii"))
        if isinstance(split, str):
            return _target_error(split)
        headers = parse_header_block(field_block)
        if isinstance(headers, ProtocolError):
            return headers
        return self._frame(method.decode("ascii"), target.decode("ascii"), split, version, headers)

    def _frame(
        self, method: str, target: str, split: Target, version: bytes, headers: Headers
    ) -> Union[ProtocolError, Request, None]:
        fields: Dict[str, List[str]] = {}
        for name, value in headers:
            fields.setdefault(name, []).append(value)
        if "transfer-encoding" in fields:
            return ERR_CL_AND_TE if "content-length" in fields else ERR_LENGTH_REQUIRED
        length = content_length(fields.get("content-length", ()))
        if isinstance(length, ProtocolError):
            return length
        if length > MAX_HTTP_BODY_BYTES:
            return ERR_BODY_TOO_LARGE
        http11 = version == b"HTTP/1.1"
        authority = request_authority(split, fields.get("host", ()), http11)
        if isinstance(authority, ProtocolError):
            return authority
        wants_continue = expects_continue(fields.get("expect", ()), http11)
        if isinstance(wants_continue, ProtocolError):
            return wants_continue
        tokens = {
            token.strip().lower()
            for value in fields.get("connection", ())
            for token in value.split(",")
        }
        keep_alive = "close" not in tokens if http11 else "keep-alive" in tokens
        self._head = Request(
            method,
            target,
            version.decode("ascii"),
            headers,
            b"",
            keep_alive,
            split.path,
            split.query,
            authority,
        )
        self._body_length = length
        self._continue = wants_continue and length > 0
        return None

    def _take_request(self) -> Request:
        assert self._head is not None
        length = self._body_length
        request = self._head._replace(body=bytes(self._buffer[:length]))
        del self._buffer[:length]
        self._head = None
        self._body_length = 0
        self._continue = False
        return request


def parse_header_block(block: bytes) -> Union[Headers, ProtocolError]:
    """Field lines (without the request line or the blank line) -> ``[(name, value)]``."""
    if not block:
        return []
    lines = block.split(b"\n")
    if len(lines) > MAX_HTTP_HEADERS:
        return ERR_HEADERS_TOO_LARGE
    headers: Headers = []
    for raw in lines:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            return _header_error("obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon:
            return _header_error("no colon")
        if not _TOKEN.match(name):
            return _header_error("bad name")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            return _header_error("control character in value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return headers


def request_authority(
    target: Target, hosts: Sequence[str], http11: bool
) -> Union[Optional[Authority], ProtocolError]:
    """The host a request names: its absolute-form target's authority, else its ``Host``
    field's (RFC 9112 3.2.2); None for HTTP/1.0 without either. HTTP/1.1 needs exactly one
    ``Host``, and any ``Host`` must be ``host[:port]`` (RFC 9112 3.2: 400 otherwise); an
    empty one (allowed for targets without an authority) names the host ``""``."""
    if len(hosts) > 1 or (http11 and not hosts):
        return ERR_NO_HOST
    from_header: Optional[Authority] = None
    if hosts:
        from_header = parse_authority(hosts[0]) if hosts[0] else Authority("", None)
        if from_header is None:
            return ERR_BAD_HOST
    return target.authority if target.authority is not None else from_header


def expects_continue(values: Sequence[str], http11: bool) -> Union[bool, ProtocolError]:
    """Whether the ``Expect`` fields ask for ``100-continue`` (case-insensitive). Any other
    expectation is ``417``. HTTP/1.0 has no expectations: ignored (RFC 9110 10.1.1)."""
    if not http11 or not values:
        return False
    members = {item.strip().lower() for value in values for item in value.split(",")}
    members.discard("")
    if members - {"100-continue"}:
        return ERR_EXPECTATION
    return bool(members)


def content_length(values: Sequence[str]) -> Union[int, ProtocolError]:
    """The body length from the ``Content-Length`` values (0 if none). Several fields, or a
    list, are accepted only if all agree (RFC 9110 8.6)."""
    lengths = {item.strip() for value in values for item in value.split(",")}
    if not lengths:
        return 0
    if len(lengths) != 1:
        return ERR_BAD_LENGTH
    (text,) = lengths
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        return ERR_BAD_LENGTH
    return int(text)


# --- responses ---------------------------------------------------------------------------

REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def format_response(
    status: int,
    headers: Sequence[Tuple[str, str]],
    body: bytes,
    keep_alive: bool,
    head_only: bool = False,
) -> bytes:
    """Serialize a response. ``Content-Length`` and ``Connection`` are added here; the body
    is left out for *head_only* (a ``HEAD`` request) and for 304."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if status != 304:
        lines.append(f"Content-Length: {len(body)}")
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only or status == 304 else head + body
