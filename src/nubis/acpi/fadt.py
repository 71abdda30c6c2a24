"""The Fixed ACPI Description Table, revision 6.4, for a hardware-reduced ACPI platform.

ACPI 6.4 section 5.2.9 ("Fixed ACPI Description Table (FADT)", table 5.9). nubis has no PM1
event/control blocks, PM timer or GPE blocks: it sets ``HW_REDUCED_ACPI`` (section 4.1) and
describes sleep and reset through registers only, as Generic Address Structures (section
5.2.3.2) in system I/O space: ``SLEEP_CONTROL_REG``/``SLEEP_STATUS_REG`` (section 4.8.3.7) at
``layout.PORT_ACPI_SLEEP_CONTROL``/``PORT_ACPI_SLEEP_STATUS`` and ``RESET_REG`` (section 4.8.3.6)
at ``layout.PORT_ACPI_RESET``. ``IAPC_BOOT_ARCH`` (table 5.11) says an 8042 is present and
VGA is not.
"""

from __future__ import annotations

import ctypes

from nubis.acpi.sdt import SdtHeader, finish_table, new_header
from nubis.arch.x86_64 import layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "FADT_MINOR_REVISION",
    "FADT_REVISION",
    "FLAG_HW_REDUCED_ACPI",
    "FLAG_RESET_REG_SUP",
    "GAS_SYSTEM_IO",
    "HYPERVISOR_VENDOR_ID",
    "IAPC_BOOT_ARCH_8042",
    "IAPC_BOOT_ARCH_VGA_NOT_PRESENT",
    "Fadt",
    "GenericAddress",
    "build_fadt",
]

FADT_REVISION: Final = 6
FADT_MINOR_REVISION: Final = 4
FLAG_RESET_REG_SUP: Final = 1 << 10
FLAG_HW_REDUCED_ACPI: Final = 1 << 20
IAPC_BOOT_ARCH_8042: Final = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT: Final = 1 << 2
GAS_SYSTEM_IO: Final = 1
GAS_ACCESS_BYTE: Final = 1
HYPERVISOR_VENDOR_ID: Final = b"NUBISVMM"
"""FADT "Hypervisor Vendor Identity", 8 bytes, all part of the identity (table 5.9)."""
PM_PROFILE_UNSPECIFIED: Final = 0


class GenericAddress(ctypes.LittleEndianStructure):
    """Generic Address Structure, 12 bytes (ACPI 6.4 section 5.2.3.2, table 5.1)."""

    _pack_ = 1
    _fields_ = (
        ("address_space_id", ctypes.c_uint8),
        ("register_bit_width", ctypes.c_uint8),
        ("register_bit_offset", ctypes.c_uint8),
        ("access_size", ctypes.c_uint8),
        ("address", ctypes.c_uint64),
    )


