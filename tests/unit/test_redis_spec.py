"""common/redis_spec.py without a Redis: URLs, the password, what a start says."""

from __future__ import annotations

import sys
import types

import pytest

from common.redis_spec import INSTALL_HINT, PASSWORD_ENV, make_spec, start_problem


@pytest.mark.parametrize(
    "url", ["http://localhost:6379", "redis:///0", "localhost:6379", "", "unix:///tmp/r.sock"]
)
def test_a_url_that_is_not_redis_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        make_spec(url, 30)
    assert str(raised.value) == (f"--redis wants redis://HOST:PORT/DB or rediss://..., got {url!r}")


def test_the_password_comes_from_the_environment_and_is_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "p@ss:w/rd")
    spec = make_spec("rediss://cache.example:6380/2", 30, node="n1")
    assert spec.url == "rediss://:p%40ss%3Aw%2Frd@cache.example:6380/2"
    assert spec.shown() == "rediss://:***@cache.example:6380/2"
    assert "p%40ss" not in spec.shown()
    mine = make_spec("redis://app:secret@h:1/0", 30)  # the URL's own password wins
    assert mine.url == "redis://app:secret@h:1/0" and mine.shown() == "redis://app:***@h:1/0"


def test_node_names_differ() -> None:
    assert make_spec("redis://h/0", 30).node != make_spec("redis://h/0", 30).node


def test_without_redis_py_the_start_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    problem = start_problem(make_spec("redis://127.0.0.1:6379/0", 30))
    assert problem == f"--redis needs the redis client: {INSTALL_HINT}"
    assert INSTALL_HINT == 'pip install "shardchat[redis]"'


@pytest.mark.parametrize("hiredis", [None, types.SimpleNamespace(Reader=object)])
def test_without_hiredis_or_with_one_too_old_the_start_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, hiredis: object
) -> None:
    pytest.importorskip("redis")
    monkeypatch.setitem(sys.modules, "hiredis", hiredis)  # None: import -> ImportError
    problem = start_problem(make_spec("redis://127.0.0.1:6379/0", 30))
    assert problem == f"--redis needs hiredis 2.2.1 or later: {INSTALL_HINT}"
