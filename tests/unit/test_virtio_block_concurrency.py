"""virtio-blk with several requests in flight: overlap, FLUSH ordering, reset and shutdown, batching.

The seam is ``os.preadv``/``os.pwritev``/``os.fdatasync`` (the device calls them through the
``os`` module): a gate holds each call until the test opens it, so the tests can see how many
calls are inside the backing at once and what the device does meanwhile.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from block_rig import BlockRig
from hypothesis import given, settings
from hypothesis import strategies as st

from nubis.memory import GuestMemory
from nubis.virtio.block import (
    REQUEST_HEADER,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
    coalesce,
)

DISK_SECTORS = 2048
CONTENTS = bytes(range(256)) * (DISK_SECTORS * 2)


def _poll(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the expected state was not reached"
        time.sleep(0.002)


class Gate:
    """Wraps an ``os`` function: each call waits (inside the call) until the gate opens."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.opened = threading.Event()
        self.lock = threading.Lock()
        self.entered = 0
        self.inside = 0
        self.max_inside = 0
        self.finished = 0

    def __call__(self, *args: Any) -> Any:
        with self.lock:
            self.entered += 1
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
        try:
            # The timeout only keeps a broken device from hanging the test run.
            self.opened.wait(20)
            return self.real(*args)
        finally:
            with self.lock:
                self.inside -= 1
                self.finished += 1


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(CONTENTS)
    return path


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, 0x100000)])
    yield mem
    mem.close()


Rig = BlockRig


@pytest.fixture
def rig(disk: Path, memory: GuestMemory) -> Iterator[Rig]:
    r = Rig(Block(disk, io_threads=8), memory)
    yield r
    r.close()


def _used_heads(used: Sequence[tuple[int, int]]) -> list[int]:
    return [head for head, _ in used]


