"""Shared pytest setup: make the checkout importable however pytest is started.

``python -m pytest`` from the repository root already puts the root on ``sys.path``; plain
``pytest`` (or an IDE) may not, and every test imports ``common``, ``shard``, ``router`` and
``tests.cluster`` from the checkout rather than from an installed copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
