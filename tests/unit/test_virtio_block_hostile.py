"""Property tests: hostile request headers and descriptor tables against virtio-blk.

Each runs on both backends: a buffered disk (the I/O thread pool) and a direct one (native AIO),
the latter where the scratch directory supports O_DIRECT.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nubis.memory import GuestMemory
from nubis.virtio import block as block_module
from nubis.virtio.block import (
    DISCARD_SEGMENT,
    REQUEST_HEADER,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    Block,
    has_async_direct_io,
    second_byte_mask,
    split_request,
    split_request_anyhow,
    table_aligned,
)
from nubis.virtio.mock import MockDriver
from nubis.virtio.queue import DESC, VIRTQ_DESC_F_WRITE, Descriptor, DescriptorChain

SECTORS = 64
DISK = bytes(range(256)) * (SECTORS * 2)


class Scratch(str):
    """A scratch directory; ``direct`` says whether its filesystem supports O_DIRECT."""

    direct: bool


@pytest.fixture(scope="module")
def scratch(request: pytest.FixtureRequest) -> Iterator[Scratch]:
    try:
        parent: str | None = str(request.getfixturevalue("direct_dir"))
    except pytest.skip.Exception:
        parent = None
    with tempfile.TemporaryDirectory(dir=parent) as directory:
        result = Scratch(directory)
        result.direct = parent is not None
        yield result


def _open(path: str, scratch: Scratch, direct: bool, **options: Any) -> Block:
    return Block(path, direct=direct and scratch.direct, **options)


def _fresh_disk(directory: str, sectors: int = SECTORS) -> str:
    """A disk image of ``sectors`` sectors, `DISK` repeated."""
    path = os.path.join(directory, "disk.img")
    with open(path, "wb") as f:
        f.write(DISK * (sectors // SECTORS))
    return path


kinds = st.one_of(
    st.sampled_from(
        [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ]
    ),
    st.integers(0, 2**32 - 1),
)
sectors = st.one_of(
    st.sampled_from([0, 1, SECTORS - 1, SECTORS, SECTORS + 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
segments = st.lists(
    st.tuples(sectors, st.integers(0, 2**32 - 1) | st.integers(0, 80), st.integers(0, 3)),
    max_size=3,
).map(lambda segs: b"".join(DISCARD_SEGMENT.pack(*s) for s in segs))
payloads = st.one_of(
    segments,
    st.integers(0, 4).map(lambda n: b"\xee" * (512 * n)),
    st.binary(max_size=40),
)
requests = st.tuples(
    kinds,
    sectors,
    payloads,
    st.lists(st.sampled_from([512, 1024]) | st.integers(0, 1100), max_size=3),
    st.integers(0, 17),  # split the header after this many bytes (16+ means no split)
    st.booleans(),
    st.sampled_from([8, 512]),  # buffer alignment: 512 lets a direct disk use O_DIRECT
)


@settings(max_examples=150, deadline=None)
@given(
    batch=st.lists(requests, min_size=1, max_size=6),
    readonly=st.booleans(),
    direct=st.booleans(),
)
def test_hostile_requests_get_a_status(
    scratch: Scratch,
    batch: list[tuple[int, int, bytes, list[int], int, bool, int]],
    readonly: bool,
    direct: bool,
) -> None:
    path = _fresh_disk(scratch)
    with GuestMemory([(0, 0x40000), (0x80000, 0x10000)]) as memory:
        block = _open(path, scratch, direct, readonly=readonly, queue_size=64)
        driver = MockDriver(block, memory, sizes=[64])
        mock = driver.queues[0]
        chains = []
        for kind, sector, payload, reads, split, indirect, alignment in batch:
            header = REQUEST_HEADER.pack(kind, 0, sector)
            readable = [header[:split], header[split:], payload]
            readable = [piece for piece in readable if piece]
            chains.append(
                mock.add_chain(readable, [*reads, 1], indirect=indirect, alignment=alignment)
            )
        guard = bytes(memory.regions[1].view)
        before = bytearray(memory.regions[0].view)
        driver.activate()
        assert block.uses_native_aio == (
            direct and scratch.direct and has_async_direct_io(block._direct_fd)
        )
        block.reset()  # waits for the worker and for every request it put in flight
        # Only the writable buffers and the used ring changed.
        after = bytearray(memory.regions[0].view)
        allowed = [(mock.used_ring, 6 + 8 * 64)]
        allowed += [buffer for chain in chains for buffer in chain.writable]
        for addr, size in allowed:
            before[addr : addr + size] = after[addr : addr + size]
        assert before == after
        assert not driver.needs_reset.is_set()
        used = mock.take_used()
        # Reads and writes run concurrently and may complete in any order (2.7.8).
        assert sorted(head for head, _ in used) == sorted(chain.head for chain in chains)
        lengths = dict(used)
        for chain in chains:
            length = lengths[chain.head]
            status_addr, _ = chain.writable[-1]
            status = memory.read(status_addr, 1)[0]
            assert status in (0, 1, 2)
            assert 1 <= length <= sum(size for _, size in chain.writable)
        assert bytes(memory.regions[1].view) == guard
        block.shutdown()
        driver.close()
    assert os.path.getsize(path) == len(DISK)
    if readonly:
        with open(path, "rb") as f:
            assert f.read() == DISK


@settings(max_examples=100, deadline=None)
@given(
    table=st.lists(
        st.tuples(
            st.sampled_from([0x20000, 0x20008, 0x3FFF0, 0x40000, 0x80000, 0x8FFF8])
            | st.integers(0, 0x100000),
            st.sampled_from([0, 1, 15, 16, 17, 512, 513, 0x10000]) | st.integers(0, 2**32 - 1),
            st.sampled_from([0, 1, 2, 3, 4, 5, 7]),
            st.integers(0, 17),
        ),
        min_size=16,
        max_size=16,
    ),
    heads=st.lists(st.integers(0, 17), min_size=1, max_size=8),
    header=st.tuples(
        st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_GET_ID]), sectors
    ),
    direct=st.booleans(),
)
def test_hostile_tables_touch_only_writable_buffers(
    scratch: Scratch,
    table: list[tuple[int, int, int, int]],
    heads: list[int],
    header: tuple[int, int],
    direct: bool,
) -> None:
    path = _fresh_disk(scratch)
    with GuestMemory([(0, 0x40000), (0x80000, 0x10000)]) as memory:
        block = _open(path, scratch, direct, queue_size=16)
        driver = MockDriver(block, memory, sizes=[16])
        mock = driver.queues[0]
        # Plausible request headers wherever a descriptor might point.
        for addr in (0x20000, 0x20008, 0x80000):
            memory.write(addr, REQUEST_HEADER.pack(header[0], 0, header[1]))
        for index, desc in enumerate(table):
            mock.write_descriptor(index, *desc)
        for head in heads:
            mock.publish(head)
        before = [bytes(region.view) for region in memory.regions]
        driver.activate()
        block.reset()
        after = [bytes(region.view) for region in memory.regions]
        allowed = [(mock.used_ring, mock.used_ring + 6 + 8 * 16)] + [
            (addr, addr + length) for addr, length, flags, _ in table if flags & VIRTQ_DESC_F_WRITE
        ]
        for region, old, new in zip(memory.regions, before, after, strict=True):
            if old == new:
                continue
            for offset in range(len(old)):
                if old[offset] != new[offset]:
                    addr = region.start + offset
                    assert any(lo <= addr < hi for lo, hi in allowed), hex(addr)
        assert driver.needs_reset.is_set() or mock.used_idx() == len(heads)
        block.shutdown()
        driver.close()
    assert os.path.getsize(path) == len(DISK)


@pytest.mark.parametrize("direct", [False, True])
def test_a_valid_request_still_works_after_hostile_ones(scratch: Scratch, direct: bool) -> None:
    path = _fresh_disk(scratch)
    with GuestMemory([(0, 0x40000)]) as memory:
        block = _open(path, scratch, direct, queue_size=16)
        driver = MockDriver(block, memory, sizes=[16])
        mock = driver.queues[0]
        mock.add_chain([REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 2**64 - 1)], [512, 1])
        ok = mock.add_chain([REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 1)], [512, 1])
        driver.activate()
        driver.wait_used(0, 2)
        assert memory.read(ok.writable[1][0], 1)[0] == VIRTIO_BLK_S_OK
        assert memory.read(ok.writable[0][0], 512) == DISK[512:1024]
        block.shutdown()
        driver.close()


@settings(max_examples=500, deadline=None)
@given(
    buffers=st.lists(
        st.tuples(
            st.one_of(
                st.integers(0, 2**64 - 1).map(lambda addr: addr & ~0xFFF),
                st.integers(0, 2**64 - 1).map(lambda addr: addr & ~0x1FF),
                st.integers(0, 2**64 - 1),
            ),
            st.one_of(st.sampled_from([512, 4096, 65536, 512 * 3]), st.integers(0, 2**32 - 1)),
        ),
        min_size=1,
        max_size=40,
    ),
    bits=st.sampled_from([0, 512, 4096, 1 << 20, 1, 256]),
    align=st.sampled_from([512, 1024, 4096, 65536, 1 << 17]),
)
def test_table_alignment_read_from_bytes_is_the_plain_rule(
    buffers: list[tuple[int, int]], bits: int, align: int
) -> None:
    # Header and status entries around the data buffers, with bits that must not count.
    entries = [(0x1001, 16, 1, 1), *((a, n, 3, 0) for a, n in buffers), (0x2003, 1, 2, 0)]
    table = memoryview(b"".join(DESC.pack(*entry) for entry in entries))
    plain = bits
    for addr, length in buffers:
        plain |= addr | length
    expected = align <= 1 << 16 and not plain & (align - 1)
    last = len(entries) - 1
    assert table_aligned(table, last, bits, align, second_byte_mask(align)) == expected


@settings(max_examples=300, deadline=None)
@given(
    readable=st.lists(st.sampled_from([0, 1, 15, 16, 17, 512, 4096]), max_size=4),
    writable=st.lists(st.sampled_from([0, 1, 2, 512, 4096]), max_size=4),
)
def test_the_usual_framing_splits_as_any_framing_does(
    readable: list[int], writable: list[int]
) -> None:
    # Each buffer at its own address, so that a mix-up of buffers shows.
    lengths = [*readable, *writable]
    if not lengths:
        return
    descriptors = [
        Descriptor(0x10000 * (i + 1), length, VIRTQ_DESC_F_WRITE if i >= len(readable) else 0, 0)
        for i, length in enumerate(lengths)
    ]
    chain = DescriptorChain(0, descriptors, len(readable))
    assert split_request(chain) == split_request_anyhow(chain)


def _run_requests(
    path: str,
    scratch: Scratch,
    batch: list[tuple[int, int, list[int], bool, int, bool]],
    readonly: bool,
    direct: bool,
    shortcuts: bool,
    counters: dict[str, int] | None = None,
) -> tuple[dict[int, int], list[bytes], bytes]:
    """Run header/data.../status requests; the used lengths, each chain's writable bytes and
    the disk afterwards (and the device's counters into ``counters``, if given)."""
    with GuestMemory([(0, 0x40000)]) as memory:
        block = _open(path, scratch, direct, readonly=readonly, queue_size=64)
        if not shortcuts:
            block._start_simple = lambda *_args: False  # type: ignore[method-assign]
            block._start_scattered = lambda *_args: False  # type: ignore[method-assign]
        driver = MockDriver(block, memory, sizes=[64])
        mock = driver.queues[0]
        chains = []
        for kind, sector, sizes, flipped, alignment, indirect in batch:
            header = REQUEST_HEADER.pack(kind, 0, sector)
            # The data goes the way the type says (writable for a read), unless flipped.
            data_writable = (kind != VIRTIO_BLK_T_OUT) != flipped
            if data_writable:
                readable, writable = [header], [*sizes, 1]
            else:
                readable, writable = [header, *(b"\x5a" * size for size in sizes)], [1]
            chains.append(
                mock.add_chain(readable, writable, indirect=indirect, alignment=alignment)
            )
        driver.activate()
        block.reset()
        used = dict(mock.take_used())
        written = [mock.read_buffers(chain.writable) for chain in chains]
        if counters is not None:
            counters.update(block.counters())
        block.shutdown()
        driver.close()
    with open(path, "rb") as f:
        return used, written, f.read()


def _assert_shortcuts_change_nothing(
    scratch: Scratch,
    batch: list[tuple[int, int, list[int], bool, int, bool]],
    readonly: bool,
    direct: bool,
    sectors: int = SECTORS,
) -> None:
    """``batch`` gives the same used lengths, guest bytes and disk with and without shortcuts.

    Requests in flight together may complete in any order, as on any disk, so a batch with a
    write that overlaps another request has no single outcome; such batches are not tried.
    """
    spans = [
        (kind == VIRTIO_BLK_T_OUT, sector, sector + -(-sum(sizes) // 512))
        for kind, sector, sizes, *_ in batch
    ]
    assume(
        not any(
            (write or other_write) and start < other_end and other_start < end
            for i, (write, start, end) in enumerate(spans)
            for other_write, other_start, other_end in spans[i + 1 :]
        )
    )
    outcomes = []
    for shortcuts in (True, False):
        path = _fresh_disk(scratch, sectors)
        outcomes.append(_run_requests(path, scratch, batch, readonly, direct, shortcuts))
    assert outcomes[0] == outcomes[1]


@settings(max_examples=150, deadline=None)
@given(
    batch=st.lists(
        st.tuples(
            st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_GET_ID, 99]),
            st.sampled_from([0, 0, 1, 8, SECTORS - 8, SECTORS - 1, SECTORS, 2**64 - 1]),
            # Mostly whole sectors, so that many requests are valid; now and then not.
            st.lists(
                st.sampled_from([512, 512, 1024, 2048, 1, 100, 256, 511]), min_size=1, max_size=5
            ),
            st.sampled_from([False, False, False, True]),
            st.sampled_from([8, 512]),
            # Linux puts every request in an indirect table; both forms have shortcuts.
            st.sampled_from([True, True, False]),
        ),
        min_size=1,
        max_size=5,
    ),
    readonly=st.booleans(),
    direct=st.booleans(),
)
def test_the_request_shortcuts_answer_as_the_general_path(
    scratch: Scratch,
    batch: list[tuple[int, int, list[int], bool, int, bool]],
    readonly: bool,
    direct: bool,
) -> None:
    # Reads and writes of one buffer, or of many buffers of one direction, skip the general
    # framing; whatever the request, the guest and the disk must see the same as through the
    # general path (buffers that touch or not, aligned or not, any type, sector and length).
    _assert_shortcuts_change_nothing(scratch, batch, readonly, direct)


@settings(max_examples=100, deadline=None)
@given(
    batch=st.lists(
        st.tuples(
            st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT]),
            st.sampled_from([0, 8, 64, 128, 4 * SECTORS - 16, 4 * SECTORS - 2]),
            # Whole sectors, in buffers that touch (page-sized, page-aligned) or leave gaps.
            st.lists(st.sampled_from([512, 1024, 2048, 4096]), min_size=2, max_size=6),
            st.sampled_from([False, False, False, False, True]),
            st.sampled_from([512, 4096]),
            st.sampled_from([True, True, False]),
        ),
        min_size=1,
        max_size=4,
    ),
    readonly=st.sampled_from([False, False, True]),
    direct=st.sampled_from([True, True, False]),
)
def test_reads_and_writes_of_many_buffers_answer_as_the_general_path(
    scratch: Scratch,
    batch: list[tuple[int, int, list[int], bool, int, bool]],
    readonly: bool,
    direct: bool,
) -> None:
    # The requests Linux sends for large reads and writes, valid more often than not: the
    # scattered shortcut (columns from the indirect table, iovecs from columns) must give the
    # guest and the disk what the general path gives.
    _assert_shortcuts_change_nothing(scratch, batch, readonly, direct, 4 * SECTORS)


