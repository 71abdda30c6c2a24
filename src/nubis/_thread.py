"""Names for nubis's OS threads, so ``top -H``, ``ps -L`` and /proc/PID/task tell them apart.

Python names its ``threading.Thread`` objects only for itself; the kernel's name of a thread
(``comm``, at most 15 bytes) stays the process's unless the thread sets it with
``prctl(PR_SET_NAME)``, which only the calling thread can do for itself.
"""

from __future__ import annotations

import ctypes
import threading

PR_SET_NAME = 15
#: The kernel's limit on a thread name (TASK_COMM_LEN, 16 bytes with its terminating zero).
COMM_MAX = 15

_prctl = ctypes.CDLL(None, use_errno=True)["prctl"]
_prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def comm_name(name: str) -> bytes:
    """``name`` as the kernel keeps it: UTF-8, cut to 15 bytes (a ``nubis-`` prefix dropped)."""
    name = name.removeprefix("nubis-")
    return name.encode("utf-8", "replace")[:COMM_MAX]


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (its ``threading`` name by default) in the kernel.

    Best effort: a refusal changes nothing else.
    """
    _prctl(PR_SET_NAME, comm_name(name or threading.current_thread().name), 0, 0, 0)
