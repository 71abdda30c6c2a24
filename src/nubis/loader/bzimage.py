"""Load a Linux bzImage for the 64-bit boot protocol.

A bzImage is the real-mode boot sector and setup code (``setup_sects`` 512-byte sectors after
the first one) followed by the protected-mode kernel. nubis skips the real-mode part entirely:
it checks the setup header at offset 0x1f1, copies the protected-mode kernel to 1 MiB
(``layout.HIGH_RAM_START``) and enters it in 64-bit mode at load address + 0x200, as
``Documentation/arch/x86/boot.rst`` ("64-bit Boot Protocol", "Details of Header Fields")
describes. The setup header is returned so the zero-page configurator can hand it back.
"""

from __future__ import annotations

import ctypes
from typing import Final

from nubis._frozen import Frozen
from nubis.arch.x86_64 import layout
from nubis.loader.bootproto import (
    BOOT_FLAG,
    HDRS_MAGIC,
    LOADFLAG_LOADED_HIGH,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    SetupHeader,
)
from nubis.loader.errors import LoaderError
from nubis.loader.kernelfile import KernelFile, file_size, read_at, read_into_guest
from nubis.memory import GuestMemory

__all__ = ["MIN_BOOT_PROTOCOL", "BzImageLoadResult", "load_bzimage", "parse_setup_header"]

MIN_BOOT_PROTOCOL: Final = 0x020C
"""2.12: the first protocol with ``xloadflags``, which says whether a 64-bit entry exists."""
SECTOR_SIZE: Final = 512
DEFAULT_SETUP_SECTS: Final = 4  # boot.rst: "If this field is 0, the real value is 4."
ENTRY_64_OFFSET: Final = 0x200  # boot.rst: the 64-bit entry is at the load address + 0x200


class BzImageLoadResult(Frozen):
    """Where a bzImage's protected-mode kernel landed, and its setup header."""

    __slots__ = ("entry_64", "header", "kernel_end", "load_addr")

    header: SetupHeader
    """The setup header as read from the file, for the zero page."""
    load_addr: int
    """Guest physical address of the protected-mode kernel."""
    entry_64: int
    """The 64-bit entry point: ``load_addr + 0x200``."""
    kernel_end: int
    """First address past all memory the kernel may use before it reads the memory map."""

    def __init__(self, header: SetupHeader, load_addr: int, entry_64: int, kernel_end: int) -> None:
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "load_addr", load_addr)
        object.__setattr__(self, "entry_64", entry_64)
        object.__setattr__(self, "kernel_end", kernel_end)


def _setup_sects(header: SetupHeader) -> int:
    return int(header.setup_sects) or DEFAULT_SETUP_SECTS


def parse_setup_header(data: bytes) -> SetupHeader:
    """Parse and check the setup header of a bzImage whose first bytes are ``data``.

    Raises `LoaderError` unless the image speaks boot protocol 2.12 or later, loads high
    and has a 64-bit entry point.
    """
    end = SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader)
    if len(data) < end:
        raise LoaderError("kernel file is too short to hold a bzImage setup header")
    header = SetupHeader.from_buffer_copy(data, SETUP_HEADER_OFFSET)
    if header.header != HDRS_MAGIC:
        raise LoaderError("kernel file is not a bzImage (no 'HdrS' magic at offset 0x202)")
    if header.boot_flag != BOOT_FLAG:
        raise LoaderError(f"bzImage boot_flag is {header.boot_flag:#x}, expected 0xaa55")
    if header.version < MIN_BOOT_PROTOCOL:
        raise LoaderError(
            f"bzImage speaks boot protocol {header.version >> 8}.{header.version & 0xFF}, "
            "nubis needs 2.12 or later"
        )
    if not header.loadflags & LOADFLAG_LOADED_HIGH:
        raise LoaderError("bzImage is not a 'loaded high' kernel (LOADED_HIGH is clear)")
    if not header.xloadflags & XLF_KERNEL_64:
        raise LoaderError("bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear)")
    alignment = int(header.kernel_alignment)
    if header.relocatable_kernel and (alignment == 0 or alignment & (alignment - 1)):
        raise LoaderError(f"bzImage kernel_alignment {alignment:#x} is not a power of two")
    if header.init_size == 0:
        raise LoaderError("bzImage init_size is 0")
    return header


def _runtime_start(header: SetupHeader, load_addr: int) -> int:
    """Where the kernel decompresses to and runs from, as boot.rst describes for init_size.

    A relocatable kernel runs at its load address rounded up to ``kernel_alignment`` but not
    below ``pref_address``; a fixed one runs at ``pref_address``.
    """
    pref = int(header.pref_address)
    if not header.relocatable_kernel:
        return pref
    alignment = int(header.kernel_alignment)
    aligned = (load_addr + alignment - 1) & ~(alignment - 1)
    return max(aligned, pref)


def load_bzimage(memory: GuestMemory, kernel: KernelFile) -> BzImageLoadResult:
    """Load the protected-mode part of the bzImage ``kernel`` at 1 MiB in ``memory``.

    Raises `LoaderError` for a file that is not a usable bzImage or that needs more memory
    than the guest has below the 32-bit hole; nothing is written in that case.
    """
    size = file_size(kernel)
    probe = min(size, SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader))
    header = parse_setup_header(read_at(kernel, 0, probe, "bzImage setup header"))
    setup_size = (_setup_sects(header) + 1) * SECTOR_SIZE
    if size <= setup_size:
        raise LoaderError(
            f"bzImage has {size} bytes, no protected-mode kernel after its {setup_size} bytes "
            "of setup code"
        )
    payload_size = size - setup_size
    load_addr = layout.HIGH_RAM_START
    runtime_start = _runtime_start(header, load_addr)
    kernel_end = max(load_addr + payload_size, runtime_start + int(header.init_size))
    if not memory.contains(load_addr, kernel_end - load_addr):
        raise LoaderError(
            f"bzImage needs guest RAM up to {kernel_end:#x} to decompress and start, "
            "more than the guest has below the 32-bit hole"
        )
    read_into_guest(memory, kernel, setup_size, load_addr, payload_size, "bzImage kernel")
    return BzImageLoadResult(header, load_addr, load_addr + ENTRY_64_OFFSET, kernel_end)
