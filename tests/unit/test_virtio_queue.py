"""Tests for the split virtqueue (nubis.virtio.queue) driven by the mock driver."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nubis.memory import GuestMemory
from nubis.virtio.mock import MockSplitQueue
from nubis.virtio.queue import (
    DESC,
    RING_HEADER,
    RING_U16,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Descriptor,
    Queue,
    QueueError,
    TableChain,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)

RAM = 0x10000


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


def test_layouts_match_the_spec() -> None:
    assert DESC.size == 16
    assert DESC.pack(1, 2, 3, 4) == (1).to_bytes(8, "little") + (2).to_bytes(4, "little") + (
        3
    ).to_bytes(2, "little") + (4).to_bytes(2, "little")
    assert RING_HEADER.size == 4
    assert RING_U16.size == 2
    assert USED_ELEM.size == 8
    assert (desc_table_size(256), avail_ring_size(256), used_ring_size(256)) == (4096, 518, 2054)
    assert (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT) == (1, 2, 4)


def test_max_size_must_be_a_power_of_two() -> None:
    for bad in (0, 3, 65536, -1):
        with pytest.raises(ValueError):
            Queue(bad)
    assert Queue(32768).size == 32768


def test_reset_restores_defaults(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue(event_idx=True)
    queue.size = 4
    mock.add_chain([b"x"])
    queue.size = 8
    assert queue.pop_descriptor_chain(memory) is not None
    queue.reset()
    assert (queue.size, queue.ready, queue.event_idx, queue.next_avail) == (8, False, False, 0)
    assert (queue.desc_table, queue.avail_ring, queue.used_ring) == (0, 0, 0)


def test_pop_returns_chain_and_add_used_publishes(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    assert queue.pop_descriptor_chain(memory) is None
    sent = mock.add_chain([b"hello", b"world!"], [100, 1])
    chain = queue.pop_descriptor_chain(memory)
    assert chain is not None
    assert chain.head_index == sent.head
    assert [(d.addr, d.len) for d in chain.readable()] == sent.readable
    assert [(d.addr, d.len) for d in chain.writable()] == sent.writable
    assert all(d.is_write_only for d in chain.writable())
    assert chain.readable_len() == 11 and chain.writable_len() == 101
    assert b"".join(chain.readable_views(memory)) == b"helloworld!"
    views = chain.writable_views(memory)
    views[0][:3] = b"abc"
    assert memory.read(sent.writable[0][0], 3) == b"abc"
    assert len(chain) == 4 and list(chain) == chain.descriptors
    assert queue.pop_descriptor_chain(memory) is None
    queue.add_used(memory, chain.head_index, 42)
    assert mock.take_used() == [(sent.head, 42)]
    assert queue.next_used == 1


def test_indirect_chain_is_expanded(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    sent = mock.add_chain([b"a" * 16], [512, 1], indirect=True)
    chain = queue.pop_descriptor_chain(memory)
    assert chain is not None
    assert chain.head_index == sent.head
    assert [(d.addr, d.len) for d in chain.readable()] == sent.readable
    assert [(d.addr, d.len) for d in chain.writable()] == sent.writable


def test_ring_wraps_around(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 4, 0)
    queue = mock.create_queue()
    for round_ in range(70000 // 4 // 100):
        for i in range(4):
            mock.add_chain([bytes([round_ & 0xFF, i])])
        for _ in range(4):
            chain = queue.pop_descriptor_chain(memory)
            assert chain is not None
            queue.add_used(memory, chain.head_index, 0)
        mock.reset_data()
        assert len(mock.take_used()) == 4
    # Force the 16-bit indices across the wrap point.
    mock.avail_idx = queue.next_avail = 0xFFFE
    mock.set_avail_idx(0xFFFE)
    for i in range(4):
        mock.add_chain([bytes([i])])
    seen = []
    while (chain := queue.pop_descriptor_chain(memory)) is not None:
        seen.append(bytes(chain.readable_views(memory)[0]))
    assert seen == [b"\0", b"\1", b"\2", b"\3"]
    assert queue.next_avail == 2


def test_avail_idx_jumping_ahead_is_an_error(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    mock.set_avail_idx(9)
    with pytest.raises(QueueError, match="ahead"):
        queue.pop_descriptor_chain(memory)
    mock.set_avail_idx(8)
    mock.write_descriptor(0, 0x8000, 1, 0, 0)
    assert queue.pop_descriptor_chain(memory) is not None  # head slots are all zero


def test_head_index_beyond_size_is_an_error(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    mock.publish(8)
    with pytest.raises(QueueError, match="beyond queue size"):
        queue.pop_descriptor_chain(memory)


@pytest.mark.parametrize(
    ("descriptors", "message"),
    [
        ([(0x8000, 4, VIRTQ_DESC_F_NEXT, 0)], "loops"),
        ([(0x8000, 4, VIRTQ_DESC_F_NEXT, 1), (0x8000, 4, VIRTQ_DESC_F_NEXT, 0)], "loops"),
        ([(0x8000, 4, VIRTQ_DESC_F_NEXT, 8)], "beyond"),
        ([(RAM - 4, 8, 0, 0)], "outside guest RAM"),
        ([(2**64 - 1, 2**32 - 1, 0, 0)], "outside guest RAM"),
        (
            [(0x8000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (0x8000, 4, 0, 0)],
            "readable buffer after a writable",
        ),
        ([(0x8000, 0, VIRTQ_DESC_F_INDIRECT, 0)], "multiple of 16"),
        ([(0x8000, 24, VIRTQ_DESC_F_INDIRECT, 0)], "multiple of 16"),
        ([(0x8000, 16 * 9, VIRTQ_DESC_F_INDIRECT, 0)], "more than the queue size"),
        ([(RAM - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)], "not inside guest RAM"),
        ([(0x8000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)], "INDIRECT and NEXT"),
    ],
)
def test_bad_chains_are_errors(
    memory: GuestMemory, descriptors: list[tuple[int, int, int, int]], message: str
) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    for index, desc in enumerate(descriptors):
        mock.write_descriptor(index, *desc)
    mock.publish(0)
    with pytest.raises(QueueError, match=message):
        queue.pop_descriptor_chain(memory)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([(0x9000, 4, VIRTQ_DESC_F_INDIRECT, 0)], "nests"),
        ([(0x9000, 4, VIRTQ_DESC_F_NEXT, 0)], "loops"),
        ([(0x9000, 4, VIRTQ_DESC_F_NEXT, 1), (0x9000, 4, VIRTQ_DESC_F_NEXT, 2)], "beyond"),
        ([(RAM, 1, 0, 0)], "outside guest RAM"),
    ],
)
def test_bad_indirect_tables_are_errors(
    memory: GuestMemory, table: list[tuple[int, int, int, int]], message: str
) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    for index, desc in enumerate(table):
        memory.write(0x8000 + 16 * index, DESC.pack(*desc))
    mock.write_descriptor(0, 0x8000, 16 * len(table), VIRTQ_DESC_F_INDIRECT, 0)
    mock.publish(0)
    with pytest.raises(QueueError, match=message):
        queue.pop_descriptor_chain(memory)


def test_chain_of_exactly_queue_size_is_accepted(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 4, 0)
    queue = mock.create_queue()
    for i in range(4):
        mock.write_descriptor(i, 0x8000 + i, 1, VIRTQ_DESC_F_NEXT if i < 3 else 0, i + 1)
    mock.publish(0)
    chain = queue.pop_descriptor_chain(memory)
    assert chain is not None and len(chain) == 4


def test_direct_descriptors_before_an_indirect_table_count_towards_the_limit(
    memory: GuestMemory,
) -> None:
    mock = MockSplitQueue(memory, 4, 0)
    queue = mock.create_queue()
    for i in range(4):
        memory.write(
            0x8000 + 16 * i, DESC.pack(0x9000, 1, VIRTQ_DESC_F_NEXT if i < 3 else 0, i + 1)
        )
    mock.write_descriptor(0, 0x9000, 1, VIRTQ_DESC_F_NEXT, 1)
    mock.write_descriptor(1, 0x8000, 64, VIRTQ_DESC_F_INDIRECT, 0)
    mock.publish(0)
    with pytest.raises(QueueError, match="more than the queue size"):
        queue.pop_descriptor_chain(memory)


def test_zero_length_buffers_are_allowed_anywhere(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 4, 0)
    queue = mock.create_queue()
    mock.write_descriptor(0, 2**64 - 1, 0, VIRTQ_DESC_F_WRITE, 0)
    mock.publish(0)
    chain = queue.pop_descriptor_chain(memory)
    assert chain is not None
    assert chain.writable_views(memory) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("desc_table", 8, "aligned"),
        ("avail_ring", 1, "aligned"),
        ("used_ring", 2, "aligned"),
        ("desc_table", RAM - 16, "not inside guest RAM"),
        ("used_ring", RAM - 4, "not inside guest RAM"),
        ("avail_ring", 2**64 - 2, "not inside guest RAM"),
        ("size", 3, "power of two"),
        ("size", 16, "power of two"),
        ("size", 0, "power of two"),
        ("ready", False, "ready"),
    ],
)
def test_bad_ring_configuration_is_an_error(
    memory: GuestMemory, field: str, value: object, message: str
) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    setattr(queue, field, value)
    with pytest.raises(QueueError, match=message):
        queue.pop_descriptor_chain(memory)
    with pytest.raises(QueueError, match=message):
        queue.add_used(memory, 0, 0)


def test_add_used_checks_its_arguments(memory: GuestMemory) -> None:
    queue = MockSplitQueue(memory, 8, 0).create_queue()
    with pytest.raises(QueueError):
        queue.add_used(memory, 8, 0)
    with pytest.raises(QueueError):
        queue.add_used(memory, 0, 2**32)


def test_notification_without_event_idx(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    assert queue.needs_notification(memory)
    mock.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not queue.needs_notification(memory)
    queue.disable_notification(memory)
    assert mock.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    assert not queue.enable_notification(memory)
    assert not mock.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    mock.add_chain([b"x"])
    assert queue.enable_notification(memory)


def test_notification_with_event_idx(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue(event_idx=True)
    for _ in range(3):
        mock.add_chain([b"x"])
    queue.disable_notification(memory)
    assert mock.used_flags() == 0  # EVENT_IDX suppresses through avail_event only
    chains = [queue.pop_descriptor_chain(memory) for _ in range(3)]
    assert not queue.enable_notification(memory)
    assert mock.avail_event() == 3
    mock.set_used_event(1)  # the driver wants an interrupt once used idx passes 1
    queue.add_used(memory, chains[0].head_index, 0)  # type: ignore[union-attr]
    assert queue.needs_notification(memory)  # the first answer is always yes
    queue.add_used(memory, chains[1].head_index, 0)  # type: ignore[union-attr]
    assert queue.needs_notification(memory)  # used idx 1 -> 2 passes used_event 1
    queue.add_used(memory, chains[2].head_index, 0)  # type: ignore[union-attr]
    assert not queue.needs_notification(memory)  # 2 -> 3 does not
    mock.set_used_event(3)
    assert not queue.needs_notification(memory)  # nothing new was used


def test_vring_need_event_examples() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)
    assert not vring_need_event(5, 3, 3)


@pytest.mark.parametrize("many", [False, True])
def test_pop_buffers_across_regions_in_any_order(many: bool) -> None:
    """Buffers in the other region, just below a region or in the hole between are told apart."""
    with GuestMemory([(0, 0x4000), (0x8000, 0x4000)]) as memory:
        mock = MockSplitQueue(memory, 8, 0)
        queue = mock.create_queue()
        memory.write(0x8000, b"high")
        memory.write(0x3FF0, b"low!")
        mock.write_descriptor(0, 0x8000, 4, VIRTQ_DESC_F_WRITE, 0)
        mock.write_descriptor(1, 0x3FF0, 4, VIRTQ_DESC_F_WRITE, 0)
        mock.write_descriptor(2, 0x8000, 4, VIRTQ_DESC_F_WRITE, 0)
        mock.write_descriptor(3, 0x7FF0, 16, VIRTQ_DESC_F_WRITE, 0)  # in the hole
        for head in range(4):
            mock.publish(head)

        def pop() -> tuple[int, list[memoryview], int] | None:
            if many:
                popped = queue.pop_buffers_many(memory, 1, writable=True)
                return popped[0] if popped else None
            return queue.pop_buffers(memory, writable=True)

        for head, data in ((0, b"high"), (1, b"low!"), (2, b"high")):
            popped = pop()
            assert popped is not None
            assert (popped[0], [bytes(v) for v in popped[1]], popped[2]) == (head, [data], 4)
        with pytest.raises(QueueError, match="0x7ff0 of 16 bytes outside guest RAM"):
            pop()


def test_pop_buffers_gives_one_direction_of_a_chain(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    sent = mock.add_chain([b"ab", b"", b"cde"], [5, 0, 7], indirect=True)
    mock.add_chain([b"xyz"], [9])
    readable = queue.pop_buffers(memory, writable=False)
    assert readable is not None
    assert (readable[0], [bytes(v) for v in readable[1]], readable[2]) == (
        sent.head,
        [b"ab", b"cde"],
        5,
    )
    (writable,) = queue.pop_buffers_many(memory, 4, writable=True)
    assert [len(v) for v in writable[1]] == [9]
    assert writable[2] == 9
    assert queue.pop_buffers(memory, writable=True) is None
    assert queue.pop_buffers_many(memory, 4, writable=True) == []


def test_pop_buffers_into_fills_parallel_lists_and_rejects_short_chains(
    memory: GuestMemory,
) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    first = mock.add_chain([], [16])
    short = mock.add_chain([], [4])
    split = mock.add_chain([], [8, 0, 8], indirect=True)
    many_views = mock.add_chain([], [2, 2, 2])
    heads: list[int] = [99]  # appended to, not replaced
    lengths: list[int] = [1]
    counts: list[int] = [1]
    views: list[memoryview] = [memoryview(b"x")]
    rejected = queue.pop_buffers_into(
        memory, 3, heads, lengths, counts, views, writable=True, min_length=5
    )
    assert rejected == [short.head]
    assert heads == [99, first.head, split.head]
    assert lengths == [1, 16, 16]
    assert counts == [1, 1, 2]
    assert [len(v) for v in views] == [1, 16, 8, 8]
    # A chain with more buffers than max_views keeps the first ones (and their length).
    assert (
        queue.pop_buffers_into(memory, 8, heads, lengths, counts, views, writable=True, max_views=2)
        == []
    )
    assert (heads[-1], lengths[-1], counts[-1]) == (many_views.head, 4, 2)
    assert queue.pop_buffers_into(memory, 8, heads, lengths, counts, views, writable=True) == []


def test_stage_used_spread_fills_chains_in_order_and_publishes_on_request(
    memory: GuestMemory,
) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    heads = [3, 5, 6, 1]
    lengths = [100, 50, 80, 10]
    assert queue.stage_used_spread(memory, heads, lengths, 100) == 1
    assert queue.stage_used_spread(memory, heads[1:], lengths[1:], 51) == 2
    assert mock.used_idx() == 0  # nothing visible before publish_used
    queue.publish_used(memory)
    assert mock.take_used() == [(3, 100), (5, 50), (6, 1)]
    with pytest.raises(QueueError, match="do not fit"):
        queue.stage_used_spread(memory, [2], [10], 11)
    with pytest.raises(QueueError, match="beyond queue size"):
        queue.stage_used_spread(memory, [8], [10], 5)


def test_a_three_entry_indirect_request_takes_the_shortcut(memory: GuestMemory) -> None:
    mock = MockSplitQueue(memory, 8, 0)
    queue = mock.create_queue()
    for writable in ([4096, 1], [1]):
        readable = [b"h" * 16] if len(writable) == 2 else [b"h" * 16, b"d" * 512]
        sent = mock.add_chain(readable, writable, indirect=True)
        table = Descriptor(*DESC.unpack(memory.read(mock.desc_table + DESC.size * sent.head, 16)))
        assert table.len == 48
        shortcut = queue._read_indirect3(memory, sent.head, table.addr)
        assert shortcut is not None
        chain = queue.pop_descriptor_chain(memory)
        assert chain is not None
        assert list(chain) == list(shortcut)
        assert chain.readable_count == shortcut.readable_count == len(readable)
        assert [(d.addr, d.len) for d in chain.writable()] == sent.writable


def test_a_large_in_order_indirect_request_takes_the_shortcut(memory: GuestMemory) -> None:
    # A 1 MiB read as Linux frames it: header, many page-sized buffers, status.
    mock = MockSplitQueue(memory, 256, 0)
    queue = mock.create_queue()
    for readable, writable in (([16], [1024] * 30 + [1]), ([16] + [512] * 20, [1]), ([16] * 5, [])):
        sent = mock.add_chain([bytes(n) for n in readable], writable, indirect=True)
        table = Descriptor(*DESC.unpack(memory.read(mock.desc_table + DESC.size * sent.head, 16)))
        assert table.len == DESC.size * (len(readable) + len(writable))
        shortcut = queue._read_indirect_run(memory, sent.head, table.addr, table.len)
        assert shortcut is not None
        chain = queue.pop_descriptor_chain(memory)
        assert chain is not None
        walked = list(queue._walk_chain(memory, sent.head))
        # The table is kept as checked: a driver rewriting it afterwards changes nothing.
        assert isinstance(chain, TableChain) and len(chain) == len(walked)
        memory.write(table.addr, bytes(table.len))
        assert list(chain) == list(shortcut) == walked
        addrs, lens = chain.table.cast("Q")[::2].tolist(), chain.table.cast("I")[2::4].tolist()
        assert list(zip(addrs, lens, strict=True)) == [(d.addr, d.len) for d in walked]
        assert chain.readable_count == shortcut.readable_count == len(readable)
        assert [(d.addr, d.len) for d in chain.writable()] == sent.writable
