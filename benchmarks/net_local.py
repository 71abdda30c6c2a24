"""virtio-net's host CPU per frame, receive and transmit, measured in one process with no guest.

What it measures: the real :class:`nubis.virtio.net.Net` device and its worker thread, moving
frames between a frame-preserving backend file and split virtqueues in (shared) guest memory.
No guest and no KVM are needed: the guest's driver is played by a forked child process that
works on the rings as Linux's virtio_net driver does, and a second child is the host side of
the backend. Both children run outside the measured process, so its CPU is the device's alone.

* ``rx``: the host side sends frames as fast as it can; the driver posts receive buffers and
  refills them after each interrupt. With ``--mode mrg`` (VIRTIO_NET_F_MRG_RXBUF, the Linux
  default) every buffer is one 4 KiB writable descriptor; with ``--mode big`` (no MRG_RXBUF but
  the guest TSO offloads) every buffer is an indirect table of a 12-byte header and 18 pages,
  about 72 KiB, as Linux's "big packets" receive does.
* ``tx``: the driver keeps the transmit ring full of frames laid out as Linux lays out a TSO
  skb (the vnet header and the packet headers in one buffer, the payload in page fragments of
  up to 32 KiB, through an indirect table when there is more than one) and reclaims completed
  ones after interrupts; the host side reads and discards them.

Both drivers use VIRTIO_F_RING_EVENT_IDX (used_event, avail_event) like Linux does. Frame sizes
(Ethernet bytes after the 12-byte vnet header) default to 1514, 3584, 16384 and 65226; the larger
ones carry a GSO vnet header, which the device passes through untouched.

Backend: a ``SOCK_SEQPACKET`` socket pair by default. ``--backend tap`` uses a real tap with a
vnet header instead, created in a network namespace of this benchmark's own (the process forks a
child that unshares its network namespace; needs root): frames reach the tap from an
``AF_PACKET`` socket on the tap's host side (so no GSO on receive; the tap's MTU is raised to fit
the largest frame) and transmitted frames are read back from the same socket.

Figures, per direction and frame size: frames per second, the device worker thread's CPU in
microseconds per frame (the figure to cut), and the whole measured process's CPU per frame.
The reference is the floor of the same backend: a bare Python loop that moves each frame with
one ``os.readv`` (receive) or ``os.writev`` (transmit) and nothing else, measured the same way.

Output: a table, then one JSON line of ``benchmarks/_report.py`` per direction
(``net_local_rx``, ``net_local_tx``: geometric mean over the sizes of the worker's µs per frame,
against the floor), and last ``net_local`` (the geometric mean of the two).

Usage: ``python benchmarks/net_local.py [--seconds S] [--mode mrg|big] [--sizes 1514,65226]
[--direction rx|tx|both] [--backend socketpair|tap] [--rounds N] [--profile rx|tx]
[--pace-us US]``. With ``--pace-us`` the host side sends one frame every US microseconds, as
TCP's pacing hands frames to a tap, instead of as fast as it can: the device then mostly wakes
up for a single frame, which is what a receive of paced TCP costs.
Each point is run ``--rounds`` times (3) and the round with the median worker CPU is shown.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import math
import os
import pstats
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit
from nubis.memory import GuestMemory
from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    ActivatedQueue,
    InterruptKind,
)
from nubis.virtio.net import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
    VNET_HDR,
    FdBackend,
    Net,
)
from nubis.virtio.queue import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)
from nubis.virtio.worker import Worker

PAGE = 4096
QUEUE_SIZE = 256
MEMORY_SIZE = 64 << 20
RX_QUEUE_BASE = 0x0
TX_QUEUE_BASE = 0x10000
RX_DATA = 1 << 20
TX_DATA = 32 << 20
BIG_PAGES = 18  # the first page after the header, then MAX_SKB_FRAGS (17) pages
DEFAULT_SIZES = (1514, 3584, 16384, 65226)
GSO_TCPV4 = 1
NEEDS_CSUM = 1
TCP_HEADERS = 66  # Ethernet, IPv4 and TCP headers with timestamps
MSS = 1448


def vnet_header(frame_len: int) -> bytes:
    """The vnet header a host stack puts in front of a frame: GSO above one MSS."""
    if frame_len - TCP_HEADERS > MSS:
        return VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, TCP_HEADERS, MSS, 34, 16, 0)
    return VNET_HDR.pack(NEEDS_CSUM, 0, 0, 0, 34, 16, 0)


class Rings:
    """The driver's view of one split virtqueue at ``base`` in the shared guest memory."""

    def __init__(self, view: memoryview, base: int) -> None:
        self.desc = base
        self.avail = base + desc_table_size(QUEUE_SIZE)
        self.used = (self.avail + avail_ring_size(QUEUE_SIZE) + 3) // 4 * 4
        end = self.used + used_ring_size(QUEUE_SIZE)
        self.view = view
        self.avail_u16 = view[self.avail : self.avail + avail_ring_size(QUEUE_SIZE)].cast("H")
        self.used_u16 = view[self.used : end].cast("H")
        self.used_u32 = view[self.used + 4 : self.used + 4 + 8 * QUEUE_SIZE].cast("I")
        self.avail_idx = 0
        self.last_kicked = 0
        self.used_seen = 0

    def configure(self, queue: object) -> None:
        queue.size = QUEUE_SIZE  # type: ignore[attr-defined]
        queue.desc_table = self.desc  # type: ignore[attr-defined]
        queue.avail_ring = self.avail  # type: ignore[attr-defined]
        queue.used_ring = self.used  # type: ignore[attr-defined]
        queue.event_idx = True  # type: ignore[attr-defined]
        queue.ready = True  # type: ignore[attr-defined]

    def write_desc(
        self, table: int, index: int, addr: int, length: int, flags: int, nxt: int
    ) -> None:
        DESC.pack_into(self.view, table + DESC.size * index, addr, length, flags, nxt)

    def post(self, head: int) -> None:
        self.avail_u16[2 + (self.avail_idx & (QUEUE_SIZE - 1))] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self, kick: Callable[[], None]) -> None:
        """Publish the available index and notify the device if avail_event asks for it."""
        old, new = self.last_kicked, self.avail_idx
        if old == new:
            return
        self.avail_u16[1] = new
        self.last_kicked = new
        if vring_need_event(self.used_u16[2 + 4 * QUEUE_SIZE], new, old):
            kick()

    def take_used(self) -> list[int]:
        heads = []
        end = self.used_u16[1]
        seen = self.used_seen
        while seen != end:
            heads.append(self.used_u32[2 * (seen & (QUEUE_SIZE - 1))])
            seen = (seen + 1) & 0xFFFF
        self.used_seen = seen
        return heads

    def set_used_event(self, value: int) -> None:
        self.avail_u16[2 + QUEUE_SIZE] = value & 0xFFFF


