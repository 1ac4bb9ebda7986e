"""Trusted proxies (``--trusted-proxy CIDR[,CIDR...]``): the real client address behind a
reverse proxy or load balancer, so that every per-address limit counts clients, not the
proxy.

Only a peer inside a trusted network is believed. From it, HTTP takes the client from
``Forwarded`` (RFC 7239) or else ``X-Forwarded-For``, walking the list from the right
(the hop nearest us) past every trusted address: the first address that is not trusted is
the client (a client cannot fake what our own proxy appended). The scheme comes from the
nearest hop (``proto=`` or ``X-Forwarded-Proto``). The line protocol takes a PROXY protocol
header in front of its first line: v1 (``PROXY TCP4 <src> <dst> <sport> <dport>\r\n``) or
v2 (binary: a 12-byte signature, version and command, family, length, the addresses and
any TLVs); :func:`read_proxy_header` tells them apart (sans-IO). From any other peer these
headers mean nothing (HTTP) or are an unknown command (TCP)."""

from __future__ import annotations

import ipaddress
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: The longest PROXY v1 header line, CRLF included (the protocol's own bound).
PROXY_V1_MAX_BYTES = 107
#: The longest PROXY v2 header we take, TLVs included: the protocol allows 16 + 65,535
#: bytes; proxies send the addresses (at most 36 bytes) and a few TLVs (ALPN, authority,
#: TLS details), and a peer is not to make us hold more than this before the welcome.
PROXY_V2_MAX_BYTES = 1024
#: The first 12 bytes of every PROXY v2 header (no text protocol starts with them).
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


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


#: The request headers a trusted proxy may name the client in (``--proxy-header``). Only
#: one is believed: a proxy that appends to one passes the other through from the client.
PROXY_HEADERS = ("x-forwarded-for", "forwarded")


class TrustedProxies:
    """The networks whose peers are believed about the client behind them, and the header
    they name it in (``x-forwarded-for``, with ``X-Forwarded-Proto``, or ``forwarded``)."""

    def __init__(self, networks: Sequence[Network] = (), header: str = PROXY_HEADERS[0]) -> None:
        if header not in PROXY_HEADERS:
            raise ValueError(f"the proxy header is one of {', '.join(PROXY_HEADERS)}")
        self.networks = tuple(networks)
        self.header = header

    @classmethod
    def parse(cls, text: str, header: str = PROXY_HEADERS[0]) -> TrustedProxies:
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
        return cls(networks, header)

    def with_header(self, header: str) -> TrustedProxies:
        return TrustedProxies(self.networks, header)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: str) -> bool:
        """True if the peer address *ip* is inside a trusted network."""
        address = _address(ip)
        return address is not None and any(address in network for network in self.networks)

    def trusts_key(self, key: str) -> bool:
        """True if every address the per-address limits' *key* stands for (an IPv4 address,
        or an IPv6 /64) is trusted."""
        if "/" not in key:
            return self.trusts(key)
        try:
            group = ipaddress.ip_network(key, strict=False)
        except ValueError:
            return False
        return any(
            group.version == network.version and group.subnet_of(network)  # type: ignore[arg-type]
            for network in self.networks
        )

    def client_of(self, peer: str, headers: Sequence[Tuple[str, str]]) -> Tuple[str, str]:
        """``(client ip, scheme)`` of a request from *peer* with *headers* (lower-case
        names): *peer* and ``""`` unless *peer* is trusted."""
        if not self.trusts(peer):
            return peer, ""
        if self.header == "forwarded":
            elements = _forwarded(",".join(v for n, v in headers if n == "forwarded"))
            hops = [element.get("for", "unknown") for element in elements]
            proto = elements[-1].get("proto", "") if elements else ""
        else:
            joined = ",".join(value for name, value in headers if name == "x-forwarded-for")
            hops = [hop.strip() for hop in joined.split(",") if hop.strip()]
            protos = [value for name, value in headers if name == "x-forwarded-proto"]
            proto = protos[-1].split(",")[-1].strip() if protos else ""
        client = peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break  # "unknown", an obfuscated name: the last trusted hop is all we know
            client = str(address)
            if not any(address in network for network in self.networks):
                break
        proto = proto.lower()
        return client, proto if proto in ("http", "https") else ""


