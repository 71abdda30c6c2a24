"""Binary layouts of the Linux x86 boot protocol: the setup header and the zero page.

Declared once here and shared by the bzImage loader (which reads the setup header out of the
kernel file) and the zero-page configurator (which writes it back with the loader's fields
filled in). Offsets follow ``Documentation/arch/x86/boot.rst`` ("The real-mode kernel header")
and ``Documentation/arch/x86/zero-page.rst``: the setup header sits at offset 0x1f1 of both the
bzImage file and the 4096-byte ``struct boot_params``.
"""

from __future__ import annotations

import ctypes
from typing import Final

__all__ = [
    "BOOT_FLAG",
    "BOOT_PARAMS_SIZE",
    "E820_MAX_ENTRIES_ZEROPAGE",
    "HDRS_MAGIC",
    "LOADER_TYPE_UNDEFINED",
    "LOADFLAG_CAN_USE_HEAP",
    "LOADFLAG_KEEP_SEGMENTS",
    "LOADFLAG_LOADED_HIGH",
    "SETUP_HEADER_OFFSET",
    "XLF_CAN_BE_LOADED_ABOVE_4G",
    "XLF_KERNEL_64",
    "BootE820Entry",
    "BootParams",
    "SetupHeader",
]

SETUP_HEADER_OFFSET: Final = 0x1F1
"""Offset of the setup header in a bzImage file and in ``struct boot_params`` (boot.rst)."""
BOOT_PARAMS_SIZE: Final = 4096
HDRS_MAGIC: Final = 0x53726448  # b"HdrS" read as a little-endian u32
BOOT_FLAG: Final = 0xAA55
LOADER_TYPE_UNDEFINED: Final = 0xFF  # boot.rst: "0xFF: undefined" boot loader ID
E820_MAX_ENTRIES_ZEROPAGE: Final = 128

# loadflags (boot.rst, field "loadflags").
LOADFLAG_LOADED_HIGH: Final = 0x01
LOADFLAG_KEEP_SEGMENTS: Final = 0x40
LOADFLAG_CAN_USE_HEAP: Final = 0x80

# xloadflags (boot.rst, field "xloadflags").
XLF_KERNEL_64: Final = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G: Final = 0x02


class SetupHeader(ctypes.LittleEndianStructure):
    """``struct setup_header``: the real-mode kernel header, boot protocol 2.15 (boot.rst).

    Offsets in the comments are relative to the start of the zero page / bzImage file.
    """

    _pack_ = 1
    _fields_ = (
        ("setup_sects", ctypes.c_uint8),  # 0x1f1
        ("root_flags", ctypes.c_uint16),  # 0x1f2
        ("syssize", ctypes.c_uint32),  # 0x1f4
        ("ram_size", ctypes.c_uint16),  # 0x1f8
        ("vid_mode", ctypes.c_uint16),  # 0x1fa
        ("root_dev", ctypes.c_uint16),  # 0x1fc
        ("boot_flag", ctypes.c_uint16),  # 0x1fe
        ("jump", ctypes.c_uint16),  # 0x200
        ("header", ctypes.c_uint32),  # 0x202
        ("version", ctypes.c_uint16),  # 0x206
        ("realmode_swtch", ctypes.c_uint32),  # 0x208
        ("start_sys_seg", ctypes.c_uint16),  # 0x20c
        ("kernel_version", ctypes.c_uint16),  # 0x20e
        ("type_of_loader", ctypes.c_uint8),  # 0x210
        ("loadflags", ctypes.c_uint8),  # 0x211
        ("setup_move_size", ctypes.c_uint16),  # 0x212
        ("code32_start", ctypes.c_uint32),  # 0x214
        ("ramdisk_image", ctypes.c_uint32),  # 0x218
        ("ramdisk_size", ctypes.c_uint32),  # 0x21c
        ("bootsect_kludge", ctypes.c_uint32),  # 0x220
        ("heap_end_ptr", ctypes.c_uint16),  # 0x224
        ("ext_loader_ver", ctypes.c_uint8),  # 0x226
        ("ext_loader_type", ctypes.c_uint8),  # 0x227
        ("cmd_line_ptr", ctypes.c_uint32),  # 0x228
        ("initrd_addr_max", ctypes.c_uint32),  # 0x22c
        ("kernel_alignment", ctypes.c_uint32),  # 0x230
        ("relocatable_kernel", ctypes.c_uint8),  # 0x234
        ("min_alignment", ctypes.c_uint8),  # 0x235
        ("xloadflags", ctypes.c_uint16),  # 0x236
        ("cmdline_size", ctypes.c_uint32),  # 0x238
        ("hardware_subarch", ctypes.c_uint32),  # 0x23c
        ("hardware_subarch_data", ctypes.c_uint64),  # 0x240
        ("payload_offset", ctypes.c_uint32),  # 0x248
        ("payload_length", ctypes.c_uint32),  # 0x24c
        ("setup_data", ctypes.c_uint64),  # 0x250
        ("pref_address", ctypes.c_uint64),  # 0x258
        ("init_size", ctypes.c_uint32),  # 0x260
        ("handover_offset", ctypes.c_uint32),  # 0x264
        ("kernel_info_offset", ctypes.c_uint32),  # 0x268
    )


class BootE820Entry(ctypes.LittleEndianStructure):
    """``struct boot_e820_entry``: one 20-byte memory map entry of the zero page (zero-page.rst)."""

    _pack_ = 1
    _fields_ = (
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    )


class BootParams(ctypes.LittleEndianStructure):
    """``struct boot_params``, the 4096-byte zero page (zero-page.rst).

    Only the fields a nubis guest needs are named; the rest are padding kept at zero.
    """

    _pack_ = 1
    _fields_ = (
        ("_pad_screen_apm_tboot_ist", ctypes.c_uint8 * 0x070),  # 0x000
        ("acpi_rsdp_addr", ctypes.c_uint64),  # 0x070
        ("_pad_078", ctypes.c_uint8 * (0x0C0 - 0x078)),
        ("ext_ramdisk_image", ctypes.c_uint32),  # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),  # 0x0c8
        ("_pad_0cc", ctypes.c_uint8 * (0x1E8 - 0x0CC)),
        ("e820_entries", ctypes.c_uint8),  # 0x1e8
        ("_pad_1e9", ctypes.c_uint8 * (SETUP_HEADER_OFFSET - 0x1E9)),
        ("hdr", SetupHeader),  # 0x1f1
        ("_pad_26c", ctypes.c_uint8 * (0x2D0 - 0x26C)),
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad_cd0", ctypes.c_uint8 * (BOOT_PARAMS_SIZE - 0xCD0)),
    )