def rx_driver(view: memoryview, irq_fd: int, notify_fd: int, mode: str) -> None:
    """Play Linux's receive side: fill the ring, and after each interrupt refill what was used."""
    rings = Rings(view, RX_QUEUE_BASE)
    tables = RX_DATA
    data = RX_DATA + QUEUE_SIZE * 32 * DESC.size
    for head in range(QUEUE_SIZE):
        if mode == "mrg":
            rings.write_desc(rings.desc, head, data + head * PAGE, PAGE, VIRQ_W, 0)
        else:
            table = tables + head * 32 * DESC.size
            base = data + head * (BIG_PAGES + 1) * PAGE
            entries = [(base, VNET_HDR.size), (base + 16, PAGE - 16)]
            entries += [(base + PAGE * (i + 1), PAGE) for i in range(BIG_PAGES - 1)]
            for i, (addr, length) in enumerate(entries):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(entries) else 0
                rings.write_desc(table, i, addr, length, VIRQ_W | more, i + 1 if more else 0)
            rings.write_desc(
                rings.desc, head, table, DESC.size * len(entries), VIRTQ_DESC_F_INDIRECT, 0
            )
        rings.post(head)
    kick = lambda: os.eventfd_write(notify_fd, 1)  # noqa: E731
    rings.set_used_event(0)
    rings.publish(kick)
    while True:
        os.eventfd_read(irq_fd)
        while True:
            heads = rings.take_used()
            for head in heads:
                rings.post(head)
            rings.publish(kick)
            # virtqueue_enable_cb: interrupt at the next used entry, then look once more.
            rings.set_used_event(rings.used_seen)
            if rings.used_u16[1] == rings.used_seen:
                break


