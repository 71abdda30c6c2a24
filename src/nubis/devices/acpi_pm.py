"""ACPI hardware-reduced power management registers: sleep control, sleep status and reset.

A hardware-reduced ACPI platform (ACPI 6.4, section 4.1) has no PM1 event/control blocks; the
FADT instead points at three one-byte registers, which nubis places at consecutive I/O ports
(``PORT_ACPI_SLEEP_CONTROL``, ``PORT_ACPI_SLEEP_STATUS``, ``PORT_ACPI_RESET`` in
``nubis.arch.x86_64.layout``), so the device may be inserted as one 3-byte range at 0x600:

- Sleep control register (ACPI 6.4, section 4.8.3.7): bits 4:2 SLP_TYP, bit 5 SLP_EN. Writing
  SLP_EN with the SLP_TYP of \\_S5 (soft off, ``ACPI_S5_SLEEP_TYPE``) powers the VM off through
  the injected ``power_off`` callback. Other sleep states are not supported and are ignored.
- Sleep status register (section 4.8.3.7): bit 7 WAK_STS, write 1 to clear. The VM never sleeps
  and wakes, so it reads 0.
- Reset register (section 4.8.3.6): writing ``ACPI_RESET_VALUE`` resets the VM through the
  injected ``reset`` callback.
"""

from __future__ import annotations

from collections.abc import Callable

from nubis._log import getLogger
from nubis.arch.x86_64.layout import (
    ACPI_RESET_VALUE,
    ACPI_S5_SLEEP_TYPE,
    PORT_ACPI_RESET,
    PORT_ACPI_SLEEP_CONTROL,
    PORT_ACPI_SLEEP_STATUS,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["AcpiPmDevice", "sleep_control_value"]

_log = getLogger(__name__)

SLP_TYP_SHIFT: Final = 2
SLP_TYP_MASK: Final = 0x7 << SLP_TYP_SHIFT
SLP_EN: Final = 1 << 5
WAK_STS: Final = 1 << 7


def sleep_control_value(sleep_type: int) -> int:
    """The byte an OS writes to the sleep control register to enter ``sleep_type``."""
    return ((sleep_type << SLP_TYP_SHIFT) & SLP_TYP_MASK) | SLP_EN


class AcpiPmDevice:
    """The hardware-reduced ACPI sleep control, sleep status and reset registers.

    The callbacks run on the vCPU thread that made the write, outside any device lock; the VMM
    should only record the request there and act on it from its control loop.
    """

    def __init__(self, power_off: Callable[[], None], reset: Callable[[], None]) -> None:
        self._power_off = power_off
        self._reset = reset

    def __repr__(self) -> str:
        return "AcpiPmDevice()"

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """All three registers read as 0 (no sleep type latched, no wake event)."""
        data[:] = bytes(len(data))

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """Act on writes to the sleep control and reset registers, byte by byte."""
        for index, value in enumerate(data):
            port = base + offset + index
            if port == PORT_ACPI_SLEEP_CONTROL:
                self._write_sleep_control(value)
            elif port == PORT_ACPI_RESET:
                if value == ACPI_RESET_VALUE:
                    _log.info("guest requested a reset through the ACPI reset register")
                    self._reset()
            elif port == PORT_ACPI_SLEEP_STATUS:
                pass  # WAK_STS is write-1-to-clear and never set
            # Other ports in a wider range are reserved.

    def _write_sleep_control(self, value: int) -> None:
        if not value & SLP_EN:
            return
        sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        if sleep_type == ACPI_S5_SLEEP_TYPE:
            _log.info("guest requested power off (ACPI S5)")
            self._power_off()
        else:
            _log.warning("ignoring a request for unsupported ACPI sleep type %d", sleep_type)
