"""The Multiple APIC Description Table: local APICs, the IOAPIC, overrides and NMI wiring.

ACPI 6.4 section 5.2.12 ("Multiple APIC Description Table (MADT)"). A nubis guest has one
local APIC per vCPU (APIC id = vCPU index, section 5.2.12.2), nubis's IOAPIC
(``nubis.devices.ioapic``) at ``layout.IOAPIC_START`` with GSI base 0 (5.2.12.3), the ISA timer
IRQ 0 routed to GSI 2 (Interrupt Source Override, 5.2.12.5) and NMI on LINT1 of every local APIC
(5.2.12.7). ``PCAT_COMPAT`` is clear: the VM has no 8259 PICs (KVM's split irqchip).
"""

from __future__ import annotations

import ctypes

from nubis.acpi.errors import AcpiError
from nubis.acpi.sdt import SdtHeader, finish_table, new_header
from nubis.arch.x86_64 import layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "LAPIC_ENABLED",
    "MADT_REVISION",
    "MAX_VCPUS",
    "PCAT_COMPAT",
    "MadtFixed",
    "MadtInterruptSourceOverride",
    "MadtIoApic",
    "MadtLocalApic",
    "MadtLocalApicNmi",
    "build_madt",
]

MADT_REVISION: Final = 5
PCAT_COMPAT: Final = 1
LAPIC_ENABLED: Final = 1
ALL_PROCESSORS: Final = 0xFF
MAX_VCPUS: Final = 255  # xAPIC ids 0-254; 0xff means "all processors"
TYPE_LOCAL_APIC: Final = 0
TYPE_IO_APIC: Final = 1
TYPE_INTERRUPT_SOURCE_OVERRIDE: Final = 2
TYPE_LOCAL_APIC_NMI: Final = 4
IOAPIC_ID: Final = 0
ISA_BUS: Final = 0
MPS_INTI_CONFORMS: Final = 0  # polarity and trigger mode conform to the bus


class MadtFixed(ctypes.LittleEndianStructure):
    """The MADT's fixed part: header, local APIC address, flags (table 5.19)."""

    _pack_ = 1
    _fields_ = (
        ("header", SdtHeader),
        ("local_apic_address", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class MadtLocalApic(ctypes.LittleEndianStructure):
    """Processor Local APIC structure, type 0, 8 bytes (table 5.22)."""

    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("processor_uid", ctypes.c_uint8),
        ("apic_id", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
    )


class MadtIoApic(ctypes.LittleEndianStructure):
    """I/O APIC structure, type 1, 12 bytes (table 5.24)."""

    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("io_apic_id", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
        ("io_apic_address", ctypes.c_uint32),
        ("gsi_base", ctypes.c_uint32),
    )


class MadtInterruptSourceOverride(ctypes.LittleEndianStructure):
    """Interrupt Source Override structure, type 2, 10 bytes (table 5.25)."""

    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("bus", ctypes.c_uint8),
        ("source", ctypes.c_uint8),
        ("gsi", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
    )


class MadtLocalApicNmi(ctypes.LittleEndianStructure):
    """Local APIC NMI structure, type 4, 6 bytes (table 5.30)."""

    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("processor_uid", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("lint", ctypes.c_uint8),
    )


def build_madt(num_vcpus: int) -> bytes:
    """The MADT for ``num_vcpus`` vCPUs (1 to 255)."""
    if not 1 <= num_vcpus <= MAX_VCPUS:
        raise AcpiError(f"the MADT describes 1 to {MAX_VCPUS} vCPUs, not {num_vcpus}")
    parts: list[ctypes.Structure] = [
        MadtFixed(
            header=new_header(b"APIC", MADT_REVISION),
            local_apic_address=layout.APIC_START,
            flags=0,  # no PCAT_COMPAT: there are no 8259s
        )
    ]
    parts.extend(
        MadtLocalApic(
            type=TYPE_LOCAL_APIC,
            length=ctypes.sizeof(MadtLocalApic),
            processor_uid=index,
            apic_id=index,
            flags=LAPIC_ENABLED,
        )
        for index in range(num_vcpus)
    )
    parts.append(
        MadtIoApic(
            type=TYPE_IO_APIC,
            length=ctypes.sizeof(MadtIoApic),
            io_apic_id=IOAPIC_ID,
            io_apic_address=layout.IOAPIC_START,
            gsi_base=0,
        )
    )
    parts.append(
        MadtInterruptSourceOverride(
            type=TYPE_INTERRUPT_SOURCE_OVERRIDE,
            length=ctypes.sizeof(MadtInterruptSourceOverride),
            bus=ISA_BUS,
            source=0,
            gsi=2,
            flags=MPS_INTI_CONFORMS,
        )
    )
    parts.append(
        MadtLocalApicNmi(
            type=TYPE_LOCAL_APIC_NMI,
            length=ctypes.sizeof(MadtLocalApicNmi),
            processor_uid=ALL_PROCESSORS,
            flags=MPS_INTI_CONFORMS,
            lint=1,
        )
    )
    return finish_table(b"".join(bytes(part) for part in parts))
