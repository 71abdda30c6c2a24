"""Tests for virtio-rng (nubis.virtio.rng) with the mock driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nubis.memory import GuestMemory
from nubis.virtio.device import VIRTIO_F_VERSION_1, DeviceType, InterruptKind
from nubis.virtio.mock import MockDriver
from nubis.virtio.queue import VIRTQ_DESC_F_WRITE
from nubis.virtio.rng import Rng


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, 0x40000)])
    yield mem
    mem.close()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "entropy"
    path.write_bytes(bytes(range(256)) * 64)
    return path


def test_identity_and_config(source: Path) -> None:
    rng = Rng(source)
    try:
        assert rng.device_type is DeviceType.ENTROPY
        assert rng.avail_features >> VIRTIO_F_VERSION_1 & 1
        config = bytearray(b"\xff" * 8)
        rng.read_config(0, memoryview(config))
        assert config == bytes(8)
    finally:
        rng.shutdown()


def test_bad_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="not positive"):
        Rng(max_bytes=0)


def test_fills_writable_buffers_from_the_source(source: Path, memory: GuestMemory) -> None:
    rng = Rng(source, max_bytes=1000)
    driver = MockDriver(rng, memory)
    driver.activate()
    mock = driver.queues[0]
    try:
        first = mock.add_chain([], [100, 28])
        second = mock.add_chain([], [4096])  # capped at 1000 bytes
        driver.notify(0)
        driver.wait_used(0, 2)
        assert mock.take_used() == [(first.head, 128), (second.head, 1000)]
        expected = bytes(range(256)) * 64
        assert mock.read_buffers(first.writable) == expected[:128]
        assert memory.read(second.writable[0][0], 1000) == expected[128:1128]
        assert memory.read(second.writable[0][0] + 1000, 8) == bytes(8)
        assert rng.counters() == {"bytes": 1128, "requests": 2, "source_errors": 0}
        assert (InterruptKind.QUEUE, 0) in driver.interrupt.events
    finally:
        rng.shutdown()
        driver.close()


def test_urandom_by_default(memory: GuestMemory) -> None:
    rng = Rng()
    driver = MockDriver(rng, memory)
    driver.activate()
    try:
        chain = driver.queues[0].add_chain([], [64])
        driver.notify(0)
        driver.wait_used(0, 1)
        assert driver.queues[0].take_used() == [(chain.head, 64)]
        assert memory.read(chain.writable[0][0], 64) != bytes(64)
    finally:
        rng.shutdown()
        driver.close()


def test_readable_only_chain_gets_nothing(source: Path, memory: GuestMemory) -> None:
    rng = Rng(source)
    driver = MockDriver(rng, memory)
    driver.activate()
    try:
        chain = driver.queues[0].add_chain([b"abc"])
        driver.notify(0)
        driver.wait_used(0, 1)
        assert driver.queues[0].take_used() == [(chain.head, 0)]
        assert memory.read(chain.readable[0][0], 3) == b"abc"
    finally:
        rng.shutdown()
        driver.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    table=st.lists(
        st.tuples(
            st.integers(0, 0x50000),
            st.integers(0, 0x20000),
            st.sampled_from([0, 1, 2, 3, 4, 7]),
            st.integers(0, 9),
        ),
        min_size=8,
        max_size=8,
    ),
    heads=st.lists(st.integers(0, 9), min_size=1, max_size=8),
)
def test_hostile_tables_touch_only_writable_buffers(
    source: Path, table: list[tuple[int, int, int, int]], heads: list[int]
) -> None:
    # One region [0, 256K) with the rings at 0; nothing else exists.
    with GuestMemory([(0, 0x40000)]) as memory:
        rng = Rng(source, max_bytes=0x800)
        driver = MockDriver(rng, memory, sizes=[8], stride=0x40000)
        mock = driver.queues[0]
        for index, desc in enumerate(table):
            mock.write_descriptor(index, *desc)
        for head in heads:
            mock.publish(head)
        before = bytes(memory.regions[0].view)
        driver.activate()  # the worker processes what is already published, then
        rng.reset()  # reset waits for it
        after = bytes(memory.regions[0].view)
        allowed = [(mock.used_ring, mock.used_ring + 6 + 8 * 8)] + [
            (addr, addr + length) for addr, length, flags, _ in table if flags & VIRTQ_DESC_F_WRITE
        ]
        for offset in (i for i in range(len(before)) if before[i] != after[i]):
            assert any(lo <= offset < hi for lo, hi in allowed), hex(offset)
        # Sane end state: every chain completed, or the device asked for a reset.
        assert driver.needs_reset.is_set() or mock.used_idx() == len(heads)
        assert not rng.active
        rng.shutdown()
        driver.close()
