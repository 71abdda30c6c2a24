"""virtio-blk: a block device backed by a raw image file or a host block device (virtio 1.2, 5.2).

The device has one request queue. Each request is a descriptor chain holding a 16-byte header
(type, reserved, sector; 5.2.6), then data (read by the device for OUT, DISCARD and
WRITE_ZEROES; written for IN and GET_ID) and finally one status byte the device writes. Message
framing is free (2.6.4): the header and the data may be split across descriptors anyhow.

Data moves with ``os.preadv``/``os.pwritev`` straight between the backing file and guest memory
(memoryview slices of the guest mapping, no intermediate copy). FLUSH completes only after
``fdatasync``. DISCARD and WRITE_ZEROES use ``fallocate(2)``, which Python does not wrap, through
ctypes. Everything in a request is guest-controlled: sectors and lengths are checked against the
capacity and a malformed request gets an IOERR or UNSUPP status, never an exception.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nubis._log import getLogger
from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceType,
)
from nubis.virtio.queue import DescriptorChain
from nubis.virtio.worker import QueueDevice

if TYPE_CHECKING:
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

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call ``fallocate(2)``; raises OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


Segment = tuple[int, int]
"""A guest buffer: (guest address, length)."""


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


class Block(QueueDevice):
    """A virtio block device over a raw image file or a host block device (5.2).

    ``readonly`` opens the backing O_RDONLY and offers VIRTIO_BLK_F_RO; ``direct`` opens it
    O_DIRECT (misaligned guest buffers then go through a second, buffered descriptor);
    ``serial`` is the GET_ID answer (at most 20 bytes; derived from the file otherwise).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        direct: bool = False,
        serial: str | bytes | None = None,
        queue_size: int = 256,
    ) -> None:
        """Open ``path`` and size the disk; raises OSError or ValueError with one clear sentence."""
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
            ),
            0,
        )
        self._logged_io_error = False

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

    def on_shutdown(self) -> None:
        """Flush the backing file and close it."""
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

    # --- requests -----------------------------------------------------------------------------

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        """Execute one request; returns the bytes written to the chain (data and status)."""
        memory = self.memory
        assert memory is not None
        writable = [(d.addr, d.len) for d in chain.writable() if d.len]
        if not writable:
            # Without a status byte there is no way to answer; give the chain back untouched.
            self._counters["malformed_requests"] += 1
            return 0
        status_addr = writable[-1][0] + writable[-1][1] - 1
        data_in, _ = _split(writable, sum(length for _, length in writable) - 1)
        readable = [(d.addr, d.len) for d in chain.readable() if d.len]
        written = 0
        try:
            header, data_out = _split(readable, REQUEST_HEADER.size)
            if sum(length for _, length in header) < REQUEST_HEADER.size:
                self._counters["malformed_requests"] += 1
                raise RequestError(VIRTIO_BLK_S_IOERR, "the request header is short")
            kind, _reserved, sector = REQUEST_HEADER.unpack(_gather(memory, header))
            written = self._execute(memory, kind, sector, data_out, data_in)
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

    def _execute(
        self,
        memory: GuestMemory,
        kind: int,
        sector: int,
        data_out: list[Segment],
        data_in: list[Segment],
    ) -> int:
        if kind == VIRTIO_BLK_T_IN:
            return self._read(memory, sector, data_in)
        if kind == VIRTIO_BLK_T_OUT:
            self._write(memory, sector, data_out)
            return 0
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
        align = self._direct_align
        if offset % align or length % align:
            return self._fd
        for addr, size in segments:
            if addr % align or size % align:
                return self._fd
        return self._direct_fd

    def _read(self, memory: GuestMemory, sector: int, segments: list[Segment]) -> int:
        length = sum(size for _, size in segments)
        self._check_range(sector, length)
        offset = sector << SECTOR_SHIFT
        fd = self._fd_for(segments, offset, length)
        done = self._transfer(memory, fd, segments, offset, write=False)
        if done < length:
            # End of file (the image shrank): the rest reads as zeroes.
            for addr, size in _split(segments, done)[1]:
                memory.slice(addr, size)[:] = bytes(size)
        self._counters["read_ops"] += 1
        self._counters["read_bytes"] += length
        return length

    def _write(self, memory: GuestMemory, sector: int, segments: list[Segment]) -> None:
        if self.readonly:
            raise RequestError(VIRTIO_BLK_S_IOERR, "the disk is read-only")
        length = sum(size for _, size in segments)
        self._check_range(sector, length)
        offset = sector << SECTOR_SHIFT
        fd = self._fd_for(segments, offset, length)
        if self._transfer(memory, fd, segments, offset, write=True) < length:
            raise RequestError(VIRTIO_BLK_S_IOERR, "the disk accepted no more bytes")
        self._counters["write_ops"] += 1
        self._counters["write_bytes"] += length

    def _transfer(
        self, memory: GuestMemory, fd: int, segments: list[Segment], offset: int, *, write: bool
    ) -> int:
        """Move bytes between ``fd`` at ``offset`` and guest memory; returns bytes moved."""
        done = 0
        pending = segments
        while pending:
            batch = pending[:_IOV_MAX]
            views = [memory.slice(addr, size) for addr, size in batch]
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
            pending = _split(pending, count)[1]
        return done

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
