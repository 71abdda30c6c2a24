"""virtio-blk's host CPU per request, measured locally: no guest, no KVM, no test host.

A driver stand-in plays Linux's virtio_blk over one split virtqueue laid out in guest memory (a
shared :class:`~nubis.memory.GuestMemory`) and drives a real :class:`~nubis.virtio.block.Block`
device against a real file (a few hundred MiB under /tmp, filled once with tagged random blocks;
the page cache holds it, so each read is cheap and the device's own cost is what the run
measures). The driver runs in a child process, as a guest runs on its own vCPU: it neither takes
the device's GIL nor counts in its CPU time. Everything between the driver and the file runs as
in a VM: the device's queue worker wakes on the notify eventfd, parses and checks each chain,
hands it to the I/O thread pool (or, with ``--direct``, submits it by native AIO), publishes
used entries and raises the "interrupt", which here is an eventfd the driver blocks on, as an
irqfd would be. With ``--direct`` the reads bypass the page cache and reach the host's disk, so
the numbers also depend on that disk.

The driver does what the guest's driver does with VIRTIO_RING_F_EVENT_IDX and
VIRTIO_RING_F_INDIRECT_DESC negotiated: it keeps ``--depth`` requests (32) outstanding, each a
header/data/status chain (through a 3-entry indirect table by default, as Linux builds every
request with more than one buffer when INDIRECT_DESC is offered; ``--no-indirect`` puts the three
descriptors in the ring's table), notifies only when the device's avail_event asks for it, and on
each interrupt takes every used entry, checks its status, length and data (each 4 KiB block of
the file starts with its block number), and resubmits the slot at once, then re-arms used_event.

Two jobs, as in ``benchmarks/block.py`` in a guest:

* ``randread_4k``: 4 KiB reads at uniformly random 4 KiB-aligned offsets: IOPS and CPU
  microseconds per request;
* ``seq_read``: 1 MiB sequential reads, the data in ``--seq-segments`` separate (non-touching)
  buffers per request: MiB/s and CPU milliseconds per MiB.

CPU: ``time.process_time`` of the device's process (every thread, user and system) over the
timed part of a job: ``cpu_us_per_request`` and ``cpu_ms_per_mib``. Standard error also shows
the system part, the context switches and interrupts per request and the driver's own CPU.
``--delay-us`` adds a sleep before each read the device
issues (GIL released, as in a slow backing such as 9p), to check that requests still overlap;
it is off by default, so that the numbers measure CPU, not latency.

Reference: the same reads issued straight from Python, ``--io-threads`` threads each calling
``os.preadv`` into a buffer in a loop (no virtqueue, no hand-off): the floor that a Python device
cannot go below. Ratios are nubis / reference.

Output: a JSON line of ``benchmarks/_report.py`` per metric (``block_local_randread_4k_iops``,
``block_local_randread_4k_cpu``, ``block_local_seq_read_mibs``, ``block_local_seq_read_cpu``),
then ``block_local`` last, the device's CPU microseconds per 4 KiB random read.

Usage: ``PYTHONPATH=src .venv/bin/python benchmarks/block_local.py [--requests N] [--runs R]
[--no-indirect] [--direct [--no-native-aio]] [--delay-us US] [--only randread|seq]``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import resource
import select
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit
from nubis.memory import GuestMemory
from nubis.virtio import block as block_module
from nubis.virtio.block import REQUEST_HEADER, VIRTIO_BLK_T_IN, Block
from nubis.virtio.device import ActivatedQueue, InterruptKind
from nubis.virtio.mock import MockSplitQueue
from nubis.virtio.queue import (
    DESC,
    USED_ELEM,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    full_fence,
    vring_need_event,
)

BLOCK = 4096
MIB = 1 << 20
QUEUE_SIZE = 256
TAG = struct.Struct("<Q")


def make_disk(path: Path, size: int) -> None:
    """A file of ``size`` bytes of random data, each 4 KiB block tagged with its number."""
    if path.exists() and path.stat().st_size == size:
        return
    rng = random.Random(1)
    chunk = bytearray(rng.randbytes(MIB))
    with open(path, "wb") as out:
        for base in range(0, size, MIB):
            for off in range(0, MIB, BLOCK):
                TAG.pack_into(chunk, off, (base + off) // BLOCK)
            out.write(chunk)


def warm(path: Path) -> None:
    """Read the file once so that the page cache holds it."""
    with open(path, "rb", buffering=0) as src:
        while src.read(8 * MIB):
            pass


#: How long the driver waits for an interrupt before it declares the device stuck.
STALL_SECONDS = 10
#: Added to the interrupt eventfd when the device reports DEVICE_NEEDS_RESET.
NEEDS_RESET = 1 << 40


class EventfdInterrupt:
    """The device's interrupts as an eventfd the driver blocks on, like an irqfd."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.needs_reset = False
        self.count = 0

    def trigger(self, kind: InterruptKind, queue_index: int = 0) -> None:
        self.count += 1
        os.eventfd_write(self.fd, 1)

    def set_needs_reset(self) -> None:
        self.needs_reset = True
        os.eventfd_write(self.fd, NEEDS_RESET)


