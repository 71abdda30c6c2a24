"""virtio-blk: a block device backed by a raw image file or a host block device (virtio 1.2, 5.2).

The device has one request queue. Each request is a descriptor chain holding a 16-byte header
(type, reserved, sector; 5.2.6), then data (read by the device for OUT, DISCARD and
WRITE_ZEROES; written for IN and GET_ID) and finally one status byte the device writes. Message
framing is free (2.6.4): the header and the data may be split across descriptors anyhow.

Data moves straight between the backing file and guest memory, with no intermediate copy: by
``os.preadv``/``os.pwritev`` on memoryview slices of the guest mapping, or by native AIO iovecs
that name the mapping's host addresses (see below). FLUSH completes only after
``fdatasync``. DISCARD and WRITE_ZEROES use ``fallocate(2)``, which Python does not wrap, through
ctypes. Everything in a request is guest-controlled: sectors and lengths are checked against the
capacity and a malformed request gets an IOERR or UNSUPP status, never an exception.

Concurrency. A disk is latency-bound: one request at a time leaves the backing idle while the
guest's driver keeps dozens queued, so reads and writes are put in flight while the queue worker
keeps popping. Every guest-controlled decision stays on the worker thread: it pops a chain,
parses and checks the request (header, type, range, read-only) and either answers it at once
(errors, GET_ID) or starts its I/O on one of two backends.

Native AIO (direct disks, as QEMU's ``aio=native``). A disk opened with ``direct`` on a block
device or on a local filesystem whose O_DIRECT I/O Linux runs asynchronously (ext4, XFS, btrfs,
F2FS: `ASYNC_DIRECT_IO_FSTYPES`, read from the mount table) moves its data with Linux native AIO
(:mod:`nubis.virtio.aio`) and no helper thread at all. On other filesystems (9p, NFS, FUSE,
overlayfs) ``io_submit`` performs each request before it returns, so one worker would run them
one at a time: those direct disks keep the thread pool, which overlaps them (measured in the
nested test host, whose images live on 9p: sequential 1 MiB reads at 0.71 of QEMU's rate with
native AIO there, against 0.89 to 1.13 with the pool). With native AIO:

* the worker turns each checked read or write into an iocb whose iovecs hold the host addresses
  of the guest buffers (``GuestMemory.host_address``; the queue already checked the ranges) and
  submits the whole burst it popped with one ``io_submit``. The iocbs and iovec arrays are
  preallocated per slot, one slot per request in flight and as many slots as the queue has
  entries, so they stay valid until the kernel is done with them;
* each iocb names the completion eventfd the worker's epoll watches (``IOCB_FLAG_RESFD``); on it
  the worker takes every completion with a non-blocking ``io_getevents``, writes the status
  bytes, publishes the lot with one used-index update and raises one interrupt
  (``signal_used``, so EVENT_IDX suppression applies). Used entries come out in completion
  order, which the split ring allows when VIRTIO_F_IN_ORDER is not negotiated (2.7.8);
* ``io_submit`` may take fewer iocbs than offered: the rest are offered again at once, and on
  EAGAIN (no room in the kernel) they wait until a completion frees room. Another refusal fails
  that request with IOERR;
* a short transfer is resubmitted for its remainder, as ``preadv`` would be called again: a
  read that reaches end of file (the image shrank) fills the rest with zeroes, a write the disk
  takes no more of fails with IOERR, and a negative result fails with IOERR. Requests with more
  buffers than IOV_MAX go out in IOV_MAX-sized pieces the same way. EINVAL on the O_DIRECT
  descriptor, at submission or as a result, means the backing wants stricter alignment than
  assumed: the request is retried on the buffered descriptor, as the thread pool does.

Guest buffers that do not meet the O_DIRECT alignment go through the buffered descriptor,
still by native AIO; ``io_submit`` then copies them before it returns (Linux only runs native
AIO asynchronously on O_DIRECT files), blocking the worker for the copy. Linux's virtio_blk
aligns its buffers, so this is the exception.

The I/O thread pool (buffered disks, where ``io_submit`` would block just the same; direct
disks on filesystems without asynchronous direct I/O, and when the kernel refuses an AIO
context, e.g. without CONFIG_AIO or with ``fs.aio-max-nr`` exhausted). ``io_threads`` threads
(16 by default) run ``preadv``/``pwritev``, which release the GIL:

* an I/O thread only slices guest memory at addresses the queue already checked, moves the
  bytes, releases its views and appends the finished request to a deque; it writes the eventfd
  that the worker's epoll watches only when the worker has not been woken already since it
  last took the deque, so a burst of completions costs one wake-up;
* only the worker writes status bytes and used entries and signals the driver, as above. Each
  request costs a hand-off to a thread and back, a few wake-ups and GIL switches, which is why
  direct disks prefer native AIO.

FLUSH, DISCARD and WRITE_ZEROES are barriers: the worker first waits until every request popped
before them has completed (publishing those completions), then runs them itself. A FLUSH therefore
reaches ``fdatasync`` only after every earlier write is in the file; the requests after a barrier
wait for it, as a barrier is rare next to reads and writes. Reset and shutdown stop the worker,
then wait for every request still in flight (publishing it unless the device failed; a failed
device submits nothing more), so no I/O thread and no kernel AIO request touches guest memory or
the backing file once ``reset()`` or ``shutdown()`` returns; then the AIO context is destroyed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import queue as _queue
import select
import stat
import struct
import threading
from collections import deque
from collections.abc import Sequence
from functools import reduce
from itertools import repeat
from operator import add, eq, or_
from typing import TYPE_CHECKING

from nubis._log import getLogger
from nubis._thread import name_os_thread
from nubis.memory import GuestMemoryError
from nubis.virtio.aio import (
    IO_EVENT,
    IOCB,
    IOCB_CMD_PREADV,
    IOCB_CMD_PWRITEV,
    IOCB_FLAG_RESFD,
    IOVEC,
    AioContext,
)
from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceType,
)
from nubis.virtio.queue import DescriptorChain, Queue, TableChain
from nubis.virtio.worker import QueueDevice, Worker, clear_eventfd

if TYPE_CHECKING:
    from typing import Final

    from nubis.memory import GuestMemory

_log = getLogger(__name__)

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Status values (5.2.6).
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
#: GET_ID answers with this many bytes, without a terminating NUL when all are used (5.2.6).
VIRTIO_BLK_ID_BYTES = 20
SECTOR_SIZE = 512
SECTOR_SHIFT = 9

#: struct virtio_blk_req header (5.2.6): le32 type, le32 reserved, le64 sector.
REQUEST_HEADER = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes (5.2.6): le64 sector, le32 num_sectors, le32 flags.
DISCARD_SEGMENT = struct.Struct("<QII")
#: struct virtio_blk_config (5.2.4): capacity, size_max, seg_max, geometry (cylinders, heads,
#: sectors), blk_size, topology (physical_block_exp, alignment_offset, min_io_size,
#: opt_io_size), writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
#: discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
#: write_zeroes_may_unmap, unused1[3], max_secure_erase_sectors, max_secure_erase_seg,
#: secure_erase_sector_alignment.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")

#: Limits advertised for DISCARD and WRITE_ZEROES, in 512-byte sectors and segments.
MAX_DISCARD_SECTORS = 0x3FFFFF
MAX_DISCARD_SEGMENTS = 32

# <linux/fs.h>: BLKGETSIZE64 = _IOR(0x12, 114, size_t), BLKSSZGET = _IO(0x12, 104).
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
# <linux/falloc.h>.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: Requests that wait for everything before them to complete, then run on the worker thread.
_BARRIERS = frozenset((VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES))

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_ZERO_CHUNK = 1 << 20
#: The most bytes one native AIO iocb carries when it merges requests that follow one another
#: on disk: enough to spare most per-iocb costs of a sequential stream, small enough that the
#: first of them is not held back long behind the others.
MERGE_MAX_BYTES = 4 << 20

#: I/O threads per disk: enough to keep a guest's usual queue depth (32) mostly in flight.
DEFAULT_IO_THREADS = 16

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


# Filesystems whose O_DIRECT reads and writes Linux runs asynchronously under io_submit (their
# direct I/O goes through iomap or the block layer's own path). Elsewhere (9p, NFS, FUSE,
# overlayfs, tmpfs...) io_submit does the I/O before it returns, so one worker would serialise
# what the I/O threads overlap.
ASYNC_DIRECT_IO_FSTYPES: Final = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"})


def mount_fstype(device: int) -> str | None:
    """The filesystem type /proc/self/mountinfo gives the mount of device ``device``."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and "-" in fields[3:]:
                    separator = fields.index("-", 3)
                    if separator + 1 < len(fields):
                        return fields[separator + 1]
    except OSError:
        return None
    return None