VIRQ_W = VIRTQ_DESC_F_WRITE


TX_FRAGMENT = 32768  # Linux's socket page fragments are 32 KiB compound pages


def tx_layout(frame_len: int) -> list[tuple[int, int]]:
    """Offsets and lengths of a transmitted frame's buffers: headers, then page fragments.

    Fragments are at most 32 KiB and never adjacent (a gap of one page between them).
    """
    linear = VNET_HDR.size + min(TCP_HEADERS, frame_len)
    parts = [(0, linear)]
    left = frame_len - min(TCP_HEADERS, frame_len)
    offset = PAGE
    while left > 0:
        take = min(TX_FRAGMENT, left)
        parts.append((offset, take))
        offset += TX_FRAGMENT + PAGE
        left -= take
    return parts


def tx_driver(view: memoryview, irq_fd: int, notify_fd: int, frame_len: int) -> None:
    """Play Linux's transmit side: keep the ring full, reclaim after interrupts."""
    rings = Rings(view, TX_QUEUE_BASE)
    parts = tx_layout(frame_len)
    span = parts[-1][0] + parts[-1][1] + PAGE
    tables = TX_DATA
    data = TX_DATA + QUEUE_SIZE * 32 * DESC.size
    header = vnet_header(frame_len)
    for head in range(QUEUE_SIZE):
        base = data + head * span
        view[base : base + VNET_HDR.size] = header
        for offset, length in parts[1:]:
            view[base + offset : base + offset + length] = b"\xab" * length
        if len(parts) == 1:
            rings.write_desc(rings.desc, head, base, parts[0][1], 0, 0)
        else:
            table = tables + head * 32 * DESC.size
            for i, (offset, length) in enumerate(parts):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(parts) else 0
                rings.write_desc(table, i, base + offset, length, more, i + 1 if more else 0)
            rings.write_desc(
                rings.desc, head, table, DESC.size * len(parts), VIRTQ_DESC_F_INDIRECT, 0
            )
    kick = lambda: os.eventfd_write(notify_fd, 1)  # noqa: E731
    free = list(range(QUEUE_SIZE))
    while True:
        for head in free:
            rings.post(head)
        free = []
        rings.publish(kick)
        outstanding = (rings.avail_idx - rings.used_seen) & 0xFFFF
        # virtqueue_enable_cb_delayed: an interrupt once three quarters are done.
        rings.set_used_event(rings.used_seen + outstanding * 3 // 4)
        free = rings.take_used()
        if not free:
            os.eventfd_read(irq_fd)
            free = rings.take_used()


def host_sender(fd: int, message: bytes, pace_us: float = 0.0) -> None:
    write = os.write
    if not pace_us:
        while True:
            write(fd, message)
    # Paced like a TCP sender: one frame every pace_us microseconds, on a fixed schedule.
    period = pace_us / 1e6
    due = time.monotonic()
    while True:
        write(fd, message)
        due += period
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def host_reader(fd: int) -> None:
    buffer = bytearray(70000)
    readinto = os.readv
    views = [buffer]
    while True:
        readinto(fd, views)


class EventfdInterrupt:
    """The transport's interrupt as an irqfd: one eventfd write per queue interrupt."""

    def __init__(self) -> None:
        self.fds = [os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)]
        self.failed = False

    def trigger(self, kind: InterruptKind, queue_index: int = 0) -> None:
        if kind is InterruptKind.QUEUE and queue_index < 2:
            os.eventfd_write(self.fds[queue_index], 1)

    def set_needs_reset(self) -> None:
        self.failed = True


