"""The router's one-line reports of resource failures (router/app.py): a shard that cannot
start at boot, and asyncio's accept() running out of descriptors."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any, Dict, List

import pytest

from router.app import _log_loop_error, start_failure_message
from router.shards import ShardStartError


def start_error(code: int, index: int = 3) -> ShardStartError:
    return ShardStartError(index, OSError(code, os.strerror(code)))


@pytest.mark.parametrize(
    "code, hint",
    [
        (errno.EMFILE, ": raise the open-file limit (ulimit -n) or use fewer --shards"),
        (errno.ENFILE, ": raise the open-file limit (ulimit -n) or use fewer --shards"),
        (errno.EAGAIN, ": the system is out of processes or memory; try fewer --shards"),
        (errno.ENOMEM, ": the system is out of processes or memory; try fewer --shards"),
        (errno.EACCES, ""),
    ],
    ids=["EMFILE", "ENFILE", "EAGAIN", "ENOMEM", "other"],
)
def test_start_failure_is_one_line_with_what_to_do(code: int, hint: str) -> None:
    name = errno.errorcode[code]
    assert start_failure_message(start_error(code)) == f"3 ({name}: {os.strerror(code)}){hint}"


class FakeLoop:
    def __init__(self) -> None:
        self.defaults: List[Dict[str, Any]] = []

    def default_exception_handler(self, context: Dict[str, Any]) -> None:
        self.defaults.append(context)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE], ids=["EMFILE", "ENFILE"])
def test_accept_out_of_descriptors_is_one_warning_line(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    loop = FakeLoop()
    context = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(code, os.strerror(code)),
    }
    with caplog.at_level(logging.WARNING, logger="router.app"):
        _log_loop_error(loop, context)  # type: ignore[arg-type]
    assert loop.defaults == []
    assert [record.getMessage() for record in caplog.records] == [
        f"cannot accept connections ({errno.errorcode[code]}: {os.strerror(code)}); "
        "trying again in 1s"
    ]
    assert all(record.exc_info is None for record in caplog.records)


def test_other_loop_errors_go_to_the_default_handler(caplog: pytest.LogCaptureFixture) -> None:
    loop = FakeLoop()
    context = {"message": "Exception in callback", "exception": RuntimeError("boom")}
    _log_loop_error(loop, context)  # type: ignore[arg-type]
    assert loop.defaults == [context]
    assert caplog.records == []


def test_the_router_installs_the_handler() -> None:
    from router.app import Router
    from router.settings import Settings

    async def main() -> Any:
        router = Router(Settings(tcp_port=0, http_port=None))
        return asyncio.get_running_loop().get_exception_handler() is _log_loop_error, router

    installed, router = asyncio.run(main())
    assert installed
    assert router.fds is router.hub.limiter.fds
