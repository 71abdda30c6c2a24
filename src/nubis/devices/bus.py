"""A bus of non-overlapping address ranges that routes guest PIO and MMIO accesses to devices.

When a vCPU exits on a port or MMIO access KVM could not handle, the vCPU thread asks the
matching `Bus` (one for I/O ports, one for MMIO) to deliver it. A device is inserted at one or
more ranges; on an access it is told the base of the range that was hit and the offset inside
it, so one device can own several ranges (a PCI function with several BARs, the i8042 at 0x60
and 0x64).

Lookups happen on every exit and from several vCPU threads, so they take no lock: the ranges
live in an immutable snapshot (sorted starts plus entries) that insert, remove and
update_range replace with a single attribute assignment under a writer lock. A reader sees
either the old or the new snapshot, never a half-updated one.

As on real hardware, a read from an address no device decodes returns all ones and a write
there is dropped (PCI local bus 3.0, section 3.3.3.1, master abort). An access that starts in a
range but runs past its end is treated the same way.
"""

from __future__ import annotations

import bisect
import threading

from nubis._log import DEBUG, getLogger
from nubis._typing import NamedTuple, Protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["Bus", "BusDevice", "BusError", "BusRange"]

_log = getLogger(__name__)

_ALL_ONES: Final = b"\xff" * 64


class BusDevice(Protocol):
    """A device model reachable through a `Bus`.

    ``base`` is the start of the range the access hit, ``offset`` the distance from it, and
    ``data`` the bytes to fill (read) or consume (write); its length is the access width.
    """

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """Fill ``data`` with the device's response to a read at ``base + offset``."""

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """Handle a write of ``data`` at ``base + offset``."""


class BusError(ValueError):
    """A bus range could not be inserted, removed or moved."""


class BusRange(NamedTuple):
    """One range of a bus: ``[base, base + length)`` served by ``device``."""

    base: int
    length: int
    device: BusDevice

    @property
    def end(self) -> int:
        """The first address past the range."""
        return self.base + self.length

    def describe(self) -> str:
        """The range and its device, for error messages."""
        return f"[{self.base:#x}, {self.end:#x}) of {type(self.device).__name__}"


class _Snapshot(NamedTuple):
    starts: tuple[int, ...]
    ranges: tuple[BusRange, ...]


_EMPTY: Final = _Snapshot((), ())


class Bus:
    """Non-overlapping address ranges mapped to devices, with lock-free lookups.

    ``name`` (for example ``"pio"`` or ``"mmio"``) appears in errors and logs.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.unmapped_reads = 0
        self.unmapped_writes = 0
        self._snapshot: _Snapshot = _EMPTY
        self._writer_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Bus({self.name!r}, {len(self._snapshot.ranges)} ranges)"

    def _check_new_range(self, ranges: tuple[BusRange, ...], new: BusRange) -> None:
        if new.length <= 0:
            raise BusError(
                f"cannot insert {new.describe()} on the {self.name} bus: "
                f"its length {new.length} is not positive"
            )
        if new.base < 0:
            raise BusError(
                f"cannot insert {new.describe()} on the {self.name} bus: its base is negative"
            )
        for existing in ranges:
            if existing.base < new.end and new.base < existing.end:
                raise BusError(
                    f"cannot insert {new.describe()} on the {self.name} bus: "
                    f"it overlaps {existing.describe()}"
                )

    def _publish(self, ranges: list[BusRange]) -> None:
        ranges.sort(key=lambda r: r.base)
        self._snapshot = _Snapshot(tuple(r.base for r in ranges), tuple(ranges))

    def _index_of(self, ranges: tuple[BusRange, ...], base: int, action: str) -> int:
        for index, existing in enumerate(ranges):
            if existing.base == base:
                return index
        raise BusError(f"cannot {action} on the {self.name} bus: no range starts at {base:#x}")

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        """Map ``[base, base + length)`` to ``device``; overlapping or empty ranges are refused."""
        new = BusRange(base, length, device)
        with self._writer_lock:
            ranges = self._snapshot.ranges
            self._check_new_range(ranges, new)
            self._publish([*ranges, new])

    def remove(self, base: int) -> BusDevice:
        """Unmap the range starting at ``base`` and return its device."""
        with self._writer_lock:
            ranges = list(self._snapshot.ranges)
            index = self._index_of(self._snapshot.ranges, base, f"remove the range at {base:#x}")
            removed = ranges.pop(index)
            self._publish(ranges)
            return removed.device

    def update_range(self, old_base: int, new_base: int, length: int) -> None:
        """Move the range at ``old_base`` to ``[new_base, new_base + length)``, in one step.

        Used when the guest relocates a PCI BAR; lookups see the old or the new mapping.
        """
        with self._writer_lock:
            ranges = list(self._snapshot.ranges)
            action = f"move the range at {old_base:#x} to {new_base:#x}"
            index = self._index_of(self._snapshot.ranges, old_base, action)
            old = ranges.pop(index)
            self._check_new_range(tuple(ranges), BusRange(new_base, length, old.device))
            ranges.append(BusRange(new_base, length, old.device))
            self._publish(ranges)

    def devices(self) -> tuple[BusRange, ...]:
        """All ranges, sorted by base."""
        return self._snapshot.ranges

    def find(self, addr: int, length: int = 1) -> BusRange | None:
        """The range containing all of ``[addr, addr + length)``, or ``None``."""
        snapshot = self._snapshot
        index = bisect.bisect_right(snapshot.starts, addr) - 1
        if index >= 0:
            found = snapshot.ranges[index]
            offset = addr - found.base
            if offset < found.length and offset + length <= found.length:
                return found
        return None

    def read(self, addr: int, data: memoryview) -> bool:
        """Deliver a read at ``addr``; True if a device handled it, else ``data`` is all ones."""
        snapshot = self._snapshot
        index = bisect.bisect_right(snapshot.starts, addr) - 1
        if index >= 0:
            base, length, device = snapshot.ranges[index]
            offset = addr - base
            if offset < length and offset + len(data) <= length:
                device.read(base, offset, data)
                return True
        size = len(data)
        data[:] = _ALL_ONES[:size] if size <= len(_ALL_ONES) else b"\xff" * size
        self.unmapped_reads += 1
        if _log.isEnabledFor(DEBUG):
            _log.debug("%s bus: unmapped read of %d bytes at %#x", self.name, size, addr)
        return False

    def write(self, addr: int, data: memoryview) -> bool:
        """Deliver a write at ``addr``; True if a device handled it, else it is dropped."""
        snapshot = self._snapshot
        index = bisect.bisect_right(snapshot.starts, addr) - 1
        if index >= 0:
            base, length, device = snapshot.ranges[index]
            offset = addr - base
            if offset < length and offset + len(data) <= length:
                device.write(base, offset, data)
                return True
        self.unmapped_writes += 1
        if _log.isEnabledFor(DEBUG):
            _log.debug("%s bus: dropped write of %s at %#x", self.name, bytes(data).hex(), addr)
        return False