def fork(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            body()
        finally:
            os._exit(0)
    return pid


def thread_cpu(name: str) -> float:
    for thread in threading.enumerate():
        if thread.name == name and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    raise RuntimeError(f"no thread named {name}")


class Backend:
    """A frame-preserving pair of files: the device's end and the host side's end."""

    def __init__(self, kind: str, largest: int) -> None:
        self.kind = kind
        if kind == "socketpair":
            device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for sock in (device_end, host_end):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            device_end.setblocking(False)
            self._keep = (device_end, host_end)
            self.device_fd = device_end.fileno()
            self.host_fd = host_end.fileno()
            self.with_header = True
        else:
            from nubis.vmm.tap import configure_host_side, open_tap

            tap = open_tap("nlbench0")
            configure_host_side(tap.name, mtu=min(65535, largest + 14))
            packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            packet.bind((tap.name, 0))
            packet.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            packet.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self._keep = (tap, packet)  # type: ignore[assignment]
            self.device_fd = tap.fds[0]
            self.host_fd = packet.fileno()
            self.with_header = False

    def message(self, frame_len: int) -> bytes:
        """What the host side sends for one frame of ``frame_len`` Ethernet bytes."""
        frame = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56, 2, 0, 0, 0, 0, 1, 8, 0])
        frame += bytes(i & 0xFF for i in range(frame_len - len(frame)))
        return vnet_header(frame_len) + frame if self.with_header else frame

    def close(self) -> None:
        for item in self._keep:
            item.close()


class Result:
    def __init__(self, frames: int, seconds: float, worker_cpu: float, process_cpu: float) -> None:
        self.frames = frames
        self.rate = frames / seconds
        self.worker_us = worker_cpu / max(frames, 1) * 1e6
        self.process_us = process_cpu / max(frames, 1) * 1e6


@contextlib.contextmanager
def children(*pids: int) -> Iterator[None]:
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def measure(counter: Callable[[], int], worker: str, warmup: float, seconds: float) -> Result:
    time.sleep(warmup)
    start = (counter(), thread_cpu(worker), time.process_time(), time.monotonic())
    time.sleep(seconds)
    end = (counter(), thread_cpu(worker), time.process_time(), time.monotonic())
    return Result(end[0] - start[0], end[3] - start[3], end[1] - start[1], end[2] - start[2])


def profiled_worker(enabled: bool) -> Callable[[], None]:
    """Run the device worker under cProfile when asked; returns a function printing the profile."""
    if not enabled:
        return lambda: None
    profile = cProfile.Profile()
    original = Worker._run

    def run(self: Worker) -> None:
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    Worker._run = run  # type: ignore[method-assign]

    def report() -> None:
        Worker._run = original  # type: ignore[method-assign]
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)

    return report


def run_device(direction: str, frame_len: int, args: argparse.Namespace, profile: bool) -> Result:
    backend = Backend(args.backend, max(args.sizes))
    memory = GuestMemory([(0, MEMORY_SIZE)], shared=True)
    view = memory.regions[0].view
    net = Net(FdBackend([backend.device_fd]), mac="52:54:00:12:34:56", queue_size=QUEUE_SIZE)
    features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_EVENT_IDX
    features |= 1 << VIRTIO_F_RING_INDIRECT_DESC | 1 << VIRTIO_NET_F_CSUM
    features |= 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6
    features |= 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4
    features |= 1 << VIRTIO_NET_F_GUEST_TSO6
    if args.mode == "mrg":
        features |= 1 << VIRTIO_NET_F_MRG_RXBUF
    net.ack_features(features)
    interrupt = EventfdInterrupt()
    notify = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
    queues = []
    for index, base in enumerate((RX_QUEUE_BASE, TX_QUEUE_BASE)):
        from nubis.virtio.queue import Queue

        queue = Queue(QUEUE_SIZE)
        Rings(view, base).configure(queue)
        queues.append(ActivatedQueue(index, queue, notify[index]))
    if direction == "rx":
        driver = fork(lambda: rx_driver(view, interrupt.fds[0], notify[0], args.mode))
        peer = fork(lambda: host_sender(backend.host_fd, backend.message(frame_len), args.pace_us))
        counter = lambda: net.counters()["rx_frames"]  # noqa: E731
    else:
        driver = fork(lambda: tx_driver(view, interrupt.fds[1], notify[1], frame_len))
        peer = fork(lambda: host_reader(backend.host_fd))
        counter = lambda: net.counters()["tx_frames"]  # noqa: E731
    report = profiled_worker(profile)
    try:
        with children(driver, peer):
            net.activate(memory, interrupt, queues)
            result = measure(counter, f"nubis-{net.name}", args.warmup, args.seconds)
            if interrupt.failed:
                raise RuntimeError("the device reported DEVICE_NEEDS_RESET")
    finally:
        net.shutdown()
        report()
        for fd in (*notify, *interrupt.fds):
            os.close(fd)
        backend.close()
        memory.close()
    return result


