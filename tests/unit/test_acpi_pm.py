"""Tests for nubis.devices.acpi_pm (ACPI 6.4, sections 4.8.3.6 and 4.8.3.7)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nubis.arch.x86_64.layout import (
    ACPI_RESET_VALUE,
    ACPI_S5_SLEEP_TYPE,
    PORT_ACPI_RESET,
    PORT_ACPI_SLEEP_CONTROL,
    PORT_ACPI_SLEEP_STATUS,
)
from nubis.devices.acpi_pm import AcpiPmDevice, sleep_control_value
from nubis.devices.bus import Bus


class Board:
    def __init__(self, *, split: bool = False) -> None:
        self.events: list[str] = []
        self.dev = AcpiPmDevice(
            power_off=lambda: self.events.append("off"), reset=lambda: self.events.append("reset")
        )
        self.bus = Bus("pio")
        if split:
            for port in (PORT_ACPI_SLEEP_CONTROL, PORT_ACPI_SLEEP_STATUS, PORT_ACPI_RESET):
                self.bus.insert(self.dev, port, 1)
        else:
            self.bus.insert(self.dev, PORT_ACPI_SLEEP_CONTROL, 3)

    def outb(self, port: int, value: int) -> None:
        assert self.bus.write(port, memoryview(bytes([value])))

    def inb(self, port: int) -> int:
        data = memoryview(bytearray(1))
        assert self.bus.read(port, data)
        return data[0]


def test_register_layout() -> None:
    assert PORT_ACPI_SLEEP_STATUS == PORT_ACPI_SLEEP_CONTROL + 1
    assert PORT_ACPI_RESET == PORT_ACPI_SLEEP_CONTROL + 2
    # SLP_TYP in bits 4:2, SLP_EN bit 5: S5 (type 5) is 0b0011_0100
    assert sleep_control_value(5) == 0x34


@pytest.mark.parametrize("split", [False, True])
def test_s5_powers_off(split: bool) -> None:
    board = Board(split=split)
    board.outb(PORT_ACPI_SLEEP_CONTROL, sleep_control_value(ACPI_S5_SLEEP_TYPE))
    assert board.events == ["off"]


def test_slp_typ_without_slp_en_does_nothing() -> None:
    board = Board()
    board.outb(PORT_ACPI_SLEEP_CONTROL, ACPI_S5_SLEEP_TYPE << 2)
    assert board.events == []


def test_other_sleep_types_are_ignored() -> None:
    board = Board()
    for sleep_type in range(8):
        if sleep_type != ACPI_S5_SLEEP_TYPE:
            board.outb(PORT_ACPI_SLEEP_CONTROL, sleep_control_value(sleep_type))
    assert board.events == []


@pytest.mark.parametrize("split", [False, True])
def test_reset_register(split: bool) -> None:
    board = Board(split=split)
    board.outb(PORT_ACPI_RESET, ACPI_RESET_VALUE ^ 0xFF)
    assert board.events == []
    board.outb(PORT_ACPI_RESET, ACPI_RESET_VALUE)
    assert board.events == ["reset"]


def test_writes_to_status_and_reads_are_harmless() -> None:
    board = Board()
    board.outb(PORT_ACPI_SLEEP_STATUS, 0x80)
    assert board.inb(PORT_ACPI_SLEEP_STATUS) & 0x80 == 0
    assert board.inb(PORT_ACPI_SLEEP_CONTROL) == 0
    assert board.inb(PORT_ACPI_RESET) == 0
    assert board.events == []


def test_wide_write_reaches_each_register() -> None:
    board = Board()
    board.bus.write(
        PORT_ACPI_SLEEP_CONTROL,
        memoryview(bytes([sleep_control_value(ACPI_S5_SLEEP_TYPE), 0, ACPI_RESET_VALUE])),
    )
    assert board.events == ["off", "reset"]


@given(port=st.sampled_from([0, 1, 2]), value=st.integers(0, 255))
def test_only_the_documented_values_have_effects(port: int, value: int) -> None:
    board = Board()
    board.outb(PORT_ACPI_SLEEP_CONTROL + port, value)
    expected = []
    if port == 0 and value & 0x20 and (value >> 2) & 7 == ACPI_S5_SLEEP_TYPE:
        expected = ["off"]
    if port == 2 and value == ACPI_RESET_VALUE:
        expected = ["reset"]
    assert board.events == expected
