"""The IOAPIC, in userspace, for KVM's split irqchip.

Why a split irqchip. KVM can emulate the whole legacy interrupt system in the kernel
(KVM_CREATE_IRQCHIP: two 8259 PICs, an IOAPIC and the local APICs, plus KVM_CREATE_PIT2 for the
8254 timer), or only the local APICs, leaving the IOAPIC to the VMM (KVM_CAP_SPLIT_IRQCHIP,
Linux Documentation/virt/kvm/api.rst, section 7.7). A nubis guest has no use for the PICs or the
PIT: its FADT declares a hardware-reduced ACPI platform, on which Linux installs no legacy PIC
and keeps time with the local APIC timer and kvmclock. Those devices still cost: KVM registers
them on its I/O buses, and tearing them down when the VM is closed waits for several SRCU grace
periods, which measured 4 to 25 ms at every nubis exit on the hosts we run on, against 0.4 ms
with the split irqchip. Every device nubis adds interrupts with MSI-X except three ISA lines (the
UART, the GED power button, the RTC), so the IOAPIC left to userspace is a table of 24
redirection entries and no hot path.

How interrupts flow. A legacy device keeps its irqfd on GSI ``pin`` (``devices.interrupt``).
Each time the guest writes a redirection entry, this model turns it into the MSI message the
IOAPIC would send for it (Intel 82093AA datasheet, section 3.2.4, and the MSI address and data
layout of the Intel SDM, volume 3, section 11.11) and hands it to the ``route`` callback, which
installs it as the KVM MSI route of that GSI; a masked entry removes the route. KVM then
delivers each irqfd signal straight to the local APICs, with no exit to userspace.

Devices raise edges (an irqfd is a pulse), so an entry the guest sets to level-triggered acts as
an edge too: remote IRR is never set, and the EOI register (version 0x20) and KVM's
KVM_EXIT_IOAPIC_EOI exits have nothing to clear. Registers (82093AA section 3.2): IOREGSEL at
offset 0x00 selects a register that IOWIN at 0x10 reads or writes, 32 bits at a time; register
0 is the ID, 1 the version and the highest entry index, 2 the arbitration ID, 0x10 + 2n and
0x11 + 2n the low and high halves of entry n. Everything here is guest-controlled: any offset,
width and value is accepted, and unknown registers read as zero and ignore writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["IOAPIC_VERSION", "IoApic", "MsiMessage", "redirection_to_msi"]

IOAPIC_VERSION: Final = 0x20
REG_SELECT: Final = 0x00
REG_WINDOW: Final = 0x10
INDEX_ID: Final = 0x00
INDEX_VERSION: Final = 0x01
INDEX_ARBITRATION: Final = 0x02
INDEX_REDIRECTION: Final = 0x10

RTE_MASKED: Final = 1 << 16
# Bits of an entry the guest may change: vector, delivery mode, destination mode, polarity,
# trigger mode, mask and the destination byte, plus bits 48-55, which Linux uses for the
# extended destination ID when KVM advertises it. Delivery status (12) and remote IRR (14)
# are read-only.
_RTE_WRITABLE: Final = 0xFFFF_0000_0001_AFFF
MSI_ADDRESS_BASE: Final = 0xFEE0_0000

MsiMessage = tuple[int, int]
"""An MSI (address, data) pair."""


def redirection_to_msi(entry: int) -> MsiMessage:
    """The MSI message an IOAPIC sends for redirection entry ``entry`` when its pin fires.

    Address: 0xFEEx_xxxx with the destination APIC ID in bits 19:12, bits 8-14 of an extended
    destination ID in bits 11:5 and the destination mode in bit 2. Data: the vector, the
    delivery mode in bits 10:8, level-assert in bit 14 and the trigger mode in bit 15.
    """
    vector = entry & 0xFF
    delivery_mode = (entry >> 8) & 0x7
    logical = (entry >> 11) & 1
    level = (entry >> 15) & 1
    destination = (entry >> 56) & 0xFF
    extended = (entry >> 49) & 0x7F
    address = MSI_ADDRESS_BASE | destination << 12 | extended << 5 | logical << 2
    data = vector | delivery_mode << 8 | level << 14 | level << 15
    return address, data


class IoApic:
    """The IOAPIC's register file; ``route(pin, message)`` follows every entry change.

    ``route`` gets the MSI message of an unmasked entry, or None when the entry is masked; it
    is called only when that changes, under the model's lock, so calls arrive in order.
    """

    def __init__(
        self,
        route: Callable[[int, MsiMessage | None], None],
        *,
        ioapic_id: int = 0,
        num_pins: int = 24,
    ) -> None:
        if not 1 <= num_pins <= 240:
            raise ValueError(f"an IOAPIC has 1 to 240 pins, not {num_pins}")
        self._route = route
        self._lock = threading.Lock()
        self._id = ioapic_id & 0xF
        self._select = 0
        self.entries = [RTE_MASKED] * num_pins

    @property
    def num_pins(self) -> int:
        """How many redirection entries (and GSIs) the IOAPIC has."""
        return len(self.entries)

    def message(self, pin: int) -> MsiMessage | None:
        """The MSI message pin ``pin`` delivers now, or None while it is masked."""
        return _message(self.entries[pin])

    # --- the bus device protocol ---------------------------------------------------------

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """Read IOREGSEL or IOWIN; everything else reads as zero."""
        with self._lock:
            if offset == REG_SELECT:
                value = self._select
            elif offset == REG_WINDOW:
                value = self._read_register(self._select)
            else:
                value = 0
        data[:] = (value & 0xFFFF_FFFF).to_bytes(4, "little")[: len(data)].ljust(len(data), b"\0")

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """Write IOREGSEL or IOWIN; EOI and other offsets are accepted and ignored."""
        value = int.from_bytes(data[:4], "little")
        with self._lock:
            if offset == REG_SELECT:
                self._select = value & 0xFF
            elif offset == REG_WINDOW:
                self._write_register(self._select, value)

    # --- registers -----------------------------------------------------------------------

    def _read_register(self, index: int) -> int:
        if index in (INDEX_ID, INDEX_ARBITRATION):
            return self._id << 24
        if index == INDEX_VERSION:
            return (self.num_pins - 1) << 16 | IOAPIC_VERSION
        pin, high = divmod(index - INDEX_REDIRECTION, 2)
        if index < INDEX_REDIRECTION or pin >= self.num_pins:
            return 0
        return self.entries[pin] >> (32 * high)

    def _write_register(self, index: int, value: int) -> None:
        if index == INDEX_ID:
            self._id = (value >> 24) & 0xF
            return
        pin, high = divmod(index - INDEX_REDIRECTION, 2)
        if index < INDEX_REDIRECTION or pin >= self.num_pins:
            return
        old = self.entries[pin]
        if high:
            new = (old & 0xFFFF_FFFF) | (value & 0xFFFF_FFFF) << 32
        else:
            new = (old & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF)
        new = (old & ~_RTE_WRITABLE) | (new & _RTE_WRITABLE)
        self.entries[pin] = new
        message = _message(new)
        if message != _message(old):
            self._route(pin, message)


def _message(entry: int) -> MsiMessage | None:
    return None if entry & RTE_MASKED else redirection_to_msi(entry)
