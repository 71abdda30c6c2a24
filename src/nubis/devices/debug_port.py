"""The debug port (I/O port 0x80): guest code writes progress markers, nubis timestamps them.

On a PC, port 0x80 is the POST code port; firmware and boot code write a byte there to mark
progress. nubis uses it the way cloud-hypervisor does, to measure boot time: a guest (a test
blob, an init script, a patched kernel) writes a marker and the VMM records when it arrived,
relative to the start of the VMM process. Each write is logged at info level and kept in
`DebugPort.records` as ``(elapsed_seconds, value)`` for tests and benchmarks.

Linux may also use port 0x80 as an I/O delay (``io_delay=0x80``); to keep memory bounded the
record list stops growing at ``max_records`` and further writes are only counted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from nubis._log import getLogger

__all__ = ["DebugPort", "process_start_time"]

_log = getLogger(__name__)

_STAT_START_TIME_FIELD = 21  # /proc/<pid>/stat field 22 (proc(5)), counted after the comm field


def _boot_clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def process_start_time() -> float:
    """When this process started, in seconds of CLOCK_BOOTTIME (from /proc/self/stat).

    The kernel records the start in clock ticks, so the resolution is 1/SC_CLK_TCK (10 ms).
    """
    with open("/proc/self/stat", "rb") as stat:
        content = stat.read()
    # The command name is in parentheses and may contain spaces; fields resume after it.
    fields = content[content.rindex(b")") + 2 :].split()
    ticks = int(fields[_STAT_START_TIME_FIELD - 2])
    return ticks / os.sysconf("SC_CLK_TCK")


class DebugPort:
    """Records bytes written to port 0x80 with their time since ``start_time``.

    ``clock`` and ``start_time`` share a timescale: by default CLOCK_BOOTTIME and the moment
    the interpreter started, so the times read as "seconds since the VMM was launched".
    """

    def __init__(
        self,
        start_time: float | None = None,
        clock: Callable[[], float] = _boot_clock,
        max_records: int = 10_000,
    ) -> None:
        self._clock = clock
        if start_time is None:
            try:
                start_time = process_start_time()
            except (OSError, ValueError, IndexError):
                start_time = clock()
        self.start_time = start_time
        self.max_records = max_records
        self.records: list[tuple[float, int]] = []
        self.dropped = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DebugPort({len(self.records)} records)"

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """Reads return the last value written (a POST code latch), 0 before any write."""
        with self._lock:
            value = self.records[-1][1] if self.records else 0
        data[:] = bytes([value]) * len(data)

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """Record and log each written byte with the time since start."""
        elapsed = self._clock() - self.start_time
        with self._lock:
            for value in data:
                if len(self.records) < self.max_records:
                    self.records.append((elapsed, value))
                else:
                    self.dropped += 1
                _log.info("debug port %#x: %#04x at %.6f s", base + offset, value, elapsed)
