"""The ACPI Generic Event Device behind nubis's power button (ACPI 6.4, section 5.6.9).

The DSDT (``nubis.acpi.dsdt``) describes a GED (``ACPI0013``) whose ``_EVT`` method reads this
one-byte status register and, when bit 0 (``GED_EVENT_POWER_BUTTON``) is set, notifies the
power button device (``PNP0C0C``) with 0x80, "power button pressed"; Linux's ACPI button driver
turns that into a KEY_POWER input event and an ACPI netlink event that acpid or systemd-logind
act on. Reading the register returns the pending events and clears them; the interrupt leaves
through an injected `Trigger` (an irqfd on an IOAPIC pin in a VM).
"""

from __future__ import annotations

import threading

from nubis.acpi.dsdt import GED_EVENT_POWER_BUTTON
from nubis.devices.interrupt import Trigger


class GenericEventDevice:
    """The GED status register as a one-byte MMIO device."""

    def __init__(self, interrupt: Trigger) -> None:
        self._interrupt = interrupt
        self._lock = threading.Lock()
        self._pending = 0
        self.presses = 0

    def press_power_button(self) -> None:
        """Record a power-button press and interrupt the guest."""
        with self._lock:
            self._pending |= GED_EVENT_POWER_BUTTON
            self.presses += 1
        self._interrupt.trigger()

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """Return the pending events in the first byte (the rest read as zero) and clear them."""
        with self._lock:
            value, self._pending = (self._pending, 0) if offset == 0 else (0, self._pending)
        data[:] = bytes(len(data))
        if len(data):
            data[0] = value

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """The register is read-only; writes are ignored."""
