"""virtio-net: a network device over host tap files (virtio 1.2, section 5.1).

Queues (5.1.2): one receiveq and one transmitq per queue pair (queue ``2k`` receives, ``2k + 1``
transmits for pair ``k``), then, with more than one pair, a controlq. Each pair has its own backend
file, typically one queue of a multi-queue tap; any file that keeps frame boundaries works (a
``SOCK_SEQPACKET`` socket stands in for a tap in tests).

Every frame carries the 12-byte ``struct virtio_net_hdr`` (5.1.6, with ``num_buffers`` as VERSION_1
requires) in front of the Ethernet frame. The tap is set up with a vnet header of that same size, so
the header passes straight through: transmit is one ``os.writev`` of the chain's readable buffers,
receive one ``os.readv`` into the posted buffers (memoryview slices of guest memory; no copy in
Python). The device writes only ``num_buffers`` itself, since a tap leaves those two bytes alone.

Receive is driven by the backend file's readability (epoll in the worker), transmit by queue
notifications. With VIRTIO_NET_F_MRG_RXBUF a frame may fill several receive chains: the device
keeps chains it popped but has not used yet and reads only when they hold a whole frame of the
largest size the negotiated offloads allow (or when it holds the entire ring). When the driver has
posted no receive buffers, the backend file is taken out of epoll (frames wait in the tap, nothing
is dropped) until the driver notifies the receiveq.

Multi-queue (5.1.6.5.5): with VIRTIO_NET_F_MQ the driver starts with one pair and changes the
number with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the controlq; pairs beyond it are detached from
the tap (``NetBackend.set_queue_enabled``) so the kernel does not steer frames to them.

Link status (VIRTIO_NET_F_STATUS): up while the backend works; an error or end of file on a
backend file (the tap was deleted) takes the link down and raises a configuration interrupt. A
backend that can tell whether its host side is up (a tap's IFF_UP, ``is_up``) is watched by a
small thread twice a second; a change reaches the worker through an eventfd, which brings the
link down or back up and raises a configuration interrupt each time.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    ActivatedQueue,
    DeviceType,
    InterruptKind,
    VirtioInterrupt,
)
from nubis.virtio.queue import DescriptorChain
from nubis.virtio.worker import QueueDevice, Worker

if TYPE_CHECKING:
    from nubis.memory import GuestMemory

_log = logging.getLogger(__name__)

# Feature bits (5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

#: The guest offloads a backend must honour when it hands frames to the guest.
GUEST_OFFLOAD_FEATURES = (
    1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_GUEST_UFO
)

# Status bits (5.1.4).
VIRTIO_NET_S_LINK_UP = 1

# Control queue (5.1.6.5): classes, commands and acks.
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
#: The most queue pairs a device may offer (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX, 5.1.6.5.5).
MAX_QUEUE_PAIRS = 0x8000

#: struct virtio_net_hdr (5.1.6): u8 flags, u8 gso_type, le16 hdr_len, le16 gso_size,
#: le16 csum_start, le16 csum_offset, le16 num_buffers.
VNET_HDR = struct.Struct("<BBHHHHH")
NUM_BUFFERS_OFFSET = 10
NUM_BUFFERS = struct.Struct("<H")
#: struct virtio_net_config (5.1.4) up to mtu: u8 mac[6], le16 status,
#: le16 max_virtqueue_pairs, le16 mtu.
CONFIG = struct.Struct("<6sHHH")
#: struct virtio_net_ctrl (5.1.6.5) header: u8 class, u8 command.
CTRL_HEADER = struct.Struct("<BB")
#: struct virtio_net_ctrl_mq for VQ_PAIRS_SET: le16 virtqueue_pairs.
CTRL_MQ_PAIRS = struct.Struct("<H")

ETH_HEADER_LEN = 14
VLAN_HEADER_LEN = 4
DEFAULT_MTU = 1500
#: The largest frame a tap hands over with TSO/UFO: a 64 KiB IP packet plus link headers.
MAX_GSO_FRAME = 65535 + ETH_HEADER_LEN + VLAN_HEADER_LEN

#: The most bytes of a control request the device looks at (header and VQ_PAIRS_SET data).
_CTRL_REQUEST_MAX = CTRL_HEADER.size + CTRL_MQ_PAIRS.size
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# Errors after which a backend file is considered gone (the tap was deleted or detached).
_LINK_GONE = frozenset({errno.EBADF, errno.EBADFD, errno.EIO, errno.ENODEV, errno.ENXIO})


class NetBackend(Protocol):
    """Where frames go and come from: one file per queue pair, and the tap's controls.

    ``nubis.vmm.tap.Tap`` is one; :class:`FdBackend` wraps plain files.
    """

    @property
    def fds(self) -> Sequence[int]:
        """One non-blocking, frame-preserving file per queue pair (not owned by the device)."""
        ...

    def set_guest_offloads(self, features: int) -> None:
        """Produce only frames the guest accepts, given its acked GUEST_* feature bits."""
        ...

    def set_queue_enabled(self, pair: int, enabled: bool) -> None:
        """Let the backend steer received frames to queue ``pair`` or not."""
        ...


class FdBackend:
    """A backend of plain files (sockets, pipes) that have no offloads and no queue steering."""

    def __init__(self, fds: Sequence[int]) -> None:
        """Use ``fds``, one per queue pair."""
        self.fds = tuple(fds)

    def set_guest_offloads(self, features: int) -> None:
        """Nothing to tell a plain file."""

    def set_queue_enabled(self, pair: int, enabled: bool) -> None:
        """Nothing to tell a plain file."""


class _RxStash:
    """Receive chains popped ahead of use, oldest first, as parallel lists.

    ``heads[i]`` can take ``capacities[i]`` bytes in ``view_counts[i]`` consecutive entries of
    ``views`` (all the chains' writable views in order, handed to ``readv`` as they are);
    ``capacity`` is the sum of ``capacities``. Lists rather than one object per chain, since
    Linux posts one 4 KiB buffer per chain with MRG_RXBUF and a 64 KiB frame fills 17 of them.
    """

    __slots__ = ("capacities", "capacity", "heads", "view_counts", "views")

    def __init__(self) -> None:
        self.heads: list[int] = []
        self.capacities: list[int] = []
        self.view_counts: list[int] = []
        self.views: list[memoryview] = []
        self.capacity = 0

    def drop(self, chains: int) -> None:
        """Forget the first ``chains`` chains."""
        counts, capacities = self.view_counts, self.capacities
        if chains == 1:
            views, capacity = counts[0], capacities[0]
        else:
            views, capacity = sum(counts[:chains]), sum(capacities[:chains])
        del self.heads[:chains], capacities[:chains], counts[:chains], self.views[:views]
        self.capacity -= capacity

    def clear(self) -> None:
        """Forget every chain and release the views."""
        for view in self.views:
            view.release()
        self.heads.clear()
        self.capacities.clear()
        self.view_counts.clear()
        self.views.clear()
        self.capacity = 0


def parse_mac(mac: str | bytes) -> bytes:
    """Six bytes from ``12:34:56:78:9a:bc`` (or six bytes as they are)."""
    raw = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) else bytes(mac)
    if len(raw) != 6:
        raise ValueError(f"MAC address {mac!r} is not six bytes")
    return raw


class Net(QueueDevice):
    """A virtio network device (5.1) over ``tap``: a :class:`NetBackend`, a file, or files.

    ``num_queues`` counts receive and transmit queues (an even number, two per pair); the backend
    needs one file per pair. ``mtu`` offers VIRTIO_NET_F_MTU. The files are not closed here.
    """

    def __init__(
        self,
        tap: NetBackend | int | Sequence[int],
        *,
        mac: str | bytes,
        mtu: int | None = None,
        num_queues: int = 2,
        queue_size: int = 256,
        name: str = "net",
    ) -> None:
        """Check the arguments; nothing is read or written before activation."""
        if isinstance(tap, int):
            backend: NetBackend = FdBackend([tap])
        elif isinstance(tap, Sequence):
            backend = FdBackend(tap)
        else:
            backend = tap
        if num_queues < 2 or num_queues % 2 or num_queues // 2 > MAX_QUEUE_PAIRS:
            raise ValueError(f"virtio-net queue count {num_queues} is not an even number from 2")
        pairs = num_queues // 2
        if len(backend.fds) != pairs:
            raise ValueError(
                f"virtio-net with {pairs} queue pairs needs {pairs} backend files, "
                f"got {len(backend.fds)}"
            )
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ValueError(f"virtio-net MTU {mtu} is not between 68 and 65535")
        sizes = [queue_size] * num_queues + ([queue_size] if pairs > 1 else [])
        super().__init__(name, sizes)
        self.backend = backend
        self.mac = parse_mac(mac)
        self.mtu = mtu
        self.max_pairs = pairs
        self.link_up = True
        self._link_fd: int | None = (
            os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            if getattr(self.backend, "is_up", None) is not None
            else None
        )
        self._link_watch: tuple[threading.Event, threading.Thread] | None = None
        self.active_pairs = 1
        self._ctrl_index: int | None = None
        self._stash = [_RxStash() for _ in range(pairs)]
        self._polling = [False] * pairs
        # poll(2) on each backend file, called with a zero timeout: whether a frame is waiting.
        self._probes: list[Callable[[int], list[tuple[int, int]]]] = []
        for fd in backend.fds:
            probe = select.poll()
            probe.register(fd, select.POLLIN)
            self._probes.append(probe.poll)
        self._rx_budget = 0
        # Bytes of the receive chain popped last: how many the next frame needs is guessed so.
        self._rx_chain_guess = 4096
        self._mergeable = False
        self._counters = dict.fromkeys(
            (
                "rx_frames",
                "rx_bytes",
                "rx_dropped",
                "tx_frames",
                "tx_bytes",
                "tx_dropped",
                "rx_bad_buffers",
                "ctrl_commands",
            ),
            0,
        )

    # --- VirtioDevice -------------------------------------------------------------------------

    @property
    def device_type(self) -> DeviceType:
        """virtio device id 1."""
        return DeviceType.NET

    @property
    def avail_features(self) -> int:
        """VERSION_1, EVENT_IDX, INDIRECT_DESC, checksum and TSO offloads both ways, MRG_RXBUF,
        MAC, STATUS; MTU when given; CTRL_VQ and MQ with more than one queue pair.
        """
        features = 0
        for bit in (
            VIRTIO_F_VERSION_1,
            VIRTIO_F_RING_EVENT_IDX,
            VIRTIO_F_RING_INDIRECT_DESC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
        ):
            features |= 1 << bit
        if self.mtu is not None:
            features |= 1 << VIRTIO_NET_F_MTU
        if self.max_pairs > 1:
            features |= 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_MQ
        return features

    def config_bytes(self) -> bytes:
        """The current struct virtio_net_config."""
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return CONFIG.pack(self.mac, status, self.max_pairs, self.mtu or 0)

    def read_config(self, offset: int, data: memoryview) -> None:
        """Copy from struct virtio_net_config; bytes beyond it read as zero."""
        config = self.config_bytes()
        length = len(data)
        chunk = config[offset : offset + length] if 0 <= offset < len(config) else b""
        data[: len(chunk)] = chunk
        data[len(chunk) :] = bytes(length - len(chunk))

    def write_config(self, offset: int, data: memoryview) -> None:
        """The configuration is read-only with VERSION_1 (the MAC is set by the device)."""

    def counters(self) -> dict[str, int]:
        """Frames and bytes received and transmitted (bytes exclude the vnet header), drops."""
        return dict(self._counters)

    def _has(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def activate(
        self,
        memory: GuestMemory,
        interrupt: VirtioInterrupt,
        queues: Sequence[ActivatedQueue],
    ) -> None:
        """Check the queues the driver enabled for the negotiated features, then start.

        Without MQ the driver uses receiveq1, transmitq1 and, with CTRL_VQ, the controlq at
        index 2; with MQ every pair and the controlq at index ``2 * max_pairs`` (5.1.2).
        """
        mq = self._has(VIRTIO_NET_F_MQ)
        ctrl = self._has(VIRTIO_NET_F_CTRL_VQ)
        pairs = self.max_pairs if mq else 1
        count = 2 * pairs + (1 if ctrl else 0)
        enabled = {q.index: q for q in queues if q.index < count}
        if sorted(enabled) != list(range(count)):
            raise ValueError(f"{self.name} needs queues 0 to {count - 1} enabled")
        saved = self._queue_max_sizes
        self._queue_max_sizes = saved[:count]
        try:
            self._ctrl_index = 2 * pairs if ctrl else None
            self.active_pairs = 1
            self._mergeable = self._has(VIRTIO_NET_F_MRG_RXBUF)
            self._rx_budget = self._frame_budget()
            self.backend.set_guest_offloads(self.acked_features & GUEST_OFFLOAD_FEATURES)
            for pair in range(self.max_pairs):
                self.backend.set_queue_enabled(pair, pair == 0)
            super().activate(memory, interrupt, [enabled[i] for i in range(count)])
        finally:
            self._queue_max_sizes = saved
        self._start_link_watch()

    # --- host-side link state -----------------------------------------------------------------

    _LINK_POLL_SECONDS = 0.5

    def _start_link_watch(self) -> None:
        is_up: Callable[[], bool] | None = getattr(self.backend, "is_up", None)
        if is_up is None or self._link_fd is None:
            return
        stop = threading.Event()
        fd = self._link_fd
        # The state to compare with is taken now, not when the thread first runs: a change
        # between activation and the thread's start would otherwise go unnoticed. A link that
        # disagrees with the tap already (down before activation, or up again since a reset)
        # is set right by the worker, as after a change.
        last = is_up()
        if last != self.link_up:
            os.eventfd_write(fd, 1)

        def watch() -> None:
            nonlocal last
            while not stop.wait(self._LINK_POLL_SECONDS):
                now = is_up()
                if now != last:
                    last = now
                    os.eventfd_write(fd, 1)

        self._link_watch = (
            stop,
            threading.Thread(target=watch, name=f"{self.name}-link", daemon=True),
        )
        self._link_watch[1].start()

    def _stop_link_watch(self) -> None:
        watch, self._link_watch = self._link_watch, None
        if watch is not None:
            watch[0].set()
            watch[1].join(timeout=2.0)

    def _link_changed(self) -> None:
        """Worker callback: the host side of the backend went up or down."""
        assert self._link_fd is not None
        try:
            os.eventfd_read(self._link_fd)
        except BlockingIOError:
            return
        is_up: Callable[[], bool] | None = getattr(self.backend, "is_up", None)
        up = bool(is_up()) if is_up is not None else True
        if not up:
            self._link_down(None, "the host side of the tap is down")
            return
        if self.link_up or self.failed:
            return
        self.link_up = True
        _log.info("%s: the host side of the tap is up; the link is up", self.name)
        for pair in range(self.active_pairs):
            self._set_polling(self._worker, pair, True)
        interrupt = self.interrupt
        if interrupt is not None and self._has(VIRTIO_NET_F_STATUS):
            interrupt.trigger(InterruptKind.CONFIG)
        for pair in range(self.active_pairs):
            self._receive(pair)

    def _frame_budget(self) -> int:
        """The most bytes (header included) one received frame can need, given the offloads."""
        if self.acked_features & (
            1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_UFO
        ):
            return VNET_HDR.size + MAX_GSO_FRAME
        return VNET_HDR.size + (self.mtu or DEFAULT_MTU) + ETH_HEADER_LEN + VLAN_HEADER_LEN

    # --- worker -------------------------------------------------------------------------------

    def setup_worker(self, worker: Worker) -> None:
        """Poll the active pairs' backend files (only pair 0 until the driver asks for more)."""
        self._polling = [False] * self.max_pairs
        for pair in range(self.active_pairs):
            self._set_polling(worker, pair, True)
        if self._link_fd is not None:
            worker.add_fd(self._link_fd, self._link_changed)

    def _set_polling(self, worker: Worker | None, pair: int, on: bool) -> None:
        # Removed rather than masked: epoll reports hang-ups even for an empty event mask.
        if worker is None or self._polling[pair] == on:
            return
        fd = self.backend.fds[pair]
        if on:
            worker.add_fd(fd, lambda: self._receive(pair))
        else:
            worker.remove_fd(fd)
        self._polling[pair] = on

    def queue_notified(self, index: int) -> None:
        """receiveq: take new buffers (and resume reading); transmitq: send; controlq: obey."""
        if index == self._ctrl_index:
            self.drain_queue(index, self._control)
        elif index % 2 == 0:
            if index // 2 < self.active_pairs:
                self._receive(index // 2)
        else:
            self._transmit_queue(index)

    def drain_on_shutdown(self, index: int) -> None:
        """Send what the guest still has queued; receive nothing more."""
        if index % 2 == 1 and index != self._ctrl_index:
            self.queue_notified(index)

    # --- transmit -----------------------------------------------------------------------------

    #: The most transmit chains handled before their used entries are published.
    _TX_BATCH = 64

    def _transmit_queue(self, index: int) -> None:
        """Send every frame the driver queued on transmitq ``index``, one ``writev`` each.

        Chains are popped in batches and returned with one used-index update per batch;
        notifications stay suppressed while the device works (2.7.10) and one interrupt per
        batch, if the driver wants it, reports the batch.
        """
        memory = self.memory
        if memory is None or self.failed:
            return
        queue = self.queues[index].queue
        fd = self.backend.fds[index // 2]
        writev = os.writev
        header = VNET_HDR.size
        frames = sent = dropped = 0
        try:
            while True:
                queue.disable_notification(memory)
                while chains := queue.pop_buffers_many(memory, self._TX_BATCH, writable=False):
                    used: list[tuple[int, int]] = []
                    for head, views, length in chains:
                        used.append((head, 0))
                        if length <= header or len(views) > _IOV_MAX or not self.link_up:
                            dropped += 1
                            continue
                        try:
                            writev(fd, views)
                        except OSError as exc:
                            dropped += 1
                            if exc.errno in _LINK_GONE:
                                self._link_down(exc)
                            elif _log.isEnabledFor(logging.DEBUG):
                                _log.debug(
                                    "%s: a transmitted frame was refused: %s", self.name, exc
                                )
                            continue
                        frames += 1
                        sent += length - header
                    queue.add_used_many(memory, used)
                    # Interrupt per batch, not once at the end: a guest's TCP holds back new
                    # frames until earlier ones complete (TCP small queues), so completions
                    # must not wait for a long drain. used_event still decides (2.7.10).
                    self.signal_used(index)
                if not queue.enable_notification(memory):
                    break
        finally:
            counters = self._counters
            counters["tx_frames"] += frames
            counters["tx_bytes"] += sent
            counters["tx_dropped"] += dropped

    # --- receive ------------------------------------------------------------------------------

    #: The fewest receive chains one refill asks the ring for. Linux posts 4 KiB buffers with
    #: MRG_RXBUF, so a 64 KiB TCP frame fills 16 or 17 of them: a refill of 64 serves about
    #: four such frames, and each pass over the ring costs far more in fixed work than per
    #: chain (16 gave one pass per large frame).
    _RX_REFILL = 64

    def _refill(self, pair: int) -> bool:
        """Pop receive chains until they hold a whole frame; False when there are too few."""
        memory = self.memory
        assert memory is not None
        stash = self._stash[pair]
        queue = self.queues[2 * pair].queue
        mergeable = self._mergeable
        want = self._rx_budget if mergeable else 1
        heads, capacities = stash.heads, stash.capacities
        have = stash.capacity if mergeable else len(heads)
        popped_bad = False
        while have < want:
            # As many chains as the frame needs if they are like the last one (one at a time
            # without MRG_RXBUF); a wrong guess costs another round. At least _RX_REFILL of
            # them when the ring has that many: the frames after this one then find their
            # buffers already stashed, and one pass over the ring serves several frames.
            guess = -(-(want - have) // self._rx_chain_guess) if mergeable else 1
            need = max(guess, self._RX_REFILL)
            before = len(heads)
            # Too small to hold even the header (5.1.6.3.1): given back unused.
            rejected = queue.pop_buffers_into(
                memory,
                need,
                heads,
                capacities,
                stash.view_counts,
                stash.views,
                writable=True,
                min_length=VNET_HDR.size,
                max_views=_IOV_MAX,
            )
            if rejected:
                queue.add_used_many(memory, [(head, 0) for head in rejected])
                self._counters["rx_bad_buffers"] += len(rejected)
                popped_bad = True
            added = len(heads) - before
            if not added:
                if rejected:
                    continue
                # Ask for a notification; buffers that arrived meanwhile are taken right away.
                if queue.enable_notification(memory):
                    queue.disable_notification(memory)
                    continue
                break
            gained = capacities[before] if added == 1 else sum(capacities[before:])
            stash.capacity += gained
            have += gained if mergeable else added
            self._rx_chain_guess = max(capacities[-1], 1024)
        if popped_bad:
            self.signal_used(2 * pair)
        if have >= want:
            return True
        # A ring that cannot hold the budget even when full must still receive.
        return bool(heads) and len(heads) >= queue.size

    def _receive(self, pair: int) -> None:
        """Move frames from the backend into receive buffers until either runs out.

        This is nubis's hottest loop under receive load, so it works per frame, not per buffer,
        where it can: the views of the chains a frame may need are handed to one ``readv``, and
        the chains it filled are returned with one used-index update; one interrupt, if the
        driver wants it, covers every frame moved here. (An interrupt check per frame, here and
        on transmit, which would let an idle guest start on a frame while the next is read, cut
        TCP throughput to between a tenth and a half in the nested test host: interrupts reach
        a guest there at great cost.)
        """
        memory = self.memory
        if memory is None or self.failed or not self.link_up:
            return
        worker = self._worker
        fd = self.backend.fds[pair]
        stash = self._stash[pair]
        index = 2 * pair
        queue = self.queues[index].queue
        mergeable = self._mergeable
        heads = stash.heads
        capacities = stash.capacities
        all_views = stash.views
        refill = self._refill
        readv = os.readv
        stage_used = queue.stage_used_spread
        publish_used = queue.publish_used
        header = VNET_HDR.size
        probe = self._probes[pair]
        probed = False
        frames = received = dropped = 0
        try:
            while True:
                if (stash.capacity < self._rx_budget if mergeable else not heads) and not refill(
                    pair
                ):
                    self._set_polling(worker, pair, False)
                    break
                # Mergeable: every stashed chain is offered (the stash holds about one
                # largest frame); otherwise the first chain alone.
                if mergeable:
                    views = all_views if len(all_views) <= _IOV_MAX else all_views[:_IOV_MAX]
                else:
                    views = all_views[: stash.view_counts[0]]
                try:
                    count = readv(fd, views)
                except BlockingIOError:
                    self._set_polling(worker, pair, True)
                    break
                except OSError as exc:
                    if exc.errno in _LINK_GONE:
                        self._link_down(exc)
                        break
                    if exc.errno == errno.EINTR:
                        continue
                    # The backend refused this frame; epoll reports the next one.
                    dropped += 1
                    break
                if count == 0:
                    self._link_down(None)
                    break
                if count < header:
                    dropped += 1
                    continue
                # The chains the frame filled, oldest first (the last one maybe in part),
                # stored as used elements; num_buffers goes in before they are published.
                chains = stage_used(memory, heads, capacities, count)
                first = views[0]
                if len(first) >= header:
                    NUM_BUFFERS.pack_into(first, NUM_BUFFERS_OFFSET, chains)
                else:
                    _put_u16(views, NUM_BUFFERS_OFFSET, chains)
                publish_used(memory)
                stash.drop(chains)
                frames += 1
                received += count - header
                if not probed:
                    # A paced sender (TCP paces a tap's frames about a millisecond apart)
                    # mostly leaves one frame per wake-up. Asking poll(2) whether another
                    # waits costs a fraction of the readv that would fail with EAGAIN, most
                    # of whose cost is raising BlockingIOError. After a second frame, reads
                    # go on until EAGAIN: a burst pays for no probe per frame.
                    probed = True
                    if not probe(0):
                        self._set_polling(worker, pair, True)
                        break
        finally:
            counters = self._counters
            counters["rx_frames"] += frames
            counters["rx_bytes"] += received
            counters["rx_dropped"] += dropped
            if frames:
                self.signal_used(index)

    def _link_down(self, exc: OSError | None, why: str | None = None) -> None:
        """The backend is gone or down: report the link down once and stop reading it."""
        if not self.link_up:
            return
        self.link_up = False
        if why is not None:
            _log.info("%s: %s; the link is down", self.name, why)
        else:
            reason = "it reached end of file" if exc is None else os.strerror(exc.errno or 0)
            _log.error("%s: the backend failed (%s); the link is down", self.name, reason)
        worker = self._worker
        for pair in range(self.max_pairs):
            self._set_polling(worker, pair, False)
        interrupt = self.interrupt
        if interrupt is not None and self._has(VIRTIO_NET_F_STATUS):
            interrupt.trigger(InterruptKind.CONFIG)

    # --- control ------------------------------------------------------------------------------

    def _control(self, index: int, chain: DescriptorChain) -> int:
        memory = self.memory
        assert memory is not None
        self._counters["ctrl_commands"] += 1
        writable = [d for d in chain.writable() if d.len]
        if not writable:
            return 0
        request = bytearray()
        for desc in chain.readable():
            want = min(desc.len, _CTRL_REQUEST_MAX - len(request))
            if want <= 0:
                break
            request += memory.read(desc.addr, want)
        ack = self._execute_control(bytes(request))
        memory.write(writable[0].addr, bytes([ack]))
        return 1

    def _execute_control(self, request: bytes) -> int:
        if len(request) < CTRL_HEADER.size:
            return VIRTIO_NET_ERR
        klass, command = CTRL_HEADER.unpack_from(request)
        if klass != VIRTIO_NET_CTRL_MQ or command != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
            return VIRTIO_NET_ERR
        if not self._has(VIRTIO_NET_F_MQ) or len(request) < CTRL_HEADER.size + CTRL_MQ_PAIRS.size:
            return VIRTIO_NET_ERR
        (pairs,) = CTRL_MQ_PAIRS.unpack_from(request, CTRL_HEADER.size)
        if not 1 <= pairs <= self.max_pairs:
            return VIRTIO_NET_ERR
        self.set_active_pairs(pairs)
        return VIRTIO_NET_OK

    def set_active_pairs(self, pairs: int) -> None:
        """Use receive and transmit queues of the first ``pairs`` pairs (on the worker thread)."""
        worker = self._worker
        for pair in range(self.max_pairs):
            on = pair < pairs
            self.backend.set_queue_enabled(pair, on)
            if not on:
                self._set_polling(worker, pair, False)
        self.active_pairs = pairs
        for pair in range(pairs):
            if self.link_up:
                self._receive(pair)

    # --- reset --------------------------------------------------------------------------------

    def on_reset(self) -> None:
        """Give back chains held for receive, forget the pair count and the negotiated offloads."""
        self._stop_link_watch()
        self._release_stash()
        self.active_pairs = 1
        self._ctrl_index = None
        self._polling = [False] * self.max_pairs

    def on_shutdown(self) -> None:
        """Release held receive buffers (the backend files belong to the caller)."""
        self._stop_link_watch()
        self._release_stash()
        if self._link_fd is not None:
            os.close(self._link_fd)
            self._link_fd = None

    def _release_stash(self) -> None:
        for stash in self._stash:
            stash.clear()


def _put_u16(views: Sequence[memoryview], offset: int, value: int) -> None:
    """Store a little-endian u16 at byte ``offset`` of the concatenation of ``views``."""
    data = NUM_BUFFERS.pack(value)
    done = 0
    for view in views:
        size = len(view)
        if offset < size:
            count = min(size - offset, len(data) - done)
            view[offset : offset + count] = data[done : done + count]
            done += count
            if done == len(data):
                return
            offset = 0
        else:
            offset -= size