class Driver:
    """The guest driver's side of the block queue: ``depth`` slots resubmitted as they complete."""

    def __init__(
        self,
        memory: GuestMemory,
        *,
        depth: int,
        request_size: int,
        segments: int,
        indirect: bool,
        disk_blocks: int,
        sequential: bool,
    ) -> None:
        self.memory = memory
        self.mock = MockSplitQueue(memory, QUEUE_SIZE, 0)
        self.depth = depth
        self.request_size = request_size
        self.disk_blocks = disk_blocks
        self.sequential = sequential
        self.rng = random.Random(2)
        self.next_block = 0
        self.notify_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.interrupt = EventfdInterrupt()
        region = memory.regions[0]
        view = region.mmap
        mock = self.mock
        self.avail = memoryview(view)[mock.avail_ring : mock.avail_ring + 4 + 2 * QUEUE_SIZE + 2]
        self.avail = self.avail.cast("H")
        used_len = 4 + USED_ELEM.size * QUEUE_SIZE + 2
        used_bytes = memoryview(view)[mock.used_ring : mock.used_ring + used_len]
        self.used_bytes = used_bytes
        self.used = used_bytes.cast("H")
        self.used_elems = used_bytes[4 : 4 + USED_ELEM.size * QUEUE_SIZE].cast("I")
        self.mem = memoryview(view)
        descs_per_slot = 2 + segments
        if not indirect and descs_per_slot * depth > QUEUE_SIZE:
            raise SystemExit(f"{depth} requests of {descs_per_slot} descriptors overflow the ring")
        seg_size = request_size // segments
        # Per slot: header, data segments (each in its own place, none touching), status.
        self.headers: list[int] = []
        self.data: list[list[int]] = []
        self.status: list[int] = []
        self.sector_of: dict[int, int] = {}
        self.slot_of_head: dict[int, int] = {}
        self.head_of_slot: list[int] = []
        for slot in range(depth):
            header = mock.alloc(16, 16)
            status = mock.alloc(1, 1)
            buffers = []
            for _ in range(segments):
                buffers.append(mock.alloc(seg_size, BLOCK))
                mock.alloc(BLOCK, BLOCK)  # a gap, so that the buffers do not touch
            entries = [(header, 16, 0)]
            entries += [(addr, seg_size, VIRTQ_DESC_F_WRITE) for addr in buffers]
            entries.append((status, 1, VIRTQ_DESC_F_WRITE))
            if indirect:
                table = mock.alloc(DESC.size * len(entries), 16)
                for i, (addr, length, flags) in enumerate(entries):
                    more = i + 1 < len(entries)
                    memory.write(
                        table + DESC.size * i,
                        DESC.pack(addr, length, flags | (VIRTQ_DESC_F_NEXT if more else 0), i + 1),
                    )
                head = slot
                mock.write_descriptor(
                    head, table, DESC.size * len(entries), VIRTQ_DESC_F_INDIRECT, 0
                )
            else:
                head = slot * descs_per_slot
                for i, (addr, length, flags) in enumerate(entries):
                    more = i + 1 < len(entries)
                    mock.write_descriptor(
                        head + i,
                        addr,
                        length,
                        flags | (VIRTQ_DESC_F_NEXT if more else 0),
                        head + i + 1,
                    )
            self.headers.append(header)
            self.data.append(buffers)
            self.status.append(status)
            self.slot_of_head[head] = slot
            self.head_of_slot.append(head)
        self.avail_idx = 0
        self.used_seen = 0
        self.errors = 0

    def activated_queue(self) -> ActivatedQueue:
        queue = self.mock.create_queue(event_idx=True)
        return ActivatedQueue(0, queue, self.notify_fd)

    def _next_sector(self) -> int:
        blocks = self.request_size // BLOCK
        if self.sequential:
            block = self.next_block
            self.next_block += blocks
            if self.next_block > self.disk_blocks:
                block, self.next_block = 0, blocks
        else:
            block = self.rng.randrange(self.disk_blocks - blocks + 1)
        return block * (BLOCK // 512)

    def _post(self, slot: int) -> None:
        sector = self._next_sector()
        header = self.headers[slot]
        REQUEST_HEADER.pack_into(self.mem, header, VIRTIO_BLK_T_IN, 0, sector)
        self.mem[self.status[slot]] = 0xFF
        self.sector_of[slot] = sector
        avail = self.avail
        avail[2 + (self.avail_idx & (QUEUE_SIZE - 1))] = self.head_of_slot[slot]
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def _kick(self, old: int) -> None:
        self.avail[1] = self.avail_idx
        full_fence()
        avail_event = self.used[2 + 4 * QUEUE_SIZE]
        if vring_need_event(avail_event, self.avail_idx, old):
            os.eventfd_write(self.notify_fd, 1)

    def _check(self, slot: int, length: int) -> None:
        mem = self.mem
        sector = self.sector_of[slot]
        if mem[self.status[slot]] != 0 or length != self.request_size + 1:
            self.errors += 1
            return
        first = self.data[slot][0]
        if TAG.unpack_from(mem, first)[0] != sector * 512 // BLOCK:
            self.errors += 1

    def run(self, requests: int) -> tuple[float, float]:
        """Post ``requests`` reads at the queue depth; returns (seconds, driver CPU seconds)."""
        start_cpu = time.thread_time()
        start = time.perf_counter()
        posted = 0
        old = self.avail_idx
        for slot in range(min(self.depth, requests)):
            self._post(slot)
            posted += 1
        self._kick(old)
        completed = 0
        used, elems = self.used, self.used_elems
        avail = self.avail
        used_event_slot = 2 + QUEUE_SIZE
        interrupt_fd = self.interrupt.fd
        poller = select.poll()
        poller.register(interrupt_fd, select.POLLIN)
        while completed < requests:
            if not poller.poll(STALL_SECONDS * 1000):
                raise SystemExit(
                    f"no interrupt for {STALL_SECONDS} s with {posted - completed} requests "
                    f"outstanding: avail idx {self.avail_idx}, avail_event "
                    f"{used[2 + 4 * QUEUE_SIZE]}, used idx {used[1]}, used_event "
                    f"{avail[used_event_slot]}"
                )
            if int.from_bytes(os.read(interrupt_fd, 8), "little") >= NEEDS_RESET:
                raise SystemExit("the device reported DEVICE_NEEDS_RESET")
            old = self.avail_idx
            while True:
                end = used[1]
                while self.used_seen != end:
                    pos = 2 * (self.used_seen & (QUEUE_SIZE - 1))
                    slot = self.slot_of_head[elems[pos]]
                    self._check(slot, elems[pos + 1])
                    completed += 1
                    self.used_seen = (self.used_seen + 1) & 0xFFFF
                    if posted < requests:
                        self._post(slot)
                        posted += 1
                avail[used_event_slot] = self.used_seen
                full_fence()
                if used[1] == self.used_seen:
                    break
            if self.avail_idx != old:
                self._kick(old)
        return time.perf_counter() - start, time.thread_time() - start_cpu

    def close(self) -> None:
        os.close(self.notify_fd)
        os.close(self.interrupt.fd)
        self.mem.release()
        self.avail.release()
        self.used_elems.release()
        self.used.release()
        self.used_bytes.release()


def run_nubis(args: argparse.Namespace, disk: Path, *, sequential: bool) -> dict[str, float]:
    """One run: the driver in a child process, the device in this one."""
    request_size = MIB if sequential else BLOCK
    segments = args.seq_segments if sequential else 1
    requests = args.seq_requests if sequential else args.requests
    warmup = min(requests, 500)
    memory = GuestMemory([(0, 128 * MIB if sequential else 16 * MIB)], shared=True)
    driver = Driver(
        memory,
        depth=args.depth,
        request_size=request_size,
        segments=segments,
        indirect=args.indirect,
        disk_blocks=args.disk_mib * MIB // BLOCK,
        sequential=sequential,
    )
    go_read, go_write = os.pipe()
    report_read, report_write = os.pipe()
    child = os.fork()
    if child == 0:  # the guest's side: only the driver runs here
        try:
            os.close(go_write)
            os.close(report_read)
            os.read(go_read, 1)
            driver.run(warmup)
            os.write(report_write, b"warm\n")
            seconds, driver_cpu = driver.run(requests)
            os.write(report_write, f"{seconds} {driver_cpu} {driver.errors}\n".encode())
        except BaseException as exc:
            print(f"driver: {exc}", file=sys.stderr, flush=True)
        finally:
            os._exit(0)
    os.close(go_read)
    os.close(report_write)
    options = {"native_aio": False} if args.no_native_aio else {}
    device = Block(disk, direct=args.direct, io_threads=args.io_threads, **options)
    device.ack_features(device.avail_features)
    device.activate(memory, driver.interrupt, [driver.activated_queue()])
    reports = os.fdopen(report_read, "r")
    try:
        os.write(go_write, b"g")
        if reports.readline() != "warm\n":
            raise SystemExit("the driver process failed during the warm-up")
        interrupts_before = driver.interrupt.count
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = time.process_time()
        line = reports.readline()
        cpu = time.process_time() - cpu0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        interrupts = driver.interrupt.count - interrupts_before
        if not line:
            raise SystemExit("the driver process failed")
        seconds_text, driver_cpu_text, errors = line.split()
        if int(errors):
            raise SystemExit(f"{errors} requests came back wrong")
    finally:
        os.waitpid(child, 0)
        reports.close()
        os.close(go_write)
        device.shutdown()
        driver.close()
        memory.close()
    if driver.interrupt.needs_reset:
        raise SystemExit("the device reported DEVICE_NEEDS_RESET")
    return {
        "seconds": float(seconds_text),
        "requests": requests,
        "device_cpu": cpu,
        "driver_cpu": float(driver_cpu_text),
        "interrupts": interrupts,
        "system_cpu": usage.ru_stime - usage0.ru_stime,
        "switches": usage.ru_nvcsw - usage0.ru_nvcsw + usage.ru_nivcsw - usage0.ru_nivcsw,
    }


def run_reference(args: argparse.Namespace, disk: Path, *, sequential: bool) -> dict[str, float]:
    request_size = MIB if sequential else BLOCK
    requests = args.seq_requests if sequential else args.requests
    disk_blocks = args.disk_mib * MIB // BLOCK
    blocks = request_size // BLOCK
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if args.direct else 0)
    fd = os.open(disk, flags)
    rng = random.Random(3)
    if sequential:
        offsets = [((i * blocks) % (disk_blocks - blocks + 1)) * BLOCK for i in range(requests)]
    else:
        offsets = [rng.randrange(disk_blocks - blocks + 1) * BLOCK for _ in range(requests)]
    lock = threading.Lock()
    position = iter(offsets)

    def loop() -> None:
        # A mapping is page aligned, as O_DIRECT (--direct) wants the buffer.
        buffer = mmap.mmap(-1, request_size)
        view = [memoryview(buffer)]
        while True:
            with lock:
                offset = next(position, None)
            if offset is None:
                return
            if args.delay_us:
                time.sleep(args.delay_us / 1e6)
            os.preadv(fd, view, offset)

    threads = [threading.Thread(target=loop) for _ in range(args.io_threads)]
    cpu0 = time.process_time()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    os.close(fd)
    return {"seconds": seconds, "requests": requests, "device_cpu": cpu}


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="4 KiB reads per run")
    parser.add_argument("--seq-requests", type=int, default=1000, help="1 MiB reads per run")
    parser.add_argument("--seq-segments", type=int, default=16, help="data buffers per 1 MiB read")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--io-threads", type=int, default=block_module.DEFAULT_IO_THREADS)
    parser.add_argument("--disk-mib", type=int, default=256)
    parser.add_argument("--disk", type=Path, default=Path("/tmp/nubis-block-local.img"))
    parser.add_argument("--no-indirect", dest="indirect", action="store_false")
    parser.add_argument("--direct", action="store_true", help="open the file O_DIRECT")
    parser.add_argument(
        "--no-native-aio",
        action="store_true",
        help="with --direct, use the I/O threads instead of native AIO",
    )
    parser.add_argument("--delay-us", type=float, default=0.0, help="sleep before each read")
    parser.add_argument("--only", choices=("randread", "seq"))
    args = parser.parse_args()

    make_disk(args.disk, args.disk_mib * MIB)
    warm(args.disk)
    if args.delay_us:
        real_preadv = os.preadv
        delay = args.delay_us / 1e6

        def slow_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            time.sleep(delay)
            return real_preadv(fd, buffers, offset)

        block_module.os.preadv = slow_preadv  # type: ignore[assignment]

    results: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    for job, sequential in (("randread", False), ("seq", True)):
        if args.only and args.only != job:
            continue
        nubis_runs, reference_runs = [], []
        for _ in range(args.runs):
            nubis_runs.append(run_nubis(args, args.disk, sequential=sequential))
            reference_runs.append(run_reference(args, args.disk, sequential=sequential))
        nubis = {key: median(nubis_runs, key) for key in nubis_runs[0]}
        reference = {key: median(reference_runs, key) for key in reference_runs[0]}
        results[job] = (nubis, reference)
        for name, run in (("nubis", nubis), ("python preadv", reference)):
            req = run["requests"]
            rate = req / run["seconds"]
            line = (
                f"{job:9} {name:14} {rate:10.0f} req/s  "
                f"CPU {run['device_cpu'] / req * 1e6:7.1f} us/req"
            )
            if "interrupts" in run:
                line += (
                    f" (system {run['system_cpu'] / req * 1e6:.1f})"
                    f"  interrupts/req {run['interrupts'] / req:.2f}"
                    f"  context switches/req {run['switches'] / req:.2f}"
                    f"  driver CPU {run['driver_cpu'] / req * 1e6:.1f} us/req"
                )
            print(line, file=sys.stderr)

    if "randread" in results:
        nubis, reference = results["randread"]
        iops = nubis["requests"] / nubis["seconds"]
        ref_iops = reference["requests"] / reference["seconds"]
        emit("block_local_randread_4k_iops", "IOPS", iops, ref_iops, "python preadv", "higher")
        emit(
            "block_local_randread_4k_cpu",
            "cpu_us_per_request",
            nubis["device_cpu"] / nubis["requests"] * 1e6,
            reference["device_cpu"] / reference["requests"] * 1e6,
            "python preadv",
            "lower",
        )
    if "seq" in results:
        nubis, reference = results["seq"]
        emit(
            "block_local_seq_read_mibs",
            "MiB/s",
            nubis["requests"] / nubis["seconds"],
            reference["requests"] / reference["seconds"],
            "python preadv",
            "higher",
        )
        emit(
            "block_local_seq_read_cpu",
            "cpu_ms_per_mib",
            nubis["device_cpu"] / nubis["requests"] * 1e3,
            reference["device_cpu"] / reference["requests"] * 1e3,
            "python preadv",
            "lower",
        )
    if "randread" in results:
        nubis, reference = results["randread"]
        emit(
            "block_local",
            "cpu_us_per_request",
            nubis["device_cpu"] / nubis["requests"] * 1e6,
            reference["device_cpu"] / reference["requests"] * 1e6,
            "python preadv",
            "lower",
        )


if __name__ == "__main__":
    main()