def test_reads_are_in_flight_together(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(os.preadv)
    monkeypatch.setattr(os, "preadv", gate)
    chains = [rig.add(VIRTIO_BLK_T_IN, 8 * i, read_len=4096) for i in range(6)]
    rig.driver.activate()
    # Every read sits inside the backing at the same time; one at a time would stop at 1.
    _poll(lambda: gate.inside == 6)
    assert rig.mock.used_idx() == 0
    gate.opened.set()
    rig.driver.wait_used(0, 6)
    used = rig.mock.take_used()
    assert sorted(_used_heads(used)) == sorted(c.head for c in chains)
    assert all(length == 4097 for _, length in used)
    for i, chain in enumerate(chains):
        assert rig.status(chain) == VIRTIO_BLK_S_OK
        assert rig.mock.read_buffers(chain.writable[:1]) == CONTENTS[i * 4096 : (i + 1) * 4096]
    counters = rig.block.counters()
    assert counters["read_ops"] == 6 and counters["read_bytes"] == 6 * 4096
    assert counters["io_errors"] == 0


def test_in_flight_requests_are_bounded_by_the_io_threads(
    disk: Path, memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(os.preadv)
    monkeypatch.setattr(os, "preadv", gate)
    rig = Rig(Block(disk, io_threads=3), memory)
    try:
        for i in range(7):
            rig.add(VIRTIO_BLK_T_IN, i, read_len=512)
        rig.driver.activate()
        _poll(lambda: gate.inside == 3)
        time.sleep(0.1)
        assert gate.entered == 3  # the other four wait for a free thread
        gate.opened.set()
        rig.driver.wait_used(0, 7)
        assert gate.max_inside == 3
    finally:
        rig.close()


def test_a_later_request_completes_before_a_stalled_one(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first read stalls in the backing; a GET_ID behind it is answered meanwhile.
    gate = Gate(os.preadv)
    monkeypatch.setattr(os, "preadv", gate)
    slow = rig.add(VIRTIO_BLK_T_IN, 0, read_len=512)
    quick = rig.add(VIRTIO_BLK_T_GET_ID, read_len=20)
    rig.driver.activate()
    rig.driver.wait_used(0, 1)
    assert rig.mock.take_used() == [(quick.head, 21)]
    gate.opened.set()
    rig.driver.wait_used(0, 1)
    assert rig.mock.take_used() == [(slow.head, 513)]


def test_flush_waits_for_the_writes_before_it(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(os.pwritev)
    monkeypatch.setattr(os, "pwritev", gate)
    synced: list[tuple[int, int]] = []
    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        synced.append((gate.finished, rig.mock.used_idx()))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    payloads = [os.urandom(4096) for _ in range(3)]
    writes = [rig.add(VIRTIO_BLK_T_OUT, 8 * i, data) for i, data in enumerate(payloads)]
    flush = rig.add(VIRTIO_BLK_T_FLUSH)
    rig.driver.activate()
    _poll(lambda: gate.inside == 3)
    time.sleep(0.2)
    # The writes are stuck in the backing: the flush must neither sync nor complete yet.
    assert synced == []
    assert rig.mock.used_idx() == 0
    gate.opened.set()
    rig.driver.wait_used(0, 4)
    heads = _used_heads(rig.mock.take_used())
    assert heads[-1] == flush.head
    assert sorted(heads[:3]) == sorted(w.head for w in writes)
    # fdatasync ran once every write was in the file and published, before the flush was.
    assert synced == [(3, 3)]
    assert all(rig.status(c) == VIRTIO_BLK_S_OK for c in [*writes, flush])
    assert rig.block.counters()["write_ops"] == 3
    assert rig.block.counters()["flush_ops"] == 1


def test_requests_after_a_flush_wait_for_it(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(os.fdatasync)
    monkeypatch.setattr(os, "fdatasync", gate)
    flush = rig.add(VIRTIO_BLK_T_FLUSH)
    read = rig.add(VIRTIO_BLK_T_IN, 0, read_len=512)
    rig.driver.activate()
    _poll(lambda: gate.inside == 1)
    time.sleep(0.1)
    assert rig.mock.used_idx() == 0
    gate.opened.set()
    rig.driver.wait_used(0, 2)
    assert _used_heads(rig.mock.take_used()) == [flush.head, read.head]


@pytest.mark.parametrize("stop", ["reset", "shutdown"])
def test_reset_and_shutdown_wait_for_requests_in_flight(
    disk: Path, memory: GuestMemory, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    gate = Gate(os.preadv)
    monkeypatch.setattr(os, "preadv", gate)
    rig = Rig(Block(disk, io_threads=4), memory)
    chains = [rig.add(VIRTIO_BLK_T_IN, i, read_len=512) for i in range(4)]
    rig.driver.activate()
    _poll(lambda: gate.inside == 4)
    returned: list[tuple[int, int]] = []

    def stopper() -> None:
        getattr(rig.block, stop)()
        returned.append((gate.inside, gate.finished))

    thread = threading.Thread(target=stopper)
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive(), f"{stop} returned with reads still in guest memory"
    gate.opened.set()
    thread.join(20)
    assert not thread.is_alive()
    # When it returned, no read was inside the backing any more and all had finished.
    assert returned == [(0, 4)]
    # A healthy device completes them: status written and used entries published.
    assert sorted(_used_heads(rig.mock.take_used())) == sorted(c.head for c in chains)
    assert all(rig.status(c) == VIRTIO_BLK_S_OK for c in chains)
    assert rig.block.counters()["read_ops"] == 4
    if stop == "reset":
        rig.block.shutdown()
    rig.driver.close()
    # Shutdown ended the worker and the I/O threads.
    assert not any(t.name.startswith(f"nubis-block:{disk}") for t in threading.enumerate())


def test_reset_after_failure_waits_but_publishes_nothing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(os.preadv)
    monkeypatch.setattr(os, "preadv", gate)
    rig.add(VIRTIO_BLK_T_IN, 0, read_len=512)
    rig.mock.write_descriptor(40, 0x1000, 16, 1, 40)  # a chain that loops onto itself
    rig.mock.publish(40)
    rig.driver.activate()
    _poll(lambda: gate.inside == 1 and rig.driver.needs_reset.is_set())
    thread = threading.Thread(target=rig.block.reset)
    thread.start()
    time.sleep(0.1)
    assert thread.is_alive()
    gate.opened.set()
    thread.join(20)
    assert not thread.is_alive() and gate.inside == 0
    assert rig.mock.used_idx() == 0
    assert rig.block.counters()["read_ops"] == 1


def test_completions_are_batched_into_one_interrupt(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(os.preadv)
    monkeypatch.setattr(os, "preadv", gate)
    # Hold the worker's completion handler until every read has finished.
    handler_gate = threading.Event()
    real_handler = rig.block._completions_ready

    def held_handler() -> None:
        handler_gate.wait(20)
        real_handler()

    monkeypatch.setattr(rig.block, "_completions_ready", held_handler)
    for i in range(5):
        rig.add(VIRTIO_BLK_T_IN, i, read_len=512)
    rig.driver.activate()
    _poll(lambda: gate.inside == 5)
    time.sleep(0.1)  # the worker has finished starting requests and waits for completions
    before = rig.queue_interrupts()
    gate.opened.set()
    _poll(lambda: gate.finished == 5)
    time.sleep(0.05)
    handler_gate.set()
    rig.driver.wait_used(0, 5)
    time.sleep(0.1)
    assert rig.queue_interrupts() - before == 1


def test_a_burst_of_completions_wakes_the_worker_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(os.preadv)
    monkeypatch.setattr(os, "preadv", gate)
    wakeups: list[int] = []
    real_write = os.eventfd_write

    def counting_write(fd: int, value: int) -> None:
        if fd == rig.block._done_fd:
            wakeups.append(value)
        real_write(fd, value)

    monkeypatch.setattr(os, "eventfd_write", counting_write)
    # Hold the worker's completion handler until every read has finished.
    handler_gate = threading.Event()
    real_handler = rig.block._completions_ready

    def held_handler() -> None:
        handler_gate.wait(20)
        real_handler()

    monkeypatch.setattr(rig.block, "_completions_ready", held_handler)
    chains = [rig.add(VIRTIO_BLK_T_IN, i, read_len=512) for i in range(5)]
    rig.driver.activate()
    _poll(lambda: gate.inside == 5)
    gate.opened.set()
    _poll(lambda: gate.finished == 5)
    time.sleep(0.05)
    # Five completions while the worker had not yet taken the first: one wake-up.
    assert len(wakeups) == 1
    handler_gate.set()
    rig.driver.wait_used(0, 5)
    assert sorted(_used_heads(rig.mock.take_used())) == sorted(c.head for c in chains)
    # Once the worker has taken them, the next completion wakes it again.
    later = rig.add(VIRTIO_BLK_T_IN, 9, read_len=512)
    rig.driver.notify(0)
    rig.driver.wait_used(0, 1)
    assert rig.mock.take_used() == [(later.head, 513)]
    assert len(wakeups) == 2


def test_io_errors_in_the_pool_become_ioerr(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing_preadv)
    bad = rig.add(VIRTIO_BLK_T_IN, 0, read_len=512)
    good = rig.add(VIRTIO_BLK_T_OUT, 0, b"\x5a" * 512)
    rig.driver.activate()
    rig.driver.wait_used(0, 2)
    used = dict(rig.mock.take_used())
    assert used == {bad.head: 1, good.head: 1}
    assert rig.status(bad) == VIRTIO_BLK_S_IOERR
    assert rig.status(good) == VIRTIO_BLK_S_OK
    counters = rig.block.counters()
    assert counters["io_errors"] == 1 and counters["read_ops"] == 0
    assert counters["write_ops"] == 1 and counters["write_bytes"] == 512


def test_readonly_disk_refuses_writes_before_the_pool(
    disk: Path, memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "pwritev", lambda *args: calls.append(1) or 0)
    rig = Rig(Block(disk, readonly=True), memory)
    try:
        write = rig.add(VIRTIO_BLK_T_OUT, 0, b"\xaa" * 512)
        rig.driver.activate()
        rig.driver.wait_used(0, 1)
        assert rig.status(write) == VIRTIO_BLK_S_IOERR
        assert calls == []
    finally:
        rig.close()
    assert disk.read_bytes() == CONTENTS


def test_touching_buffers_reach_the_disk_as_one_iovec(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes: list[list[int]] = []
    real = os.preadv

    def recording(fd: int, views: Sequence[memoryview], offset: int) -> int:
        shapes.append([len(view) for view in views])
        return real(fd, views, offset)

    monkeypatch.setattr(os, "preadv", recording)
    header = REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 2)
    # The mock lays a chain's buffers out one after the other: 3 x 512 bytes touch.
    chain = rig.mock.add_chain([header], [512, 512, 512, 1])
    rig.driver.activate()
    rig.driver.wait_used(0, 1)
    assert rig.mock.take_used() == [(chain.head, 1537)]
    assert shapes == [[1536]]
    assert rig.status(chain) == VIRTIO_BLK_S_OK
    assert rig.mock.read_buffers(chain.writable[:3]) == CONTENTS[1024 : 1024 + 1536]


def test_coalesce_joins_only_touching_buffers_of_one_region() -> None:
    memory = GuestMemory([(0, 0x1000), (0x1000, 0x1000)])
    try:
        assert coalesce(memory, [(0x100, 0x100), (0x200, 0x100), (0x400, 0x10)]) == [
            (0x100, 0x200),
            (0x400, 0x10),
        ]
        # Touching, but across two regions: they stay apart (one slice cannot span both).
        assert coalesce(memory, [(0xF00, 0x100), (0x1000, 0x100)]) == [
            (0xF00, 0x100),
            (0x1000, 0x100),
        ]
        assert coalesce(memory, []) == []
    finally:
        memory.close()


def _coalesce_reference(memory: GuestMemory, segments: Sequence[tuple[int, int]]) -> list[Any]:
    # The plain rule: join a buffer to the run before it when it starts where the run ends
    # and the joined run still lies in one region.
    merged: list[tuple[int, int]] = []
    for addr, size in segments:
        if merged:
            last_addr, last_size = merged[-1]
            if last_addr + last_size == addr and memory.contains(last_addr, last_size + size):
                merged[-1] = (last_addr, last_size + size)
                continue
        merged.append((addr, size))
    return merged


@settings(max_examples=300, deadline=None)
@given(
    segments=st.lists(
        st.tuples(
            st.sampled_from([0, 0x800, 0xF00, 0x1000, 0x1800, 0x1F00, 0x3000, 0x3F00]),
            st.sampled_from([0x80, 0x100, 0x800]),
        ),
        max_size=12,
    ),
    chained=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_coalesce_agrees_with_the_plain_rule(
    segments: list[tuple[int, int]], chained: list[bool]
) -> None:
    # Regions [0, 8K) and [12K, 16K) with a hole between; many buffers touch the one before.
    with GuestMemory([(0, 0x2000), (0x3000, 0x1000)]) as memory:
        touching: list[tuple[int, int]] = []
        for (addr, size), follow in zip(segments, chained, strict=False):
            if follow and touching:
                addr = touching[-1][0] + touching[-1][1]
            if memory.contains(addr, size):  # the queue hands over only buffers in RAM
                touching.append((addr, size))
        assert coalesce(memory, touching) == _coalesce_reference(memory, touching)