def run_floor(direction: str, frame_len: int, args: argparse.Namespace) -> Result:
    """The backend's floor: one bare readv or writev per frame on a thread of this process."""
    backend = Backend(args.backend, max(args.sizes))
    os.set_blocking(backend.device_fd, True)
    count = [0]
    stop = threading.Event()
    message = backend.message(frame_len)
    if direction == "rx":
        peer = fork(lambda: host_sender(backend.host_fd, message, args.pace_us))
        buffer = bytearray(VNET_HDR.size + 65536 + 64)
        views = [memoryview(buffer)]

        def loop() -> None:
            readv = os.readv
            fd = backend.device_fd
            with contextlib.suppress(OSError):  # the host side is gone: the run is over
                while not stop.is_set():
                    readv(fd, views)
                    count[0] += 1
    else:
        peer = fork(lambda: host_reader(backend.host_fd))
        payload = [memoryview(vnet_header(frame_len) + message[-frame_len:])]

        def loop() -> None:
            writev = os.writev
            fd = backend.device_fd
            with contextlib.suppress(OSError):  # the host side is gone: the run is over
                while not stop.is_set():
                    writev(fd, payload)
                    count[0] += 1

    thread = threading.Thread(target=loop, name="floor", daemon=True)
    try:
        with children(peer):
            thread.start()
            result = measure(lambda: count[0], "floor", args.warmup, args.seconds)
            stop.set()
    finally:
        backend.close()
        thread.join(2)
    return result


def in_new_netns() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def median_of(results: list[Result]) -> Result:
    """The round with the median worker CPU per frame."""
    return sorted(results, key=lambda result: result.worker_us)[len(results) // 2]


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3, help="runs per point; the median is kept")
    parser.add_argument("--mode", choices=("mrg", "big"), default="mrg")
    parser.add_argument("--direction", choices=("rx", "tx", "both"), default="both")
    parser.add_argument("--backend", choices=("socketpair", "tap"), default="socketpair")
    parser.add_argument("--profile", choices=("rx", "tx"))
    parser.add_argument(
        "--sizes", type=lambda text: [int(x) for x in text.split(",")], default=DEFAULT_SIZES
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-syscall floor")
    parser.add_argument(
        "--pace-us",
        type=float,
        default=0.0,
        help="receive: the host side sends one frame every PACE_US microseconds (0: flat out)",
    )
    args = parser.parse_args()
    if args.backend == "tap":
        in_new_netns()
    directions = ("rx", "tx") if args.direction == "both" else (args.direction,)
    if args.profile:
        directions = (args.profile,)
    print(f"backend {args.backend}, receive mode {args.mode}, {args.seconds} s per point")
    print(
        f"{'dir':3} {'frame':>6} {'frames/s':>10} {'worker us/f':>12} {'process us/f':>13}"
        f" {'floor us/f':>11}"
    )
    summary: dict[str, tuple[float, float]] = {}
    for direction in directions:
        nubis_us, floor_us = [], []
        for size in args.sizes:
            rounds = 1 if args.profile else args.rounds
            result = median_of(
                [
                    run_device(direction, size, args, args.profile == direction)
                    for _ in range(rounds)
                ]
            )
            floor = (
                None
                if args.no_floor
                else median_of([run_floor(direction, size, args) for _ in range(rounds)])
            )
            nubis_us.append(result.worker_us)
            floor_text = "-" if floor is None else f"{floor.worker_us:.2f}"
            if floor is not None:
                floor_us.append(floor.worker_us)
            print(
                f"{direction:3} {size:6d} {result.rate:10.0f} {result.worker_us:12.2f}"
                f" {result.process_us:13.2f} {floor_text:>11}",
                flush=True,
            )
        summary[direction] = (geomean(nubis_us), geomean(floor_us) if floor_us else 0.0)
    for direction, (nubis, floor) in summary.items():
        emit(f"net_local_{direction}", "us/frame", nubis, floor, "bare readv/writev", "lower",
             mode=args.mode, backend=args.backend)  # fmt: skip
    if len(summary) == 2:
        emit(
            "net_local",
            "us/frame",
            geomean([v[0] for v in summary.values()]),
            geomean([v[1] for v in summary.values()]) if all(v[1] for v in summary.values()) else 0,
            "bare readv/writev",
            "lower",
        )


if __name__ == "__main__":
    main()
