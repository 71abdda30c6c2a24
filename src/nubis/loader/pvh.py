"""Boot configurator for the PVH boot protocol: build and write ``hvm_start_info``.

A kernel entered at its PVH entry point (32-bit protected mode, paging off) finds ``ebx``
pointing at ``struct hvm_start_info``, which gives the command line, the RSDP, a list of
modules (the initramfs is module 0) and, from version 1 on, the memory map. Layouts and
constants follow ``xen/include/public/arch-x86/hvm/start_info.h``; nubis writes the start info
at ``layout.PVH_INFO_START``, the memory map at ``layout.PVH_MEMMAP_START`` and the module
list right after the largest memory map.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from nubis.arch.x86_64 import layout
from nubis.loader.errors import LoaderError
from nubis.memory import GuestMemory, GuestMemoryError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from nubis.loader.initramfs import InitramfsLoadResult

__all__ = [
    "HVM_START_INFO_VERSION",
    "HVM_START_MAGIC_VALUE",
    "PVH_MODLIST_START",
    "HvmMemmapTableEntry",
    "HvmModlistEntry",
    "HvmStartInfo",
    "configure_pvh",
]

HVM_START_MAGIC_VALUE: Final = 0x336EC578
HVM_START_INFO_VERSION: Final = 1  # version 1 adds memmap_paddr and memmap_entries


class HvmStartInfo(ctypes.LittleEndianStructure):
    """``struct hvm_start_info``, 56 bytes (start_info.h, version 1)."""

    _pack_ = 1
    _fields_ = (
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("nr_modules", ctypes.c_uint32),
        ("modlist_paddr", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("rsdp_paddr", ctypes.c_uint64),
        ("memmap_paddr", ctypes.c_uint64),
        ("memmap_entries", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


class HvmModlistEntry(ctypes.LittleEndianStructure):
    """``struct hvm_modlist_entry``, 32 bytes (start_info.h)."""

    _pack_ = 1
    _fields_ = (
        ("paddr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    )


class HvmMemmapTableEntry(ctypes.LittleEndianStructure):
    """``struct hvm_memmap_table_entry``, 24 bytes (start_info.h); types are E820 numbers."""

    _pack_ = 1
    _fields_ = (
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


PVH_MODLIST_START: Final = layout.PVH_MEMMAP_START + layout.PVH_MEMMAP_MAX_ENTRIES * ctypes.sizeof(
    HvmMemmapTableEntry
)
"""Where nubis puts the module list: right after room for the largest memory map."""


def configure_pvh(
    memory: GuestMemory,
    *,
    memory_map: Sequence[tuple[int, int, int]],
    cmdline_addr: int = layout.CMDLINE_START,
    initramfs: InitramfsLoadResult | None = None,
    rsdp_addr: int | None = None,
) -> HvmStartInfo:
    """Write the start info, memory map and module list for a PVH entry; return the start info.

    ``memory_map`` holds ``(addr, size, type)`` entries with E820 type numbers. The vCPU
    enters the kernel with ``ebx`` holding ``layout.PVH_INFO_START``.
    """
    if len(memory_map) > layout.PVH_MEMMAP_MAX_ENTRIES:
        raise LoaderError(
            f"memory map has {len(memory_map)} entries, more than the "
            f"{layout.PVH_MEMMAP_MAX_ENTRIES} nubis has room for"
        )
    table = (HvmMemmapTableEntry * len(memory_map))()
    for entry, (addr, size, kind) in zip(table, memory_map, strict=True):
        entry.addr, entry.size, entry.type = addr, size, kind
    info = HvmStartInfo(
        magic=HVM_START_MAGIC_VALUE,
        version=HVM_START_INFO_VERSION,
        cmdline_paddr=cmdline_addr,
        rsdp_paddr=rsdp_addr or 0,
        memmap_paddr=layout.PVH_MEMMAP_START,
        memmap_entries=len(memory_map),
    )
    try:
        if initramfs is not None:
            module = HvmModlistEntry(paddr=initramfs.addr, size=initramfs.size)
            memory.write_obj(PVH_MODLIST_START, module)
            info.nr_modules = 1
            info.modlist_paddr = PVH_MODLIST_START
        memory.write(layout.PVH_MEMMAP_START, bytes(table))
        memory.write_obj(layout.PVH_INFO_START, info)
    except GuestMemoryError as exc:
        raise LoaderError(f"PVH start info does not fit in guest RAM: {exc}") from None
    return info
