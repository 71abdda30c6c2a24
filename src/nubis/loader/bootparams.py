"""Boot configurator for the Linux 64-bit boot protocol: build and write the zero page.

The zero page (``struct boot_params``, ``Documentation/arch/x86/zero-page.rst``) tells a kernel
entered at its 64-bit entry point where its command line, initramfs, memory map and ACPI RSDP
are (``Documentation/arch/x86/boot.rst``, "64-bit Boot Protocol"). For a bzImage the setup
header read from the file is copied in; for an ELF ``vmlinux`` entered at ``e_entry`` nubis
synthesises one, since the kernel still checks the header magic and reads the loader fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from nubis.arch.x86_64 import layout
from nubis.loader.bootproto import (
    BOOT_FLAG,
    E820_MAX_ENTRIES_ZEROPAGE,
    HDRS_MAGIC,
    LOADER_TYPE_UNDEFINED,
    LOADFLAG_LOADED_HIGH,
    BootParams,
    SetupHeader,
)
from nubis.loader.cmdline import Cmdline
from nubis.loader.errors import LoaderError
from nubis.loader.initramfs import InitramfsLoadResult
from nubis.memory import GuestMemory, GuestMemoryError

__all__ = [
    "SYNTHETIC_BOOT_PROTOCOL",
    "build_boot_params",
    "configure_boot_params",
    "synthesize_setup_header",
]

SYNTHETIC_BOOT_PROTOCOL: Final = 0x020F
"""The boot protocol version (2.15) a synthesised setup header claims."""
_SYNTHETIC_KERNEL_ALIGNMENT: Final = 2 * layout.MiB  # x86_64 Linux's default physical alignment
_U32_MASK: Final = 0xFFFF_FFFF


def synthesize_setup_header(cmdline_size: int) -> SetupHeader:
    """A setup header for a kernel entered directly at its 64-bit entry (an ELF vmlinux)."""
    header = SetupHeader()
    header.boot_flag = BOOT_FLAG
    header.header = HDRS_MAGIC
    header.version = SYNTHETIC_BOOT_PROTOCOL
    header.loadflags = LOADFLAG_LOADED_HIGH
    header.kernel_alignment = _SYNTHETIC_KERNEL_ALIGNMENT
    header.cmdline_size = cmdline_size
    return header


def build_boot_params(
    *,
    memory_map: Sequence[tuple[int, int, int]],
    cmdline: Cmdline,
    cmdline_addr: int = layout.CMDLINE_START,
    setup_header: SetupHeader | None = None,
    initramfs: InitramfsLoadResult | None = None,
    rsdp_addr: int | None = None,
) -> BootParams:
    """The zero page for a kernel with this memory map, command line, initramfs and RSDP.

    ``setup_header`` is the header a bzImage loader returned, or ``None`` to synthesise one.
    ``memory_map`` holds ``(addr, size, type)`` entries with E820 type numbers.
    """
    if len(memory_map) > E820_MAX_ENTRIES_ZEROPAGE:
        raise LoaderError(
            f"memory map has {len(memory_map)} entries, more than the zero page's "
            f"{E820_MAX_ENTRIES_ZEROPAGE}"
        )
    params = BootParams()
    if setup_header is None:
        header = synthesize_setup_header(len(cmdline))
    else:
        header = SetupHeader.from_buffer_copy(setup_header)
        if len(cmdline) > header.cmdline_size:
            raise LoaderError(
                f"kernel command line of {len(cmdline)} bytes is longer than the "
                f"{header.cmdline_size} bytes this kernel accepts"
            )
    header.type_of_loader = LOADER_TYPE_UNDEFINED
    header.cmd_line_ptr = cmdline_addr & _U32_MASK
    params.ext_cmd_line_ptr = cmdline_addr >> 32
    if initramfs is not None:
        header.ramdisk_image = initramfs.addr & _U32_MASK
        header.ramdisk_size = initramfs.size & _U32_MASK
        params.ext_ramdisk_image = initramfs.addr >> 32
        params.ext_ramdisk_size = initramfs.size >> 32
    params.hdr = header
    if rsdp_addr is not None:
        params.acpi_rsdp_addr = rsdp_addr
    for index, (addr, size, kind) in enumerate(memory_map):
        entry = params.e820_table[index]
        entry.addr, entry.size, entry.type = addr, size, kind
    params.e820_entries = len(memory_map)
    return params


def configure_boot_params(
    memory: GuestMemory,
    *,
    memory_map: Sequence[tuple[int, int, int]],
    cmdline: Cmdline,
    cmdline_addr: int = layout.CMDLINE_START,
    setup_header: SetupHeader | None = None,
    initramfs: InitramfsLoadResult | None = None,
    rsdp_addr: int | None = None,
    zero_page_addr: int = layout.ZERO_PAGE_START,
) -> BootParams:
    """Build the zero page (see `build_boot_params`), write it at ``zero_page_addr``, return it.

    The vCPU enters the kernel with ``rsi`` pointing at ``zero_page_addr``.
    """
    params = build_boot_params(
        memory_map=memory_map,
        cmdline=cmdline,
        cmdline_addr=cmdline_addr,
        setup_header=setup_header,
        initramfs=initramfs,
        rsdp_addr=rsdp_addr,
    )
    try:
        memory.write_obj(zero_page_addr, params)
    except GuestMemoryError as exc:
        raise LoaderError(f"zero page does not fit in guest RAM: {exc}") from None
    return params
