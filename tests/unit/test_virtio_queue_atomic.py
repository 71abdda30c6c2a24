"""The ring indices a driver shares with nubis are read and written as whole 16-bit values.

A guest driver runs on another CPU while a device worker publishes used entries. If nubis stored
the used index one byte at a time, the driver could read half of it: at the 256 boundary
``0x00ff -> 0x0100`` the intermediate ``0x0000`` makes a driver take a stale used element as a
completed chain (Linux then reports "id N is not a head!"). These tests put a C thread (compiled
here with gcc, as the driver's CPU) on the other side of a real ring in a real mmap and count
values that are neither the old nor the new index, in both directions.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nubis.memory import GuestMemory
from nubis.virtio.mock import MockSplitQueue
from nubis.virtio.queue import Queue

C_SOURCE = r"""
#include <stdint.h>
/* Read *p until *stop; count the values that are neither a nor b. */
long watch(volatile uint16_t *p, volatile int *stop, uint16_t a, uint16_t b) {
    long torn = 0;
    while (!*stop) { uint16_t v = *p; if (v != a && v != b) torn++; }
    return torn;
}
/* Store a and b to *p in turn, as one 16-bit store each, until *stop. */
long flip(volatile uint16_t *p, volatile int *stop, uint16_t a, uint16_t b) {
    long n = 0;
    while (!*stop) { *p = a; *p = b; n++; }
    return n;
}
"""

# The used index moves between these two: one step across a 256 boundary, where every byte of
# the value changes.
BEFORE, AFTER = 0x00FF, 0x0100
#: How long each side keeps at it. Catching a torn access takes luck; with byte-wise accesses a
#: second saw thousands to millions of them, with whole 16-bit accesses none can happen.
SECONDS = 1.0


@pytest.fixture(scope="module")
def driver_cpu(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is missing (scripts/install.sh installs it)"
    directory = tmp_path_factory.mktemp("driver-cpu")
    source = directory / "driver.c"
    source.write_text(C_SOURCE)
    library = directory / "libdriver.so"
    subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    lib = ctypes.CDLL(str(Path(library)))
    for name in ("watch", "flip"):
        function = getattr(lib, name)
        function.restype = ctypes.c_long
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint16, ctypes.c_uint16]
    return lib


@pytest.fixture
def ring() -> Iterator[tuple[GuestMemory, MockSplitQueue, Queue]]:
    memory = GuestMemory([(0, 0x10000)])
    mock = MockSplitQueue(memory, 256, 0)
    yield memory, mock, mock.create_queue(event_idx=True)
    memory.close()


def _on_other_cpu(
    function: Callable[..., int], address: int, a: int, b: int, work: Callable[[], None]
) -> int:
    """Run the C ``function`` on ``address`` in a thread (ctypes drops the GIL) during ``work``."""
    stop = ctypes.c_int(0)
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(function(address, ctypes.addressof(stop), a, b))
    )
    thread.start()
    try:
        work()
    finally:
        stop.value = 1
        thread.join()
    return result[0]


def test_the_driver_never_sees_half_a_used_index(
    driver_cpu: ctypes.CDLL, ring: tuple[GuestMemory, MockSplitQueue, Queue]
) -> None:
    memory, mock, queue = ring
    address = memory.regions[0].host_address + mock.used_ring + 2  # used->idx
    queue.next_used = BEFORE - 1
    queue.add_used(memory, 0, 0)
    assert queue.used_idx(memory) == BEFORE

    def publish() -> None:
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            queue.next_used = BEFORE
            queue.add_used(memory, 0, 0)  # stores AFTER
            queue.next_used = BEFORE - 1
            queue.add_used(memory, 0, 0)  # stores BEFORE

    torn = _on_other_cpu(driver_cpu.watch, address, BEFORE, AFTER, publish)
    assert torn == 0, f"the driver read {torn} used indices that were neither old nor new"


def test_nubis_never_reads_half_an_available_index(
    driver_cpu: ctypes.CDLL, ring: tuple[GuestMemory, MockSplitQueue, Queue]
) -> None:
    memory, mock, queue = ring
    address = memory.regions[0].host_address + mock.avail_ring + 2  # avail->idx
    seen: set[int] = set()

    def read() -> None:
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            seen.add(queue.avail_idx(memory))

    _on_other_cpu(driver_cpu.flip, address, BEFORE, AFTER, read)
    assert seen <= {0, BEFORE, AFTER}, f"torn available indices read: {sorted(seen)}"
    assert AFTER in seen or BEFORE in seen


def test_the_driver_never_sees_half_an_avail_event(
    driver_cpu: ctypes.CDLL, ring: tuple[GuestMemory, MockSplitQueue, Queue]
) -> None:
    memory, mock, queue = ring
    # avail_event follows the used ring's 256 elements (2.7.8).
    address = memory.regions[0].host_address + mock.used_ring + 4 + 8 * 256

    avail_idx = mock.avail_ring + 2

    def publish() -> None:
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            # The driver's avail index keeps step, so nothing is pending and no rule is broken.
            for index in (AFTER, BEFORE):
                memory.write_u16(avail_idx, index)
                queue.next_avail = index
                assert not queue.enable_notification(memory)

    memory.write_u16(avail_idx, BEFORE)
    queue.next_avail = BEFORE
    queue.enable_notification(memory)
    torn = _on_other_cpu(driver_cpu.watch, address, BEFORE, AFTER, publish)
    assert torn == 0, f"the driver read {torn} avail_event values that were neither old nor new"
