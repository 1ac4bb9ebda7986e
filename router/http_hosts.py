"""Which hosts the HTTP listener answers for, and which origins may change state (pure).

**DNS rebinding**: a page on ``http://evil.example:8000`` whose name the attacker then
points at 127.0.0.1 talks to this server *same-origin*: the browser sends
``Host: evil.example:8000`` and ``Origin: http://evil.example:8000``, which agree with each
other. Only a list of the names this server is really reached by tells them apart, so
every request's host is checked against :class:`AllowedHosts`, and a ``POST``'s
``Origin`` must name an allowed host *and* the request's own host and port.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import FrozenSet, Iterable, Optional, Sequence

from router.http_target import DEFAULT_PORTS, Authority, parse_host_name, parse_origin

#: Always allowed by default: the loopback names a local browser uses.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: Listening addresses that mean "every interface": the machine's own names are unknown.
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class AllowedHosts:
    """The host names (in :class:`~router.http_target.Authority` form) requests may name.
    ``any_host`` (``--allowed-hosts '*'``) accepts every host, which turns the DNS-rebinding
    protection off; the ``Origin`` must still match the request's own host."""

    names: FrozenSet[str] = frozenset(LOOPBACK_HOSTS)
    any_host: bool = False

    @classmethod
    def parse(cls, text: str) -> AllowedHosts:
        """``HOST[,HOST...]`` or ``*`` (the ``--allowed-hosts`` flag). Raises ``ValueError``
        naming the first entry that is not a host name (a port, a path, an empty entry)."""
        entries = [entry.strip() for entry in text.split(",")]
        if "*" in entries:
            return cls(frozenset(), any_host=True)
        names = []
        for entry in entries:
            name = parse_host_name(entry)
            if name is None:
                raise ValueError(f"not a host name (no port, no scheme): {entry!r}")
            names.append(name)
        return cls(frozenset(names))

    @classmethod
    def default_for(cls, listen_host: str, hostname: Optional[str] = None) -> AllowedHosts:
        """The default list for a listener on *listen_host*: that host, ``localhost``,
        ``127.0.0.1`` and ``[::1]``; for a wildcard address (``0.0.0.0``, ``::``) also the
        machine's name (*hostname*, default ``socket.gethostname()``, which asks no DNS)."""
        names = set(LOOPBACK_HOSTS)
        if listen_host in WILDCARD_ADDRESSES:
            names.add(hostname if hostname is not None else socket.gethostname())
        else:
            names.add(listen_host)
        return cls(frozenset(_normalized(names)))

    def allows(self, host: str) -> bool:
        """True if *host* (already in Authority form) may be named by a request."""
        return self.any_host or host in self.names

    def as_flag(self) -> str:
        """The list as an ``--allowed-hosts`` value (IPv6 without brackets: no shell globs)."""
        if self.any_host:
            return "*"
        return ",".join(sorted(name.strip("[]") for name in self.names))

    def describe(self) -> str:
        """The list for the startup log."""
        return (
            "* (any host: no DNS-rebinding protection)"
            if self.any_host
            else ", ".join(sorted(self.names))
        )


def _normalized(names: Iterable[str]) -> Iterable[str]:
    for name in names:
        normal = parse_host_name(name.strip())
        if normal is not None:  # e.g. a hostname with characters no URL may carry
            yield normal


def host_allowed(allowed: AllowedHosts, authority: Optional[Authority]) -> bool:
    """May a request whose effective authority is *authority* be answered? *authority* is
    the absolute-form target's, else the ``Host`` field's; None only for HTTP/1.0 without
    ``Host``, which is allowed (such a client names no host a rebinding could fake)."""
    return authority is None or allowed.allows(authority.host)


def origin_allowed(
    allowed: AllowedHosts, origins: Sequence[str], authority: Optional[Authority]
) -> bool:
    """May a state-changing request with these ``Origin`` field values go on? No field: yes
    (not a browser, or a same-origin request of an old one). Otherwise exactly one field,
    ``http(s)://host[:port]`` with an allowed host that is the request's own *authority*
    (host and port; a port left out is the scheme's default, and a request that names no
    port matches the origin's default, as behind a TLS proxy). ``null`` never matches."""
    if not origins:
        return True
    if len(origins) != 1 or authority is None:
        return False
    origin = parse_origin(origins[0])
    if origin is None or not allowed.allows(origin.authority.host):
        return False
    if origin.authority.host != authority.host:
        return False
    # A Host without a port means the default one, of the scheme the page was loaded with
    # (the router itself speaks plain HTTP, but a TLS proxy in front may pass Host as is).
    port = authority.port if authority.port is not None else DEFAULT_PORTS[origin.scheme]
    return origin.authority.port == port
