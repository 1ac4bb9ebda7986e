"""The router process's own descriptor table: how many are open, and which.

Linux lists it in ``/proc/self/fd``, macOS in ``/dev/fd``; elsewhere (Windows, whose
sockets and pipes are handles with no per-process limit) there is nothing to read and the
functions return None. Listing the table opens one descriptor for the listing itself; both
functions leave it out.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Set


def _table_path() -> Optional[str]:
    if sys.platform.startswith("linux"):
        return "/proc/self/fd"
    if sys.platform == "darwin":
        return "/dev/fd"
    return None  # other systems: /dev/fd may show only 0-2 (FreeBSD without fdescfs)


def count_open_descriptors() -> Optional[int]:
    """The number of descriptors this process has open, or None where it cannot be read."""
    path = _table_path()
    if path is None:
        return None
    try:
        return len(os.listdir(path)) - 1  # minus the listing's own descriptor
    except OSError:
        return None  # out of descriptors for the listing itself, or no such table


def open_descriptors() -> Optional[Set[int]]:
    """The descriptors this process has open, or None where they cannot be listed.

    The listing's own descriptor was the lowest free one when it was opened and is closed
    again by now, so it is the first listed number that is no longer open."""
    path = _table_path()
    if path is None:
        return None
    try:
        listed = sorted(int(name) for name in os.listdir(path))
    except (OSError, ValueError):
        return None
    for fd in listed:
        try:
            os.fstat(fd)
        except OSError:
            listed.remove(fd)
            break
    return set(listed)
