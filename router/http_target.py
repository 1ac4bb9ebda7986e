"""Request targets, authorities and origins, sans-IO: strings in, split values or a reason out.

RFC 9112 3.2 allows four forms of request target; this server takes

- origin-form ``/path?query`` (what browsers send),
- absolute-form ``http://host[:port]/path?query`` (what proxies send; RFC 9112 3.2.2: the
  server must accept it, and its authority then names the host, not the ``Host`` field),
- asterisk-form ``*``, for ``OPTIONS`` only,

and refuses authority-form (``host:port``, for ``CONNECT``) and anything else. Nothing
here decodes percent-escapes: it only checks they are well formed, so that the code that
does decode them (a room name in a path) sees ``%XX`` triplets and nothing else.

:class:`Authority` is the one shape a host takes everywhere (``Host`` field, absolute-form
target, ``Origin``, ``--allowed-hosts`` entries): the name lower-cased, an IPv6 address in
brackets in its compressed form, the port as a number or None.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import NamedTuple, Optional, Union

#: The default port of each scheme an origin or an absolute-form target may have.
DEFAULT_PORTS = {"http": 80, "https": 443}

# RFC 3986 reg-name: unreserved / pct-encoded / sub-delims (IPv4 addresses are of this form).
_REG_NAME = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+\Z")
_PORT = re.compile(r"[0-9]{0,5}\Z")
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)\Z", re.DOTALL)
# A "%" that does not start a "%XX" triplet.
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class Authority(NamedTuple):
    """A host and its port. ``host`` is lower-case, without a trailing dot; an IPv6
    address is in brackets (``[::1]``); ``port`` is None when none was given."""

    host: str
    port: Optional[int]


class Target(NamedTuple):
    """A split request target: ``path`` (``*`` for asterisk-form) and ``query`` (without
    the ``?``), both still percent-encoded; ``authority`` for absolute-form only."""

    path: str
    query: str
    authority: Optional[Authority] = None


class Origin(NamedTuple):
    """A serialized ``Origin`` field: scheme (lower-case) and authority, whose port is
    filled in with the scheme's default when the origin named none."""

    scheme: str
    authority: Authority


def split_target(method: str, target: str) -> Union[Target, str]:
    """Split a request target (visible ASCII, as the parser checked) for *method*.

    Returns the :class:`Target`, or a message saying why the target is refused (the caller
    answers ``400 bad_request``)."""
    if target.startswith("/"):
        return _path_and_query(target)
    if target == "*":
        return Target("*", "") if method == "OPTIONS" else "asterisk-form (*) is for OPTIONS only"
    match = _ABSOLUTE.match(target)
    if match is None:
        return "the target must be /path, http://host/path or * (OPTIONS)"
    scheme, authority_text, rest = match.groups()
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return f"scheme {scheme!r} is not http or https"
    if "@" in authority_text:
        return "user information in the target's authority"
    authority = parse_authority(authority_text)
    if authority is None:
        return f"invalid authority {authority_text!r}"
    if authority.port is None:  # the URI's port is its scheme's default
        authority = Authority(authority.host, DEFAULT_PORTS[scheme])
    split = _path_and_query("/" + rest if rest.startswith("?") or not rest else rest)
    if isinstance(split, str):
        return split
    return split._replace(authority=authority)


def _path_and_query(text: str) -> Union[Target, str]:
    if "#" in text:
        return "a fragment (#) in the target"
    if _BAD_PERCENT.search(text):
        return "a % that is not followed by two hex digits"
    path, _, query = text.partition("?")
    return Target(path, query)


@functools.lru_cache(maxsize=256)
def parse_authority(text: str) -> Optional[Authority]:
    """``host[:port]`` (``[v6]:port`` for IPv6) -> :class:`Authority`, or None if it is
    not one (no host, a bad character, a port over 65535, a zone or IPvFuture literal)."""
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        host = _ipv6(inner) if bracket else None
        if host is None or (rest and not rest.startswith(":")):
            return None
        port_text: Optional[str] = rest[1:] if rest else None
    else:
        name, colon, port_text = text.partition(":")
        host = _reg_name(name)
        if host is None:
            return None
        if not colon:
            port_text = None
    if port_text is None or port_text == "":  # "host:" means the default port (RFC 3986)
        return Authority(host, None)
    if not _PORT.match(port_text) or int(port_text) > 65535:
        return None
    return Authority(host, int(port_text))


def parse_host_name(text: str) -> Optional[str]:
    """A host name without a port, as ``--allowed-hosts`` takes it (an IPv6 address with
    or without brackets) -> its :class:`Authority` form, or None if it is not one."""
    if ":" in text and not text.startswith("["):
        return _ipv6(text)
    authority = parse_authority(text)
    if authority is None or authority.port is not None or text.endswith(":"):
        return None
    return authority.host


def parse_origin(text: str) -> Optional[Origin]:
    """An ``Origin`` field value ``scheme://host[:port]`` -> :class:`Origin`, or None for
    anything else (``null``, another scheme, a path, user information)."""
    match = _ABSOLUTE.match(text)
    if match is None or match.group(3) or "@" in match.group(2):
        return None
    scheme = match.group(1).lower()
    if scheme not in DEFAULT_PORTS:
        return None
    authority = parse_authority(match.group(2))
    if authority is None:
        return None
    if authority.port is None:
        authority = Authority(authority.host, DEFAULT_PORTS[scheme])
    return Origin(scheme, authority)


def _reg_name(text: str) -> Optional[str]:
    """A registered name or IPv4 address, lower-cased, one trailing dot dropped (``host.``
    is the same DNS name as ``host``)."""
    if not _REG_NAME.match(text):
        return None
    name = text.lower()
    if name.endswith(".") and len(name) > 1:
        name = name[:-1]
    return name


def _ipv6(text: str) -> Optional[str]:
    """An IPv6 address (no zone) -> ``[compressed form]``, or None."""
    if "%" in text:  # zone identifiers name an interface of the client, not this server
        return None
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return f"[{address.compressed}]"
