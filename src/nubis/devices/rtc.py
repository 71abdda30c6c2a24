"""A CMOS real-time clock (Motorola MC146818A) at ports 0x70/0x71, reporting the host's UTC time.

Port 0x70 selects a CMOS byte (bits 6:0; bit 7 masks NMIs on a PC and is not part of the
index), port 0x71 reads or writes it. The clock registers follow the MC146818A datasheet
("Address map", "Registers A-D"):

- 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (1 = Sunday), 0x07 day of month,
  0x08 month, 0x09 year within the century; 0x32 is the century, the byte the ACPI FADT's
  CENTURY field points Linux at (ACPI 6.4, section 5.2.9, "CENTURY");
- register A (0x0A): UIP (bit 7) always clear, so a reader never waits for an update; the
  divider bits keep what the guest writes (0x26, a 32.768 kHz base and 1024 Hz rate, at reset);
- register B (0x0B): 24-hour mode and BCD at reset, as Linux on x86 expects (it always converts
  from BCD); the time is encoded per the DM (bit 2, binary) and 24/12 (bit 1) bits the guest
  sets;
- register C (0x0C): no interrupt flags (interrupts are not modelled); register D (0x0D): VRT
  (bit 7), the battery is good.

The time comes from an injected clock (``time.time`` by default), read on every access, so the
guest sees the host's UTC time. Writes to the clock registers are ignored: the clock follows the
host. Every other index is a plain CMOS RAM byte.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from nubis._enum import IntEnum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["CMOS_SIZE", "CmosRtc", "RtcRegister"]

CMOS_SIZE: Final = 128
_INDEX_MASK: Final = 0x7F
_NMI_DISABLE: Final = 0x80


class RtcRegister(IntEnum):
    """CMOS indices with a clock meaning."""

    SECONDS = 0x00
    SECONDS_ALARM = 0x01
    MINUTES = 0x02
    MINUTES_ALARM = 0x03
    HOURS = 0x04
    HOURS_ALARM = 0x05
    DAY_OF_WEEK = 0x06
    DAY_OF_MONTH = 0x07
    MONTH = 0x08
    YEAR = 0x09
    STATUS_A = 0x0A
    STATUS_B = 0x0B
    STATUS_C = 0x0C
    STATUS_D = 0x0D
    CENTURY = 0x32


STATUS_A_UIP: Final = 0x80
STATUS_A_DEFAULT: Final = 0x26
STATUS_B_SET: Final = 0x80
STATUS_B_BINARY: Final = 0x04
STATUS_B_24_HOUR: Final = 0x02
STATUS_B_DEFAULT: Final = STATUS_B_24_HOUR
STATUS_D_VALID_RAM_AND_TIME: Final = 0x80
_HOUR_PM: Final = 0x80

_TIME_REGISTERS: Final = frozenset(
    {
        RtcRegister.SECONDS,
        RtcRegister.MINUTES,
        RtcRegister.HOURS,
        RtcRegister.DAY_OF_WEEK,
        RtcRegister.DAY_OF_MONTH,
        RtcRegister.MONTH,
        RtcRegister.YEAR,
        RtcRegister.CENTURY,
    }
)


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


class CmosRtc:
    """The CMOS RTC and RAM; insert it at port 0x70 with length 2 (offset 0 index, 1 data)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self.nmi_disabled = False
        self._ram = bytearray(CMOS_SIZE)
        self._ram[RtcRegister.STATUS_A] = STATUS_A_DEFAULT
        self._ram[RtcRegister.STATUS_B] = STATUS_B_DEFAULT

    def __repr__(self) -> str:
        return f"CmosRtc(index={self._index:#x})"

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """Read the index register (offset 0) or the selected CMOS byte (offset 1)."""
        with self._lock:
            if offset == 0:
                value = self._index | (_NMI_DISABLE if self.nmi_disabled else 0)
            else:
                value = self._read_cmos(self._index)
        data[:] = bytes([value]) * len(data)

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """Select a CMOS byte (offset 0) or write the selected byte (offset 1)."""
        if not len(data):
            return
        value = data[0]
        with self._lock:
            if offset == 0:
                self._index = value & _INDEX_MASK
                self.nmi_disabled = bool(value & _NMI_DISABLE)
            else:
                self._write_cmos(self._index, value)

    def _read_cmos(self, index: int) -> int:
        if index in _TIME_REGISTERS:
            return self._time_field(index)
        if index == RtcRegister.STATUS_A:
            return self._ram[index] & ~STATUS_A_UIP
        if index == RtcRegister.STATUS_C:
            return 0
        if index == RtcRegister.STATUS_D:
            return STATUS_D_VALID_RAM_AND_TIME
        return self._ram[index]

    def _write_cmos(self, index: int, value: int) -> None:
        if index in _TIME_REGISTERS or index in (RtcRegister.STATUS_C, RtcRegister.STATUS_D):
            return  # the clock follows the host; C and D are read-only
        self._ram[index] = value

    def _time_field(self, index: int) -> int:
        now = time.gmtime(int(self._clock()))
        status_b = self._ram[RtcRegister.STATUS_B]
        encode = (lambda v: v) if status_b & STATUS_B_BINARY else _bcd
        if index == RtcRegister.SECONDS:
            return encode(min(now.tm_sec, 59))  # a leap second reads as :59
        if index == RtcRegister.MINUTES:
            return encode(now.tm_min)
        if index == RtcRegister.HOURS:
            if status_b & STATUS_B_24_HOUR:
                return encode(now.tm_hour)
            hour12 = now.tm_hour % 12 or 12
            return encode(hour12) | (_HOUR_PM if now.tm_hour >= 12 else 0)
        if index == RtcRegister.DAY_OF_WEEK:
            return encode((now.tm_wday + 1) % 7 + 1)  # tm_wday 0 is Monday; RTC 1 is Sunday
        if index == RtcRegister.DAY_OF_MONTH:
            return encode(now.tm_mday)
        if index == RtcRegister.MONTH:
            return encode(now.tm_mon)
        if index == RtcRegister.YEAR:
            return encode(now.tm_year % 100)
        return encode(now.tm_year // 100)
