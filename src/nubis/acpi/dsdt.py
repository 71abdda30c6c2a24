r"""The Differentiated System Description Table: the AML namespace of a nubis guest.

ACPI 6.4 section 5.2.11.1 ("Differentiated System Description Table (DSDT)"): an SDT header
followed by AML (chapter 20), built with `nubis.acpi.aml`. It describes exactly the devices a
nubis guest has that the OS cannot find otherwise:

- ``\_S5_``, the soft-off sleep type the OS writes to ``SLEEP_CONTROL_REG`` (section 7.4.2);
- ``\_SB.COM1``, the 16550 UART (PNP0501) at ``layout.PORT_COM1`` on ``layout.IRQ_COM1``;
- ``\_SB.RTC_``, the CMOS RTC (PNP0B00) at ``layout.PORT_RTC`` on ``layout.IRQ_RTC``;
- ``\_SB.PCI0``, the PCI Express host bridge (PNP0A08, compatible PNP0A03, section 6.5.10
  and the PCI Firmware Specification) with its bus, I/O and memory windows in ``_CRS``; no
  ``_PRT`` since every PCI device interrupts through MSI-X;
- optionally ``\_SB.GED_``, a Generic Event Device (ACPI0013, section 5.6.9) whose ``_EVT``
  reads a one-byte MMIO status register and notifies the power button ``\_SB.PWRB``
  (PNP0C0C, section 4.8.2.2.1.2) with 0x80 when bit 0 is set.
"""

from __future__ import annotations

from nubis._frozen import Frozen
from nubis.acpi.aml import (
    Aml,
    AmlTerm,
    And,
    Device,
    DWordMemory,
    EisaId,
    Field,
    FieldAccess,
    FieldUpdate,
    If,
    Interrupt,
    Io,
    IrqNoFlags,
    LEqual,
    Local,
    Method,
    Name,
    NamePath,
    Notify,
    OperationRegion,
    Package,
    QWordMemory,
    RegionSpace,
    Scope,
    Store,
    WordBusNumber,
    WordIo,
    crs,
    hid,
    uid,
)
from nubis.acpi.errors import AcpiError
from nubis.acpi.sdt import finish_table, new_header
from nubis.arch.x86_64 import layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "DSDT_REVISION",
    "GED_EVENT_POWER_BUTTON",
    "PCI_DEVICE_IO_END",
    "PCI_DEVICE_IO_START",
    "GedConfig",
    "build_dsdt",
    "dsdt_terms",
]

DSDT_REVISION: Final = 6  # 2 or above: AML integers are 64 bits wide
GED_EVENT_POWER_BUTTON: Final = 0x01
"""Bit in the GED status byte that means "the power button was pressed"."""
GED_REGISTER_SIZE: Final = 1
POWER_BUTTON_NOTIFY: Final = 0x80  # section 5.6.6: "S0 Power Button Pressed"
PCI_DEVICE_IO_START: Final = 0x0D00
PCI_DEVICE_IO_END: Final = 0xFFFF


class GedConfig(Frozen):
    """A Generic Event Device: its one-byte status register's MMIO address and its GSI."""

    __slots__ = ("gsi", "mmio_address")

    mmio_address: int
    gsi: int

    def __init__(self, mmio_address: int, gsi: int) -> None:
        object.__setattr__(self, "mmio_address", mmio_address)
        object.__setattr__(self, "gsi", gsi)
        self._check()

    def _check(self) -> None:
        if not 0 <= self.mmio_address < layout.FIRST_ADDR_PAST_32BITS:
            raise AcpiError(f"GED register address {self.mmio_address:#x} is not 32-bit")
        if not 0 <= self.gsi < 1 << 32:
            raise AcpiError(f"GED interrupt {self.gsi} is not a valid GSI")


def _com1() -> Device:
    return Device(
        "COM1",
        [
            hid("PNP0501"),
            uid(0),
            crs(
                [
                    Io(layout.PORT_COM1, layout.PORT_COM1, 1, layout.PORT_UART_SIZE),
                    IrqNoFlags(layout.IRQ_COM1),
                ]
            ),
        ],
    )


def _rtc() -> Device:
    return Device(
        "RTC",
        [
            hid("PNP0B00"),
            crs(
                [
                    Io(layout.PORT_RTC, layout.PORT_RTC, 1, layout.PORT_RTC_SIZE),
                    IrqNoFlags(layout.IRQ_RTC),
                ]
            ),
        ],
    )


def _pci0(mem64_start: int, mem64_size: int) -> Device:
    return Device(
        "PCI0",
        [
            hid("PNP0A08"),
            Name("_CID", EisaId("PNP0A03")),
            Name("_SEG", 0),
            Name("_BBN", 0),
            uid(0),
            crs(
                [
                    WordBusNumber(0, 0),
                    Io(
                        layout.PORT_PCI_CONFIG_ADDRESS,
                        layout.PORT_PCI_CONFIG_ADDRESS,
                        1,
                        layout.PORT_PCI_CONFIG_SIZE,
                    ),
                    WordIo(PCI_DEVICE_IO_START, PCI_DEVICE_IO_END),
                    DWordMemory(layout.MEM_32BIT_DEVICES_START, layout.MEM_32BIT_DEVICES_SIZE),
                    QWordMemory(mem64_start, mem64_size),
                ]
            ),
        ],
    )


def _ged(config: GedConfig) -> list[Aml]:
    status = "GDAT"
    return [
        Device(
            "GED",
            [
                hid("ACPI0013"),
                uid(0),
                crs([Interrupt(config.gsi)]),
                OperationRegion("GDST", RegionSpace.SYSTEM_MEMORY, config.mmio_address, 1),
                Field(
                    "GDST",
                    [(status, 8 * GED_REGISTER_SIZE)],
                    access=FieldAccess.BYTE,
                    update=FieldUpdate.WRITE_AS_ZEROS,
                ),
                Method(
                    "_EVT",
                    1,
                    [
                        Store(NamePath(status), Local(0)),
                        If(
                            LEqual(And(Local(0), GED_EVENT_POWER_BUTTON), GED_EVENT_POWER_BUTTON),
                            [Notify(NamePath(r"\_SB.PWRB"), POWER_BUTTON_NOTIFY)],
                        ),
                    ],
                    serialized=True,
                ),
            ],
        ),
        Device("PWRB", [hid("PNP0C0C"), uid(0)]),
    ]


def dsdt_terms(mem64_start: int, mem64_size: int, ged: GedConfig | None = None) -> list[Aml]:
    """The DSDT's AML terms, for a 64-bit PCI window of ``mem64_size`` bytes at ``mem64_start``."""
    s5 = layout.ACPI_S5_SLEEP_TYPE
    devices: list[AmlTerm] = [_com1(), _rtc(), _pci0(mem64_start, mem64_size)]
    if ged is not None:
        devices.extend(_ged(ged))
    return [Name(r"\_S5", Package([s5, s5, 0, 0])), Scope(r"\_SB", devices)]


def build_dsdt(mem64_start: int, mem64_size: int, ged: GedConfig | None = None) -> bytes:
    """The DSDT bytes; see `dsdt_terms`."""
    aml = b"".join(term.to_aml_bytes() for term in dsdt_terms(mem64_start, mem64_size, ged))
    return finish_table(bytes(new_header(b"DSDT", DSDT_REVISION)) + aml)