def _forwarded(value: str) -> List[Dict[str, str]]:
    """The elements of a ``Forwarded`` value (RFC 7239), each ``{name: value}`` with the
    first of each name, quoted strings honoured (a ``,`` or ``;`` inside quotes separates
    nothing)."""
    elements: List[Dict[str, str]] = []
    current: Dict[str, str] = {}
    pair: List[str] = []
    quoted = escaped = False

    def end_pair() -> None:
        name, _, item = "".join(pair).partition("=")
        name = name.strip().lower()
        if name and name not in current:
            current[name] = item.strip()
        pair.clear()

    for char in value:
        if quoted:
            if escaped:
                pair.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            else:
                pair.append(char)
        elif char == '"':
            quoted = True
        elif char == ";":
            end_pair()
        elif char == ",":
            end_pair()
            elements.append(current)
            current = {}
        else:
            pair.append(char)
    end_pair()
    elements.append(current)
    return elements


class ProxyHeader(NamedTuple):
    """What the front of a trusted peer's input says: *client* ``""`` keeps the peer's
    address (no header, ``PROXY UNKNOWN``, a v2 ``LOCAL`` or unspecified family); *length*
    is how many bytes of the input were the header (0: there was none)."""

    client: str
    length: int


class BadProxyHeader(ValueError):
    """The input starts like a PROXY header and is not a valid one."""


def read_proxy_header(data: bytes) -> Optional[ProxyHeader]:
    """The PROXY header at the front of *data* (everything a trusted peer sent so far), or
    None while more bytes are needed to tell. Raises :class:`BadProxyHeader`."""
    v1, v2 = b"PROXY ", PROXY_V2_SIGNATURE
    if data.startswith(v1) or v1.startswith(data):
        return _read_v1(data)
    if data.startswith(v2) or v2.startswith(data):
        return _read_v2(data)
    return ProxyHeader("", 0)


def _read_v1(data: bytes) -> Optional[ProxyHeader]:
    end = data.find(b"\r\n", 0, PROXY_V1_MAX_BYTES)
    if end < 0:
        if len(data) >= PROXY_V1_MAX_BYTES:
            raise BadProxyHeader("no CRLF within the first 107 bytes")
        return None
    client = parse_proxy_v1(data[:end])
    if client is None:
        raise BadProxyHeader("not a PROXY v1 line")
    return ProxyHeader(client, end + 2)


#: v2 family-and-transport byte -> (address bytes, address size) of a TCP stream.
_V2_STREAMS = {0x11: (ipaddress.IPv4Address, 4), 0x21: (ipaddress.IPv6Address, 16)}


def _read_v2(data: bytes) -> Optional[ProxyHeader]:
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family = data[13]
    length = 16 + int.from_bytes(data[14:16], "big")
    if version != 2 or command not in (0, 1):
        raise BadProxyHeader("not PROXY v2, or a command other than LOCAL and PROXY")
    if length > PROXY_V2_MAX_BYTES:
        raise BadProxyHeader(f"a v2 header over {PROXY_V2_MAX_BYTES} bytes")
    if len(data) < length:
        return None
    stream = _V2_STREAMS.get(family)
    if command == 0 or family in (0x00, 0x31):  # LOCAL (a health check), UNSPEC, UNIX
        return ProxyHeader("", length)
    if stream is None:
        raise BadProxyHeader(f"v2 family and transport 0x{family:02x} is not TCP")
    kind, size = stream
    if length < 16 + 2 * size + 4:
        raise BadProxyHeader("a v2 header too short for its addresses")
    source = kind(data[16 : 16 + size])
    mapped = getattr(source, "ipv4_mapped", None)
    return ProxyHeader(str(mapped or source), length)


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
