"""router/cli.py: a router tier the platform cannot run is refused at start."""

from __future__ import annotations

import pytest

from common.limits import MAX_TIER_CHILDREN_WINDOWS
from router.cli import tier_problem


@pytest.mark.parametrize(
    ("routers", "shards", "platform", "refused"),
    [
        (2, MAX_TIER_CHILDREN_WINDOWS - 2, "win32", False),
        (2, MAX_TIER_CHILDREN_WINDOWS - 1, "win32", True),
        (16, 16, "win32", True),
        (1, 64, "win32", False),  # one router: no supervisor
        (16, 16, "linux", False),
        (16, 16, "darwin", False),
    ],
    ids=["win-at-bound", "win-past-bound", "win-16x16", "win-one-router", "linux", "macos"],
)
def test_a_tier_windows_cannot_wait_on_is_refused(
    routers: int, shards: int, platform: str, refused: bool
) -> None:
    problem = tier_problem(routers, shards, platform)
    assert (problem is not None) == refused
    if refused:
        assert problem is not None and f"at most {MAX_TIER_CHILDREN_WINDOWS}" in problem
