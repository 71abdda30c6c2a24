"""Tests for nubis.devices.rtc against the MC146818A register map and Linux's expectations."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nubis.devices.bus import Bus
from nubis.devices.rtc import CmosRtc

# 2024-02-29 13:05:09 UTC, a Thursday
WHEN = calendar.timegm((2024, 2, 29, 13, 5, 9, 0, 0, 0))


class Cmos:
    def __init__(self, now: float = WHEN) -> None:
        self.now = now
        self.dev = CmosRtc(clock=lambda: self.now)
        self.bus = Bus("pio")
        self.bus.insert(self.dev, 0x70, 2)

    def read(self, index: int) -> int:
        self.bus.write(0x70, memoryview(bytes([index])))
        data = memoryview(bytearray(1))
        self.bus.read(0x71, data)
        return data[0]

    def write(self, index: int, value: int) -> None:
        self.bus.write(0x70, memoryview(bytes([index])))
        self.bus.write(0x71, memoryview(bytes([value])))


@pytest.fixture
def cmos() -> Cmos:
    return Cmos()


def test_time_in_bcd_24_hour(cmos: Cmos) -> None:
    assert cmos.read(0x0B) & 0x06 == 0x02  # 24-hour, BCD
    assert [cmos.read(i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)] == [
        0x09,
        0x05,
        0x13,
        0x05,  # Thursday: Sunday is 1
        0x29,
        0x02,
        0x24,
        0x20,
    ]


def test_binary_mode(cmos: Cmos) -> None:
    cmos.write(0x0B, 0x06)
    assert [cmos.read(i) for i in (0x00, 0x04, 0x07, 0x09, 0x32)] == [9, 13, 29, 24, 20]


def test_12_hour_mode_sets_pm_bit(cmos: Cmos) -> None:
    cmos.write(0x0B, 0x00)
    assert cmos.read(0x04) == 0x80 | 0x01
    cmos.now = calendar.timegm((2024, 1, 1, 0, 30, 0, 0, 0, 0))
    assert cmos.read(0x04) == 0x12  # midnight is 12 AM
    cmos.now = calendar.timegm((2024, 1, 1, 12, 30, 0, 0, 0, 0))
    assert cmos.read(0x04) == 0x80 | 0x12


def test_status_registers(cmos: Cmos) -> None:
    assert cmos.read(0x0A) == 0x26
    assert not cmos.read(0x0A) & 0x80  # never updating
    cmos.write(0x0A, 0xA6)
    assert cmos.read(0x0A) == 0x26
    assert cmos.read(0x0C) == 0
    assert cmos.read(0x0D) == 0x80
    cmos.write(0x0D, 0)
    assert cmos.read(0x0D) == 0x80


def test_clock_follows_the_host(cmos: Cmos) -> None:
    cmos.write(0x00, 0x59)  # the guest cannot move the clock
    assert cmos.read(0x00) == 0x09
    cmos.now += 1
    assert cmos.read(0x00) == 0x10


def test_nmi_bit_is_not_part_of_the_index(cmos: Cmos) -> None:
    cmos.write(0x80 | 0x40, 0xAB)
    assert cmos.dev.nmi_disabled
    assert cmos.read(0x40) == 0xAB
    assert not cmos.dev.nmi_disabled
    cmos.read(0x80 | 0x09)
    data = memoryview(bytearray(1))
    cmos.bus.read(0x70, data)
    assert data[0] == 0x89


def test_plain_cmos_bytes(cmos: Cmos) -> None:
    for index in (0x0E, 0x10, 0x31, 0x33, 0x7F):
        cmos.write(index, index ^ 0x5A)
    assert [cmos.read(i) for i in (0x0E, 0x10, 0x31, 0x33, 0x7F)] == [
        i ^ 0x5A for i in (0x0E, 0x10, 0x31, 0x33, 0x7F)
    ]


def test_default_clock_is_wall_time() -> None:
    dev = CmosRtc()
    data = memoryview(bytearray(1))
    dev.write(0x70, 0, memoryview(bytes([0x32])))
    dev.read(0x70, 1, data)
    assert data[0] in (0x20, 0x21)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0xF)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=calendar.timegm((2999, 12, 31, 23, 59, 59, 0, 0, 0))))
def test_bcd_fields_decode_to_the_clock(now: int) -> None:
    cmos = Cmos(now)
    fields = {i: _from_bcd(cmos.read(i)) for i in (0, 2, 4, 6, 7, 8, 9, 0x32)}
    seconds = calendar.timegm(
        (fields[0x32] * 100 + fields[9], fields[8], fields[7], fields[4], fields[2], fields[0])
    )
    assert seconds == now
    weekday = (now // 86400 + 4) % 7  # 1970-01-01 was a Thursday; 0 = Sunday
    assert fields[6] == weekday + 1
