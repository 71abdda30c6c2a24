"""Place an initramfs in guest RAM, page aligned and as high as the kernel allows.

``Documentation/arch/x86/boot.rst`` ("Details of Header Fields", ``initrd_addr_max``; "Sample
Boot Configuration") asks the loader to put the initial ramdisk as high as possible below
``initrd_addr_max``; nubis also keeps it below the 32-bit MMIO hole and above the kernel's
footprint, so neither the kernel's decompression nor its early allocations run into it. The
placement is handed to the kernel through ``ramdisk_image``/``ramdisk_size`` (zero page) or
as PVH module 0.
"""

from __future__ import annotations

from typing import Final

from nubis._frozen import Frozen
from nubis.arch.x86_64 import layout
from nubis.loader.errors import LoaderError
from nubis.loader.kernelfile import KernelFile, file_size, read_into_guest
from nubis.memory import PAGE_SIZE, GuestMemory

__all__ = ["DEFAULT_INITRD_ADDR_MAX", "InitramfsLoadResult", "load_initramfs"]

DEFAULT_INITRD_ADDR_MAX: Final = layout.MEM_32BIT_RESERVED_START - 1
"""The highest initramfs byte address when the kernel states no limit (ELF/PVH boot)."""


class InitramfsLoadResult(Frozen):
    """Where the initramfs landed."""

    __slots__ = ("addr", "size")

    addr: int
    size: int

    def __init__(self, addr: int, size: int) -> None:
        object.__setattr__(self, "addr", addr)
        object.__setattr__(self, "size", size)


def load_initramfs(
    memory: GuestMemory,
    initramfs: KernelFile,
    *,
    kernel_end: int,
    initrd_addr_max: int = DEFAULT_INITRD_ADDR_MAX,
) -> InitramfsLoadResult:
    """Copy ``initramfs`` to the highest page-aligned spot in low RAM that the kernel allows.

    ``initrd_addr_max`` is the highest address the initramfs may occupy (the setup header's
    field of that name for a bzImage); ``kernel_end`` the first address past the kernel's
    footprint. Raises `LoaderError` if the file is empty or does not fit in between.
    """
    size = file_size(initramfs)
    if size == 0:
        raise LoaderError("initramfs file is empty")
    low_ram = memory.find_region(layout.HIGH_RAM_START)
    if low_ram is None:
        raise LoaderError("guest has no RAM at 1 MiB to hold the kernel and initramfs")
    limit = min(initrd_addr_max + 1, low_ram.end, layout.MEM_32BIT_RESERVED_START)
    addr = (limit - size) & ~(PAGE_SIZE - 1)
    lowest = (kernel_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if addr < lowest:
        raise LoaderError(
            f"initramfs of {size} bytes does not fit between the kernel's end at "
            f"{kernel_end:#x} and the initramfs limit {limit:#x}"
        )
    read_into_guest(memory, initramfs, 0, addr, size, "initramfs")
    return InitramfsLoadResult(addr, size)
