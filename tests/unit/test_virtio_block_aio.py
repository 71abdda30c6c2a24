"""virtio-blk's native AIO backend: batching, completion order, refused submissions, barriers,
reset and shutdown with requests in flight.

The disk is a direct one in a directory that supports O_DIRECT. The seam is
``nubis.virtio.aio.syscall``: a :class:`FakeSyscall` passes every call on to the kernel but
records the submissions, can make ``io_submit`` take fewer iocbs or fail, and can hold back
completions (taking them from the kernel and handing them to the device only later, in any
order), so the tests decide when and in which order the device learns about them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from block_rig import BlockRig

from nubis.memory import GuestMemory
from nubis.virtio import aio
from nubis.virtio import block as block_module
from nubis.virtio.block import (
    REQUEST_HEADER,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
)
from nubis.virtio.device import InterruptKind
from nubis.virtio.mock import MockDriver

DISK_SECTORS = 4096  # 2 MiB
CONTENTS = b"".join(i.to_bytes(4, "little") * 128 for i in range(DISK_SECTORS))


def _poll(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the expected state was not reached"
        time.sleep(0.002)


class FakeSyscall:
    """``syscall(2)`` for native AIO with a test's hands on it."""

    def __init__(self) -> None:
        self.real = aio.syscall
        self.lock = threading.Lock()
        #: Each io_submit: (iocbs offered, iocbs taken or -errno).
        self.submits: list[tuple[int, int]] = []
        #: What io_submit does next, one entry per call: ("take", n), ("fail", errno).
        self.script: list[tuple[str, int]] = []
        #: Calls in order: ("submit", offered, taken), ("events", n), ("destroy",).
        self.log: list[tuple[int | str, ...]] = []
        #: Of each iocb the kernel took: (fd, opcode, iovec count, offset).
        self.iocbs: list[tuple[int, int, int, int]] = []
        #: While clear, completions are taken from the kernel but not handed on.
        self.release = threading.Event()
        self.release.set()
        self.held: list[bytes] = []
        self.reverse = False
        self.in_kernel = 0
        #: The disk offsets of the iocbs whose completions were handed on, in the order handed.
        self.handed_offsets: list[int] = []
        #: Rewrites of the results of the next completions handed on, one each, in order.
        self.rewrites: list[Callable[[int], int]] = []

    def __call__(self, number: int, a1: int, a2: int, a3: int, a4: int, a5: int) -> int:
        if number == aio.SYS_IO_SUBMIT:
            return self._submit(a1, a2, a3)
        if number == aio.SYS_IO_GETEVENTS:
            return self._get_events(a1, a3, a4, a5)
        if number == aio.SYS_IO_DESTROY:
            with self.lock:
                self.log.append(("destroy",))
        return self.real(number, a1, a2, a3, a4, a5)

    def _submit(self, handle: int, count: int, pointers: int) -> int:
        action, value = self.script.pop(0) if self.script else ("take", count)
        if action == "fail":
            with self.lock:
                self.submits.append((count, -value))
                self.log.append(("submit", count, -value))
            ctypes.set_errno(value)
            return -1
        taken = self.real(aio.SYS_IO_SUBMIT, handle, min(count, value), pointers, 0, 0)
        with self.lock:
            self.submits.append((count, taken))
            self.log.append(("submit", count, taken))
            if taken > 0:
                self.in_kernel += taken
                addresses = struct.unpack(f"<{taken}Q", ctypes.string_at(pointers, 8 * taken))
                for address in addresses:
                    fields = aio.IOCB.unpack(ctypes.string_at(address, aio.IOCB.size))
                    self.iocbs.append((fields[5], fields[3], fields[7], fields[8]))
        return taken

    def _get_events(self, handle: int, max_events: int, events: int, timeout: int) -> int:
        scratch = ctypes.create_string_buffer(aio.IO_EVENT.size * max_events)
        count = self.real(
            aio.SYS_IO_GETEVENTS, handle, 0, max_events, ctypes.addressof(scratch), timeout
        )
        assert count >= 0
        with self.lock:
            self.in_kernel -= count
            size = aio.IO_EVENT.size
            self.held += [scratch.raw[i * size : (i + 1) * size] for i in range(count)]
            if not self.release.is_set():
                return 0
            handed = self.held[:max_events]
            del self.held[: len(handed)]
            if self.reverse:
                handed.reverse()
            for i in range(min(len(handed), len(self.rewrites))):
                data, obj, result, result2 = aio.IO_EVENT.unpack(handed[i])
                rewritten = self.rewrites.pop(0)(result)
                handed[i] = aio.IO_EVENT.pack(data, obj, rewritten, result2)
            for event in handed:
                iocb = ctypes.string_at(aio.IO_EVENT.unpack(event)[1], aio.IOCB.size)
                self.handed_offsets.append(aio.IOCB.unpack(iocb)[8])
            ctypes.memmove(events, b"".join(handed), size * len(handed))
            self.log.append(("events", len(handed)))
            return len(handed)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeSyscall:
    syscall = FakeSyscall()
    monkeypatch.setattr(aio, "syscall", syscall)
    return syscall


