"""Split virtqueues, seen from the device side (virtio 1.2, section 2.7).

A split virtqueue is three areas in guest memory that the driver places: the descriptor table
(2.7.5), the available ring (2.7.6) and the used ring (2.7.8). The driver publishes descriptor
chains by head index in the available ring; the device consumes them and returns them through the
used ring with the number of bytes it wrote.

This module is sans-IO: a :class:`Queue` holds the ring addresses and the device's indices, and
every operation takes the guest memory as an argument. The transport fills in ``size``,
``desc_table``, ``avail_ring``, ``used_ring``, ``event_idx`` and ``ready`` from the driver's
configuration; a device worker pops :class:`DescriptorChain` objects and adds used entries.

Everything in guest memory is hostile. Each value read from the rings is checked once, the checked
copy is what the device sees, and any violation raises :class:`QueueError`, after which the device
sets DEVICE_NEEDS_RESET (2.1.2). No operation touches memory outside the guest's RAM.

Memory ordering (2.7.13, 2.7.7.2): nubis runs on x86-64, whose total store order keeps
load-load and store-store order, so the available index is read before the ring entries it covers
and a used element is written before the used index that publishes it, simply by program order.
The one reordering x86-64 allows, a later load overtaking an earlier store, matters where the
device publishes an index and then reads the driver's suppression state; a full fence separates
those (see :func:`full_fence`).

Atomicity: the driver reads and writes the ring indices and flags (``idx``, ``flags``,
``used_event``, ``avail_event``) as single 16-bit accesses while the device works on the same
ring from another CPU. ``struct.pack_into`` stores such a field in pieces (a reader on another
CPU sees torn values, whatever the format's byte order), so a driver could see half of a new used
index (at a 256 boundary ``0x00ff`` becomes ``0x0000`` for an instant before ``0x0100``) and take
a stale used element for a completed chain. Every shared 16-bit field is therefore accessed through
``memoryview.cast("H")`` views, whose item reads and writes are one aligned 16-bit load or store
(the byte order is the machine's: little-endian, as virtio 1.x requires, on x86-64).
"""

from __future__ import annotations

import struct
import sys
import threading
from array import array
from collections.abc import Iterator, Sequence
from itertools import repeat

from nubis._typing import NamedTuple
from nubis.memory import GuestMemoryError

TYPE_CHECKING = False

if TYPE_CHECKING:
    from nubis.memory import GuestMemory, GuestRegion

# Descriptor flags (2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# Available ring flags (2.7.6) and used ring flags (2.7.8).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

if sys.byteorder != "little":  # pragma: no cover - the ring views below use native order
    raise ImportError("nubis.virtio.queue needs a little-endian machine")

# The largest queue size a split virtqueue can have (2.7).
MAX_QUEUE_SIZE = 32768

#: struct virtq_desc (2.7.5): le64 addr, le32 len, le16 flags, le16 next.
DESC = struct.Struct("<QIHH")
#: An indirect table of three descriptors, read at once (see `Queue._read_chain`).
DESC3 = struct.Struct("<QIHHQIHHQIHH")
#: The header of struct virtq_avail and of struct virtq_used: le16 flags, le16 idx.
RING_HEADER = struct.Struct("<HH")
#: One le16 ring slot: an available ring entry, used_event (2.7.6) or avail_event (2.7.8).
RING_U16 = struct.Struct("<H")
#: struct virtq_used_elem (2.7.8): le32 id, le32 len.
USED_ELEM = struct.Struct("<II")

# Alignment of each area (2.7, table "Virtqueue Part Alignment").
DESC_TABLE_ALIGN = 16
AVAIL_RING_ALIGN = 2
USED_RING_ALIGN = 4


def desc_table_size(queue_size: int) -> int:
    """Bytes of a descriptor table of ``queue_size`` entries (2.7)."""
    return DESC.size * queue_size


def avail_ring_size(queue_size: int) -> int:
    """Bytes of an available ring, including the trailing used_event field (2.7)."""
    return RING_HEADER.size + RING_U16.size * queue_size + RING_U16.size


def used_ring_size(queue_size: int) -> int:
    """Bytes of a used ring, including the trailing avail_event field (2.7)."""
    return RING_HEADER.size + USED_ELEM.size * queue_size + RING_U16.size


_fence_lock = threading.Lock()