def _merged_by_model(batch: list[tuple[int, int, list[int], bool, int, bool]], cap: int) -> int:
    """How many requests of ``batch``, all pending at once, ride in an earlier one's iocb."""
    merged = 0
    group_kind, group_end, group_bytes = None, -1, 0
    for kind, sector, sizes, *_ in batch:
        size = sum(sizes)
        if kind == group_kind and sector * 512 == group_end and group_bytes + size <= cap:
            merged += 1
            group_bytes += size
        else:
            group_kind, group_bytes = kind, size
        group_end = sector * 512 + size
    return merged


@settings(max_examples=100, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT]),
            # Mostly right after the request before, as a sequential stream goes.
            st.sampled_from([0, 0, 0, 8]),
            st.lists(st.sampled_from([4096, 8192]), min_size=1, max_size=2),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
    cap=st.sampled_from([4096, 8192, 16384, 1 << 20]),
)
def test_merged_iocbs_answer_as_requests_sent_one_by_one(
    scratch: Scratch, requests: list[tuple[int, int, list[int], bool]], cap: int
) -> None:
    # Native AIO merges requests that continue one another on disk into one iocb. Whatever the
    # mix of directions, gaps and sizes, the guest and the disk must see what they see with no
    # merging, and exactly the requests the model says share an iocb must do so.
    assert scratch.direct, "the scratch directory must support O_DIRECT for native AIO"
    batch: list[tuple[int, int, list[int], bool, int, bool]] = []
    cursor = 0
    for kind, gap, sizes, indirect in requests:
        sector = cursor + gap
        batch.append((kind, sector, sizes, False, 4096, indirect))
        cursor = sector + sum(sizes) // 512
    outcomes = []
    merged = []
    for merge_max in (cap, 0):
        saved = block_module.MERGE_MAX_BYTES
        block_module.MERGE_MAX_BYTES = merge_max
        counters: dict[str, int] = {}
        try:
            path = _fresh_disk(scratch, 8 * SECTORS)  # room for every request of the batch
            outcomes.append(_run_requests(path, scratch, batch, False, True, True, counters))
        finally:
            block_module.MERGE_MAX_BYTES = saved
        merged.append(counters["merged_requests"])
    assert outcomes[0] == outcomes[1]
    # Every request succeeded (its status byte, last of its writable bytes), so every one
    # went to the kernel and the model counts them all.
    assert all(written[-1] == VIRTIO_BLK_S_OK for written in outcomes[0][1])
    assert merged == [_merged_by_model(batch, cap), 0]


