"""Tests for nubis.devices.i8042 against the command set Linux's i8042 driver uses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nubis.devices.bus import Bus
from nubis.devices.i8042 import I8042

DATA = 0x60
COMMAND = 0x64
OBF = 0x01
AUXDATA = 0x20
TIMEOUT = 0x40


class CountingTrigger:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


class Kbc:
    def __init__(self) -> None:
        self.resets = 0
        self.kbd_irq = CountingTrigger()
        self.aux_irq = CountingTrigger()
        self.dev = I8042(self._reset, self.kbd_irq, self.aux_irq)
        self.bus = Bus("pio")
        self.bus.insert(self.dev, DATA, 1)
        self.bus.insert(self.dev, COMMAND, 1)

    def _reset(self) -> None:
        self.resets += 1

    def inb(self, port: int) -> int:
        data = memoryview(bytearray(1))
        assert self.bus.read(port, data)
        return data[0]

    def outb(self, port: int, value: int) -> None:
        assert self.bus.write(port, memoryview(bytes([value])))

    def command(self, cmd: int, param: int | None = None, replies: int = 0) -> list[int]:
        """Like Linux's __i8042_command: send, optionally a parameter, then read replies."""
        self.outb(COMMAND, cmd)
        if param is not None:
            self.outb(DATA, param)
        out = []
        for _ in range(replies):
            assert self.inb(COMMAND) & OBF, f"no reply to command {cmd:#x}"
            out.append(self.inb(DATA))
        return out


@pytest.fixture
def kbc() -> Kbc:
    return Kbc()


def test_status_after_reset(kbc: Kbc) -> None:
    status = kbc.inb(COMMAND)
    assert status & OBF == 0
    assert status & 0x02 == 0  # input buffer never busy
    assert status & 0x10  # key lock off: Linux warns otherwise
    assert status & 0x04  # system flag


def test_linux_probe_sequence(kbc: Kbc) -> None:
    # i8042_flush: nothing is waiting.
    assert not kbc.inb(COMMAND) & OBF
    # i8042_controller_selftest
    assert kbc.command(0xAA, replies=1) == [0x55]
    # i8042_controller_init: read CTR twice until stable, then write it back modified.
    ctr = kbc.command(0x20, replies=1)[0]
    assert kbc.command(0x20, replies=1)[0] == ctr
    ctr = (ctr | 0x10 | 0x20) & ~0x03  # disable both ports and their interrupts
    kbc.command(0x60, ctr)
    assert kbc.command(0x20, replies=1) == [ctr]
    # keyboard port: interface test, enable
    assert kbc.command(0xAB, replies=1) == [0x00]
    kbc.command(0xAE)
    assert not kbc.command(0x20, replies=1)[0] & 0x10
    kbc.command(0xAD)
    assert kbc.command(0x20, replies=1)[0] & 0x10


def test_linux_aux_checks(kbc: Kbc) -> None:
    # i8042_check_aux: AUX loopback must come back flagged as AUX data.
    kbc.outb(COMMAND, 0xD3)
    kbc.outb(DATA, 0x5A)
    assert kbc.inb(COMMAND) & (OBF | AUXDATA) == OBF | AUXDATA
    assert kbc.inb(DATA) == 0x5A
    assert kbc.command(0xA9, replies=1) == [0x00]
    # i8042_toggle_aux: the AUXDIS bit follows disable/enable.
    kbc.command(0xA7)
    assert kbc.command(0x20, replies=1)[0] & 0x20
    kbc.command(0xA8)
    assert not kbc.command(0x20, replies=1)[0] & 0x20


def test_aux_loop_raises_irq12_when_enabled(kbc: Kbc) -> None:
    kbc.command(0x60, 0x47)  # KBDINT | AUXINT | SYSFLAG | XLATE
    kbc.outb(COMMAND, 0xD3)
    kbc.outb(DATA, 0xA5)
    assert kbc.aux_irq.count == 1
    assert kbc.kbd_irq.count == 0
    assert kbc.inb(DATA) == 0xA5


def test_keyboard_loop_raises_irq1_when_enabled(kbc: Kbc) -> None:
    kbc.command(0xD2, 0x11)
    assert kbc.kbd_irq.count == 0  # KBDINT clear by default
    assert kbc.inb(COMMAND) & (OBF | AUXDATA) == OBF
    assert kbc.inb(DATA) == 0x11
    kbc.command(0x60, 0x01)
    kbc.command(0xD2, 0x22)
    assert kbc.kbd_irq.count == 1


def test_absent_devices_answer_with_a_timeout(kbc: Kbc) -> None:
    kbc.outb(DATA, 0xF2)  # ATKBD_CMD_GETID to the keyboard
    status = kbc.inb(COMMAND)
    assert status & (OBF | TIMEOUT | AUXDATA) == OBF | TIMEOUT
    assert kbc.inb(DATA) == 0xFE
    kbc.command(0xD4, 0xFF)  # reset the mouse
    assert kbc.inb(COMMAND) & (OBF | TIMEOUT | AUXDATA) == OBF | TIMEOUT | AUXDATA
    assert kbc.inb(DATA) == 0xFE
    assert not kbc.inb(COMMAND) & OBF


def test_replies_queue_in_order(kbc: Kbc) -> None:
    kbc.outb(COMMAND, 0xAA)
    kbc.outb(COMMAND, 0xAB)
    assert [kbc.inb(DATA), kbc.inb(DATA), kbc.inb(DATA)] == [0x55, 0x00, 0x00]


def test_pulse_reset_calls_back(kbc: Kbc) -> None:
    for _ in range(3):  # Linux's kb reboot pulses repeatedly
        kbc.outb(COMMAND, 0xFE)
    assert kbc.resets == 3
    assert kbc.dev.reset_requests == 3


def test_output_port_reset_bit(kbc: Kbc) -> None:
    assert kbc.command(0xD0, replies=1)[0] & 0x01
    kbc.command(0xD1, 0x03)
    assert kbc.resets == 0
    kbc.command(0xD1, 0x02)
    assert kbc.resets == 1


def test_last_write_kind_in_status(kbc: Kbc) -> None:
    kbc.outb(COMMAND, 0xAE)
    assert kbc.inb(COMMAND) & 0x08
    kbc.outb(DATA, 0x00)
    assert not kbc.inb(COMMAND) & 0x08


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([DATA, COMMAND]), st.integers(0, 255)), max_size=40))
def test_random_traffic_never_raises_and_only_0xfe_resets(ops: list[tuple[int, int]]) -> None:
    kbc = Kbc()
    for port, value in ops:
        kbc.outb(port, value)
        kbc.inb(COMMAND)
        kbc.inb(DATA)
    pulses = sum(1 for port, value in ops if port == COMMAND and value == 0xFE)
    assert kbc.resets >= pulses
