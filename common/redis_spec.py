"""Which Redis a node shares its rooms through (``--redis URL``), checked before it starts.

A :class:`RedisSpec` is plain data (it is pickled to every shard process): the URL, this
node's name and the presence time. :func:`start_problem` says, in one line, why the node
cannot start with it: redis-py missing (``pip install "shardchat[redis]"``), a URL that is
not ``redis://`` or ``rediss://``, or a Redis that does not answer within ``--redis-wait``.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote, urlsplit, urlunsplit

#: Where a password comes from when the URL has none.
PASSWORD_ENV = "SHARDCHAT_REDIS_PASSWORD"
INSTALL_HINT = 'pip install "shardchat[redis]"'


@dataclass(frozen=True)
class RedisSpec:
    url: str  # with the password, if any (never logged: see shown())
    node: str  # this node's name: member ids are <node>:<cid>
    presence_seconds: float

    def shown(self) -> str:
        """The URL without its password, for logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = (parts.username or "") + ":***@" + (parts.hostname or "")
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))


def node_name() -> str:
    """A name for this node, unique among the nodes on one Redis: host, pid, random."""
    host = socket.gethostname().split(".")[0] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def make_spec(url: str, presence_seconds: float, node: Optional[str] = None) -> RedisSpec:
    """*url* with the password from ``SHARDCHAT_REDIS_PASSWORD`` if it has none. Raises
    ``ValueError`` with the user's line for a URL that is not Redis's."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"--redis wants redis://HOST:PORT/DB or rediss://..., got {url!r}")
    password = os.environ.get(PASSWORD_ENV)
    if password and parts.password is None:
        user = quote(parts.username or "", safe="")
        netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
        url = urlunsplit(parts._replace(netloc=netloc))
    return RedisSpec(url, node or node_name(), presence_seconds)


def start_problem(spec: RedisSpec, wait_seconds: float = 0.0) -> Optional[str]:
    """Why a node cannot start on *spec* (one line), or None. Tries for up to
    *wait_seconds* (``--redis-wait``) for Redis to answer. Blocking."""
    try:
        import redis
    except ImportError:
        return f"--redis needs the redis client: {INSTALL_HINT}"
    try:  # (the shards read their subscriptions and pack commands with it)
        import hiredis
    except ImportError:
        hiredis = None
    if not (hasattr(hiredis, "Reader") and hasattr(hiredis, "pack_command")):
        return f"--redis needs hiredis 2.2.1 or later: {INSTALL_HINT}"
    deadline = time.monotonic() + wait_seconds
    while True:
        client = redis.Redis.from_url(spec.url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
            return None
        except redis.exceptions.AuthenticationError as error:
            return (
                f"Redis at {spec.shown()} refused the password ({error}): check the URL or"
                f" {PASSWORD_ENV}"
            )
        except redis.exceptions.RedisError as error:
            if time.monotonic() >= deadline:
                waited = f" (waited {wait_seconds:g} s)" if wait_seconds else ""
                return (
                    f"cannot reach Redis at {spec.shown()}{waited}: {error}; start it, check"
                    " --redis, or wait for it with --redis-wait SECONDS"
                )
        finally:
            client.close()
        time.sleep(0.2)
