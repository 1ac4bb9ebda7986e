"""Names a person can read in ``ps``/``top`` for the cluster's processes, without a
dependency (``setproctitle`` is not in the standard library).

On Linux the kernel keeps a short name per process (``/proc/PID/comm``, at most 15 bytes,
what ``ps -e``, ``top`` and ``pgrep`` show); writing it names the process. Elsewhere this
does nothing: the processes keep their Python command lines."""

from __future__ import annotations

import sys

#: What the kernel keeps of a name (TASK_COMM_LEN - 1).
COMM_BYTES = 15


def set_process_name(name: str) -> bool:
    """Name this process *name* (cut to 15 bytes) where the OS allows it; True if it did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/comm", "w", encoding="ascii") as comm:
            comm.write(name.encode("ascii", "replace")[:COMM_BYTES].decode("ascii"))
    except OSError:
        return False
    return True