class Fadt(ctypes.LittleEndianStructure):
    """The FADT, 276 bytes (ACPI 6.4 table 5.9); offsets in comments."""

    _pack_ = 1
    _fields_ = (
        ("header", SdtHeader),  # 0
        ("firmware_ctrl", ctypes.c_uint32),  # 36
        ("dsdt", ctypes.c_uint32),  # 40
        ("reserved0", ctypes.c_uint8),  # 44
        ("preferred_pm_profile", ctypes.c_uint8),  # 45
        ("sci_int", ctypes.c_uint16),  # 46
        ("smi_cmd", ctypes.c_uint32),  # 48
        ("acpi_enable", ctypes.c_uint8),  # 52
        ("acpi_disable", ctypes.c_uint8),  # 53
        ("s4bios_req", ctypes.c_uint8),  # 54
        ("pstate_cnt", ctypes.c_uint8),  # 55
        ("pm1a_evt_blk", ctypes.c_uint32),  # 56
        ("pm1b_evt_blk", ctypes.c_uint32),  # 60
        ("pm1a_cnt_blk", ctypes.c_uint32),  # 64
        ("pm1b_cnt_blk", ctypes.c_uint32),  # 68
        ("pm2_cnt_blk", ctypes.c_uint32),  # 72
        ("pm_tmr_blk", ctypes.c_uint32),  # 76
        ("gpe0_blk", ctypes.c_uint32),  # 80
        ("gpe1_blk", ctypes.c_uint32),  # 84
        ("pm1_evt_len", ctypes.c_uint8),  # 88
        ("pm1_cnt_len", ctypes.c_uint8),  # 89
        ("pm2_cnt_len", ctypes.c_uint8),  # 90
        ("pm_tmr_len", ctypes.c_uint8),  # 91
        ("gpe0_blk_len", ctypes.c_uint8),  # 92
        ("gpe1_blk_len", ctypes.c_uint8),  # 93
        ("gpe1_base", ctypes.c_uint8),  # 94
        ("cst_cnt", ctypes.c_uint8),  # 95
        ("p_lvl2_lat", ctypes.c_uint16),  # 96
        ("p_lvl3_lat", ctypes.c_uint16),  # 98
        ("flush_size", ctypes.c_uint16),  # 100
        ("flush_stride", ctypes.c_uint16),  # 102
        ("duty_offset", ctypes.c_uint8),  # 104
        ("duty_width", ctypes.c_uint8),  # 105
        ("day_alrm", ctypes.c_uint8),  # 106
        ("mon_alrm", ctypes.c_uint8),  # 107
        ("century", ctypes.c_uint8),  # 108
        ("iapc_boot_arch", ctypes.c_uint16),  # 109
        ("reserved1", ctypes.c_uint8),  # 111
        ("flags", ctypes.c_uint32),  # 112
        ("reset_reg", GenericAddress),  # 116
        ("reset_value", ctypes.c_uint8),  # 128
        ("arm_boot_arch", ctypes.c_uint16),  # 129
        ("fadt_minor_version", ctypes.c_uint8),  # 131
        ("x_firmware_ctrl", ctypes.c_uint64),  # 132
        ("x_dsdt", ctypes.c_uint64),  # 140
        ("x_pm1a_evt_blk", GenericAddress),  # 148
        ("x_pm1b_evt_blk", GenericAddress),  # 160
        ("x_pm1a_cnt_blk", GenericAddress),  # 172
        ("x_pm1b_cnt_blk", GenericAddress),  # 184
        ("x_pm2_cnt_blk", GenericAddress),  # 196
        ("x_pm_tmr_blk", GenericAddress),  # 208
        ("x_gpe0_blk", GenericAddress),  # 220
        ("x_gpe1_blk", GenericAddress),  # 232
        ("sleep_control_reg", GenericAddress),  # 244
        ("sleep_status_reg", GenericAddress),  # 256
        ("hypervisor_vendor_identity", ctypes.c_char * 8),  # 268
    )


def _io_byte_register(port: int) -> GenericAddress:
    return GenericAddress(
        address_space_id=GAS_SYSTEM_IO,
        register_bit_width=8,
        register_bit_offset=0,
        access_size=GAS_ACCESS_BYTE,
        address=port,
    )


def build_fadt(dsdt_address: int) -> bytes:
    """The FADT of a nubis guest whose DSDT is at ``dsdt_address`` (given as X_DSDT only)."""
    fadt = Fadt(
        header=new_header(b"FACP", FADT_REVISION),
        preferred_pm_profile=PM_PROFILE_UNSPECIFIED,
        sci_int=layout.IRQ_ACPI_SCI,
        iapc_boot_arch=IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT,
        flags=FLAG_HW_REDUCED_ACPI | FLAG_RESET_REG_SUP,
        reset_reg=_io_byte_register(layout.PORT_ACPI_RESET),
        reset_value=layout.ACPI_RESET_VALUE,
        fadt_minor_version=FADT_MINOR_REVISION,
        x_dsdt=dsdt_address,
        sleep_control_reg=_io_byte_register(layout.PORT_ACPI_SLEEP_CONTROL),
        sleep_status_reg=_io_byte_register(layout.PORT_ACPI_SLEEP_STATUS),
        hypervisor_vendor_identity=HYPERVISOR_VENDOR_ID,
    )
    return finish_table(bytes(fadt))
