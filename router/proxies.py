"""Trusted proxies (``--trusted-proxy CIDR[,CIDR...]``): the real client address behind a
reverse proxy or load balancer, so that every per-address limit counts clients, not the
proxy.

Only a peer inside a trusted network is believed. From it, HTTP takes the client from
``Forwarded`` (RFC 7239) or else ``X-Forwarded-For``, walking the list from the right
(the hop nearest us) past every trusted address: the first address that is not trusted is
the client (a client cannot fake what our own proxy appended). The scheme comes from the
nearest hop (``proto=`` or ``X-Forwarded-Proto``). The line protocol takes a PROXY protocol
v1 header (``PROXY TCP4 <src> <dst> <sport> <dport>``) as its first line. From any other
peer these headers mean nothing (HTTP) or are an unknown command (TCP)."""

from __future__ import annotations

import ipaddress
from typing import List, Optional, Sequence, Tuple, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: The longest PROXY v1 header line, CRLF included (the protocol's own bound).
PROXY_V1_MAX_BYTES = 107


def _address(text: str) -> Optional[Address]:
    text = text.strip().split("/", 1)[0]  # an address, or a per-address limits' key (v6 /64)
    if text.startswith("[") and "]" in text:  # [v6] or [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


class TrustedProxies:
    """The networks whose peers are believed about the client behind them."""

    def __init__(self, networks: Sequence[Network] = ()) -> None:
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """``10.0.0.0/8,::1`` -> the networks. Raises ``ValueError`` naming a bad one."""
        networks: List[Network] = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not an address or a network (CIDR)") from None
        if not networks:
            raise ValueError("no address or network given")
        return cls(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: str) -> bool:
        address = _address(ip)
        return address is not None and any(address in network for network in self.networks)

    def client_of(self, peer: str, headers: Sequence[Tuple[str, str]]) -> Tuple[str, str]:
        """``(client ip, scheme)`` of a request from *peer* with *headers* (lower-case
        names): *peer* and ``""`` unless *peer* is trusted."""
        if not self.trusts(peer):
            return peer, ""
        forwarded = [value for name, value in headers if name == "forwarded"]
        if forwarded:
            hops, proto = _forwarded(",".join(forwarded))
        else:
            joined = ",".join(value for name, value in headers if name == "x-forwarded-for")
            hops = [hop.strip() for hop in joined.split(",") if hop.strip()]
            protos = [value for name, value in headers if name == "x-forwarded-proto"]
            proto = protos[-1].split(",")[-1].strip().lower() if protos else ""
        client = peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break  # "unknown", an obfuscated name: the last trusted hop is all we know
            client = str(address)
            if not any(address in network for network in self.networks):
                break
        return client, proto if proto in ("http", "https") else ""


def _forwarded(value: str) -> Tuple[List[str], str]:
    """The ``for=`` of each element of a ``Forwarded`` value, and the last ``proto=``."""
    hops: List[str] = []
    proto = ""
    for element in value.split(","):
        hop = None
        for pair in element.split(";"):
            name, _, item = pair.partition("=")
            name, item = name.strip().lower(), item.strip().strip('"')
            if name == "for":
                hop = item
            elif name == "proto":
                proto = item.lower()
        hops.append(hop if hop is not None else "unknown")
    return hops, proto


def parse_proxy_v1(line: bytes) -> Optional[str]:
    """The client address of a PROXY v1 header *line* (without CRLF); ``""`` for
    ``PROXY UNKNOWN`` (keep the peer's); None if it is not a valid header."""
    parts = line.split(b" ")
    if len(parts) < 2 or parts[0] != b"PROXY":
        return None
    if parts[1] == b"UNKNOWN":
        return ""
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        return None
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
        ipaddress.ip_address(parts[3].decode("ascii"))
        ports = [int(part) for part in parts[4:6]]
    except (ValueError, UnicodeDecodeError):
        return None
    if (source.version == 4) != (parts[1] == b"TCP4") or not all(0 <= p < 65536 for p in ports):
        return None
    return str(source)
