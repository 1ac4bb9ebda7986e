#!/usr/bin/env python3
"""Start a shardchat cluster: ``python scripts/start_cluster.py [--tcp-port 5000] ...``.

Runs as a plain file from a checkout (no install needed) and as the ``shardchat-server``
console script after ``pip install``. See ``--help``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):
    # Run as a file: make the checkout's packages importable (and, under spawn, the shard
    # processes inherit this sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: Optional[List[str]] = None) -> int:
    # Imported here, not at the top: under `spawn` every shard process runs this file again
    # (as __mp_main__), and must not load the whole router it never uses (~9 MB each).
    from router.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