def _record_verdicts(block: Block, shortcut: str) -> list[bool]:
    """Make ``block``'s ``shortcut`` method append what it returns to the list returned."""
    taken: list[bool] = []
    general = getattr(block, shortcut)

    def spy(*args: Any) -> bool:
        taken.append(general(*args))
        return taken[-1]

    setattr(block, shortcut, spy)
    return taken


def test_a_linux_read_and_write_take_the_simple_path(scratch: Scratch) -> None:
    path = _fresh_disk(scratch)
    with GuestMemory([(0, 0x40000)]) as memory:
        block = _open(path, scratch, False, queue_size=16)
        taken = _record_verdicts(block, "_start_simple")
        driver = MockDriver(block, memory, sizes=[16])
        mock = driver.queues[0]
        read = mock.add_chain([REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 1)], [512, 1], indirect=True)
        mock.add_chain([REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 2), b"\x11" * 512], [1])
        driver.activate()
        driver.wait_used(0, 2)
        assert taken == [True, True]
        assert memory.read(read.writable[0][0], 512) == DISK[512:1024]
        block.shutdown()
        driver.close()
    with open(path, "rb") as f:
        assert f.read()[1024:1536] == b"\x11" * 512


@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
def test_a_linux_read_of_many_buffers_takes_the_scattered_path(
    scratch: Scratch, indirect: bool
) -> None:
    path = _fresh_disk(scratch)
    with GuestMemory([(0, 0x40000)]) as memory:
        block = _open(path, scratch, False, queue_size=16)
        taken = _record_verdicts(block, "_start_scattered")
        driver = MockDriver(block, memory, sizes=[16])
        mock = driver.queues[0]
        # Buffers that do not touch (100-byte gaps), and buffers that do.
        apart = mock.add_chain(
            [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 1)],
            [512, 1024, 512, 1],
            alignment=4096,
            indirect=indirect,
        )
        touching = mock.add_chain(
            [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)],
            [512, 512, 1],
            alignment=512,
            indirect=indirect,
        )
        driver.activate()
        driver.wait_used(0, 2)
        assert taken == [True, True]
        assert mock.read_buffers(apart.writable[:-1]) == DISK[512 : 512 + 2048]
        assert mock.read_buffers(touching.writable[:-1]) == DISK[:1024]
        block.shutdown()
        driver.close()
