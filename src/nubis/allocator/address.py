"""An allocator of aligned ranges inside one address space (guest MMIO windows, I/O ports).

The builder hands PCI BARs out of the 32-bit and 64-bit MMIO windows of
``nubis.arch.x86_64.layout``; a BAR of size S must be S-aligned (PCI local bus 3.0, section
6.2.5.1), so every request names its alignment. Requests either take the lowest fitting address
(first match), the highest (last match, which keeps the bottom of a window free for fixed
devices), or one exact address (a snapshot restore puts BARs back where the guest left them).

The free space is a sorted list of disjoint ``[start, end)`` ranges; freeing merges neighbours
back together, so a window that has been fully freed is again one range.
"""

from __future__ import annotations

import bisect
import threading

from nubis._enum import Enum
from nubis._frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["AddressAllocator", "AllocPolicy", "AllocatorError", "ExactMatch"]

_ADDRESS_LIMIT: Final = 1 << 64


class AllocatorError(ValueError):
    """An allocation or release the allocator cannot satisfy."""


class AllocPolicy(Enum):
    """Where in the free space an allocation goes when no exact address is asked for."""

    FIRST_MATCH = "first"
    LAST_MATCH = "last"


class ExactMatch(Frozen):
    """Allocate at exactly ``address``, or fail."""

    __slots__ = ("address",)

    address: int

    def __init__(self, address: int) -> None:
        object.__setattr__(self, "address", address)


class AddressAllocator:
    """Aligned, non-overlapping allocations inside ``[base, base + size)``; thread-safe."""

    def __init__(self, base: int, size: int) -> None:
        if size <= 0:
            raise AllocatorError(f"address allocator size {size} must be positive")
        if base < 0 or base + size > _ADDRESS_LIMIT:
            raise AllocatorError(
                f"address allocator range [{base:#x}, {base + size:#x}) is outside the "
                "64-bit address space"
            )
        self.base = base
        self.size = size
        self.end = base + size
        self._free: list[tuple[int, int]] = [(base, self.end)]
        self._allocated: dict[int, int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AddressAllocator([{self.base:#x}, {self.end:#x}), {len(self._allocated)} used)"

    def _describe(self, size: int, alignment: int) -> str:
        return f"{size:#x} bytes aligned to {alignment:#x} in [{self.base:#x}, {self.end:#x})"

    def allocate(
        self,
        size: int,
        alignment: int = 1,
        policy: AllocPolicy | ExactMatch = AllocPolicy.FIRST_MATCH,
    ) -> int:
        """Reserve ``size`` bytes at an ``alignment``-aligned address and return that address.

        ``alignment`` must be a power of two. Raises `AllocatorError` if no free range fits.
        """
        if size <= 0:
            raise AllocatorError(f"cannot allocate {size} bytes: the size must be positive")
        if alignment <= 0 or alignment & (alignment - 1):
            raise AllocatorError(
                f"cannot allocate with alignment {alignment}: it must be a power of two"
            )
        with self._lock:
            if isinstance(policy, ExactMatch):
                address = policy.address
                if address % alignment:
                    raise AllocatorError(
                        f"cannot allocate at {address:#x}: it is not aligned to {alignment:#x}"
                    )
                index = self._free_range_holding(address, size)
                if index is None:
                    raise AllocatorError(
                        f"cannot allocate [{address:#x}, {address + size:#x}): it is not "
                        f"entirely free in [{self.base:#x}, {self.end:#x})"
                    )
            else:
                found = (
                    self._first_fit(size, alignment)
                    if policy is AllocPolicy.FIRST_MATCH
                    else self._last_fit(size, alignment)
                )
                if found is None:
                    raise AllocatorError(
                        f"cannot allocate {self._describe(size, alignment)}: no free range fits"
                    )
                index, address = found
            self._carve(index, address, address + size)
            self._allocated[address] = size
            return address

    def _first_fit(self, size: int, alignment: int) -> tuple[int, int] | None:
        for index, (start, end) in enumerate(self._free):
            address = -(-start // alignment) * alignment
            if address + size <= end:
                return index, address
        return None

    def _last_fit(self, size: int, alignment: int) -> tuple[int, int] | None:
        for index in range(len(self._free) - 1, -1, -1):
            start, end = self._free[index]
            address = (end - size) // alignment * alignment
            if address >= start:
                return index, address
        return None

    def _free_range_holding(self, address: int, size: int) -> int | None:
        index = bisect.bisect_right(self._free, (address, _ADDRESS_LIMIT)) - 1
        if index >= 0:
            start, end = self._free[index]
            if start <= address and address + size <= end:
                return index
        return None

    def _carve(self, index: int, start: int, end: int) -> None:
        free_start, free_end = self._free[index]
        pieces = []
        if free_start < start:
            pieces.append((free_start, start))
        if end < free_end:
            pieces.append((end, free_end))
        self._free[index : index + 1] = pieces

    def free(self, address: int) -> None:
        """Release the allocation that starts at ``address``."""
        with self._lock:
            size = self._allocated.pop(address, None)
            if size is None:
                raise AllocatorError(
                    f"cannot free {address:#x}: no allocation starts there "
                    "(never allocated or already freed)"
                )
            start, end = address, address + size
            index = bisect.bisect_left(self._free, (start, end))
            if index > 0 and self._free[index - 1][1] == start:
                index -= 1
                start = self._free[index][0]
                del self._free[index]
            if index < len(self._free) and self._free[index][0] == end:
                end = self._free[index][1]
                del self._free[index]
            self._free.insert(index, (start, end))

    def allocations(self) -> dict[int, int]:
        """A copy of the live allocations as ``{address: size}``."""
        with self._lock:
            return dict(self._allocated)

    def free_ranges(self) -> list[tuple[int, int]]:
        """A copy of the free space as sorted ``(start, end)`` pairs."""
        with self._lock:
            return list(self._free)
