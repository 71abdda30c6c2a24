"""Property tests: hostile descriptor tables and control requests against virtio-net.

The queues are filled before activation; the worker processes everything once as it starts and a
reset then waits for it, so each example runs to completion deterministically. The device may
only ever fail with a QueueError (the driver broke the rules: DEVICE_NEEDS_RESET), never with
anything else, and never writes outside the buffers the driver offered it.
"""

from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nubis.memory import GuestMemory
from nubis.virtio.device import VIRTIO_F_VERSION_1, ActivatedQueue
from nubis.virtio.mock import MockDriver
from nubis.virtio.net import (
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VNET_HDR,
    Net,
)
from nubis.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueError,
)

MEMORY_SIZE = 0x180000
QUEUE_SIZE = 8

descriptor = st.tuples(
    st.one_of(
        st.integers(0, MEMORY_SIZE + 0x1000),
        st.sampled_from([0, MEMORY_SIZE - 1, 2**64 - 1, 2**63]),
    ),
    st.one_of(st.integers(0, 4096), st.sampled_from([0, 1, 11, 12, 2**32 - 1])),
    st.integers(0, 7) | st.just(VIRTQ_DESC_F_WRITE),
    st.integers(0, QUEUE_SIZE + 2),
)
tables = st.lists(descriptor, min_size=1, max_size=QUEUE_SIZE)
heads = st.lists(st.integers(0, QUEUE_SIZE + 2), min_size=0, max_size=QUEUE_SIZE)
frames = st.lists(st.binary(min_size=0, max_size=3000), max_size=3)
features = st.sampled_from(
    [
        1 << VIRTIO_F_VERSION_1,
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF,
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_MQ,
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    queue=st.sampled_from([0, 1, 4]),
    table=tables,
    published=heads,
    incoming=frames,
    acked=features,
)
def test_hostile_descriptors_never_crash_the_device(
    queue: int,
    table: list[tuple[int, int, int, int]],
    published: list[int],
    incoming: list[bytes],
    acked: int,
) -> None:
    memory = GuestMemory([(0, MEMORY_SIZE)])
    sockets = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    try:
        for device_end, _ in sockets:
            device_end.setblocking(False)
        for frame in incoming:
            sockets[0][1].send(VNET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame)
        net = Net([s[0].fileno() for s in sockets], mac="02:00:00:00:00:01", num_queues=4,
                  queue_size=QUEUE_SIZE)  # fmt: skip
        driver = MockDriver(net, memory, sizes=[QUEUE_SIZE] * 5, stride=0x40000)
        if queue == 4 and not acked >> VIRTIO_NET_F_MQ & 1:
            queue = 1
        mock = driver.queues[queue]
        for i, (addr, length, flags, next_) in enumerate(table):
            mock.write_descriptor(i, addr, length, flags, next_)
        for head in published:
            mock.publish(head)
        failures: list[BaseException] = []
        net.fail = failures.append  # type: ignore[method-assign]
        net.ack_features(acked)
        mq = bool(acked >> VIRTIO_NET_F_MQ & 1)
        count = 5 if mq else 2
        net.activate(
            memory,
            driver.interrupt,
            [
                ActivatedQueue(i, driver.device_queues[i], driver.notify_fds[i])
                for i in range(count)
            ],
        )
        net.reset()
        for exc in failures:
            assert isinstance(exc, QueueError), repr(exc)
        # The rings' bookkeeping stays sane: used entries name descriptors of the queue.
        for position in range(mock.used_idx()):
            head, _ = mock.used_entry(position)
            assert 0 <= head < QUEUE_SIZE
        net.shutdown()
        driver.close()
    finally:
        for a, b in sockets:
            a.close()
            b.close()
        memory.close()


def test_flags_constants_used_by_the_strategy() -> None:
    assert VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT == 7
