"""Guest physical memory made of host mappings, with every access bounds-checked.

A VM's RAM is a few disjoint ranges of guest physical addresses (on x86_64, RAM below the 32-bit
MMIO hole and RAM above 4 GiB, see ``nubis.arch.x86_64.layout.ram_ranges``). Each range is one
host mapping, a `GuestRegion`: an anonymous private mapping by default, or a memfd mapped shared
when another process (a vhost-user backend) or a snapshot needs the pages by file descriptor.
KVM learns about a region through KVM_SET_USER_MEMORY_REGION, which takes the region's guest
physical start, its size and the host virtual address of the mapping (``host_address``).

Every address and length that reaches `GuestMemory` may come from the guest (descriptor
addresses, buffer lengths), so each access is checked to lie inside a single region; anything
else raises `GuestMemoryError`, never `IndexError` and never touches memory outside a mapping.
The lookup is a bisect over the sorted region starts and a slice of a memoryview kept per
region, so `GuestMemory.slice` is cheap enough for the virtio data path.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
from collections.abc import Sequence

from nubis._log import getLogger
from nubis._typing import NewType

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final, TypeVar

__all__ = [
    "PAGE_SIZE",
    "GuestAddress",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRegion",
]

_log = getLogger(__name__)

GuestAddress = NewType("GuestAddress", int)
"""A guest physical address."""

PAGE_SIZE: Final = 4096
"""KVM maps guest memory in pages: region starts and sizes must be multiples of this."""

HUGE_PAGE_SIZE: Final = 2 << 20
"""The x86-64 large page size; private guest RAM asked to use huge pages is aligned to it."""

_ADDRESS_LIMIT: Final = 1 << 64
# Linux's MAP_NORESERVE (<asm-generic/mman-common.h>); Python's mmap module does not export it.
# Guest RAM is mostly untouched at start, so it should not count against the commit limit.
_MAP_NORESERVE: Final = 0x4000

_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")

if TYPE_CHECKING:
    _S = TypeVar("_S", bound=ctypes.Structure)


class GuestMemoryError(ValueError):
    """An access to guest memory that does not lie within one region of guest RAM."""

    def __init__(self, address: int, length: int, reason: str = "is outside guest RAM") -> None:
        self.address = address
        self.length = length
        if address >= 0 and length >= 0:
            where = f"[{address:#x}, {address + length:#x})"
        else:
            where = f"at address {address:#x} with length {length}"
        super().__init__(f"guest memory access {where} {reason}")


class GuestRegion:
    """One contiguous range of guest physical memory backed by one host mapping.

    ``host_address`` is the userspace address of the mapping, as KVM_SET_USER_MEMORY_REGION
    wants it; ``fd`` is the memfd behind a shared region, or ``None`` for a private one.
    """

    __slots__ = ("_view", "end", "fd", "host_address", "mmap", "size", "start")

    def __init__(self, start: int, size: int, *, shared: bool, thp: bool = False) -> None:
        self.start = start
        self.size = size
        self.end = start + size
        self.fd: int | None = None
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        skip = 0
        if shared:
            fd = os.memfd_create(f"nubis-ram-{start:#x}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                self.mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
            # With ``thp``, mapped one huge page larger and used from its first 2 MiB boundary,
            # so that host and guest addresses agree modulo 2 MiB: only then can KVM map the
            # host's transparent huge pages as 2 MiB pages for the guest (one nested page
            # fault per 2 MiB first touched instead of 512, and shorter page walks). The
            # slack is never touched: it costs address space, not memory.
            slack = HUGE_PAGE_SIZE if thp and size >= HUGE_PAGE_SIZE else 0
            self.mmap = mmap.mmap(-1, size + slack, flags=flags, prot=prot)
        # The ctypes object exports the mmap's buffer; it is dropped right away so the
        # mapping can still be closed later.
        anchor = ctypes.c_char.from_buffer(self.mmap)
        base = ctypes.addressof(anchor)
        del anchor
        if len(self.mmap) > size:
            skip = -base % HUGE_PAGE_SIZE
            # Advice only: a host without transparent huge pages (or with them off) refuses
            # it or ignores it, and the guest runs on small pages.
            try:
                self.mmap.madvise(mmap.MADV_HUGEPAGE, skip, size)
            except (OSError, AttributeError):
                _log.debug("transparent huge pages are not available for %r", self)
        self.host_address: int = base + skip
        self._view = memoryview(self.mmap)[skip : skip + size]

    def __repr__(self) -> str:
        kind = "shared" if self.fd is not None else "private"
        return f"GuestRegion([{self.start:#x}, {self.end:#x}), {kind})"

    @property
    def view(self) -> memoryview:
        """A writable memoryview of the whole region (offset 0 is guest address ``start``)."""
        return self._view

    def close(self) -> None:
        """Unmap the region and close its memfd; views still held elsewhere keep it mapped."""
        self._view.release()
        try:
            self.mmap.close()
        except BufferError:
            # A caller still holds a slice; the mapping goes away when the last one does.
            _log.debug("guest region %r still has views; leaving it mapped", self)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class GuestMemory:
    """Guest RAM: disjoint regions at fixed guest physical addresses, bounds-checked access.

    ``ranges`` are ``(start, size)`` pairs, page aligned and not overlapping. With ``shared``
    each region is a memfd mapped shared (its fd can be passed to another process); otherwise
    an anonymous private mapping, which with ``thp`` is aligned to 2 MiB on the host and
    advised to use transparent huge pages (``MADV_HUGEPAGE``).
    """

    def __init__(
        self, ranges: Sequence[tuple[int, int]], *, shared: bool = False, thp: bool = False
    ) -> None:
        ordered = sorted(ranges)
        if not ordered:
            raise ValueError("guest memory needs at least one range")
        previous_end = 0
        for index, (start, size) in enumerate(ordered):
            if size <= 0:
                raise ValueError(f"guest memory range at {start:#x} has non-positive size {size}")
            if start < 0 or start + size > _ADDRESS_LIMIT:
                raise ValueError(
                    f"guest memory range [{start:#x}, {start + size:#x}) is outside the "
                    "64-bit guest physical address space"
                )
            if start % PAGE_SIZE or size % PAGE_SIZE:
                raise ValueError(
                    f"guest memory range [{start:#x}, {start + size:#x}) is not aligned to "
                    f"the {PAGE_SIZE}-byte page size KVM requires"
                )
            if index and start < previous_end:
                prev_start, prev_size = ordered[index - 1]
                raise ValueError(
                    f"guest memory range [{start:#x}, {start + size:#x}) overlaps "
                    f"[{prev_start:#x}, {prev_start + prev_size:#x})"
                )
            previous_end = start + size
        regions: list[GuestRegion] = []
        try:
            for start, size in ordered:
                regions.append(GuestRegion(start, size, shared=shared, thp=thp))
        except BaseException:
            for region in regions:
                region.close()
            raise
        self.regions: tuple[GuestRegion, ...] = tuple(regions)
        self.shared = shared
        self._starts: tuple[int, ...] = tuple(r.start for r in regions)
        self.total_size: int = sum(r.size for r in regions)

    def __repr__(self) -> str:
        return f"GuestMemory({list(self.regions)!r})"

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _locate(self, addr: int, length: int) -> tuple[GuestRegion, int]:
        """The region holding ``[addr, addr + length)`` and the offset of ``addr`` in it."""
        index = bisect.bisect_right(self._starts, addr) - 1
        if index >= 0 and length >= 0:
            region = self.regions[index]
            offset = addr - region.start
            if offset + length <= region.size:
                return region, offset
        raise GuestMemoryError(addr, length)

    def find_region(self, addr: int) -> GuestRegion | None:
        """The region containing guest address ``addr``, or ``None`` if it is not RAM."""
        index = bisect.bisect_right(self._starts, addr) - 1
        if index >= 0 and addr < self.regions[index].end:
            return self.regions[index]
        return None

    def contains(self, addr: int, length: int) -> bool:
        """Whether ``[addr, addr + length)`` lies within a single region."""
        index = bisect.bisect_right(self._starts, addr) - 1
        if index < 0 or length < 0:
            return False
        region = self.regions[index]
        return addr - region.start + length <= region.size

    def slice(self, addr: int, length: int) -> memoryview:
        """A writable, zero-copy view of ``[addr, addr + length)``, which must lie in one region."""
        index = bisect.bisect_right(self._starts, addr) - 1
        if index >= 0 and length >= 0:
            region = self.regions[index]
            offset = addr - region.start
            if offset + length <= region.size:
                return region._view[offset : offset + length]
        raise GuestMemoryError(addr, length)

    def host_address(self, addr: int, length: int) -> int:
        """The host virtual address of ``[addr, addr + length)``, which must lie in one region.

        For handing guest buffers to the kernel (an iovec of native AIO): unlike a
        :meth:`slice`, the address does not keep the mapping alive, so the caller makes sure
        that the kernel is done with it before the memory is closed.
        """
        region, offset = self._locate(addr, length)
        return region.host_address + offset

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes of guest memory at ``addr``."""
        region, offset = self._locate(addr, length)
        return bytes(region._view[offset : offset + length])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``addr``."""
        length = data.nbytes if isinstance(data, memoryview) else len(data)
        region, offset = self._locate(addr, length)
        region._view[offset : offset + length] = data

    def read_obj(self, addr: int, cls: type[_S]) -> _S:
        """Read a ctypes Structure of type ``cls`` from guest memory at ``addr``."""
        return cls.from_buffer_copy(self.slice(addr, ctypes.sizeof(cls)))

    def write_obj(self, addr: int, obj: ctypes.Structure) -> None:
        """Write the bytes of ctypes Structure ``obj`` to guest memory at ``addr``."""
        self.write(addr, bytes(obj))

    def read_u8(self, addr: int) -> int:
        """Read one byte at ``addr``."""
        region, offset = self._locate(addr, 1)
        return int(_U8.unpack_from(region._view, offset)[0])

    def read_u16(self, addr: int) -> int:
        """Read a little-endian 16-bit value at ``addr``."""
        region, offset = self._locate(addr, 2)
        return int(_U16.unpack_from(region._view, offset)[0])

    def read_u32(self, addr: int) -> int:
        """Read a little-endian 32-bit value at ``addr``."""
        region, offset = self._locate(addr, 4)
        return int(_U32.unpack_from(region._view, offset)[0])

    def read_u64(self, addr: int) -> int:
        """Read a little-endian 64-bit value at ``addr``."""
        region, offset = self._locate(addr, 8)
        return int(_U64.unpack_from(region._view, offset)[0])

    def write_u8(self, addr: int, value: int) -> None:
        """Write one byte at ``addr``; ``value`` must fit (struct.error otherwise)."""
        region, offset = self._locate(addr, 1)
        _U8.pack_into(region._view, offset, value)

    def write_u16(self, addr: int, value: int) -> None:
        """Write a little-endian 16-bit value at ``addr``."""
        region, offset = self._locate(addr, 2)
        _U16.pack_into(region._view, offset, value)

    def write_u32(self, addr: int, value: int) -> None:
        """Write a little-endian 32-bit value at ``addr``."""
        region, offset = self._locate(addr, 4)
        _U32.pack_into(region._view, offset, value)

    def write_u64(self, addr: int, value: int) -> None:
        """Write a little-endian 64-bit value at ``addr``."""
        region, offset = self._locate(addr, 8)
        _U64.pack_into(region._view, offset, value)

    def close(self) -> None:
        """Unmap every region (and close memfds); the memory must not be used afterwards."""
        for region in self.regions:
            region.close()