def has_async_direct_io(fd: int) -> bool:
    """Whether native AIO on ``fd`` (opened O_DIRECT) is asynchronous: a block device, or a
    file on a mount of one of `ASYNC_DIRECT_IO_FSTYPES`.

    The mount's type is what counts, not statfs: a 9p (or other network) mount reports its
    server's filesystem magic (ext4 for a 9p share of an ext4 directory), while its io_submit
    is synchronous all the same. A mount that cannot be found gets the I/O threads.
    """
    status = os.fstat(fd)
    if stat.S_ISBLK(status.st_mode):
        return True
    return mount_fstype(status.st_dev) in ASYNC_DIRECT_IO_FSTYPES


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call ``fallocate(2)``; raises OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


Segment = tuple[int, int]
"""A guest buffer: (guest address, length)."""


def second_byte_mask(align: int) -> bytes:
    """A ``bytes.translate`` table keeping the bits of a number's second byte that an
    alignment of ``align`` (a power of two of at least 512) needs clear."""
    return bytes(b & ((align >> 8) - 1) for b in range(256))


def table_aligned(table: memoryview, last: int, bits: int, align: int, mask: bytes) -> bool:
    """Whether the buffers of entries 1 to ``last - 1`` of an indirect table, and ``bits``,
    meet an alignment of ``align``; ``mask`` is ``second_byte_mask(align)``.

    The buffers are checked on the table's bytes rather than one number at a time: entry ``i``
    holds its address at byte ``16 i`` and its length at ``16 i + 8``, both little endian, so
    the bytes from 16 on in steps of 8 are the lowest byte of every address and length, and
    those from 17 on the byte above. With an alignment of 512 to 64 KiB the lowest bytes must
    all be zero, and the bytes above zero under the mask.
    """
    if bits & (align - 1) or align > 1 << 16:
        return False
    lowest = table[16 : 16 * last : 8].tobytes()
    if lowest.count(0) != len(lowest):
        return False
    above = table[17 : 16 * last : 8].tobytes().translate(mask)
    return above.count(0) == len(above)


def _split(segments: Sequence[Segment], count: int) -> tuple[list[Segment], list[Segment]]:
    """Split ``segments`` after ``count`` bytes (fewer if they hold fewer)."""
    head: list[Segment] = []
    for i, (addr, length) in enumerate(segments):
        if count >= length:
            head.append((addr, length))
            count -= length
            continue
        if count:
            head.append((addr, count))
        return head, [(addr + count, length - count), *segments[i + 1 :]]
    return head, []


