"""Kernel loaders (ELF/PVH, bzImage) and boot configurators (zero page, PVH start info), command line.

The linux-loader counterpart. Loaders put a kernel (`load_elf`, `load_bzimage`) and an
initramfs (`load_initramfs`) into guest memory and say where they landed; configurators write
what the kernel reads at entry (`configure_boot_params` for the 64-bit boot protocol,
`configure_pvh` for PVH) from a memory map (`standard_memory_map`) and a `Cmdline`.
Every problem with user-supplied input is a `LoaderError`.

The names below are re-exported lazily, so booting an ELF kernel never imports the bzImage
loader and the zero page builder.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from nubis.loader.bootparams import build_boot_params, configure_boot_params
    from nubis.loader.bzimage import BzImageLoadResult, load_bzimage
    from nubis.loader.cmdline import Cmdline, load_cmdline
    from nubis.loader.elf import ElfLoadResult, load_elf
    from nubis.loader.errors import LoaderError
    from nubis.loader.initramfs import InitramfsLoadResult, load_initramfs
    from nubis.loader.memmap import (
        E820_ACPI,
        E820_RAM,
        E820_RESERVED,
        MemoryMapEntry,
        standard_memory_map,
    )
    from nubis.loader.pvh import configure_pvh

_EXPORTS = {
    "BzImageLoadResult": "bzimage",
    "Cmdline": "cmdline",
    "E820_ACPI": "memmap",
    "E820_RAM": "memmap",
    "E820_RESERVED": "memmap",
    "ElfLoadResult": "elf",
    "InitramfsLoadResult": "initramfs",
    "LoaderError": "errors",
    "MemoryMapEntry": "memmap",
    "build_boot_params": "bootparams",
    "configure_boot_params": "bootparams",
    "configure_pvh": "pvh",
    "load_bzimage": "bzimage",
    "load_cmdline": "cmdline",
    "load_elf": "elf",
    "load_initramfs": "initramfs",
    "standard_memory_map": "memmap",
}

__all__ = [
    "E820_ACPI",
    "E820_RAM",
    "E820_RESERVED",
    "BzImageLoadResult",
    "Cmdline",
    "ElfLoadResult",
    "InitramfsLoadResult",
    "LoaderError",
    "MemoryMapEntry",
    "build_boot_params",
    "configure_boot_params",
    "configure_pvh",
    "load_bzimage",
    "load_cmdline",
    "load_elf",
    "load_initramfs",
    "standard_memory_map",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(__import__(f"{__name__}.{module}", fromlist=[name]), name)
