"""Tests for nubis.devices.bus: range management, routing, unmapped accesses, properties."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nubis.devices.bus import Bus, BusDevice, BusError


class Recorder:
    """A device that records accesses and answers reads with its tag byte."""

    def __init__(self, tag: int = 0xAB) -> None:
        self.tag = tag
        self.accesses: list[tuple[str, int, int, bytes]] = []

    def read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes([self.tag]) * len(data)
        self.accesses.append(("r", base, offset, bytes(data)))

    def write(self, base: int, offset: int, data: memoryview) -> None:
        self.accesses.append(("w", base, offset, bytes(data)))


def test_recorder_is_a_bus_device() -> None:
    device: BusDevice = Recorder()
    assert device is not None


def test_routes_to_the_range_with_base_and_offset() -> None:
    bus = Bus("pio")
    dev = Recorder()
    bus.insert(dev, 0x60, 1)
    bus.insert(dev, 0x64, 1)
    data = memoryview(bytearray(1))
    assert bus.read(0x64, data)
    assert bus.write(0x60, memoryview(b"\x12"))
    assert dev.accesses == [("r", 0x64, 0, b"\xab"), ("w", 0x60, 0, b"\x12")]


def test_offset_within_a_range() -> None:
    bus = Bus("mmio")
    dev = Recorder()
    bus.insert(dev, 0x1000, 0x100)
    data = memoryview(bytearray(4))
    assert bus.read(0x10FC, data)
    assert dev.accesses == [("r", 0x1000, 0xFC, b"\xab" * 4)]


@pytest.mark.parametrize("addr", [0xFFF, 0x1100, 0x10FD, 0x0])
def test_unmapped_and_straddling_reads_return_all_ones(addr: int) -> None:
    bus = Bus("mmio")
    dev = Recorder()
    bus.insert(dev, 0x1000, 0x100)
    data = memoryview(bytearray(4))
    assert not bus.read(addr, data)
    assert bytes(data) == b"\xff" * 4
    assert bus.unmapped_reads == 1
    assert dev.accesses == []


def test_large_unmapped_read_is_all_ones() -> None:
    bus = Bus("mmio")
    data = memoryview(bytearray(200))
    assert not bus.read(0, data)
    assert bytes(data) == b"\xff" * 200


def test_unmapped_write_is_dropped_and_counted() -> None:
    bus = Bus("pio")
    dev = Recorder()
    bus.insert(dev, 0x3F8, 8)
    assert not bus.write(0x3FE, memoryview(b"\x00\x00\x00"))
    assert not bus.write(0x2F8, memoryview(b"\x00"))
    assert bus.unmapped_writes == 2
    assert bus.unmapped_reads == 0
    assert dev.accesses == []


def test_unmapped_access_logs_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus("pio")
    with caplog.at_level(logging.INFO, logger="nubis.devices.bus"):
        bus.write(0x80, memoryview(b"\x01"))
    assert caplog.records == []
    with caplog.at_level(logging.DEBUG, logger="nubis.devices.bus"):
        bus.write(0x80, memoryview(b"\x01"))
        bus.read(0x81, memoryview(bytearray(1)))
    assert [r.getMessage() for r in caplog.records] == [
        "pio bus: dropped write of 01 at 0x80",
        "pio bus: unmapped read of 1 bytes at 0x81",
    ]


def test_overlap_is_refused_naming_both_ranges() -> None:
    bus = Bus("pio")
    bus.insert(Recorder(), 0x3F8, 8)
    with pytest.raises(BusError, match=r"\[0x3fc, 0x400\).*overlaps \[0x3f8, 0x400\) of Recorder"):
        bus.insert(Recorder(), 0x3FC, 4)
    with pytest.raises(BusError, match="overlaps"):
        bus.insert(Recorder(), 0x3F0, 9)
    bus.insert(Recorder(), 0x3F0, 8)  # adjacent is fine
    bus.insert(Recorder(), 0x400, 1)
    assert [(r.base, r.end) for r in bus.devices()] == [
        (0x3F0, 0x3F8),
        (0x3F8, 0x400),
        (0x400, 0x401),
    ]


@pytest.mark.parametrize("length", [0, -4])
def test_empty_range_is_refused(length: int) -> None:
    with pytest.raises(BusError, match="not positive"):
        Bus("pio").insert(Recorder(), 0x10, length)


def test_negative_base_is_refused() -> None:
    with pytest.raises(BusError, match="negative"):
        Bus("pio").insert(Recorder(), -1, 2)


def test_remove_returns_the_device() -> None:
    bus = Bus("mmio")
    dev = Recorder()
    bus.insert(dev, 0x2000, 0x10)
    with pytest.raises(BusError, match="no range starts at 0x2001"):
        bus.remove(0x2001)
    assert bus.remove(0x2000) is dev
    assert bus.devices() == ()
    assert not bus.read(0x2000, memoryview(bytearray(1)))


def test_update_range_moves_a_bar() -> None:
    bus = Bus("mmio")
    dev, other = Recorder(1), Recorder(2)
    bus.insert(dev, 0x1000, 0x100)
    bus.insert(other, 0x3000, 0x100)
    bus.update_range(0x1000, 0x2000, 0x100)
    assert bus.find(0x1000) is None
    found = bus.find(0x2080, 4)
    assert found is not None and found.device is dev and found.base == 0x2000
    with pytest.raises(BusError, match="overlaps"):
        bus.update_range(0x2000, 0x2F00, 0x200)
    # a refused move leaves the range where it was
    assert bus.find(0x2000) is not None
    with pytest.raises(BusError, match="no range starts"):
        bus.update_range(0x5000, 0x6000, 0x100)
    # moving onto an overlapping part of its own old range is allowed
    bus.update_range(0x2000, 0x2080, 0x100)
    assert [r.base for r in bus.devices()] == [0x2080, 0x3000]


# --- property tests ---------------------------------------------------------------------


class BusMachine(RuleBasedStateMachine):
    """Random inserts, removes and moves against a dict model of the address space."""

    def __init__(self) -> None:
        super().__init__()
        self.bus = Bus("model")
        self.model: dict[int, tuple[int, Recorder]] = {}

    def _overlaps(self, base: int, length: int, skip: int | None = None) -> bool:
        return any(
            b < base + length and base < b + n for b, (n, _) in self.model.items() if b != skip
        )

    @rule(base=st.integers(0, 300), length=st.integers(-2, 40))
    def insert(self, base: int, length: int) -> None:
        dev = Recorder(len(self.model) & 0xFF)
        if length <= 0 or self._overlaps(base, length):
            with pytest.raises(BusError):
                self.bus.insert(dev, base, length)
        else:
            self.bus.insert(dev, base, length)
            self.model[base] = (length, dev)

    @rule(base=st.integers(0, 300))
    def remove(self, base: int) -> None:
        if base in self.model:
            assert self.bus.remove(base) is self.model.pop(base)[1]
        else:
            with pytest.raises(BusError):
                self.bus.remove(base)

    @rule(old=st.integers(0, 300), new=st.integers(0, 300), length=st.integers(1, 40))
    def move(self, old: int, new: int, length: int) -> None:
        if old in self.model and not self._overlaps(new, length, skip=old):
            self.bus.update_range(old, new, length)
            dev = self.model.pop(old)[1]
            self.model[new] = (length, dev)
        else:
            with pytest.raises(BusError):
                self.bus.update_range(old, new, length)

    @rule(addr=st.integers(-5, 360), size=st.sampled_from([1, 2, 4, 8]))
    def lookup(self, addr: int, size: int) -> None:
        expected = None
        for b, (n, dev) in self.model.items():
            if b <= addr and addr + size <= b + n:
                expected = (b, dev)
        data = memoryview(bytearray(size))
        handled = self.bus.read(addr, data)
        if expected is None:
            assert not handled
            assert bytes(data) == b"\xff" * size
        else:
            base, dev = expected
            assert handled
            assert dev.accesses[-1] == ("r", base, addr - base, bytes([dev.tag]) * size)

    @invariant()
    def ranges_never_overlap(self) -> None:
        ranges = self.bus.devices()
        for first, second in itertools.pairwise(ranges):
            assert first.end <= second.base
        assert {r.base: r.length for r in ranges} == {b: n for b, (n, _) in self.model.items()}


BusMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_bus_state_machine = BusMachine.TestCase


@settings(max_examples=100, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 50)), max_size=20),
    addr=st.integers(-10, 1100),
)
def test_find_agrees_with_linear_scan(ranges: list[tuple[int, int]], addr: int) -> None:
    bus = Bus("scan")
    accepted: list[tuple[int, int]] = []
    for base, length in ranges:
        try:
            bus.insert(Recorder(), base, length)
            accepted.append((base, length))
        except BusError:
            assert any(b < base + length and base < b + n for b, n in accepted)
    found = bus.find(addr)
    matches = [(b, n) for b, n in accepted if b <= addr < b + n]
    assert len(matches) <= 1
    assert (found.base, found.length) == matches[0] if found else matches == []