class RequestError(Exception):
    """A request that fails with a status byte: the guest asked for something impossible."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _IoRequest:
    """A checked read or write on its way through the I/O pool or native AIO and back to the
    worker.
    """

    __slots__ = (
        "columns",
        "done",
        "fd",
        "followers",
        "head",
        "length",
        "memory",
        "offset",
        "piece",
        "segments",
        "solo",
        "status",
        "status_addr",
        "write",
    )

    def __init__(
        self,
        head: int,
        memory: GuestMemory,
        fd: int,
        segments: list[Segment],
        offset: int,
        length: int,
        write: bool,
        status_addr: int,
    ) -> None:
        self.head = head
        self.memory = memory
        self.fd = fd
        self.segments = segments
        self.offset = offset
        self.length = length
        self.write = write
        self.status_addr = status_addr
        self.status = VIRTIO_BLK_S_IOERR
        # Native AIO only: bytes moved so far, and bytes asked for by the iocb in flight.
        self.done = 0
        self.piece = 0
        # The segments' addresses and lengths as two columns, when the request found them
        # so and checked that they lie in one memory region; None otherwise.
        self.columns: tuple[Sequence[int], Sequence[int]] | None = None
        # Native AIO only: the requests merged behind this one into its iocb (None when it
        # goes alone), and whether it must go alone (a merged iocb of it fell short).
        self.followers: list[_IoRequest] | None = None
        self.solo = False


def _host_buffer(size: int) -> tuple[memoryview, int]:
    """A zeroed buffer for the kernel to read or write, and its host address.

    The memoryview keeps the bytearray from being resized, so the address stays valid as long as
    the view lives.
    """
    raw = bytearray(size)
    address = ctypes.addressof((ctypes.c_char * size).from_buffer(raw))
    return memoryview(raw), address


class _NativeAio:
    """The native AIO backend of a direct disk: a kernel context and ``depth`` slots.

    Slot ``i`` owns the ``i``-th iocb of one array, an iovec array (grown as requests need) and
    the request it carries while in flight; the iocb's ``aio_data`` is ``i``. Requests wait in
    ``pending`` until a slot is free and ``io_submit`` takes them. Only the worker thread (or,
    once it has stopped, reset or shutdown) uses this object.
    """

    def __init__(self, depth: int, resfd: int, context: AioContext) -> None:
        self.context = context
        self.depth = depth
        self.resfd = resfd
        self.iocbs, self.iocb_base = _host_buffer(IOCB.size * depth)
        self.pointers, self.pointer_base = _host_buffer(8 * depth)
        self.events, self.event_base = _host_buffer(IO_EVENT.size * depth)
        self.iovecs: list[memoryview | None] = [None] * depth
        self.iovec_bases = [0] * depth
        self.requests: list[_IoRequest | None] = [None] * depth
        self.free = list(range(depth - 1, -1, -1))
        self.pending: deque[_IoRequest] = deque()

    @property
    def submitted(self) -> int:
        """Requests the kernel holds."""
        return self.depth - len(self.free)

    def _merge(self, request: _IoRequest) -> None:
        """Take into ``request``'s iocb the pending requests that continue it on disk.

        A guest reading or writing sequentially at some depth queues requests whose ranges
        follow one another; one iocb for the run costs the kernel one submission and one
        completion instead of one per request. Only untouched requests of the same direction
        and descriptor merge, within `MERGE_MAX_BYTES` and the iovec limit.
        """
        if request.done or request.solo:
            return
        pending = self.pending
        fd, write = request.fd, request.write
        end = request.offset + request.length
        size = request.length
        vectors = len(request.segments)
        followers: list[_IoRequest] = []
        while pending:
            following = pending[0]
            if (
                following.offset != end
                or following.fd != fd
                or following.write != write
                or following.done
                or following.solo
                or size + following.length > MERGE_MAX_BYTES
                or vectors + len(following.segments) > _IOV_MAX
            ):
                break
            followers.append(pending.popleft())
            end += following.length
            size += following.length
            vectors += len(following.segments)
        if followers:
            request.followers = followers

    def _prepare(self, slot: int, request: _IoRequest, memory: GuestMemory) -> None:
        """Fill slot ``slot``'s iovecs and iocb with what is left of ``request`` (and of the
        requests merged behind it)."""
        segments = request.segments
        if request.followers:
            segments = segments.copy()
            for following in request.followers:
                segments += following.segments
        elif request.done:
            segments = _split(segments, request.done)[1]
        if len(segments) > _IOV_MAX:
            segments = segments[:_IOV_MAX]
        count = len(segments)
        iovecs = self.iovecs[slot]
        if iovecs is None or len(iovecs) < IOVEC.size * count:
            iovecs, self.iovec_bases[slot] = _host_buffer(IOVEC.size * max(count, 4))
            self.iovecs[slot] = iovecs
        if count == 1:
            addr, piece = segments[0]
            IOVEC.pack_into(iovecs, 0, memory.host_address(addr, piece), piece)
        elif not count:
            piece = 0  # a request of no data: the kernel moves nothing and completes it
        else:
            columns = request.columns if segments is request.segments else None
            if columns is not None:
                # Checked when the request was framed: every buffer lies in one region.
                addrs, lens = columns
                region = memory.find_region(addrs[0])
            else:
                addrs, lens = zip(*segments, strict=True)
                region = memory.find_region(addrs[0])
                if region is not None and (
                    min(addrs) < region.start or max(addrs) + max(lens) > region.end
                ):
                    region = None
            if region is not None:
                # Every buffer in one region: the iovecs as columns, with C-level passes.
                fields = [0] * (2 * count)
                fields[::2] = map(add, addrs, repeat(region.host_address - region.start, count))
                fields[1::2] = lens
                piece = sum(lens)
            else:
                fields, piece = self._iovec_fields(segments, memory)
            struct.pack_into(f"<{2 * count}Q", iovecs, 0, *fields)
        request.piece = piece
        IOCB.pack_into(
            self.iocbs,
            IOCB.size * slot,
            slot,  # aio_data
            0,  # aio_key
            0,  # aio_rw_flags
            IOCB_CMD_PWRITEV if request.write else IOCB_CMD_PREADV,
            0,  # aio_reqprio
            request.fd,
            self.iovec_bases[slot],
            count,
            request.offset + request.done,
            0,  # aio_reserved2
            IOCB_FLAG_RESFD,
            self.resfd,
        )

    @staticmethod
    def _iovec_fields(segments: list[Segment], memory: GuestMemory) -> tuple[list[int], int]:
        """The iovec fields (host address, length, ...) of ``segments`` and their total, for
        buffers in several regions: one region lookup per run of buffers in the same region.
        """
        piece = 0
        start = end = delta = 0
        fields: list[int] = []
        for addr, size in segments:
            if not start <= addr or addr + size > end:
                region = memory.find_region(addr)
                if region is None or addr + size > region.end:
                    raise GuestMemoryError(addr, size)
                start, end = region.start, region.end
                delta = region.host_address - start
            fields += (addr + delta, size)
            piece += size
        return fields, piece

    def submit_pending(self, memory: GuestMemory) -> list[tuple[_IoRequest, OSError]]:
        """Submit pending requests while slots are free; returns those the kernel refused.

        A short submission is retried with the rest; EAGAIN (the kernel has no room) leaves the
        rest pending until a completion frees room, unless nothing is in flight to free it.
        """
        refused: list[tuple[_IoRequest, OSError]] = []
        pending, free, requests = self.pending, self.free, self.requests
        while pending and free:
            slots: list[int] = []
            error: OSError | None = None
            taken = 0
            try:
                while pending and free:
                    slot = free.pop()
                    slots.append(slot)
                    request = requests[slot] = pending.popleft()
                    if pending:
                        self._merge(request)
                    self._prepare(slot, request, memory)
                count = len(slots)
                base = self.iocb_base
                struct.pack_into(
                    f"<{count}Q", self.pointers, 0, *[base + IOCB.size * i for i in slots]
                )
                taken = self.context.submit(self.pointer_base, count)
            except OSError as exc:
                taken, error = 0, exc
            finally:
                # Give back the slots of the requests not taken (all of them if preparing one
                # failed); the requests go back to the front, in order, unmerged.
                for slot in reversed(slots[taken:]):
                    returned = requests[slot]
                    requests[slot] = None
                    free.append(slot)
                    if returned is not None:
                        if returned.followers:
                            pending.extendleft(reversed(returned.followers))
                            returned.followers = None
                        pending.appendleft(returned)
            if error is None:
                continue  # all taken, or taken short: the next round submits the rest
            if error.errno == errno.EAGAIN and self.submitted:
                break  # a completion frees room; the worker resubmits then
            refused.append((pending.popleft(), error))
        return refused

    def collect(self) -> list[tuple[_IoRequest, int]]:
        """Take every completion the kernel has: (request, result) pairs, slots freed."""
        remaining = self.submitted
        if not remaining:
            return []
        # Straight from the kernel's completion ring where it can be read: no system call.
        taken = self.context.take_events()
        if taken is None:
            taken = []
            events, depth = self.events, self.depth
            while remaining:
                count = self.context.get_events(self.event_base, depth)
                taken += [
                    (slot, result)
                    for slot, _obj, result, _res2 in IO_EVENT.iter_unpack(
                        events[: IO_EVENT.size * count]
                    )
                ]
                remaining -= count
                if count < depth:
                    break
        finished: list[tuple[_IoRequest, int]] = []
        requests, free = self.requests, self.free
        for slot, result in taken:
            request = requests[slot]
            assert request is not None
            requests[slot] = None
            free.append(slot)
            finished.append((request, result))
        return finished


class Block(QueueDevice):
    """A virtio block device over a raw image file or a host block device (5.2).

    ``readonly`` opens the backing O_RDONLY and offers VIRTIO_BLK_F_RO; ``direct`` opens it
    O_DIRECT (misaligned guest buffers then go through a second, buffered descriptor);
    ``serial`` is the GET_ID answer (at most 20 bytes; derived from the file otherwise);
    ``io_threads`` is how many reads and writes may be in flight at once on the thread pool.
    A direct disk moves its data with Linux native AIO instead, up to ``queue_size`` requests
    in flight, where that is asynchronous (``native_aio=None``, the default: a block device
    or a file on a filesystem of `ASYNC_DIRECT_IO_FSTYPES`); ``native_aio=True`` uses it
    on any direct disk, ``False`` never. The I/O threads take over if the kernel refuses an
    AIO context.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        direct: bool = False,
        serial: str | bytes | None = None,
        queue_size: int = 256,
        io_threads: int = DEFAULT_IO_THREADS,
        native_aio: bool | None = None,
    ) -> None:
        """Open ``path`` and size the disk; raises OSError or ValueError with one clear sentence."""
        if io_threads < 1:
            raise ValueError(f"a disk needs at least one I/O thread, not {io_threads}")
        super().__init__(f"block:{os.fspath(path)}", [queue_size])
        self.path = os.fspath(path)
        self.readonly = readonly
        self.direct = direct
        mode = os.O_RDONLY if readonly else os.O_RDWR
        self._fd = os.open(self.path, mode | os.O_CLOEXEC)
        self._direct_fd = -1
        try:
            st = os.fstat(self._fd)
            self._block_device = stat.S_ISBLK(st.st_mode)
            if self._block_device:
                size_buf = bytearray(8)
                fcntl.ioctl(self._fd, BLKGETSIZE64, size_buf)
                size = int.from_bytes(size_buf, "little")
                sector_buf = bytearray(4)
                fcntl.ioctl(self._fd, BLKSSZGET, sector_buf)
                self._direct_align = max(SECTOR_SIZE, int.from_bytes(sector_buf, "little"))
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
                self._direct_align = SECTOR_SIZE
            else:
                raise ValueError(f"disk {self.path} is neither a regular file nor a block device")
            if direct:
                self._direct_fd = os.open(self.path, mode | os.O_CLOEXEC | os.O_DIRECT)
            if serial is None:
                serial = f"{st.st_dev:x}-{st.st_ino:x}"[:VIRTIO_BLK_ID_BYTES]
            ident = serial.encode() if isinstance(serial, str) else bytes(serial)
            if len(ident) > VIRTIO_BLK_ID_BYTES:
                raise ValueError(
                    f"disk serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes"
                )
        except BaseException:
            self._close_fds()
            raise
        self.serial = ident.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.capacity = size >> SECTOR_SHIFT
        self._align_mask = second_byte_mask(self._direct_align)
        self._seg_max = max(1, queue_size - 2)
        self._config = CONFIG.pack(
            self.capacity,
            0,  # size_max: not offered
            self._seg_max,
            0, 0, 0,  # geometry: not offered
            SECTOR_SIZE,
            0, 0, 0, 0,  # topology: not offered
            0, 0,  # writeback, unused0
            1,  # num_queues
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            1,  # discard_sector_alignment
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            1,  # write_zeroes_may_unmap
            0, 0, 0,  # secure erase: not offered
        )  # fmt: skip
        self._counters = dict.fromkeys(
            (
                "read_bytes",
                "write_bytes",
                "read_ops",
                "write_ops",
                "flush_ops",
                "discard_ops",
                "write_zeroes_ops",
                "get_id_ops",
                "io_errors",
                "unsupported_ops",
                "malformed_requests",
                "merged_requests",
            ),
            0,
        )
        self._logged_io_error = False
        # The I/O pool: requests go out through _jobs and come back through _done, announced on
        # _done_fd. _inflight counts requests handed out and not yet taken back; only the
        # worker thread (or, once it has stopped, reset or shutdown) touches it.
        self._io_threads = io_threads
        self._jobs: _queue.SimpleQueue[_IoRequest | None] = _queue.SimpleQueue()
        self._done: deque[_IoRequest] = deque()
        self._done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._threads: list[threading.Thread] = []
        self._inflight = 0
        # Set by the I/O thread that wrote _done_fd; the worker clears it after reading
        # _done_fd and before taking _done, so a completion appended later wakes it again.
        self._done_signalled = False
        # Native AIO (direct disks): created at activation, destroyed at reset and shutdown.
        # Its completions count on _done_fd too; finished requests also go through _done.
        if native_aio is None:
            native_aio = self._direct_fd >= 0 and has_async_direct_io(self._direct_fd)
        self._native_aio = native_aio and direct
        self._aio: _NativeAio | None = None

    # --- VirtioDevice -------------------------------------------------------------------------

    @property
    def device_type(self) -> DeviceType:
        """virtio device id 2."""
        return DeviceType.BLOCK

    @property
    def avail_features(self) -> int:
        """VERSION_1, EVENT_IDX, INDIRECT_DESC, SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES
        and RO when read-only.
        """
        features = 0
        for bit in (
            VIRTIO_F_VERSION_1,
            VIRTIO_F_RING_EVENT_IDX,
            VIRTIO_F_RING_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ):
            features |= 1 << bit
        if self.readonly:
            features |= 1 << VIRTIO_BLK_F_RO
        return features

    def read_config(self, offset: int, data: memoryview) -> None:
        """Copy from struct virtio_blk_config; bytes beyond it read as zero."""
        _read_bytes(self._config, offset, data)

    def write_config(self, offset: int, data: memoryview) -> None:
        """The configuration is read-only (writeback needs CONFIG_WCE, which is not offered)."""

    def counters(self) -> dict[str, int]:
        """Bytes and operations read, written, flushed, discarded; errors."""
        return dict(self._counters)

    @property
    def uses_native_aio(self) -> bool:
        """Whether reads and writes go through native AIO (an active direct disk) rather than
        the I/O threads.
        """
        return self._aio is not None

    def setup_worker(self, worker: Worker) -> None:
        """Watch the completion eventfd; set up native AIO or make sure the I/O threads run."""
        # Edge-triggered: _completions_ready takes every completion there is, so the counter
        # is never read on that path (see Worker.add_fd).
        worker.add_fd(self._done_fd, self._completions_ready, edge=True)
        if self._native_aio and self._aio is None:
            depth = self._queue_max_sizes[0]
            try:
                self._aio = _NativeAio(depth, self._done_fd, AioContext(depth))
                return
            except OSError as exc:
                _log.debug("%s: native AIO is unavailable, using I/O threads: %s", self.name, exc)
        if self._aio is not None:
            return
        while len(self._threads) < self._io_threads:
            thread = threading.Thread(
                target=self._io_loop, name=f"nubis-{self.name}-io{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def on_reset(self) -> None:
        """Wait for the requests still in flight; a healthy device still completes them."""
        self._quiesce(publish=not self.failed)
        self._destroy_aio()

    def _destroy_aio(self) -> None:
        aio, self._aio = self._aio, None
        if aio is not None:
            try:
                aio.context.destroy()
            except OSError as exc:
                _log.error("%s: releasing the AIO context failed: %s", self.name, exc)

    def drain_on_shutdown(self, index: int) -> None:
        """Start what is still available, then wait for it and every request in flight."""
        self.queue_notified(index)
        self._quiesce(publish=True)

    def on_shutdown(self) -> None:
        """Wait for any I/O still in flight, stop the I/O threads, flush the backing, close it."""
        self._quiesce(publish=False)
        self._destroy_aio()
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()
        if self._done_fd >= 0:
            os.close(self._done_fd)
            self._done_fd = -1
        if self._fd >= 0 and not self.readonly:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                _log.error("%s: flushing the disk on shutdown failed: %s", self.name, exc)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1

    # --- the request queue (worker thread) ----------------------------------------------------

    def queue_notified(self, index: int) -> None:
        """Start every available request; one interrupt covers those completed meanwhile."""
        memory = self.memory
        if memory is None or self.failed:
            return
        queue = self.queues[index].queue
        completed = 0
        try:
            while True:
                queue.disable_notification(memory)
                while (chain := queue.pop_descriptor_chain(memory)) is not None:
                    used = self._start(memory, queue, chain)
                    if used >= 0:
                        queue.add_used(memory, chain.head_index, used)
                        completed += 1
                if self._aio is not None and self._aio.pending:
                    # The whole burst goes to the kernel with one io_submit.
                    self._aio_submit(memory)
                if not queue.enable_notification(memory):
                    break
            if self._done:
                completed += self._reap(memory, queue)
        finally:
            if completed:
                self.signal_used(index)

    def _completions_ready(self) -> None:
        self._done_signalled = False
        memory = self.memory
        if memory is None or self.failed:
            return
        if self._reap(memory, self.queues[0].queue):
            self.signal_used(0)

    def _reap(self, memory: GuestMemory | None, queue: Queue | None) -> int:
        """Take back every finished request and publish it (without a queue: only count it).

        With native AIO, first collect the kernel's completions and submit what waits for a
        slot (without a queue: drop it instead). Returns the number of used entries added.
        """
        if self._aio is not None:
            self._aio_collect(memory if queue is not None else None)
        done = self._done
        counters = self._counters
        used: list[tuple[int, int]] = []
        while done:
            request = done.popleft()
            self._inflight -= 1
            request.memory = None  # type: ignore[assignment]
            if request.status == VIRTIO_BLK_S_OK:
                if request.write:
                    counters["write_ops"] += 1
                    counters["write_bytes"] += request.length
                else:
                    counters["read_ops"] += 1
                    counters["read_bytes"] += request.length
            else:
                counters["io_errors"] += 1
            if memory is not None:
                memory.slice(request.status_addr, 1)[0] = request.status
                written = 0 if request.write or request.status else request.length
                used.append((request.head, written + 1))
        if used and memory is not None and queue is not None:
            # The status bytes are in place before the used index that publishes them.
            queue.add_used_many(memory, used)
        return len(used)

    def _wait_idle(self, memory: GuestMemory | None, queue: Queue | None) -> int:
        """Block until no request is in flight; returns the used entries published meanwhile."""
        published = self._reap(memory, queue)
        if self._inflight:
            poller = select.poll()
            poller.register(self._done_fd, select.POLLIN)
            while self._inflight:
                poller.poll()
                clear_eventfd(self._done_fd)
                self._done_signalled = False
                published += self._reap(memory, queue)
        return published

    def _quiesce(self, *, publish: bool) -> None:
        """With the worker stopped: wait for every request in flight, publishing it if asked."""
        if not self._inflight and not self._done:
            return
        memory = self.memory
        if publish and memory is not None and self.queues:
            if self._wait_idle(memory, self.queues[0].queue):
                self.signal_used(0)
        else:
            self._wait_idle(None, None)

    def _start(self, memory: GuestMemory, queue: Queue, chain: DescriptorChain) -> int:
        """Parse and check one request; answer it now or hand its I/O to the pool.

        Returns the bytes written to the chain when answered now, -1 when the request is in
        flight (it is published when it comes back).
        """
        count = len(chain)
        if count == 3:
            if self._start_simple(memory, chain):
                return -1
        elif count > 3 and self._start_scattered(memory, chain):
            return -1
        framing = split_request(chain)
        if framing is None:
            # Without a status byte there is no way to answer; give the chain back untouched.
            self._counters["malformed_requests"] += 1
            return 0
        header, data_out, data_in, status_addr = framing
        written = 0
        try:
            if sum(length for _, length in header) < REQUEST_HEADER.size:
                self._counters["malformed_requests"] += 1
                raise RequestError(VIRTIO_BLK_S_IOERR, "the request header is short")
            kind, _reserved, sector = REQUEST_HEADER.unpack(_gather(memory, header))
            if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
                self._submit(memory, chain.head_index, kind, sector, data_out, data_in, status_addr)
                return -1
            if (
                kind in _BARRIERS
                and (self._inflight or self._done)
                and self._wait_idle(memory, queue)
            ):
                self.signal_used(0)
            written = self._execute(memory, kind, data_out, data_in)
            status = VIRTIO_BLK_S_OK
        except RequestError as exc:
            status = exc.status
            if status == VIRTIO_BLK_S_UNSUPP:
                self._counters["unsupported_ops"] += 1
            else:
                self._counters["io_errors"] += 1
            _log.debug("%s: request failed: %s", self.name, exc)
        memory.slice(status_addr, 1)[0] = status
        return written + 1

    def _start_simple(self, memory: GuestMemory, chain: DescriptorChain) -> bool:
        """Start the commonest request, if ``chain`` is one; True when it is in flight.

        Linux's virtio_blk frames a read or write of one buffer as header, data, status: one
        descriptor each, the data readable for a write and writable for a read. Such a request
        that passes every check :meth:`_submit` makes is queued here without the general
        framing. Anything else (or a request that fails a check) returns False, and the
        general path handles it, error status included.
        """
        header, data, status = chain.descriptors
        length = data.len
        readable = chain.readable_count
        if (
            header.len != REQUEST_HEADER.size
            or status.len != 1
            or not length
            or length & (SECTOR_SIZE - 1)
            or not 0 < readable < 3
        ):
            return False
        kind, _reserved, sector = REQUEST_HEADER.unpack(memory.read(header.addr, header.len))
        if kind == VIRTIO_BLK_T_IN:
            if readable != 1:
                return False
            write = False
        elif kind == VIRTIO_BLK_T_OUT:
            if readable != 2 or self.readonly:
                return False
            write = True
        else:
            return False
        if sector + (length >> SECTOR_SHIFT) > self.capacity:
            return False
        offset = sector << SECTOR_SHIFT
        segments = [(data.addr, length)]
        fd = self._fd_for_bits(data.addr | offset | length)
        self._enqueue(
            _IoRequest(chain.head_index, memory, fd, segments, offset, length, write, status.addr)
        )
        return True

    def _start_scattered(self, memory: GuestMemory, chain: DescriptorChain) -> bool:
        """Start a read or write of many buffers, if ``chain`` is one; True when in flight.

        A large request from Linux (up to 1 MiB in as many as 254 page-sized buffers) is
        header, data buffers all of one direction, status. Its buffers are handled here as
        columns, with C-level passes instead of Python steps per buffer: the total length, the
        lowest and highest address against one memory region, which buffers touch the next one
        (none: each is an iovec; all: the request is one iovec; some: :func:`coalesce`) and the
        O_DIRECT alignment of what is left. Anything unusual, and any request that fails a
        check, returns False for the general path to answer.
        """
        table = chain.table
        addrs: Sequence[int]
        lens: Sequence[int]
        if isinstance(chain, TableChain):
            # The columns Queue._in_order_table made while it found the buffers non-empty and
            # in one region.
            every_addr, every_len = chain.addrs, chain.lengths
            last = len(every_addr) - 1
            header_addr, header_len = every_addr[0], every_len[0]
            status_addr, status_len = every_addr[last], every_len[last]
            addrs, lens = every_addr[1:last], every_len[1:last]
        else:
            descriptors = chain.descriptors
            last = len(descriptors) - 1
            header_addr, header_len = descriptors[0][:2]
            status_addr, status_len = descriptors[-1][:2]
            addrs, lens, _flags, _links = zip(*descriptors[1:-1], strict=True)
            region = memory.find_region(addrs[0])
            if (
                region is None
                or not min(lens)
                or min(addrs) < region.start
                or max(addrs) + max(lens) > region.end
            ):
                return False
        readable = chain.readable_count
        if readable == 1:
            write = False
        elif readable == last:
            write = True
        else:
            return False
        if header_len != REQUEST_HEADER.size or status_len != 1 or (write and self.readonly):
            return False
        kind, _reserved, sector = REQUEST_HEADER.unpack(memory.read(header_addr, header_len))
        if kind != (VIRTIO_BLK_T_OUT if write else VIRTIO_BLK_T_IN):
            return False
        length = sum(lens)
        if length & (SECTOR_SIZE - 1) or sector + (length >> SECTOR_SHIFT) > self.capacity:
            return False
        offset = sector << SECTOR_SHIFT
        # A table whose every buffer meets the O_DIRECT alignment by itself (or any table, on
        # a buffered disk) needs no merging: each buffer is an iovec as it is.
        aligned = table is not None and (
            self._direct_fd < 0
            or table_aligned(table, last, offset | length, self._direct_align, self._align_mask)
        )
        touching = [] if aligned else list(map(eq, map(add, addrs[:-1], lens[:-1]), addrs[1:]))
        columns = None
        if True not in touching:
            segments = list(zip(addrs, lens, strict=True))
            columns = addrs, lens
            bits = 0 if aligned else reduce(or_, addrs, offset | length) | reduce(or_, lens, 0)
            fd = self._fd_for_bits(bits)
        elif False not in touching:
            segments = [(addrs[0], length)]
            fd = self._fd_for_bits(addrs[0] | offset | length)
        else:
            segments = coalesce(memory, list(zip(addrs, lens, strict=True)))
            fd = self._fd_for(segments, offset, length)
        request = _IoRequest(
            chain.head_index, memory, fd, segments, offset, length, write, status_addr
        )
        request.columns = columns
        self._enqueue(request)
        return True

    def _submit(
        self,
        memory: GuestMemory,
        head: int,
        kind: int,
        sector: int,
        data_out: list[Segment],
        data_in: list[Segment],
        status_addr: int,
    ) -> None:
        """Check a read or write and queue it for an I/O thread; raises RequestError."""
        write = kind == VIRTIO_BLK_T_OUT
        if write:
            if self.readonly:
                raise RequestError(VIRTIO_BLK_S_IOERR, "the disk is read-only")
            segments = data_out
        else:
            segments = data_in
        if len(segments) > 1:
            segments = coalesce(memory, segments)
            length = 0
            for _, size in segments:
                length += size
        elif segments:
            length = segments[0][1]
        else:
            length = 0
        self._check_range(sector, length)
        offset = sector << SECTOR_SHIFT
        fd = self._fd_for(segments, offset, length)
        self._enqueue(_IoRequest(head, memory, fd, segments, offset, length, write, status_addr))

    def _enqueue(self, request: _IoRequest) -> None:
        """Put a checked read or write in flight: native AIO submits it, else an I/O thread."""
        self._inflight += 1
        if self._aio is not None:
            self._aio.pending.append(request)
        else:
            self._jobs.put(request)

    def _execute(
        self,
        memory: GuestMemory,
        kind: int,
        data_out: list[Segment],
        data_in: list[Segment],
    ) -> int:
        if kind == VIRTIO_BLK_T_FLUSH:
            self._flush()
            return 0
        if kind == VIRTIO_BLK_T_GET_ID:
            return self._get_id(memory, data_in)
        if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self._discard_or_zero(memory, kind, data_out)
            return 0
        raise RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {kind} is not supported")

    def _check_range(self, sector: int, length: int) -> None:
        if length % SECTOR_SIZE:
            raise RequestError(
                VIRTIO_BLK_S_IOERR, f"data length {length} is not a multiple of 512 bytes"
            )
        if sector + (length >> SECTOR_SHIFT) > self.capacity:
            raise RequestError(
                VIRTIO_BLK_S_IOERR,
                f"sectors {sector}+{length >> SECTOR_SHIFT} are beyond the capacity "
                f"{self.capacity}",
            )

    def _fd_for(self, segments: Sequence[Segment], offset: int, length: int) -> int:
        if self._direct_fd < 0:
            return self._fd
        bits = offset | length
        for addr, size in segments:
            bits |= addr | size
        return self._fd_for_bits(bits)

    def _fd_for_bits(self, bits: int) -> int:
        """The O_DIRECT descriptor if ``bits`` (every offset, length and address of a request
        OR-ed together) meets its alignment, a power of two; the buffered one otherwise."""
        if self._direct_fd < 0 or bits & (self._direct_align - 1):
            return self._fd
        return self._direct_fd

    # --- native AIO (worker thread) -----------------------------------------------------------

    def _aio_submit(self, memory: GuestMemory) -> None:
        """Submit what waits for a slot; a request the kernel refuses fails with IOERR."""
        aio = self._aio
        assert aio is not None
        while refused := aio.submit_pending(memory):
            for request, exc in refused:
                if self._retry_buffered(request, exc.errno):
                    aio.pending.append(request)
                    continue
                self._log_io_error(exc)
                request.status = VIRTIO_BLK_S_IOERR
                self._done.append(request)

    def _retry_buffered(self, request: _IoRequest, error: int | None) -> bool:
        """EINVAL on the O_DIRECT descriptor means the backing wants stricter alignment than
        assumed: move ``request`` to the buffered descriptor (True) to be submitted again."""
        if error == errno.EINVAL and request.fd == self._direct_fd:
            request.fd = self._fd
            return True
        return False

    def _aio_collect(self, memory: GuestMemory | None) -> None:
        """Settle the kernel's completions into _done, or back into pending for the rest of a
        short transfer; then submit what is pending (without memory: drop it).
        """
        aio = self._aio
        assert aio is not None
        done = self._done
        for request, result in aio.collect():
            followers = request.followers
            if followers:
                request.followers = None
                group = [request, *followers]
                if result == request.piece:
                    for member in group:
                        member.done = member.length
                        member.status = VIRTIO_BLK_S_OK
                    done.extend(group)
                    self._counters["merged_requests"] += len(followers)
                else:
                    # Short or failed: each request goes again on its own and gets its own
                    # outcome (what moved already moves again, to the same place).
                    for member in group:
                        member.solo = True
                    aio.pending.extend(group)
                continue
            if result == request.piece:
                request.done += result
                if request.done == request.length:
                    request.status = VIRTIO_BLK_S_OK
                    done.append(request)
                    continue
            elif result < 0:
                if not self._retry_buffered(request, -result):
                    self._log_io_error(OSError(-result, os.strerror(-result)))
                    request.status = VIRTIO_BLK_S_IOERR
                    done.append(request)
                    continue
            elif result == 0 and memory is not None:
                if request.write:
                    _log.debug("%s: the disk accepted no more bytes", self.name)
                    request.status = VIRTIO_BLK_S_IOERR
                else:
                    # End of file (the image shrank): the rest reads as zeroes.
                    for addr, size in _split(request.segments, request.done)[1]:
                        memory.slice(addr, size)[:] = bytes(size)
                    request.status = VIRTIO_BLK_S_OK
                done.append(request)
                continue
            else:
                request.done += result  # a short transfer: the rest goes out again
            aio.pending.append(request)
        if memory is not None:
            if aio.pending:
                self._aio_submit(memory)
        else:
            # The device is stopping without publishing: nothing more goes to the kernel.
            while aio.pending:
                request = aio.pending.popleft()
                request.memory = None  # type: ignore[assignment]
                self._inflight -= 1

    # --- the I/O threads ----------------------------------------------------------------------

    def _io_loop(self) -> None:
        name_os_thread()
        jobs, done, done_fd = self._jobs, self._done, self._done_fd
        while (request := jobs.get()) is not None:
            try:
                self._perform(request)
            except RequestError as exc:
                request.status = exc.status
            except Exception as exc:
                # A bug here must not lose the request: it fails with IOERR and is logged.
                request.status = VIRTIO_BLK_S_IOERR
                _log.error("%s: a request failed unexpectedly", self.name, exc_info=exc)
            done.append(request)
            if not self._done_signalled:
                self._done_signalled = True
                os.eventfd_write(done_fd, 1)
            del request

    def _perform(self, request: _IoRequest) -> None:
        memory, segments, length = request.memory, request.segments, request.length
        done = self._transfer(
            memory, request.fd, segments, request.offset, length, write=request.write
        )
        if done < length:
            if request.write:
                raise RequestError(VIRTIO_BLK_S_IOERR, "the disk accepted no more bytes")
            # End of file (the image shrank): the rest reads as zeroes.
            for addr, size in _split(segments, done)[1]:
                memory.slice(addr, size)[:] = bytes(size)
        request.status = VIRTIO_BLK_S_OK

    def _transfer(
        self,
        memory: GuestMemory,
        fd: int,
        segments: list[Segment],
        offset: int,
        length: int,
        *,
        write: bool,
    ) -> int:
        """Move the ``length`` bytes of ``segments`` between ``fd`` at ``offset`` and guest
        memory; returns the bytes moved (fewer at end of file).
        """
        done = 0
        pending = segments
        slice_ = memory.slice
        while pending:
            batch = pending if len(pending) <= _IOV_MAX else pending[:_IOV_MAX]
            views = [slice_(addr, size) for addr, size in batch]
            try:
                if write:
                    count = os.pwritev(fd, views, offset + done)
                else:
                    count = os.preadv(fd, views, offset + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and fd == self._direct_fd:
                    # The backing wants stricter O_DIRECT alignment than assumed.
                    fd = self._fd
                    continue
                self._log_io_error(exc)
                raise RequestError(VIRTIO_BLK_S_IOERR, f"disk I/O failed: {exc}") from exc
            finally:
                for view in views:
                    view.release()
            if count == 0:
                break
            done += count
            if done == length:
                break
            pending = _split(pending, count)[1]
        return done

    # --- barriers and small requests (worker thread) ------------------------------------------

    def _flush(self) -> None:
        self._counters["flush_ops"] += 1
        if self.readonly:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._log_io_error(exc)
            raise RequestError(VIRTIO_BLK_S_IOERR, f"flushing the disk failed: {exc}") from exc

    def _get_id(self, memory: GuestMemory, segments: list[Segment]) -> int:
        self._counters["get_id_ops"] += 1
        done = 0
        for addr, size in segments:
            count = min(size, VIRTIO_BLK_ID_BYTES - done)
            if count <= 0:
                break
            memory.slice(addr, count)[:] = self.serial[done : done + count]
            done += count
        return done

    def _discard_or_zero(self, memory: GuestMemory, kind: int, segments: list[Segment]) -> None:
        name = "discard" if kind == VIRTIO_BLK_T_DISCARD else "write_zeroes"
        self._counters[f"{name}_ops"] += 1
        length = sum(size for _, size in segments)
        if length == 0 or length % DISCARD_SEGMENT.size:
            raise RequestError(
                VIRTIO_BLK_S_IOERR, f"{name} data of {length} bytes is not whole segments"
            )
        if length // DISCARD_SEGMENT.size > MAX_DISCARD_SEGMENTS:
            raise RequestError(
                VIRTIO_BLK_S_IOERR,
                f"{name} has more than {MAX_DISCARD_SEGMENTS} segments",
            )
        data = _gather(memory, segments)
        ranges = []
        for start, count, flags in DISCARD_SEGMENT.iter_unpack(data):
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (
                kind == VIRTIO_BLK_T_DISCARD and flags
            ):
                raise RequestError(VIRTIO_BLK_S_UNSUPP, f"{name} flags {flags:#x} are unknown")
            if count > MAX_DISCARD_SECTORS or start + count > self.capacity:
                raise RequestError(
                    VIRTIO_BLK_S_IOERR,
                    f"{name} of sectors {start}+{count} is beyond the capacity {self.capacity}",
                )
            ranges.append((start << SECTOR_SHIFT, count << SECTOR_SHIFT, flags))
        if self.readonly:
            raise RequestError(VIRTIO_BLK_S_IOERR, "the disk is read-only")
        for offset, size, flags in ranges:
            if size:
                self._apply_range(kind, offset, size, flags)

    def _apply_range(self, kind: int, offset: int, size: int, flags: int) -> None:
        if kind == VIRTIO_BLK_T_DISCARD or flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        else:
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        try:
            fallocate(self._fd, mode, offset, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._log_io_error(exc)
                raise RequestError(VIRTIO_BLK_S_IOERR, f"fallocate failed: {exc}") from exc
        if kind == VIRTIO_BLK_T_DISCARD:
            return  # Discarding is a hint; a backing that cannot punch holes keeps the data.
        zeroes = bytes(min(size, _ZERO_CHUNK))
        try:
            while size:
                count = os.pwrite(self._fd, zeroes[: min(size, len(zeroes))], offset)
                if count == 0:
                    raise RequestError(VIRTIO_BLK_S_IOERR, "the disk accepted no more bytes")
                offset += count
                size -= count
        except OSError as exc:
            self._log_io_error(exc)
            raise RequestError(VIRTIO_BLK_S_IOERR, f"writing zeroes failed: {exc}") from exc

    def _log_io_error(self, exc: OSError) -> None:
        if not self._logged_io_error:
            self._logged_io_error = True
            _log.error("%s: I/O on the backing file failed: %s", self.name, exc)


RequestFraming = tuple[list[Segment], list[Segment], list[Segment], int]
"""A request's header buffers, device-readable data, device-writable data and status address."""


def split_request(chain: DescriptorChain) -> RequestFraming | None:
    """Split a chain into header (at most 16 bytes), readable data, writable data and the
    address of the status byte (the last writable byte); None without a writable byte.

    Empty buffers are left out. The header may be short; the caller checks it.
    """
    descriptors = chain.descriptors
    readable_count = chain.readable_count
    first, last = descriptors[0], descriptors[-1]
    if (
        readable_count
        and readable_count < len(descriptors)
        and first.len == REQUEST_HEADER.size
        and last.len == 1
    ):
        # The framing drivers use (Linux's virtio_blk among them), taken without _split: the
        # header alone in the first descriptor, the status byte alone in the last one.
        return (
            [(first.addr, REQUEST_HEADER.size)],
            [(d.addr, d.len) for d in descriptors[1:readable_count] if d.len],
            [(d.addr, d.len) for d in descriptors[readable_count:-1] if d.len],
            last.addr,
        )
    return split_request_anyhow(chain)


def split_request_anyhow(chain: DescriptorChain) -> RequestFraming | None:
    """:func:`split_request` for any framing (2.6.4): buffers split wherever they fall."""
    writable = [(d.addr, d.len) for d in chain.writable() if d.len]
    if not writable:
        return None
    status_addr = writable[-1][0] + writable[-1][1] - 1
    data_in, _ = _split(writable, sum(length for _, length in writable) - 1)
    readable = [(d.addr, d.len) for d in chain.readable() if d.len]
    header, data_out = _split(readable, REQUEST_HEADER.size)
    return header, data_out, data_in, status_addr


def coalesce(memory: GuestMemory, segments: Sequence[Segment]) -> list[Segment]:
    """``segments`` with each run of touching buffers in one memory region made one buffer.

    A driver's scatter list often names consecutive pages one by one; handed to the kernel as
    one iovec, they cost one slice here and, on some backings (9p with O_DIRECT, say), one
    request instead of one per page. The region is looked up when a run starts, not for each
    buffer: a buffer joins the run before it if it starts where that run ends and ends inside
    the run's region.
    """
    merged: list[Segment] = []
    if not segments:
        return merged
    start = end = 0  # the region of the current run (empty: look it up)
    run_addr, run_size = segments[0]
    for addr, size in segments[1:]:
        if addr == run_addr + run_size:
            if not start <= run_addr < end:
                region = memory.find_region(run_addr)
                start, end = (0, 0) if region is None else (region.start, region.end)
            if addr + size <= end:
                run_size += size
                continue
        merged.append((run_addr, run_size))
        run_addr, run_size = addr, size
    merged.append((run_addr, run_size))
    return merged


def _gather(memory: GuestMemory, segments: Sequence[Segment]) -> bytes:
    """Copy the (small) contents of ``segments``: a header or discard segments."""
    if len(segments) == 1:
        return memory.read(*segments[0])
    return b"".join(memory.read(addr, size) for addr, size in segments)


def _read_bytes(source: bytes, offset: int, data: memoryview) -> None:
    """Fill ``data`` from ``source`` at ``offset``; anything outside ``source`` reads as zero."""
    length = len(data)
    chunk = source[offset : offset + length] if 0 <= offset < len(source) else b""
    data[: len(chunk)] = chunk
    data[len(chunk) :] = bytes(length - len(chunk))
