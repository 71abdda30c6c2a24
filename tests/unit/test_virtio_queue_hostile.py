"""Property tests: a hostile driver against nubis.virtio.queue, and round trips of valid chains."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from nubis.memory import GuestMemory
from nubis.virtio.mock import MockSplitQueue
from nubis.virtio.queue import (
    DESC,
    USED_ELEM,
    VIRTQ_DESC_F_WRITE,
    Descriptor,
    DescriptorChain,
    Queue,
    QueueError,
    vring_need_event,
)

# Two small regions with a hole between them: [0, 16K) and [32K, 48K).
REGIONS = [(0, 0x4000), (0x8000, 0x4000)]
SIZE = 8
TABLE_AREA = 0x8000  # where hostile indirect tables live

addresses = st.one_of(
    st.sampled_from(
        [0, 0x1000, 0x3FF0, 0x3FFF, 0x4000, 0x7FF0, 0x8000, 0xBFF0, 0xC000, 2**63, 2**64 - 16]
    ),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 15, 16, 32, 48, 128, 0x4000, 0x8000, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
descriptors = st.tuples(addresses, lengths, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)).map(
    lambda d: (
        d[0],
        d[1],
        d[2] & 0x7 if d[2] < 0xF000 else d[2],
        d[3] % 12 if d[3] < 0xF000 else d[3],
    )
)


def _snapshot(memory: GuestMemory) -> list[bytes]:
    return [bytes(region.view) for region in memory.regions]


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(descriptors, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(descriptors, min_size=0, max_size=12),
    ring=st.lists(
        st.integers(0, 0xFFFF).map(lambda v: v % 10 if v < 0xF000 else v),
        min_size=SIZE,
        max_size=SIZE,
    ),
    avail_idx=st.integers(0, 0xFFFF).map(lambda v: v % 12 if v < 0xE000 else v),
    event_idx=st.booleans(),
)
def test_hostile_rings_raise_only_queue_errors(
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    ring: list[int],
    avail_idx: int,
    event_idx: bool,
) -> None:
    with GuestMemory(REGIONS) as memory:
        mock = MockSplitQueue(memory, SIZE, 0)
        queue = mock.create_queue(event_idx=event_idx)
        for index, desc in enumerate(table):
            mock.write_descriptor(index, *desc)
        for index, desc in enumerate(indirect):
            memory.write(TABLE_AREA + DESC.size * index, DESC.pack(*desc))
        for slot, head in enumerate(ring):
            memory.write_u16(mock.avail_ring + 4 + 2 * slot, head)
        mock.set_avail_idx(avail_idx)
        before = _snapshot(memory)
        popped = []
        try:
            while (chain := queue.pop_descriptor_chain(memory)) is not None:
                popped.append(chain)
                for desc in chain:
                    assert desc.len == 0 or memory.contains(desc.addr, desc.len)
                assert len(chain) <= SIZE
                assert chain.head_index < SIZE
                assert sum(1 for d in chain if not d.is_write_only) == chain.readable_count
        except QueueError:
            pass
        assert len(popped) <= SIZE
        # Popping only reads guest memory.
        assert _snapshot(memory) == before
        for chain in popped:
            queue.add_used(memory, chain.head_index, chain.writable_len() & 0xFFFFFFFF)
        queue.needs_notification(memory)
        queue.enable_notification(memory) if queue.next_avail == avail_idx else None
        after = _snapshot(memory)
        # Only the used ring (flags/idx/elements/avail_event) may change.
        used_start, used_end = mock.used_ring, mock.used_ring + 6 + 8 * SIZE
        changed = [i for i, (a, b) in enumerate(zip(before[0], after[0], strict=True)) if a != b]
        assert all(used_start <= i < used_end for i in changed)
        assert before[1] == after[1]
        assert mock.take_used() == [(c.head_index, c.writable_len() & 0xFFFFFFFF) for c in popped]


chains = st.lists(
    st.tuples(
        st.lists(st.binary(min_size=0, max_size=64), max_size=3),
        st.lists(st.integers(0, 300), max_size=3),
        st.booleans(),
    ).filter(lambda c: len(c[0]) + len(c[1]) > 0),
    min_size=1,
    max_size=6,
).filter(lambda cs: sum(1 if ind else len(r) + len(w) for r, w, ind in cs) <= SIZE)


@settings(max_examples=100, deadline=None)
@given(chains=chains, start=st.integers(0, 0xFFFF))
def test_valid_chains_round_trip(
    chains: list[tuple[list[bytes], list[int], bool]], start: int
) -> None:
    with GuestMemory(REGIONS) as memory:
        mock = MockSplitQueue(memory, SIZE, 0)
        queue = mock.create_queue()
        mock.avail_idx = queue.next_avail = queue.next_used = mock.used_seen = start
        mock.set_avail_idx(start)
        memory.write_u16(mock.used_ring + 2, start)
        sent = [mock.add_chain(r, w, indirect=ind) for r, w, ind in chains]
        for expected, (readable, _, _) in zip(sent, chains, strict=True):
            chain = queue.pop_descriptor_chain(memory)
            assert chain is not None
            assert chain.head_index == expected.head
            assert [(d.addr, d.len) for d in chain.readable()] == expected.readable
            assert [(d.addr, d.len) for d in chain.writable()] == expected.writable
            assert b"".join(bytes(v) for v in chain.readable_views(memory)) == b"".join(readable)
            queue.add_used(memory, chain.head_index, 7)
        assert queue.pop_descriptor_chain(memory) is None
        assert mock.take_used() == [(c.head, 7) for c in sent]


@given(event=st.integers(0, 0xFFFF), old=st.integers(0, 0xFFFF), step=st.integers(0, 0xFFFF))
def test_vring_need_event_matches_its_definition(event: int, old: int, step: int) -> None:
    new = (old + step) & 0xFFFF
    # Needed exactly when used_event is one of the indices the device moved past.
    expected = (
        any((old + k) & 0xFFFF == event for k in range(step))
        if step < 64
        else ((event - old) & 0xFFFF < step)
    )
    assert vring_need_event(event, new, old) == expected


def _host_address(view: memoryview) -> int:
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(descriptors, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(descriptors, min_size=0, max_size=12),
    ring=st.lists(
        st.integers(0, 0xFFFF).map(lambda v: v % 10 if v < 0xF000 else v),
        min_size=SIZE,
        max_size=SIZE,
    ),
    avail_idx=st.integers(0, 0xFFFF).map(lambda v: v % 12 if v < 0xE000 else v),
    writable=st.booleans(),
    limit=st.integers(1, SIZE + 1),
)
def test_pop_buffers_checks_what_pop_descriptor_chain_checks(
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    ring: list[int],
    avail_idx: int,
    writable: bool,
    limit: int,
) -> None:
    """The lean path accepts exactly the chains the full one does, with the same buffers."""
    _check_lean_paths(table, indirect, ring, avail_idx, writable, limit)


# Receive buffers as Linux posts them with MRG_RXBUF: one writable descriptor per chain, in one
# region, with now and then a near miss.
_rx_descriptor = st.one_of(
    *[
        st.tuples(
            st.sampled_from([0x1000, 0x2000, 0x3000, 0x9000, 0xA000]),
            st.sampled_from([12, 1536, 4096]),
            st.just(2),
            st.just(0),
        )
    ]
    * 8,
    st.tuples(
        st.sampled_from([0x3FF0, 0x4000, 0x8000, 0xBFFF]),
        st.sampled_from([0, 1, 16, 4096]),
        st.sampled_from([0, 1, 2, 3, 4, 6]),
        st.integers(0, 9),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(_rx_descriptor, min_size=SIZE, max_size=SIZE),
    ring=st.lists(
        st.integers(0, 0xFFFF).map(lambda v: v % SIZE if v < 0xFF00 else v),
        min_size=SIZE,
        max_size=SIZE,
    ),
    avail_idx=st.integers(0, 0xFFFF).map(lambda v: v % 12 if v < 0xE000 else v),
    limit=st.integers(1, SIZE + 1),
)
def test_pop_buffers_checks_receive_buffers_as_pop_descriptor_chain_does(
    table: list[tuple[int, int, int, int]], ring: list[int], avail_idx: int, limit: int
) -> None:
    """The same, with tables mostly of the one-buffer chains virtio-net receives into."""
    _check_lean_paths(table, [], ring, avail_idx, True, limit)


def _check_lean_paths(
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    ring: list[int],
    avail_idx: int,
    writable: bool,
    limit: int,
) -> None:
    with GuestMemory(REGIONS) as memory:
        mock = MockSplitQueue(memory, SIZE, 0)
        for index, desc in enumerate(table):
            mock.write_descriptor(index, *desc)
        for index, desc in enumerate(indirect):
            memory.write(TABLE_AREA + DESC.size * index, DESC.pack(*desc))
        for slot, head in enumerate(ring):
            memory.write_u16(mock.avail_ring + 4 + 2 * slot, head)
        mock.set_avail_idx(avail_idx)

        def expected_buffers(chain: DescriptorChain) -> list[int]:
            descs = chain.writable() if writable else chain.readable()
            return [_host_address(memory.slice(d.addr, d.len)) for d in descs if d.len]

        full = mock.create_queue()
        expected: list[tuple[int, list[int], int]] = []
        full_error = False
        try:
            while (chain := full.pop_descriptor_chain(memory)) is not None:
                total = chain.writable_len() if writable else chain.readable_len()
                expected.append((chain.head_index, expected_buffers(chain), total))
        except QueueError:
            full_error = True

        def lean(popped: tuple[int, list[memoryview], int]) -> tuple[int, list[int], int]:
            head, views, total = popped
            assert sum(map(len, views)) == total
            return head, [_host_address(v) for v in views], total

        one = mock.create_queue()
        got: list[tuple[int, list[int], int]] = []
        one_error = False
        try:
            while (popped := one.pop_buffers(memory, writable=writable)) is not None:
                got.append(lean(popped))
        except QueueError:
            one_error = True
        assert (got, one_error) == (expected, full_error)

        many = mock.create_queue()
        got = []
        many_error = False
        try:
            while batch := many.pop_buffers_many(memory, limit, writable=writable):
                got += [lean(popped) for popped in batch]
        except QueueError:
            many_error = True
        assert many_error == full_error
        # A batch that meets a broken chain is lost with it (the device then needs a reset).
        assert got == expected if not full_error else got == expected[: len(got)]

        # The parallel-list path, with a minimum length: short chains come back as rejected.
        into = mock.create_queue()
        heads: list[int] = []
        lengths: list[int] = []
        counts: list[int] = []
        views: list[memoryview] = []
        rejected: list[int] = []
        into_error = False
        try:
            while into._pending(memory):
                rejected += into.pop_buffers_into(
                    memory, limit, heads, lengths, counts, views, writable=writable, min_length=3
                )
        except QueueError:
            into_error = True
        assert into_error == full_error
        assert sum(counts) == len(views)
        got = []
        position = 0
        for head, total, count in zip(heads, lengths, counts, strict=True):
            got.append(lean((head, views[position : position + count], total)))
            position += count
        kept = [chain for chain in expected if chain[2] >= 3]
        short = [chain[0] for chain in expected if chain[2] < 3]
        if not full_error:
            assert (got, rejected) == (kept, short)
        else:
            assert got == kept[: len(got)]
            assert rejected == short[: len(rejected)]


def _entry(flags: list[int], nexts: list[int]) -> st.SearchStrategy[tuple[int, int, int, int]]:
    # Mostly what Linux writes, sometimes anything: near misses are what the shortcut must
    # turn down.
    inside = st.tuples(
        st.sampled_from([0x1000, 0x2F00, 0x8000, 0x9000]), st.sampled_from([1, 16, 512])
    )
    edges = st.tuples(
        st.sampled_from([0x3FF0, 0x3FFF, 0xBFF0, 0xC000]), st.sampled_from([0, 1, 16, 4096])
    )
    buffer = st.one_of(inside, inside, inside, edges, st.tuples(addresses, lengths))
    return st.tuples(buffer, st.sampled_from(flags), st.sampled_from(nexts)).map(
        lambda e: (e[0][0], e[0][1], e[1], e[2])
    )


three_entries = st.tuples(
    _entry([1] * 6 + [0, 3, 5, 0xFFFF], [1] * 6 + [0, 2, 0xFFFF]),
    _entry([1, 1, 3, 3, 3, 3, 0, 2, 7], [2] * 6 + [1, 3]),
    _entry([2] * 6 + [3, 0, 6], [0] * 4 + [3, 0xFFFF]),
)


@settings(max_examples=600, deadline=None)
@given(
    entries=three_entries,
    table_at=st.sampled_from([0x1000, 0x3FD0, 0x3FE0, 0x8000, 0xBFD0]),
    size=st.sampled_from([2, 4, SIZE]),
    warm=st.booleans(),
)
def test_three_entry_indirect_tables_read_as_the_general_walk_reads_them(
    entries: tuple[tuple[int, int, int, int], ...], table_at: int, size: int, warm: bool
) -> None:
    # The shortcut for Linux's usual request (an indirect table of three descriptors) must
    # accept exactly what the general walk accepts, and give the same chain.
    with GuestMemory(REGIONS) as memory:
        mock = MockSplitQueue(memory, size, 0)
        queue = mock.create_queue()
        _place_indirect_table(memory, mock, queue, table_at, list(entries), warm)
        assert _outcome(queue._read_chain, memory) == _outcome(queue._walk_chain, memory)


def _place_indirect_table(
    memory: GuestMemory,
    mock: MockSplitQueue,
    queue: Queue,
    table_at: int,
    entries: list[tuple[int, int, int, int]],
    warm: bool,
) -> None:
    """Make descriptor 0 name an indirect table of ``entries`` at ``table_at``."""
    if warm:
        # A buffer popped from the other region first, so the cached region is not the table's.
        mock.add_chain([], [16])
        assert queue.pop_buffers(memory, writable=True) is not None
    queue.validate(memory)
    mock.write_descriptor(0, table_at, DESC.size * len(entries), 4, 0)
    for index, desc in enumerate(entries):
        # A table running past its region keeps only the entries inside it.
        if memory.contains(table_at + DESC.size * index, DESC.size):
            memory.write(table_at + DESC.size * index, DESC.pack(*desc))


def _outcome(read: Callable[[GuestMemory, int], DescriptorChain], memory: GuestMemory) -> object:
    """The chain at head 0 as ``read`` reads it, or its error message."""
    try:
        chain = read(memory, 0)
    except QueueError as exc:
        return str(exc)
    return (list(chain), chain.readable_count)


@st.composite
def in_order_tables(draw: st.DrawFn, count: int) -> list[tuple[int, int, int, int]]:
    """An indirect table of ``count`` entries as Linux fills one, often with a near miss or two."""
    readable = draw(st.integers(0, count))
    home = draw(st.sampled_from([0, 0x8000]))  # a driver's buffers mostly share a region
    inside = st.tuples(
        st.sampled_from([home + 0x1000, home + 0x2000, home + 0x3000]),
        st.sampled_from([1, 16, 512, 4096]),
    )
    table = []
    for index in range(count):
        addr, length = draw(inside)
        flags = (0 if index == count - 1 else 1) | (0 if index < readable else 2)
        table.append((addr, length, flags, index + 1))
    edges = st.tuples(
        st.sampled_from([0x3FF0, 0x3FFF, 0x4000, 0xBFF0, 0xC000]),
        st.sampled_from([0, 1, 16, 4096]),
    )
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        index = draw(st.integers(0, count - 1))
        addr, length, flags, link = table[index]
        what = draw(st.sampled_from(["flags", "link", "buffer"]))
        if what == "flags":
            flags = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 0xFFFF]))
        elif what == "link":
            link = draw(st.sampled_from([0, index, index + 2, count, 0xFFFF]))
        else:
            addr, length = draw(st.one_of(edges, edges, st.tuples(addresses, lengths)))
        table[index] = (addr, length, flags, link)
    return table


@settings(max_examples=600, deadline=None)
@given(
    data=st.data(),
    size=st.sampled_from([4, SIZE, 16]),
    table_at=st.sampled_from([0x1000, 0x3F00, 0x3FC0, 0x8000, 0xBF00]),
    warm=st.booleans(),
)
def test_in_order_indirect_tables_read_as_the_general_walk_reads_them(
    data: st.DataObject, size: int, table_at: int, warm: bool
) -> None:
    # The shortcut for large requests (an indirect table filled in order) must accept exactly
    # what the general walk accepts, and give the same chain.
    count = data.draw(st.integers(2, size + 1), label="count")
    entries = data.draw(in_order_tables(count), label="entries")
    with GuestMemory(REGIONS) as memory:
        mock = MockSplitQueue(memory, size, 0)
        queue = mock.create_queue()
        _place_indirect_table(memory, mock, queue, table_at, entries, warm)
        walked = _outcome(queue._walk_chain, memory)
        assert _outcome(queue._read_chain, memory) == walked
        # The lean path (views of one direction) takes the same shortcut; it must agree too.
        for want in (0, VIRTQ_DESC_F_WRITE):
            try:
                views, total = queue._chain_views(memory, 0, want)
                lean: object = ([_host_address(v) for v in views], total)
            except QueueError:
                lean = "refused"
            if isinstance(walked, str):
                assert lean == "refused"
                continue
            assert isinstance(walked, tuple)
            chain: list[Descriptor] = walked[0]
            readable: int = walked[1]
            chosen = [d for d in (chain[readable:] if want else chain[:readable]) if d.len]
            assert lean == (
                [memory.host_address(d.addr, d.len) for d in chosen],
                sum(d.len for d in chosen),
            )


def _spread_model(
    size: int, next_used: int, heads: list[int], lengths: list[int], written: int
) -> tuple[int, list[tuple[int, int, int]]] | str:
    # One chain at a time: each takes what is left, up to its length, until nothing is.
    left, taken, elements = written, 0, []
    while True:
        if taken >= len(heads):
            return "do not fit"
        if not 0 <= heads[taken] < size:
            return "beyond queue size"
        part = min(lengths[taken], left)
        elements.append(((next_used + taken) % size, heads[taken], part))
        taken += 1
        left -= part
        if left <= 0:
            # More elements than the ring holds would overwrite each other: refused.
            return (taken, elements) if taken <= size else "more than the ring holds"


@settings(max_examples=400, deadline=None)
@given(
    size=st.sampled_from([1, 2, 4, 8]),
    next_used=st.integers(0, 0xFFFF),
    chains=st.lists(
        st.tuples(
            st.integers(0, 4).map(lambda h: h if h < 4 else 0xFFFF),
            st.sampled_from([0, 1, 100, 4096]),
        ),
        max_size=10,
    ),
    written=st.integers(0, 20000),
)
def test_used_elements_spread_over_chains_as_one_at_a_time(
    size: int, next_used: int, chains: list[tuple[int, int]], written: int
) -> None:
    # stage_used_spread works on whole lists at once; it must store what filling the chains
    # one at a time would, wrapping around the ring, and refuse what that refuses.
    heads = [head for head, _ in chains]
    lengths = [length for _, length in chains]
    with GuestMemory(REGIONS) as memory:
        mock = MockSplitQueue(memory, size, 0)
        queue = mock.create_queue()
        queue.validate(memory)
        queue.next_used = next_used
        expected = _spread_model(size, next_used, heads, lengths, written)
        try:
            taken = queue.stage_used_spread(memory, heads, lengths, written)
        except QueueError as exc:
            # Either refusal (too few bytes offered, or a bad head) needs a device reset.
            assert isinstance(expected, str), exc
            return
        assert not isinstance(expected, str)
        assert taken == expected[0]
        assert queue.next_used == (next_used + taken) & 0xFFFF
        for slot, head, part in expected[1]:
            element = memory.read(mock.used_ring + 4 + 8 * slot, 8)
            assert USED_ELEM.unpack(element) == (head, part)