@pytest.fixture
def disk(direct_dir: Path, tmp_path: Path) -> Iterator[Path]:
    path = direct_dir / f"{tmp_path.name}.img"
    path.write_bytes(CONTENTS)
    yield path
    path.unlink()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, 0x100000)])
    yield mem
    mem.close()


class Rig(BlockRig):
    alignment = 4096  # O_DIRECT: buffers the kernel can use as they are

    def activate(self) -> None:
        self.driver.activate()
        assert self.block.uses_native_aio


@pytest.fixture
def rig(disk: Path, memory: GuestMemory, fake: FakeSyscall) -> Iterator[Rig]:
    r = Rig(Block(disk, direct=True), memory)
    yield r
    if not fake.release.is_set():  # a failed test must not leave shutdown waiting
        fake.release.set()
        r.kick_completions()
    r.close()


def _sector_data(sector: int, length: int) -> bytes:
    return CONTENTS[sector * 512 : sector * 512 + length]


def test_a_burst_goes_out_in_one_io_submit_on_the_direct_descriptor(
    rig: Rig, fake: FakeSyscall, disk: Path
) -> None:
    payloads = [os.urandom(4096) for _ in range(8)]
    # Gaps between the writes, and reads that overlap: nothing for the device to merge.
    writes = [rig.add(VIRTIO_BLK_T_OUT, 16 * i, data) for i, data in enumerate(payloads)]
    reads = [rig.add(VIRTIO_BLK_T_IN, 1000 + 8 * i, read_len=8192) for i in range(8)]
    rig.activate()
    rig.driver.wait_used(0, 16)
    used = dict(rig.mock.take_used())
    assert used == {**{w.head: 1 for w in writes}, **{r.head: 8193 for r in reads}}
    assert fake.submits == [(16, 16)]
    direct_fd = rig.block._direct_fd
    opcodes = [aio.IOCB_CMD_PWRITEV] * 8 + [aio.IOCB_CMD_PREADV] * 8
    offsets = [16 * i * 512 for i in range(8)] + [(1000 + 8 * i) * 512 for i in range(8)]
    assert fake.iocbs == [
        (direct_fd, opcode, 1, offset) for opcode, offset in zip(opcodes, offsets, strict=True)
    ]
    for i, chain in enumerate(reads):
        assert rig.status(chain) == VIRTIO_BLK_S_OK
        assert rig.data(chain) == _sector_data(1000 + 8 * i, 8192)
    assert all(rig.status(w) == VIRTIO_BLK_S_OK for w in writes)
    contents = disk.read_bytes()
    for i, data in enumerate(payloads):
        assert contents[16 * i * 512 : (16 * i + 8) * 512] == data
    counters = rig.block.counters()
    assert counters["read_ops"] == 8 and counters["read_bytes"] == 8 * 8192
    assert counters["write_ops"] == 8 and counters["write_bytes"] == 8 * 4096
    # No I/O thread was started.
    assert not any(t.name.startswith(f"nubis-block:{disk}-io") for t in threading.enumerate())


