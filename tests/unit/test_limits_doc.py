"""Every limit in common/limits.py is documented in docs/LIMITS.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common import limits

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "LIMITS.md").read_text(encoding="utf-8")
CONSTANTS = sorted(name for name in vars(limits) if re.fullmatch(r"[A-Z][A-Z0-9_]+", name))


def test_there_are_limits() -> None:
    assert len(CONSTANTS) > 20


@pytest.mark.parametrize("name", CONSTANTS)
def test_limit_is_documented(name: str) -> None:
    assert f"`{name}`" in DOC, f"{name} is not listed in docs/LIMITS.md"