def full_fence() -> None:
    """Order every earlier store before every later load (a full memory barrier).

    Python has no fence primitive. Taking and releasing an uncontended lock executes a locked
    read-modify-write instruction, which is a full barrier on x86-64.
    """
    _fence_lock.acquire()
    _fence_lock.release()


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` passes ``event_idx`` (2.7.10).

    All three are 16-bit ring indices; the arithmetic wraps modulo 2^16.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class QueueError(Exception):
    """The driver broke the virtqueue rules; the device must set DEVICE_NEEDS_RESET."""


class Descriptor(NamedTuple):
    """One checked buffer descriptor (2.7.5): guest address, length, flags and next index."""

    addr: int
    len: int
    flags: int
    next: int

    @property
    def is_write_only(self) -> bool:
        """True when the device writes this buffer (VIRTQ_DESC_F_WRITE)."""
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


#: Builds a Descriptor from an unpacked (addr, len, flags, next) tuple without a Python call.
_new_descriptor = tuple.__new__

#: The largest indirect table `Queue._in_order_table` takes; larger ones get the general walk.
RUN_MAX_ENTRIES = 1024
# What `Queue._in_order_table` compares an in-order indirect table with: the links 1, 2, ...
# and the flags of readable and writable buffers that are not the last.
_LINKS = list(range(1, RUN_MAX_ENTRIES))
_READ_FLAGS = [VIRTQ_DESC_F_NEXT] * RUN_MAX_ENTRIES
_WRITE_FLAGS = [VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE] * RUN_MAX_ENTRIES


class DescriptorChain:
    """A checked descriptor chain popped from the available ring (2.7.5.1, 2.7.5.3).

    Indirect tables are already expanded: iteration yields only buffer descriptors, the readable
    ones first and then the writable ones, as 2.7.4.2 requires of the driver. Every buffer lies
    inside guest RAM.
    """

    __slots__ = ("descriptors", "head_index", "readable_count")

    #: The checked copy of an in-order indirect table the chain was read from (`TableChain`).
    table: memoryview | None = None

    def __init__(self, head_index: int, descriptors: list[Descriptor], readable_count: int) -> None:
        """Wrap descriptors already checked by :meth:`Queue.pop_descriptor_chain`."""
        self.head_index = head_index
        self.descriptors = descriptors
        self.readable_count = readable_count

    def __iter__(self) -> Iterator[Descriptor]:
        """Iterate over every buffer descriptor of the chain, readable ones first."""
        return iter(self.descriptors)

    def __len__(self) -> int:
        """The number of buffer descriptors in the chain."""
        return len(self.descriptors)

    def readable(self) -> list[Descriptor]:
        """The device-readable descriptors, in chain order."""
        return self.descriptors[: self.readable_count]

    def writable(self) -> list[Descriptor]:
        """The device-writable descriptors, in chain order."""
        return self.descriptors[self.readable_count :]

    def readable_len(self) -> int:
        """Total bytes of the device-readable buffers."""
        return sum(d.len for d in self.descriptors[: self.readable_count])

    def writable_len(self) -> int:
        """Total bytes of the device-writable buffers."""
        return sum(d.len for d in self.descriptors[self.readable_count :])

    def readable_views(self, memory: GuestMemory) -> list[memoryview]:
        """Zero-copy views of the readable buffers (empty buffers are left out)."""
        return _views(memory, self.descriptors[: self.readable_count])

    def writable_views(self, memory: GuestMemory) -> list[memoryview]:
        """Zero-copy views of the writable buffers (empty buffers are left out)."""
        return _views(memory, self.descriptors[self.readable_count :])

    def __repr__(self) -> str:
        """A short description for logs and test failures."""
        return (
            f"DescriptorChain(head={self.head_index}, readable={self.readable()}, "
            f"writable={self.writable()})"
        )


class TableChain(DescriptorChain):
    """A chain whose indirect table the driver filled in order (see :meth:`Queue._in_order_table`).

    It keeps the checked copy of the table, so that a device that reads its buffers as columns
    (``table.cast("Q")[::2]`` the addresses, ``table.cast("I")[2::4]`` the lengths) never
    builds a `Descriptor` per buffer; ``descriptors`` builds them on first use, for everyone
    else.
    """

    __slots__ = ("_built", "addrs", "lengths", "table")

    table: memoryview

    def __init__(
        self,
        head_index: int,
        table: memoryview,
        readable_count: int,
        addrs: list[int],
        lengths: list[int],
    ) -> None:
        """Wrap ``table``, a private copy already checked by :meth:`Queue._in_order_table`,
        and the columns of its addresses and lengths that the check made."""
        self.head_index = head_index
        self.table = table
        self.addrs = addrs
        self.lengths = lengths
        self.readable_count = readable_count
        self._built: list[Descriptor] | None = None

    @property
    def descriptors(self) -> list[Descriptor]:
        """The buffer descriptors, built from the table the first time they are asked for."""
        built = self._built
        if built is None:
            new = _new_descriptor
            built = self._built = [
                new(Descriptor, fields) for fields in DESC.iter_unpack(self.table)
            ]
        return built

    @descriptors.setter
    def descriptors(self, descriptors: list[Descriptor]) -> None:
        self._built = descriptors

    def __len__(self) -> int:
        """The number of buffer descriptors in the chain."""
        return len(self.table) >> 4


def _views(memory: GuestMemory, descriptors: list[Descriptor]) -> list[memoryview]:
    slice_ = memory.slice
    try:
        return [slice_(desc.addr, desc.len) for desc in descriptors if desc.len]
    except GuestMemoryError as exc:
        raise QueueError(
            f"buffer at {exc.address:#x} of {exc.length} bytes is not in one memory region"
        ) from exc


class Queue:
    """The device side of one split virtqueue: ring addresses and indices (2.7).

    The transport sets ``size`` (a power of two up to ``max_size``), the three ring addresses,
    ``event_idx`` (VIRTIO_F_RING_EVENT_IDX negotiated) and finally ``ready``. ``next_avail`` and
    ``next_used`` are the device's free-running 16-bit indices; they are public so that a snapshot
    can save and restore them.
    """

    def __init__(self, max_size: int) -> None:
        """Create a queue offering at most ``max_size`` entries (a power of two, at most 32768)."""
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two up to 32768")
        self.max_size = max_size
        self.size = max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False
        self.next_avail = 0
        self.next_used = 0
        # The used index the driver was last told about; None until the first notification.
        self.signalled_used: int | None = None
        self._layout: tuple[int, int, int, int] | None = None
        self._layout_memory: object = None
        self._desc_view = memoryview(b"")
        # The rings as arrays of u16 (see the module docstring on atomicity): the available ring
        # is [flags, idx, ring[size], used_event]; in the used ring, u16 1 is idx and u16
        # ``2 + 4 * size`` is avail_event.
        self._avail_u16 = memoryview(b"").cast("H")
        self._used_u16 = memoryview(b"").cast("H")
        self._used_view = memoryview(b"")
        # The used ring up to its last element as u32s: idx and flags, then id, len per element.
        self._used_u32 = memoryview(b"").cast("I")
        # The guest RAM region the last buffer was found in: start, size and its view. Buffers
        # are sliced from it directly while they fall inside it (most do), saving a lookup.
        self._region: tuple[int, int, memoryview] = (0, 0, memoryview(b""))

    def reset(self) -> None:
        """Return to the state after construction (the driver reset the device)."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used = None
        self.release_memory()

    def release_memory(self) -> None:
        """Drop the cached views of the rings so that guest memory can be unmapped."""
        self._layout = None
        self._layout_memory = None
        self._desc_view = self._used_view = memoryview(b"")
        self._avail_u16 = self._used_u16 = memoryview(b"").cast("H")
        self._used_u32 = memoryview(b"").cast("I")
        self._region = (0, 0, memoryview(b""))

    def validate(self, memory: GuestMemory) -> None:
        """Check the driver's queue configuration against guest RAM (2.7, 4.1.4.3.2).

        Raises :class:`QueueError` when the queue is not ready, its size is not a power of two up
        to ``max_size``, or a ring is misaligned or not inside one memory region.
        """
        layout = (self.size, self.desc_table, self.avail_ring, self.used_ring)
        if self._layout == layout and self._layout_memory is memory:
            return
        size = self.size
        if not self.ready:
            raise QueueError("the queue is used before the driver made it ready")
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two up to {self.max_size}")
        areas = (
            ("descriptor table", self.desc_table, desc_table_size(size), DESC_TABLE_ALIGN),
            ("available ring", self.avail_ring, avail_ring_size(size), AVAIL_RING_ALIGN),
            ("used ring", self.used_ring, used_ring_size(size), USED_RING_ALIGN),
        )
        views = []
        for name, addr, length, align in areas:
            if addr % align:
                raise QueueError(f"the {name} at {addr:#x} is not {align}-byte aligned")
            try:
                views.append(memory.slice(addr, length))
            except GuestMemoryError as exc:
                raise QueueError(
                    f"the {name} at {addr:#x} ({length} bytes) is not inside guest RAM"
                ) from exc
        self._desc_view, avail_view, self._used_view = views
        self._avail_u16 = avail_view.cast("H")
        self._used_u16 = self._used_view.cast("H")
        self._used_u32 = self._used_view[: RING_HEADER.size + USED_ELEM.size * size].cast("I")
        self._layout = layout
        self._layout_memory = memory
        self._region = (0, 0, memoryview(b""))

    def avail_idx(self, memory: GuestMemory) -> int:
        """The driver's current available index (2.7.6)."""
        self.validate(memory)
        return self._avail_u16[1]

    def used_idx(self, memory: GuestMemory) -> int:
        """The used index as published in guest memory (2.7.8)."""
        self.validate(memory)
        return self._used_u16[1]

    def has_available(self, memory: GuestMemory) -> bool:
        """Whether the driver has made chains available that the device has not popped yet."""
        return self._pending(memory) > 0

    def _pending(self, memory: GuestMemory) -> int:
        self.validate(memory)
        avail_idx = self._avail_u16[1]
        pending: int = (avail_idx - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(
                f"the available index {avail_idx} is {pending} entries ahead of the device, "
                f"more than the queue size {self.size}"
            )
        return pending

    def pop_descriptor_chain(self, memory: GuestMemory) -> DescriptorChain | None:
        """Take the next available descriptor chain, or return None when there is none (2.7.13).

        The chain is read and checked completely before it is returned: indices below the queue
        size, no loops, at most ``size`` descriptors, indirect tables well formed (2.7.5.3.1),
        readable buffers before writable ones and every buffer inside guest RAM.
        """
        if not self._pending(memory):
            return None
        size = self.size
        head = self._avail_u16[2 + (self.next_avail & (size - 1))]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if head >= size:
            raise QueueError(f"available ring names descriptor {head}, beyond queue size {size}")
        return self._read_chain(memory, head)

    def pop_buffers(
        self, memory: GuestMemory, *, writable: bool
    ) -> tuple[int, list[memoryview], int] | None:
        """Take the next available chain as ``(head, views, length)``, or None when there is none.

        ``views`` are zero-copy views of the chain's device-writable buffers (``writable``) or
        of its device-readable ones, empty buffers left out, and ``length`` their total bytes.
        The chain is checked exactly as :meth:`pop_descriptor_chain` checks it, buffers of the
        other direction included; this is the lean path for devices that only want the bytes
        (virtio-net), with no :class:`Descriptor` or :class:`DescriptorChain` per chain.
        """
        if not self._pending(memory):
            return None
        size = self.size
        head = self._avail_u16[2 + (self.next_avail & (size - 1))]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if head >= size:
            raise QueueError(f"available ring names descriptor {head}, beyond queue size {size}")
        views, length = self._chain_views(memory, head, VIRTQ_DESC_F_WRITE if writable else 0)
        return head, views, length

    def pop_buffers_many(
        self, memory: GuestMemory, limit: int, *, writable: bool
    ) -> list[tuple[int, list[memoryview], int]]:
        """Up to ``limit`` chains as :meth:`pop_buffers` returns them, reading the index once."""
        count = min(self._pending(memory), limit)
        size = self.size
        mask = size - 1
        ring = self._avail_u16
        table = self._desc_view
        unpack_from = DESC.unpack_from
        want = VIRTQ_DESC_F_WRITE if writable else 0
        chain_views = self._chain_views
        popped: list[tuple[int, list[memoryview], int]] = []
        next_avail = self.next_avail
        for _ in range(count):
            head = ring[2 + (next_avail & mask)]
            next_avail = (next_avail + 1) & 0xFFFF
            self.next_avail = next_avail
            if head >= size:
                raise QueueError(
                    f"available ring names descriptor {head}, beyond queue size {size}"
                )
            addr, length, flags, _next = unpack_from(table, 16 * head)
            if flags == want and length:
                # One direct buffer of the wanted direction (what Linux posts for receive
                # with MRG_RXBUF): nothing else to check than that it lies in guest RAM.
                start, span, base = self._region
                offset = addr - start
                if offset >= 0 and offset + length <= span:
                    view = base[offset : offset + length]
                else:
                    view = self._slice_buffer(memory, head, addr, length)
                popped.append((head, [view], length))
            else:
                views, length = chain_views(memory, head, want)
                popped.append((head, views, length))
        return popped

    def pop_buffers_into(
        self,
        memory: GuestMemory,
        limit: int,
        heads: list[int],
        lengths: list[int],
        view_counts: list[int],
        views: list[memoryview],
        *,
        writable: bool,
        min_length: int = 0,
        max_views: int = 1 << 16,
    ) -> list[int]:
        """Up to ``limit`` chains as :meth:`pop_buffers_many` takes them, appended to the
        caller's parallel lists instead of returned: each chain's head, total length and view
        count, and its views in order (so ``views`` can go to ``readv`` as it is).

        The receive path of virtio-net stashes many one-buffer chains per frame, and this
        spares a tuple and a list per chain. A chain shorter than ``min_length`` is not
        appended: its head is returned, for the caller to give back. A chain with more than
        ``max_views`` buffers keeps its first ``max_views``.
        """
        count = min(self._pending(memory), limit)
        if not count:
            return []
        size = self.size
        mask = size - 1
        ring = self._avail_u16
        table = self._desc_view
        unpack_from = DESC.unpack_from
        want = VIRTQ_DESC_F_WRITE if writable else 0
        start, span, base = self._region
        floor = max(min_length, 1)
        add_head, add_length, add_count, add_view = (
            heads.append,
            lengths.append,
            view_counts.append,
            views.append,
        )
        next_avail = self.next_avail
        rejected: list[int] = []
        # The heads in one or two slices of the ring (it may wrap), not one index each.
        first = next_avail & mask
        if first + count <= size:
            ring_heads = ring[2 + first : 2 + first + count].tolist()
        else:
            ring_heads = ring[2 + first : 2 + size].tolist()
            ring_heads += ring[2 : 2 + count - (size - first)].tolist()
        # A head beyond the table ends the pop with an error once the heads before it are in.
        bad = None
        if max(ring_heads) >= size:
            bad = next(i for i, head in enumerate(ring_heads) if head >= size)
            del ring_heads[bad + 1 :]
        # First the run of chains as Linux posts them for receive, one buffer of the wanted
        # direction in the cached region each, with as few Python steps per chain as can be.
        before = len(lengths)
        for head in ring_heads if bad is None else ring_heads[:bad]:
            addr, length, flags, _next = unpack_from(table, head << 4)
            offset = addr - start
            if flags != want or length < floor or offset < 0 or offset + length > span:
                break
            add_view(base[offset : offset + length])
            add_length(length)
        simple = len(lengths) - before
        if simple:
            heads += ring_heads[:simple] if simple < len(ring_heads) else ring_heads
            view_counts += repeat(1, simple)
            next_avail = (next_avail + simple) & 0xFFFF
            self.next_avail = next_avail
            if simple == len(ring_heads):
                return rejected
            del ring_heads[:simple]
        # Then the rest, one at a time, whatever their shape.
        for head in ring_heads:
            next_avail = (next_avail + 1) & 0xFFFF
            self.next_avail = next_avail
            if head >= size:
                raise QueueError(
                    f"available ring names descriptor {head}, beyond queue size {size}"
                )
            addr, length, flags, _next = unpack_from(table, head << 4)
            if flags == want and length >= floor:
                offset = addr - start
                if offset >= 0 and offset + length <= span:
                    add_view(base[offset : offset + length])
                else:
                    add_view(self._slice_buffer(memory, head, addr, length))
                    start, span, base = self._region
                add_head(head)
                add_length(length)
                add_count(1)
                continue
            chain, length = self._chain_views(memory, head, want)
            start, span, base = self._region
            if len(chain) > max_views:
                del chain[max_views:]
                length = sum(map(len, chain))
            if length < min_length or not length:
                rejected.append(head)
                continue
            heads.append(head)
            lengths.append(length)
            view_counts.append(len(chain))
            views += chain
        return rejected

    def _chain_views(
        self, memory: GuestMemory, head: int, want: int
    ) -> tuple[list[memoryview], int]:
        """Walk the chain at ``head`` with :meth:`_read_chain`'s checks; views of one direction.

        ``want`` is VIRTQ_DESC_F_WRITE for the writable buffers, 0 for the readable ones. The
        buffers of the other direction are only checked to lie inside guest RAM.
        """
        table = self._desc_view
        table_len = self.size
        unpack_from = DESC.unpack_from
        addr, length, flags, _next = unpack_from(table, head << 4)
        if flags == VIRTQ_DESC_F_INDIRECT:
            run = self._in_order_table(memory, addr, length)
            if run is not None:
                _entries, readable, start, base, addrs, sizes = run
                # The wanted buffers' addresses and lengths: columns of the checked copy.
                if want:
                    del addrs[:readable], sizes[:readable]
                else:
                    del addrs[readable:], sizes[readable:]
                return (
                    [base[a - start : a - start + n] for a, n in zip(addrs, sizes, strict=True)],
                    sum(sizes),
                )
        start, span, base = self._region
        views: list[memoryview] = []
        total = 0
        buffers = 0
        seen_writable = False
        indirect = False
        index = head
        count = 0
        while True:
            count += 1
            if count > table_len:
                raise QueueError(
                    f"descriptor chain at head {head} loops or is longer than its table "
                    f"of {table_len} entries"
                )
            addr, length, flags, next_ = unpack_from(table, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise QueueError(f"descriptor chain at head {head} nests indirect tables")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(f"descriptor chain at head {head} sets both INDIRECT and NEXT")
                table = self._indirect_table(memory, addr, length, head)
                table_len = length // DESC.size
                indirect = True
                index = 0
                count = 0
                continue
            direction = flags & VIRTQ_DESC_F_WRITE
            if direction:
                seen_writable = True
            elif seen_writable:
                raise QueueError(
                    f"descriptor chain at head {head} has a readable buffer after a writable one"
                )
            buffers += 1
            if length:
                if direction == want:
                    offset = addr - start
                    if offset >= 0 and offset + length <= span:
                        views.append(base[offset : offset + length])
                    else:
                        views.append(self._slice_buffer(memory, head, addr, length))
                        start, span, base = self._region
                    total += length
                elif not memory.contains(addr, length):
                    raise QueueError(
                        f"descriptor chain at head {head} has a buffer at {addr:#x} of "
                        f"{length} bytes outside guest RAM"
                    )
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            index = next_
            if index >= table_len:
                raise QueueError(
                    f"descriptor chain at head {head} links to descriptor {index}, beyond its "
                    f"table of {table_len} entries"
                )
        if indirect and buffers > self.size:
            raise QueueError(
                f"descriptor chain at head {head} has {buffers} descriptors, "
                f"more than the queue size {self.size}"
            )
        return views, total

    def _read_chain(self, memory: GuestMemory, head: int) -> DescriptorChain:
        addr, length, flags, _next = DESC.unpack_from(self._desc_view, head << 4)
        if flags == VIRTQ_DESC_F_INDIRECT:
            if length == DESC3.size:
                if self.size >= 3:
                    chain = self._read_indirect3(memory, head, addr)
                    if chain is not None:
                        return chain
            else:
                chain = self._read_indirect_run(memory, head, addr, length)
                if chain is not None:
                    return chain
        return self._walk_chain(memory, head)

    def _walk_chain(self, memory: GuestMemory, head: int) -> DescriptorChain:
        """Read and check the chain at ``head``, whatever its shape (2.7.5.3, 2.7.13)."""
        # The hot path of every device: locals instead of attribute look-ups, one unpack per
        # descriptor, and the Descriptor built straight from the unpacked tuple.
        size = self.size
        table = self._desc_view
        table_len = size
        unpack_from = DESC.unpack_from
        contains = memory.contains
        descriptors: list[Descriptor] = []
        append = descriptors.append
        readable_count = 0
        seen_writable = False
        indirect = False
        index = head
        count = 0
        while True:
            count += 1
            if count > table_len:
                raise QueueError(
                    f"descriptor chain at head {head} loops or is longer than its table "
                    f"of {table_len} entries"
                )
            fields = unpack_from(table, index << 4)
            addr, length, flags, index = fields
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise QueueError(f"descriptor chain at head {head} nests indirect tables")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(f"descriptor chain at head {head} sets both INDIRECT and NEXT")
                table = self._indirect_table(memory, addr, length, head)
                table_len = length >> 4
                indirect = True
                index = 0
                count = 0
                continue
            if length and not contains(addr, length):
                raise QueueError(
                    f"descriptor chain at head {head} has a buffer at {addr:#x} of "
                    f"{length} bytes outside guest RAM"
                )
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
            elif seen_writable:
                raise QueueError(
                    f"descriptor chain at head {head} has a readable buffer after a writable one"
                )
            else:
                readable_count += 1
            append(_new_descriptor(Descriptor, fields))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if index >= table_len:
                raise QueueError(
                    f"descriptor chain at head {head} links to descriptor {index}, beyond its "
                    f"table of {table_len} entries"
                )
        if indirect and len(descriptors) > size:
            raise QueueError(
                f"descriptor chain at head {head} has {len(descriptors)} descriptors, "
                f"more than the queue size {size}"
            )
        return DescriptorChain(head, descriptors, readable_count)

    def _read_indirect3(self, memory: GuestMemory, head: int, addr: int) -> DescriptorChain | None:
        """The chain at ``head`` if it is the commonest request of all, else None.

        Linux frames every virtio-blk read or write of one segment, and more, as an indirect
        table of three descriptors: the header, the data and the status byte (2.7.5.3). When
        the table and its three non-empty buffers lie in the cached memory region and the
        descriptors link 0 to 1 to 2, readable ones first, the chain is taken with one unpack
        and no call per descriptor. Anything else returns None, and the general walk checks it.
        """
        start, span, base = self._region
        offset = addr - start
        if offset < 0 or offset + DESC3.size > span:
            region = memory.find_region(addr)
            if region is None:
                return None
            start, span, base = self._cache_region(region)
            offset = addr - start
            if offset + DESC3.size > span:
                return None
        fields = DESC3.unpack_from(base, offset)
        end = start + span
        a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _n2 = fields
        # Flags exactly NEXT, NEXT or NEXT|WRITE, then WRITE: no nested table, no readable
        # buffer after a writable one, and the chain ends at the third descriptor.
        if (
            f0 != VIRTQ_DESC_F_NEXT
            or n0 != 1
            or f1 & ~VIRTQ_DESC_F_WRITE != VIRTQ_DESC_F_NEXT
            or n1 != 2
            or f2 != VIRTQ_DESC_F_WRITE
            or not (l0 and l1 and l2)
            or not start <= a0 <= end - l0
            or not start <= a1 <= end - l1
            or not start <= a2 <= end - l2
        ):
            return None
        new = _new_descriptor
        return DescriptorChain(
            head,
            [
                new(Descriptor, fields[0:4]),
                new(Descriptor, fields[4:8]),
                new(Descriptor, fields[8:12]),
            ],
            1 if f1 & VIRTQ_DESC_F_WRITE else 2,
        )

    def _read_indirect_run(
        self, memory: GuestMemory, head: int, addr: int, length: int
    ) -> DescriptorChain | None:
        """The chain at ``head`` if its indirect table is filled in order, else None (see
        :meth:`_in_order_table`)."""
        run = self._in_order_table(memory, addr, length)
        if run is None:
            return None
        table, readable, _start, _base, addrs, lengths = run
        return TableChain(head, table, readable, addrs, lengths)

    def _in_order_table(
        self, memory: GuestMemory, addr: int, length: int
    ) -> tuple[memoryview, int, int, memoryview, list[int], list[int]] | None:
        """A copy of the indirect table at ``addr`` if it is filled in order, with its count of
        readable buffers, the start and view of the region its buffers lie in and the buffers'
        addresses and lengths as two new lists; else None.

        Linux fills an indirect table front to back: descriptor ``i`` links to ``i + 1``, the
        readable buffers come first and the last descriptor ends the chain. Large requests are
        such tables: a 1 MiB disk read of up to 256 page-sized buffers, a 64 KiB TCP segment
        sent as its headers and page fragments. The table is checked here as a whole, with
        C-level passes over one copy of it instead of Python work per descriptor:

        * the links are exactly 1, 2, ... n-1 (the last one is not followed);
        * the flags are NEXT for the readable buffers, NEXT|WRITE for the writable ones and no
          NEXT for the last (WRITE or not, not readable after writable), so no nested table;
        * no buffer is empty, and every buffer lies in the cached memory region: the lowest
          address is in it, and the highest address plus the longest length does not pass its
          end (a sufficient test, not a necessary one).

        The table is copied once and both the checks and the buffers come from that copy, so a
        driver rewriting it meanwhile cannot slip a change past the checks. Whatever fails a
        test goes to the general walk, which gives the precise verdict; so does a table of one
        entry, of more than ``size`` or `RUN_MAX_ENTRIES` entries, or not of whole entries.
        """
        if not DESC.size < length <= min(self.size, RUN_MAX_ENTRIES) << 4 or length & 15:
            return None
        start, span, base = self._region
        offset = addr - start
        if offset < 0 or offset + length > span:
            region = memory.find_region(addr)
            if region is None:
                return None
            start, span, base = self._cache_region(region)
            offset = addr - start
            if offset + length > span:
                return None
        table = memoryview(bytes(base[offset : offset + length]))
        count = length >> 4
        halves = table.cast("H")
        if halves[7 : 8 * (count - 1) : 8].tolist() != _LINKS[: count - 1]:
            return None
        flags = halves[6::8].tolist()
        last = flags[-1]
        readable = flags.count(VIRTQ_DESC_F_NEXT)
        if last == VIRTQ_DESC_F_WRITE:
            expected = _READ_FLAGS[:readable] + _WRITE_FLAGS[: count - 1 - readable]
        elif last == 0 and readable == count - 1:
            expected = _READ_FLAGS[:readable]
            readable = count
        else:
            return None
        del flags[-1]
        if flags != expected:
            return None
        lengths = table.cast("I")[2::4].tolist()
        addrs = table.cast("Q")[::2].tolist()
        if not min(lengths) or min(addrs) < start or max(addrs) + max(lengths) > start + span:
            return None
        return table, readable, start, base, addrs, lengths

    def _slice_buffer(self, memory: GuestMemory, head: int, addr: int, length: int) -> memoryview:
        """A view of a buffer outside the cached region; it becomes the cached region."""
        region = memory.find_region(addr)
        if region is None or not memory.contains(addr, length):
            raise QueueError(
                f"descriptor chain at head {head} has a buffer at {addr:#x} of "
                f"{length} bytes outside guest RAM"
            )
        self._cache_region(region)
        offset = addr - region.start
        return region.view[offset : offset + length]

    def _cache_region(self, region: GuestRegion) -> tuple[int, int, memoryview]:
        """Make ``region`` the one buffers are first looked for in; returns the cached triple."""
        self._region = (region.start, region.size, region.view)
        return self._region

    def _indirect_table(self, memory: GuestMemory, addr: int, length: int, head: int) -> memoryview:
        if length == 0 or length % DESC.size:
            raise QueueError(
                f"indirect table at head {head} is {length} bytes, not a positive multiple of 16"
            )
        if length // DESC.size > self.size:
            raise QueueError(
                f"indirect table at head {head} has {length // DESC.size} entries, more than "
                f"the queue size {self.size}"
            )
        try:
            return memory.slice(addr, length)
        except GuestMemoryError as exc:
            raise QueueError(
                f"indirect table at {addr:#x} ({length} bytes) is not inside guest RAM"
            ) from exc

    def add_used(self, memory: GuestMemory, head_index: int, written_len: int) -> None:
        """Return chain ``head_index`` to the driver, reporting ``written_len`` bytes written (2.7.8).

        The used element is stored before the used index that publishes it.
        """
        self.add_used_many(memory, ((head_index, written_len),))

    def add_used_many(self, memory: GuestMemory, used: Sequence[tuple[int, int]]) -> None:
        """Return several chains at once, as ``add_used`` for each ``(head_index, written_len)``
        but publishing the used index once, after every element is stored.
        """
        self.validate(memory)
        size = self.size
        mask = size - 1
        next_used = self.next_used
        view = self._used_view
        pack_into = USED_ELEM.pack_into
        for head_index, written_len in used:
            if not 0 <= head_index < size:
                raise QueueError(f"used entry names descriptor {head_index}, beyond queue size")
            if not 0 <= written_len <= 0xFFFFFFFF:
                raise QueueError(f"used length {written_len} does not fit in 32 bits")
            slot = RING_HEADER.size + USED_ELEM.size * (next_used & mask)
            pack_into(view, slot, head_index, written_len)
            next_used = (next_used + 1) & 0xFFFF
        self.next_used = next_used
        self._used_u16[1] = next_used

    def stage_used_spread(
        self, memory: GuestMemory, heads: Sequence[int], lengths: Sequence[int], written: int
    ) -> int:
        """Store the used elements of the first chains of ``heads`` that ``written`` bytes
        filled in order (each chain ``lengths[i]`` bytes, the last one maybe in part) and
        return how many chains that took. The driver sees none of them until
        :meth:`publish_used`: a device may still write into the buffers (virtio-net's
        ``num_buffers``) in between.
        """
        self.validate(memory)
        size = self.size
        if not lengths:
            raise QueueError(f"{written} bytes written do not fit in the 0 chains offered")
        first_length = lengths[0]
        next_used = self.next_used
        slot = next_used & (size - 1)
        if written <= first_length:
            # One chain: the whole frame of a small packet, or of a large buffer.
            head = heads[0]
            if not 0 <= head < size:
                raise QueueError(f"used entry names descriptor {head}, beyond queue size")
            USED_ELEM.pack_into(
                self._used_view, RING_HEADER.size + USED_ELEM.size * slot, head, written
            )
            self.next_used = (next_used + 1) & 0xFFFF
            return 1
        # The chains taken: up to the first whose running total reaches ``written``. Chains
        # of one size (Linux's receive buffers) give the count by a division, checked with a
        # C-level count; otherwise a walk stops there (the list may hold many more chains than
        # one frame fills). Every one but the last is reported full.
        taken = -(-written // first_length) if first_length > 0 else 0
        taken_lengths = lengths[:taken]
        if taken and len(taken_lengths) == taken and taken_lengths.count(first_length) == taken:
            total = first_length * taken
        else:
            taken = total = 0
            for length in lengths:
                taken += 1
                total += length
                if total >= written:
                    break
            else:
                raise QueueError(
                    f"{written} bytes written do not fit in the {len(lengths)} chains offered"
                )
            taken_lengths = lengths[:taken]
        if taken > size:
            raise QueueError(f"{taken} used entries do not fit in a ring of {size}")
        chosen = heads[:taken]
        if min(chosen) < 0 or max(chosen) >= size:
            bad = next(head for head in chosen if not 0 <= head < size)
            raise QueueError(f"used entry names descriptor {bad}, beyond queue size")
        last = written - (total - taken_lengths[-1])
        if slot + taken <= size:
            # Ids and lengths as two strided columns of the ring (u32 1 + 2 * slot is the
            # id of element ``slot``), then the last length.
            used = self._used_u32
            end = 2 * (slot + taken)
            used[1 + 2 * slot : 1 + end : 2] = array("I", chosen)
            used[2 + 2 * slot : 2 + end : 2] = array("I", taken_lengths)
            used[end] = last
        else:
            first = size - slot  # elements that fit before the ring wraps
            fields = [0] * (2 * taken)
            fields[::2] = chosen
            fields[1::2] = taken_lengths
            fields[-1] = last
            view = self._used_view
            struct.pack_into(
                f"<{2 * first}I",
                view,
                RING_HEADER.size + USED_ELEM.size * slot,
                *fields[: 2 * first],
            )
            struct.pack_into(
                f"<{2 * (taken - first)}I", view, RING_HEADER.size, *fields[2 * first :]
            )
        self.next_used = (next_used + taken) & 0xFFFF
        return taken

    def publish_used(self, memory: GuestMemory) -> None:
        """Make every used element stored so far visible to the driver (the used index)."""
        self.validate(memory)
        self._used_u16[1] = self.next_used

    def needs_notification(self, memory: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for the used entries added so far (2.7.10).

        With VIRTIO_F_RING_EVENT_IDX the driver's used_event decides; without it the
        VIRTQ_AVAIL_F_NO_INTERRUPT flag does. Call it after publishing used entries; it records
        the used index it answered for.
        """
        self.validate(memory)
        full_fence()
        if not self.event_idx:
            return not self._avail_u16[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        used_event = self._avail_u16[2 + self.size]
        old, new = self.signalled_used, self.next_used
        self.signalled_used = new
        if old is None:
            return True
        return vring_need_event(used_event, new, old)

    def enable_notification(self, memory: GuestMemory) -> bool:
        """Ask the driver to notify when it adds buffers; return whether some are already there.

        With VIRTIO_F_RING_EVENT_IDX this writes avail_event (2.7.8) as the device's next
        available index; otherwise it clears VIRTQ_USED_F_NO_NOTIFY. A True result means chains
        arrived meanwhile and the caller should keep popping instead of waiting.
        """
        self.validate(memory)
        if self.event_idx:
            self._used_u16[2 + 4 * self.size] = self.next_avail
        else:
            self._used_u16[0] &= ~VIRTQ_USED_F_NO_NOTIFY
        full_fence()
        return self.has_available(memory)

    def disable_notification(self, memory: GuestMemory) -> None:
        """Tell the driver notifications are not needed while the device is busy (2.7.10).

        Without VIRTIO_F_RING_EVENT_IDX this sets VIRTQ_USED_F_NO_NOTIFY; with it nothing needs
        writing, since the driver only notifies when it passes avail_event.
        """
        self.validate(memory)
        if not self.event_idx:
            self._used_u16[0] |= VIRTQ_USED_F_NO_NOTIFY