def test_requests_that_follow_one_another_on_disk_share_an_iocb(
    rig: Rig, fake: FakeSyscall, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(block_module, "MERGE_MAX_BYTES", 3 * 4096)
    # Five reads in a row on disk: two iocbs, as the cap allows three requests at most.
    reads = [rig.add(VIRTIO_BLK_T_IN, 8 * i, read_len=4096) for i in range(5)]
    # Two writes in a row, then a read that follows them on disk: no merging across directions.
    payloads = [os.urandom(4096), os.urandom(4096)]
    writes = [rig.add(VIRTIO_BLK_T_OUT, 100 + 8 * i, data) for i, data in enumerate(payloads)]
    after = rig.add(VIRTIO_BLK_T_IN, 116, read_len=4096)
    # Reads with gaps between them, and one that overlaps the one before: alone, each.
    apart = [rig.add(VIRTIO_BLK_T_IN, sector, read_len=4096) for sector in (200, 300, 304)]
    rig.activate()
    rig.driver.wait_used(0, 11)
    used = dict(rig.mock.take_used())
    assert used == {
        **{c.head: 4097 for c in [*reads, after, *apart]},
        **{w.head: 1 for w in writes},
    }
    direct_fd = rig.block._direct_fd
    read, write = aio.IOCB_CMD_PREADV, aio.IOCB_CMD_PWRITEV
    assert fake.submits == [(7, 7)]
    assert fake.iocbs == [
        (direct_fd, read, 3, 0),
        (direct_fd, read, 2, 24 * 512),
        (direct_fd, write, 2, 100 * 512),
        (direct_fd, read, 1, 116 * 512),
        (direct_fd, read, 1, 200 * 512),
        (direct_fd, read, 1, 300 * 512),
        (direct_fd, read, 1, 304 * 512),
    ]
    sectors = [0, 8, 16, 24, 32, 116, 200, 300, 304]
    for chain, sector in zip([*reads, after, *apart], sectors, strict=True):
        assert rig.status(chain) == VIRTIO_BLK_S_OK
        assert rig.data(chain) == _sector_data(sector, 4096)
    assert all(rig.status(w) == VIRTIO_BLK_S_OK for w in writes)
    assert disk.read_bytes()[100 * 512 : 116 * 512] == b"".join(payloads)
    counters = rig.block.counters()
    assert counters["read_ops"] == 9 and counters["read_bytes"] == 9 * 4096
    assert counters["write_ops"] == 2 and counters["write_bytes"] == 2 * 4096
    # Requests that rode in another's iocb: two and one of the reads, one of the writes.
    assert counters["merged_requests"] == 4


@pytest.mark.parametrize(
    ("rewrites", "failures"),
    [
        ([lambda result: result - 4096 - 512], 0),  # the merged iocb moved less than asked
        ([lambda result: -errno.EIO], 0),  # it failed, but each request alone succeeds
        ([lambda result: -errno.EIO] * 2, 1),  # it failed, and so does one request alone
    ],
    ids=["short", "failed", "failed-alone-too"],
)
def test_a_merged_iocb_that_comes_back_short_or_failed_goes_again_request_by_request(
    rig: Rig, fake: FakeSyscall, rewrites: list[Callable[[int], int]], failures: int
) -> None:
    fake.rewrites = list(rewrites)
    chains = [rig.add(VIRTIO_BLK_T_IN, 40 + 8 * i, read_len=4096) for i in range(3)]
    rig.activate()
    rig.driver.wait_used(0, 3)
    used = dict(rig.mock.take_used())
    assert set(used) == {c.head for c in chains}
    direct_fd, read = rig.block._direct_fd, aio.IOCB_CMD_PREADV
    assert fake.iocbs == [
        (direct_fd, read, 3, 40 * 512),
        (direct_fd, read, 1, 40 * 512),
        (direct_fd, read, 1, 48 * 512),
        (direct_fd, read, 1, 56 * 512),
    ]
    failed = [c for c in chains if rig.status(c) != VIRTIO_BLK_S_OK]
    assert len(failed) == failures
    assert all(rig.status(c) == VIRTIO_BLK_S_IOERR and used[c.head] == 1 for c in failed)
    for i, chain in enumerate(chains):
        if chain not in failed:
            assert used[chain.head] == 4097
            assert rig.data(chain) == _sector_data(40 + 8 * i, 4096)
    counters = rig.block.counters()
    assert counters["io_errors"] == failures and counters["read_ops"] == 3 - failures
    assert counters["merged_requests"] == 0


def test_completions_are_matched_by_slot_whatever_their_order(rig: Rig, fake: FakeSyscall) -> None:
    fake.release.clear()
    fake.reverse = True
    chains = [rig.add(VIRTIO_BLK_T_IN, 16 * i + 1, read_len=4096) for i in range(6)]
    rig.activate()
    _poll(lambda: len(fake.held) == 6)
    assert rig.mock.used_idx() == 0
    fake.release.set()
    rig.kick_completions()
    rig.driver.wait_used(0, 6)
    # Published in the order the completions were handed on (the reverse of the kernel's).
    by_offset = {(16 * i + 1) * 512: chain.head for i, chain in enumerate(chains)}
    assert len(fake.handed_offsets) == 6
    expected = [by_offset[offset] for offset in fake.handed_offsets]
    assert [head for head, _ in rig.mock.take_used()] == expected
    for i, chain in enumerate(chains):
        assert rig.status(chain) == VIRTIO_BLK_S_OK
        assert rig.data(chain) == _sector_data(16 * i + 1, 4096)
    # One interrupt for the whole burst.
    assert rig.driver.interrupt.events.count((InterruptKind.QUEUE, 0)) == 1


@pytest.mark.parametrize("step", [16, 8], ids=["apart", "merged-in-pairs"])
def test_a_short_submission_and_eagain_keep_the_rest_pending(
    rig: Rig, fake: FakeSyscall, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    # Six reads; with a step of 8 sectors they follow one another and go out in pairs.
    monkeypatch.setattr(block_module, "MERGE_MAX_BYTES", 2 * 4096)
    iocbs = 6 if step == 16 else 3
    # The kernel takes one iocb, then has no room until that one completes.
    fake.script = [("take", 1), ("fail", errno.EAGAIN)]
    chains = [rig.add(VIRTIO_BLK_T_IN, step * i, read_len=4096) for i in range(6)]
    rig.activate()
    rig.driver.wait_used(0, 6)
    assert sorted(head for head, _ in rig.mock.take_used()) == sorted(c.head for c in chains)
    for i, chain in enumerate(chains):
        assert rig.status(chain) == VIRTIO_BLK_S_OK
        assert rig.data(chain) == _sector_data(step * i, 4096)
    # The rest was offered again only after a completion freed room, merged as before.
    assert fake.log[:4] == [
        ("submit", iocbs, 1),
        ("submit", iocbs - 1, -errno.EAGAIN),
        ("events", 1),
        ("submit", iocbs - 1, iocbs - 1),
    ]
    assert [offset for _, _, _, offset in fake.iocbs] == [
        step * 512 * (6 // iocbs) * i for i in range(iocbs)
    ]
    assert rig.block.counters()["io_errors"] == 0


@pytest.mark.parametrize(
    ("error", "first_status"),
    [
        (errno.EAGAIN, VIRTIO_BLK_S_IOERR),  # no room and nothing in flight to free it
        (errno.EBADF, VIRTIO_BLK_S_IOERR),
        (errno.EINVAL, VIRTIO_BLK_S_OK),  # retried on the buffered descriptor
    ],
)
def test_a_refused_iocb_fails_alone(
    rig: Rig, fake: FakeSyscall, error: int, first_status: int
) -> None:
    fake.script = [("fail", error)]
    first = rig.add(VIRTIO_BLK_T_IN, 8, read_len=4096)
    second = rig.add(VIRTIO_BLK_T_IN, 24, read_len=4096)
    rig.activate()
    rig.driver.wait_used(0, 2)
    used = dict(rig.mock.take_used())
    assert set(used) == {first.head, second.head}
    assert rig.status(first) == first_status
    assert rig.status(second) == VIRTIO_BLK_S_OK
    assert rig.data(second) == _sector_data(24, 4096)
    if first_status == VIRTIO_BLK_S_OK:
        assert rig.data(first) == _sector_data(8, 4096)
        fds = sorted(fd for fd, _, _, _ in fake.iocbs)
        assert fds == sorted([rig.block._direct_fd, rig.block._fd])
    else:
        assert used[first.head] == 1
        assert rig.block.counters()["io_errors"] == 1


def test_flush_waits_for_the_writes_before_it(
    rig: Rig, fake: FakeSyscall, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.release.clear()
    synced: list[int] = []
    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        synced.append(rig.mock.used_idx())
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    writes = [rig.add(VIRTIO_BLK_T_OUT, 16 * i, os.urandom(4096)) for i in range(3)]
    flush = rig.add(VIRTIO_BLK_T_FLUSH)
    later = rig.add(VIRTIO_BLK_T_IN, 64, read_len=4096)
    rig.activate()
    _poll(lambda: len(fake.held) == 3)
    time.sleep(0.2)
    # The writes have not completed as far as the device knows: no sync, nothing used, and
    # the read after the flush is not submitted either.
    assert synced == []
    assert rig.mock.used_idx() == 0
    assert fake.submits == [(3, 3)]
    fake.release.set()
    rig.kick_completions()
    rig.driver.wait_used(0, 5)
    heads = [head for head, _ in rig.mock.take_used()]
    assert sorted(heads[:3]) == sorted(w.head for w in writes)
    assert heads[3:] == [flush.head, later.head]
    # fdatasync ran once every write was complete and published, before the flush was.
    assert synced == [3]
    assert all(rig.status(c) == VIRTIO_BLK_S_OK for c in [*writes, flush, later])


@pytest.mark.parametrize("stop", ["reset", "shutdown"])
def test_reset_and_shutdown_wait_for_requests_in_flight(
    disk: Path, memory: GuestMemory, fake: FakeSyscall, stop: str
) -> None:
    rig = Rig(Block(disk, direct=True), memory)
    fake.release.clear()
    chains = [rig.add(VIRTIO_BLK_T_IN, 16 * i, read_len=4096) for i in range(4)]
    rig.activate()
    _poll(lambda: len(fake.held) == 4)
    returned: list[int] = []

    def stopper() -> None:
        getattr(rig.block, stop)()
        returned.append(len(fake.held))

    thread = threading.Thread(target=stopper)
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive(), f"{stop} returned before the device saw its completions"
    fake.release.set()
    rig.kick_completions()
    thread.join(20)
    assert not thread.is_alive()
    assert returned == [0] and fake.in_kernel == 0
    # The context went away after the last completion was taken.
    assert fake.log[-1] == ("destroy",)
    assert sorted(head for head, _ in rig.mock.take_used()) == sorted(c.head for c in chains)
    assert all(rig.status(c) == VIRTIO_BLK_S_OK for c in chains)
    assert rig.block.counters()["read_ops"] == 4
    if stop == "reset":
        # A new activation sets up a new context and works.
        rig.driver.close()
        rig.driver = MockDriver(rig.block, memory)
        rig.mock = rig.driver.queues[0]
        again = rig.add(VIRTIO_BLK_T_IN, 24, read_len=4096)
        rig.activate()
        rig.driver.wait_used(0, 1)
        assert rig.data(again) == _sector_data(24, 4096)
        rig.block.shutdown()
    rig.driver.close()


def test_a_failed_device_submits_nothing_more_and_reset_drops_it(
    rig: Rig, fake: FakeSyscall
) -> None:
    rig.add(VIRTIO_BLK_T_IN, 0, read_len=4096)
    rig.add(VIRTIO_BLK_T_IN, 8, read_len=4096)
    rig.mock.write_descriptor(40, 0x1000, 16, 1, 40)  # a chain that loops onto itself
    rig.mock.publish(40)
    rig.activate()
    _poll(rig.driver.needs_reset.is_set)
    rig.block.reset()
    assert fake.submits == []
    assert rig.mock.used_idx() == 0
    assert rig.block.counters()["read_ops"] == 0


def test_a_request_longer_than_iov_max_goes_out_in_pieces(
    rig: Rig, fake: FakeSyscall, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(block_module, "_IOV_MAX", 2)
    header = REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 40)
    # Five buffers that do not touch (4096-aligned, 512 long): five iovecs.
    chain = rig.mock.add_chain([header], [512] * 5 + [1], alignment=4096)
    rig.activate()
    rig.driver.wait_used(0, 1)
    assert rig.mock.take_used() == [(chain.head, 2561)]
    assert rig.status(chain) == VIRTIO_BLK_S_OK
    assert rig.data(chain) == _sector_data(40, 2560)
    assert [(count, offset) for _, _, count, offset in fake.iocbs] == [
        (2, 40 * 512),
        (2, 42 * 512),
        (1, 44 * 512),
    ]


def test_io_setup_failure_falls_back_to_the_thread_pool(
    disk: Path, memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_aio(number: int, *args: int) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(aio, "syscall", no_aio)
    rig = Rig(Block(disk, direct=True), memory)
    try:
        chain = rig.add(VIRTIO_BLK_T_IN, 8, read_len=4096)
        rig.driver.activate()
        assert not rig.block.uses_native_aio
        rig.driver.wait_used(0, 1)
        assert rig.status(chain) == VIRTIO_BLK_S_OK
        assert rig.data(chain) == _sector_data(8, 4096)
    finally:
        rig.close()
