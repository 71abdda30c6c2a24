"""A driver stand-in for tests: lays out a split virtqueue in guest memory (virtio 1.2, 2.7).

:class:`MockSplitQueue` plays the guest driver's side of one split virtqueue: it places the
descriptor table, available ring and used ring in a :class:`~nubis.memory.GuestMemory`, hands
out data buffers, publishes descriptor chains (direct or through an indirect table, 2.7.5.3) and
reads back what the device put in the used ring. It also writes raw, possibly hostile, descriptors
so tests can attack the device side.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nubis.virtio.device import ActivatedQueue, InterruptKind, VirtioDevice
from nubis.virtio.queue import (
    DESC,
    RING_HEADER,
    RING_U16,
    USED_ELEM,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

if TYPE_CHECKING:
    from nubis.memory import GuestMemory


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass
class MockChain:
    """A chain the mock driver published: its head and where its buffers are."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)


class MockSplitQueue:
    """The driver side of one split virtqueue, laid out in guest memory at ``base``.

    The rings take the first pages after ``base``; data buffers are handed out from the
    following bytes up to ``data_end`` (the end of the region by default).
    """

    def __init__(
        self, memory: GuestMemory, size: int, base: int, *, data_end: int | None = None
    ) -> None:
        """Lay out an empty queue of ``size`` entries at ``base`` (16-byte aligned)."""
        self.memory = memory
        self.size = size
        self.desc_table = base
        self.avail_ring = base + desc_table_size(size)
        self.used_ring = _align(self.avail_ring + avail_ring_size(size), 4)
        self.data_start = _align(self.used_ring + used_ring_size(size), 4096)
        region = memory.find_region(base)
        if region is None:
            raise ValueError(f"mock queue base {base:#x} is not in guest RAM")
        self.data_end = region.end if data_end is None else data_end
        self._next_data = self.data_start
        self._free_descs = list(range(size))
        self._chain_descs: dict[int, list[int]] = {}
        self.avail_idx = 0
        self.used_seen = 0
        memory.write(base, bytes(self.data_start - base))

    def create_queue(self, *, event_idx: bool = False) -> Queue:
        """A device-side :class:`Queue` configured for this layout and marked ready."""
        queue = Queue(self.size)
        self.configure(queue, event_idx=event_idx)
        return queue

    def configure(self, queue: Queue, *, event_idx: bool = False) -> None:
        """Set ``queue``'s size, ring addresses and EVENT_IDX the way a transport would."""
        queue.size = self.size
        queue.desc_table = self.desc_table
        queue.avail_ring = self.avail_ring
        queue.used_ring = self.used_ring
        queue.event_idx = event_idx
        queue.ready = True

    def alloc(self, length: int, alignment: int = 8) -> int:
        """Reserve ``length`` bytes of data area and return their guest address."""
        addr = _align(self._next_data, alignment)
        if addr + length > self.data_end:
            raise ValueError(f"mock queue data area cannot fit {length} more bytes")
        self._next_data = addr + length
        return addr

    def reset_data(self) -> None:
        """Forget every data buffer handed out so far (their memory is reused)."""
        self._next_data = self.data_start

    def write_descriptor(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Store a raw descriptor in table slot ``index`` (no checks: tests may lie)."""
        self.memory.write(
            self.desc_table + DESC.size * index, DESC.pack(addr, length, flags, next_)
        )

    def publish(self, head: int) -> None:
        """Put ``head`` in the next available ring slot and advance the available index."""
        slot = self.avail_ring + RING_HEADER.size + RING_U16.size * (self.avail_idx % self.size)
        self.memory.write(slot, RING_U16.pack(head & 0xFFFF))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write the available ring's idx field directly."""
        self.memory.write_u16(self.avail_ring + 2, value & 0xFFFF)

    def set_avail_flags(self, flags: int) -> None:
        """Write the available ring's flags (e.g. VIRTQ_AVAIL_F_NO_INTERRUPT)."""
        self.memory.write_u16(self.avail_ring, flags)

    def set_used_event(self, value: int) -> None:
        """Write used_event, the trailing field of the available ring (EVENT_IDX)."""
        self.memory.write_u16(
            self.avail_ring + RING_HEADER.size + RING_U16.size * self.size, value & 0xFFFF
        )

    def avail_event(self) -> int:
        """Read avail_event, the trailing field of the used ring (EVENT_IDX)."""
        return self.memory.read_u16(self.used_ring + RING_HEADER.size + USED_ELEM.size * self.size)

    def used_flags(self) -> int:
        """Read the used ring's flags (VIRTQ_USED_F_NO_NOTIFY)."""
        return self.memory.read_u16(self.used_ring)

    def used_idx(self) -> int:
        """Read the used ring's idx field."""
        return self.memory.read_u16(self.used_ring + 2)

    def used_entry(self, position: int) -> tuple[int, int]:
        """Read used element ``position`` (mod size): (head id, written length)."""
        slot = self.used_ring + RING_HEADER.size + USED_ELEM.size * (position % self.size)
        ident, length = USED_ELEM.unpack(self.memory.read(slot, USED_ELEM.size))
        return int(ident), int(length)

    def take_used(self) -> list[tuple[int, int]]:
        """Every used element published since the last call, oldest first."""
        entries = []
        end = self.used_idx()
        while self.used_seen != end:
            entry = self.used_entry(self.used_seen)
            entries.append(entry)
            self._free_descs.extend(self._chain_descs.pop(entry[0], []))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return entries

    def add_chain(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        alignment: int = 8,
    ) -> MockChain:
        """Publish a chain of readable buffers holding ``readable`` and writable buffers of the
        given sizes (each starting at a multiple of ``alignment``), directly in the table or
        through one indirect table.
        """
        chain = MockChain(head=-1)
        entries: list[tuple[int, int, int]] = []
        for data in readable:
            addr = self.alloc(len(data), alignment)
            self.memory.write(addr, data)
            chain.readable.append((addr, len(data)))
            entries.append((addr, len(data), 0))
        for length in writable:
            addr = self.alloc(length, alignment)
            chain.writable.append((addr, length))
            entries.append((addr, length, VIRTQ_DESC_F_WRITE))
        if not entries:
            raise ValueError("a descriptor chain needs at least one buffer")
        if indirect:
            table = self.alloc(DESC.size * len(entries), 16)
            for i, (addr, length, flags) in enumerate(entries):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(entries) else 0
                self.memory.write(
                    table + DESC.size * i,
                    DESC.pack(addr, length, flags | more, i + 1 if more else 0),
                )
            entries = [(table, DESC.size * len(entries), VIRTQ_DESC_F_INDIRECT)]
        if len(entries) > len(self._free_descs):
            raise ValueError("mock queue has no free descriptors left for this chain")
        indices = [self._free_descs.pop(0) for _ in entries]
        for i, (addr, length, flags) in enumerate(entries):
            last = i + 1 == len(entries)
            self.write_descriptor(
                indices[i],
                addr,
                length,
                flags | (0 if last else VIRTQ_DESC_F_NEXT),
                0 if last else indices[i + 1],
            )
        chain.head = indices[0]
        self._chain_descs[chain.head] = indices
        self.publish(chain.head)
        return chain

    def read_buffers(self, buffers: Sequence[tuple[int, int]]) -> bytes:
        """Concatenate the contents of ``buffers`` (address, length pairs)."""
        return b"".join(self.memory.read(addr, length) for addr, length in buffers)


class RecordingInterrupt:
    """A :class:`~nubis.virtio.device.VirtioInterrupt` that records what the device raised."""

    def __init__(self) -> None:
        """Start with no interrupts recorded."""
        self.events: list[tuple[InterruptKind, int]] = []
        self.needs_reset = threading.Event()
        self._changed = threading.Condition()

    def trigger(self, kind: InterruptKind, queue_index: int = 0) -> None:
        """Record one interrupt and wake waiters."""
        with self._changed:
            self.events.append((kind, queue_index))
            self._changed.notify_all()

    def set_needs_reset(self) -> None:
        """Record DEVICE_NEEDS_RESET and the config interrupt that announces it (2.1.2)."""
        self.needs_reset.set()
        self.trigger(InterruptKind.CONFIG)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Block until ``predicate()`` holds, rechecking after every interrupt.

        ``timeout`` only guards against a hung test: when it passes, AssertionError is raised.
        """
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise AssertionError("the device did not reach the expected state")


class MockDriver:
    """Plays the driver and the transport for one device: queues, notify eventfds, interrupts.

    Queue ``i`` is laid out at ``base + i * stride`` and uses the rest of its stride for data.
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        *,
        base: int = 0,
        stride: int = 0x40000,
        event_idx: bool = False,
        sizes: Sequence[int] | None = None,
    ) -> None:
        """Lay out one mock queue per device queue (at the device's maximum size by default)."""
        self.device = device
        self.memory = memory
        self.event_idx = event_idx
        sizes = list(device.queue_max_sizes if sizes is None else sizes)
        self.queues = [
            MockSplitQueue(memory, size, base + i * stride, data_end=base + (i + 1) * stride)
            for i, size in enumerate(sizes)
        ]
        self.device_queues = [mock.create_queue(event_idx=event_idx) for mock in self.queues]
        self.notify_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in sizes]
        self.interrupt = RecordingInterrupt()
        self.needs_reset = self.interrupt.needs_reset

    def activate(self) -> None:
        """Accept every offered feature and activate the device with the mock queues."""
        self.device.ack_features(self.device.avail_features)
        self.device.activate(
            self.memory,
            self.interrupt,
            [
                ActivatedQueue(i, queue, fd)
                for i, (queue, fd) in enumerate(
                    zip(self.device_queues, self.notify_fds, strict=True)
                )
            ],
        )

    def notify(self, index: int) -> None:
        """Write queue ``index``'s notify eventfd, as the guest's doorbell write would."""
        os.eventfd_write(self.notify_fds[index], 1)

    def wait_used(self, index: int, count: int) -> None:
        """Wait until queue ``index`` has ``count`` used entries not yet taken, or the device
        reported DEVICE_NEEDS_RESET.
        """
        mock = self.queues[index]
        self.interrupt.wait_until(
            lambda: (
                self.needs_reset.is_set() or (mock.used_idx() - mock.used_seen) & 0xFFFF >= count
            )
        )

    def close(self) -> None:
        """Close the notify eventfds."""
        for fd in self.notify_fds:
            os.close(fd)
        self.notify_fds = []
