"""Tests for virtio-blk (nubis.virtio.block) with the mock driver and real temporary files.

Tests that move data run on both backends: ``threads`` (a buffered disk, the I/O thread pool)
and ``aio`` (a direct disk on a filesystem with O_DIRECT, native AIO, buffers 512-byte aligned
so that they take the O_DIRECT descriptor).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nubis.memory import GuestMemory
from nubis.virtio.block import (
    ASYNC_DIRECT_IO_FSTYPES,
    CONFIG,
    DISCARD_SEGMENT,
    MAX_DISCARD_SEGMENTS,
    REQUEST_HEADER,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    Block,
    has_async_direct_io,
    mount_fstype,
)
from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceType,
    InterruptKind,
)
from nubis.virtio.mock import MockChain, MockDriver

DISK_SECTORS = 2048  # 1 MiB


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, 0x100000)])
    yield mem
    mem.close()


@pytest.fixture(params=["threads", "aio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def disk(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[Path]:
    directory = tmp_path
    if backend == "aio":
        directory = request.getfixturevalue("direct_dir") / tmp_path.name
        directory.mkdir()
    path = directory / "disk.img"
    path.write_bytes(bytes(range(256)) * (DISK_SECTORS * 2))
    yield path
    if backend == "aio":
        path.unlink(missing_ok=True)
        directory.rmdir()


def _open(disk: Path, backend: str, **options: Any) -> Block:
    """The device for ``backend``: a direct disk uses native AIO."""
    return Block(disk, direct=backend == "aio", **options)


class Harness:
    """A block device activated over a mock driver."""

    def __init__(
        self, block: Block, memory: GuestMemory, *, event_idx: bool = False, aio: bool | None = None
    ) -> None:
        self.block = block
        self.memory = memory
        self.driver = MockDriver(block, memory, event_idx=event_idx)
        self.driver.activate()
        self.mock = self.driver.queues[0]
        # The backend under test is the one in use (a direct disk uses native AIO by default).
        if aio is None:  # the default: native AIO where the file system runs it asynchronously
            aio = block.direct and has_async_direct_io(block._direct_fd)
        assert block.uses_native_aio == aio
        self.alignment = 512 if block.direct else 8

    def submit(
        self,
        kind: int,
        sector: int = 0,
        data: bytes = b"",
        read_len: int = 0,
        *,
        indirect: bool = False,
    ) -> tuple[int, bytes, int]:
        """Run one request; returns (status, data read, used length)."""
        header = REQUEST_HEADER.pack(kind, 0, sector)
        readable = [header, data] if data else [header]
        writable = [read_len, 1] if read_len else [1]
        chain = self.mock.add_chain(readable, writable, indirect=indirect, alignment=self.alignment)
        return self.complete(chain)

    def complete(self, chain: MockChain) -> tuple[int, bytes, int]:
        self.driver.notify(0)
        self.driver.wait_used(0, 1)
        ((head, length),) = self.mock.take_used()
        assert head == chain.head
        self.mock.reset_data()
        status_addr, _ = chain.writable[-1]
        data = self.mock.read_buffers(chain.writable[:-1])
        return self.memory.read(status_addr, 1)[0], data, length

    def close(self) -> None:
        self.block.shutdown()
        self.driver.close()


@pytest.fixture
def harness(disk: Path, memory: GuestMemory, backend: str) -> Iterator[Harness]:
    h = Harness(_open(disk, backend, serial="nubis-disk-0"), memory)
    yield h
    h.close()


def test_layouts_match_the_spec() -> None:
    assert REQUEST_HEADER.size == 16
    assert DISCARD_SEGMENT.size == 16
    assert CONFIG.size == 72
    fields = list(range(1, 24))
    packed = CONFIG.pack(*fields)
    # blk_size at 20, num_queues at 34, max_discard_sectors at 36, max_write_zeroes_sectors at
    # 48, write_zeroes_may_unmap at 56, secure erase fields from 60 (5.2.4).
    assert int.from_bytes(packed[20:24], "little") == 7
    assert int.from_bytes(packed[34:36], "little") == 14
    assert int.from_bytes(packed[36:40], "little") == 15
    assert int.from_bytes(packed[48:52], "little") == 18
    assert packed[56] == 20
    assert int.from_bytes(packed[60:64], "little") == 21


def test_identity_features_and_config(disk: Path) -> None:
    block = Block(disk)
    try:
        assert block.device_type is DeviceType.BLOCK
        assert block.capacity == DISK_SECTORS
        features = block.avail_features
        for bit in (
            VIRTIO_F_VERSION_1,
            VIRTIO_F_RING_EVENT_IDX,
            VIRTIO_F_RING_INDIRECT_DESC,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ):
            assert features >> bit & 1
        assert not features >> VIRTIO_BLK_F_RO & 1
        config = bytearray(80)
        block.read_config(0, memoryview(config))
        assert int.from_bytes(config[0:8], "little") == DISK_SECTORS
        assert int.from_bytes(config[12:16], "little") == 254  # seg_max: queue size - 2
        assert int.from_bytes(config[20:24], "little") == 512
        assert config[72:] == bytes(8)
        tail = bytearray(b"\xff" * 4)
        block.read_config(2**40, memoryview(tail))
        assert tail == bytes(4)
        block.write_config(0, memoryview(b"\xff" * 8))
        block.read_config(0, memoryview(config))
        assert int.from_bytes(config[0:8], "little") == DISK_SECTORS
    finally:
        block.shutdown()


def test_readonly_offers_ro(disk: Path) -> None:
    block = Block(disk, readonly=True)
    try:
        assert block.avail_features >> VIRTIO_BLK_F_RO & 1
    finally:
        block.shutdown()


def test_serial_longer_than_20_bytes_is_refused(disk: Path) -> None:
    with pytest.raises(ValueError, match="longer than 20 bytes"):
        Block(disk, serial="x" * 21)


def test_missing_file_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Block(tmp_path / "missing.img")


@pytest.mark.parametrize("indirect", [False, True])
def test_read_returns_file_contents(harness: Harness, disk: Path, indirect: bool) -> None:
    status, data, used = harness.submit(VIRTIO_BLK_T_IN, 3, read_len=1024, indirect=indirect)
    assert status == VIRTIO_BLK_S_OK
    assert data == disk.read_bytes()[3 * 512 : 5 * 512]
    assert used == 1025
    counters = harness.block.counters()
    assert counters["read_ops"] == 1 and counters["read_bytes"] == 1024
    assert harness.driver.interrupt.events[-1] == (InterruptKind.QUEUE, 0)


def test_write_reaches_the_file(harness: Harness, disk: Path) -> None:
    payload = os.urandom(1536)
    status, _, used = harness.submit(VIRTIO_BLK_T_OUT, 10, payload)
    assert status == VIRTIO_BLK_S_OK and used == 1
    assert disk.read_bytes()[10 * 512 : 13 * 512] == payload
    assert harness.block.counters()["write_bytes"] == 1536


def test_header_and_data_split_anyhow(harness: Harness, disk: Path) -> None:
    # Message framing is free (2.6.4): header in two pieces, then data glued to the header tail.
    payload = os.urandom(512)
    header = REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 7)
    chain = harness.mock.add_chain([header[:5], header[5:] + payload[:100], payload[100:]], [1])
    status, _, _ = harness.complete(chain)
    assert status == VIRTIO_BLK_S_OK
    assert disk.read_bytes()[7 * 512 : 8 * 512] == payload
    # Data and status in one writable buffer.
    header = REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 7)
    chain = harness.mock.add_chain([header], [513])
    harness.driver.notify(0)
    harness.driver.wait_used(0, 1)
    assert harness.mock.take_used() == [(chain.head, 513)]
    addr = chain.writable[0][0]
    assert harness.memory.read(addr, 512) == payload
    assert harness.memory.read(addr + 512, 1) == bytes([VIRTIO_BLK_S_OK])


def test_flush_reaches_fdatasync_before_completion(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        seen.append(harness.mock.used_idx())
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    status, _, _ = harness.submit(VIRTIO_BLK_T_FLUSH)
    assert status == VIRTIO_BLK_S_OK
    assert seen == [0]  # fdatasync ran while the request was not yet used
    assert harness.block.counters()["flush_ops"] == 1


def test_get_id_returns_the_serial(harness: Harness) -> None:
    status, data, used = harness.submit(VIRTIO_BLK_T_GET_ID, read_len=20)
    assert status == VIRTIO_BLK_S_OK
    assert data == b"nubis-disk-0".ljust(20, b"\0")
    assert used == 21


def test_out_of_range_requests_fail(harness: Harness, disk: Path) -> None:
    before = disk.read_bytes()
    assert harness.submit(VIRTIO_BLK_T_IN, DISK_SECTORS, read_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert harness.submit(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, read_len=1024)[0] == 1
    assert harness.submit(VIRTIO_BLK_T_OUT, 2**64 - 1, b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert harness.submit(VIRTIO_BLK_T_OUT, 0, b"x" * 100)[0] == VIRTIO_BLK_S_IOERR
    assert harness.submit(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, read_len=512)[0] == VIRTIO_BLK_S_OK
    assert disk.read_bytes() == before
    assert harness.block.counters()["io_errors"] == 4


def test_unknown_request_is_unsupported(harness: Harness) -> None:
    for kind in (2, 10, 14, 0xFFFFFFFF):
        assert harness.submit(kind)[0] == VIRTIO_BLK_S_UNSUPP
    assert harness.block.counters()["unsupported_ops"] == 4


def test_short_header_is_an_ioerr(harness: Harness) -> None:
    chain = harness.mock.add_chain([b"\0" * 15], [1])
    assert harness.complete(chain)[0] == VIRTIO_BLK_S_IOERR


def test_chain_without_writable_buffer_is_returned_untouched(harness: Harness) -> None:
    chain = harness.mock.add_chain([REQUEST_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0)])
    harness.driver.notify(0)
    harness.driver.wait_used(0, 1)
    assert harness.mock.take_used() == [(chain.head, 0)]
    assert harness.block.counters()["malformed_requests"] == 1


def _poll(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for ``predicate`` without relying on interrupts; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the device did not reach the expected state"
        time.sleep(0.002)


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks


def test_discard_punches_holes(harness: Harness, disk: Path) -> None:
    before = _allocated(disk)
    segment = DISCARD_SEGMENT.pack(0, 1024, 0) + DISCARD_SEGMENT.pack(1024, 512, 0)
    status, _, _ = harness.submit(VIRTIO_BLK_T_DISCARD, data=segment)
    assert status == VIRTIO_BLK_S_OK
    assert _allocated(disk) < before
    assert disk.stat().st_size == DISK_SECTORS * 512
    assert disk.read_bytes()[: 1536 * 512] == bytes(1536 * 512)
    assert harness.block.counters()["discard_ops"] == 1


def test_discard_rejects_bad_segments(harness: Harness, disk: Path) -> None:
    before = disk.read_bytes()
    cases = [
        (DISCARD_SEGMENT.pack(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), VIRTIO_BLK_S_UNSUPP),
        (DISCARD_SEGMENT.pack(0, 8, 2), VIRTIO_BLK_S_UNSUPP),
        (DISCARD_SEGMENT.pack(DISK_SECTORS - 1, 2, 0), VIRTIO_BLK_S_IOERR),
        (DISCARD_SEGMENT.pack(2**64 - 1, 2**32 - 1, 0), VIRTIO_BLK_S_IOERR),
        (DISCARD_SEGMENT.pack(0, 8, 0)[:15], VIRTIO_BLK_S_IOERR),
        (DISCARD_SEGMENT.pack(0, 8, 0) * (MAX_DISCARD_SEGMENTS + 1), VIRTIO_BLK_S_IOERR),
    ]
    for data, expected in cases:
        assert harness.submit(VIRTIO_BLK_T_DISCARD, data=data)[0] == expected
    assert harness.submit(VIRTIO_BLK_T_DISCARD)[0] == VIRTIO_BLK_S_IOERR
    assert disk.read_bytes() == before


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(harness: Harness, disk: Path, unmap: bool) -> None:
    flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
    before = disk.read_bytes()
    blocks = _allocated(disk)
    data = DISCARD_SEGMENT.pack(8, 256, flags)
    status, _, _ = harness.submit(VIRTIO_BLK_T_WRITE_ZEROES, data=data)
    assert status == VIRTIO_BLK_S_OK
    after = disk.read_bytes()
    assert after[8 * 512 : 264 * 512] == bytes(256 * 512)
    assert after[: 8 * 512] == before[: 8 * 512]
    assert after[264 * 512 :] == before[264 * 512 :]
    if unmap:
        assert _allocated(disk) < blocks
    assert harness.block.counters()["write_zeroes_ops"] == 1


def test_readonly_disk_refuses_changes(disk: Path, memory: GuestMemory, backend: str) -> None:
    before = disk.read_bytes()
    mtime = disk.stat().st_mtime_ns
    h = Harness(_open(disk, backend, readonly=True), memory)
    try:
        assert h.submit(VIRTIO_BLK_T_OUT, 0, b"\xaa" * 512)[0] == VIRTIO_BLK_S_IOERR
        discard = DISCARD_SEGMENT.pack(0, 8, 0)
        assert h.submit(VIRTIO_BLK_T_DISCARD, data=discard)[0] == VIRTIO_BLK_S_IOERR
        zeroes = DISCARD_SEGMENT.pack(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        assert h.submit(VIRTIO_BLK_T_WRITE_ZEROES, data=zeroes)[0] == VIRTIO_BLK_S_IOERR
        assert h.submit(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
        status, data, _ = h.submit(VIRTIO_BLK_T_IN, 0, read_len=512)
        assert status == VIRTIO_BLK_S_OK and data == before[:512]
    finally:
        h.close()
    assert disk.read_bytes() == before
    assert disk.stat().st_mtime_ns == mtime


def test_read_past_a_shrunk_file_fills_zeroes(harness: Harness, disk: Path) -> None:
    os.truncate(disk, 512 * 10 + 100)
    status, data, _ = harness.submit(VIRTIO_BLK_T_IN, 9, read_len=1536)
    assert status == VIRTIO_BLK_S_OK
    assert data[:612] == (bytes(range(256)) * 40)[9 * 512 : 9 * 512 + 612]
    assert data[612:] == bytes(1536 - 612)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("native_aio", [False, True])
def test_direct_io(
    direct_dir: Path, tmp_path: Path, memory: GuestMemory, aligned: bool, native_aio: bool
) -> None:
    disk = direct_dir / f"{tmp_path.name}.img"
    disk.write_bytes(bytes(range(256)) * (DISK_SECTORS * 2))
    h = Harness(Block(disk, direct=True, native_aio=native_aio), memory, aio=native_aio)
    try:
        payload = os.urandom(4096)
        header = REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 16)
        if not aligned:
            h.mock.alloc(3)  # push the data buffer off alignment
        data_addr = h.mock.alloc(4096, 4096 if aligned else 1)
        h.memory.write(data_addr, payload)
        hdr_addr = h.mock.alloc(16)
        h.memory.write(hdr_addr, header)
        status_addr = h.mock.alloc(1)
        h.mock.write_descriptor(0, hdr_addr, 16, 1, 1)
        h.mock.write_descriptor(1, data_addr, 4096, 1, 2)
        h.mock.write_descriptor(2, status_addr, 1, 2, 0)
        h.mock.publish(0)
        h.driver.notify(0)
        h.driver.wait_used(0, 1)
        h.mock.take_used()
        assert h.memory.read(status_addr, 1)[0] == VIRTIO_BLK_S_OK
        assert disk.read_bytes()[16 * 512 : 24 * 512] == payload
        h.memory.write(data_addr, bytes(4096))
        h.memory.write(hdr_addr, REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 16))
        h.mock.write_descriptor(1, data_addr, 4096, 3, 2)
        h.mock.publish(0)
        h.driver.notify(0)
        h.driver.wait_used(0, 1)
        assert h.memory.read(status_addr, 1)[0] == VIRTIO_BLK_S_OK
        assert h.memory.read(data_addr, 4096) == payload
    finally:
        h.close()
        disk.unlink()


def test_many_requests_with_event_idx(disk: Path, memory: GuestMemory, backend: str) -> None:
    h = Harness(_open(disk, backend), memory, event_idx=True)
    try:
        h.mock.set_used_event(0xFFFF)  # no interrupt wanted
        chains = [
            h.mock.add_chain(
                [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, i)], [512, 1], alignment=h.alignment
            )
            for i in range(50)
        ]
        h.driver.notify(0)
        # Completion is polled through the used ring; the driver asked not to be interrupted
        # (the first interrupt is always sent: the device has not signalled before).
        _poll(lambda: h.mock.used_idx() == 50)
        # Requests run concurrently, so they may complete in any order (2.7.8).
        assert sorted(head for head, _ in h.mock.take_used()) == sorted(c.head for c in chains)
        assert (InterruptKind.QUEUE, 0) not in h.driver.interrupt.events[1:]
        assert h.mock.avail_event() == 50
    finally:
        h.close()


def test_hostile_chain_sets_needs_reset_and_reset_recovers(harness: Harness) -> None:
    harness.mock.write_descriptor(0, 0x1000, 16, 1, 0)  # loops onto itself
    harness.mock.publish(0)
    harness.driver.notify(0)
    harness.driver.wait_used(0, 1)
    assert harness.driver.needs_reset.is_set()
    assert harness.block.failed
    harness.block.reset()
    assert not harness.block.active
    # A fresh activation over fresh rings works again.
    harness.driver.close()
    harness.driver = MockDriver(harness.block, harness.memory)
    harness.driver.activate()
    harness.mock = harness.driver.queues[0]
    assert harness.submit(VIRTIO_BLK_T_GET_ID, read_len=20)[0] == VIRTIO_BLK_S_OK


def test_shutdown_drains_the_queue_and_flushes(
    disk: Path, memory: GuestMemory, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    h = Harness(_open(disk, backend), memory)
    payload = os.urandom(512)
    # Published without a notification: shutdown must still complete it.
    chain = h.mock.add_chain(
        [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 5), payload], [1], alignment=h.alignment
    )
    synced: list[int] = []
    real = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    h.close()
    assert h.mock.take_used() == [(chain.head, 1)]
    assert disk.read_bytes()[5 * 512 : 6 * 512] == payload
    assert synced


def test_native_aio_is_chosen_by_the_file_system(direct_dir: Path, tmp_path: Path) -> None:
    """Native AIO by default only where O_DIRECT I/O is asynchronous; forcing it still works."""
    with open("/dev/shm/nubis-statfs-probe", "wb") as probe:  # tmpfs: io_submit would block
        try:
            assert not has_async_direct_io(probe.fileno())
        finally:
            os.unlink(probe.name)
    disk = direct_dir / "disk.img"
    disk.write_bytes(bytes(1 << 16))
    # findmnt(8) names the mount's type, which nubis reads from /proc/self/mountinfo first.
    fstype = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert mount_fstype(disk.stat().st_dev) == fstype
    async_here = fstype in ASYNC_DIRECT_IO_FSTYPES
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert has_async_direct_io(fd) == async_here
    finally:
        os.close(fd)
    for native_aio, direct, expected in (
        (None, True, async_here),
        (True, True, True),
        (False, True, False),
        (True, False, False),
    ):
        block = Block(disk, direct=direct, native_aio=native_aio)
        try:
            assert block._native_aio == expected
        finally:
            block.shutdown()
