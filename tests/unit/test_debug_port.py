"""Tests for nubis.devices.debug_port."""

from __future__ import annotations

import logging
import time

import pytest

from nubis.devices.bus import Bus
from nubis.devices.debug_port import DebugPort, process_start_time


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_records_values_with_elapsed_time() -> None:
    clock = FakeClock()
    port = DebugPort(start_time=99.5, clock=clock)
    bus = Bus("pio")
    bus.insert(port, 0x80, 1)
    bus.write(0x80, memoryview(b"\x01"))
    clock.now = 101.25
    bus.write(0x80, memoryview(b"\x42"))
    assert port.records == [(0.5, 0x01), (1.75, 0x42)]


def test_each_byte_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    port = DebugPort(start_time=100.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="nubis.devices.debug_port"):
        port.write(0x80, 0, memoryview(b"\x10\x20"))
    assert [r.getMessage() for r in caplog.records] == [
        "debug port 0x80: 0x10 at 0.000000 s",
        "debug port 0x80: 0x20 at 0.000000 s",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_read_returns_last_value() -> None:
    port = DebugPort(start_time=0.0, clock=FakeClock())
    data = memoryview(bytearray(1))
    port.read(0x80, 0, data)
    assert data[0] == 0
    port.write(0x80, 0, memoryview(b"\x7e"))
    port.read(0x80, 0, data)
    assert data[0] == 0x7E


def test_records_are_bounded() -> None:
    port = DebugPort(start_time=0.0, clock=FakeClock(), max_records=2)
    port.write(0x80, 0, memoryview(b"\x01\x02\x03\x04"))
    assert [v for _, v in port.records] == [1, 2]
    assert port.dropped == 2


def test_default_start_is_the_process_start() -> None:
    start = process_start_time()
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert now - start >= 0
    port = DebugPort()
    assert port.start_time == start
    port.write(0x80, 0, memoryview(b"\x01"))
    assert port.records[0][0] >= 0
