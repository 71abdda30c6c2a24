"""Linux native AIO (``io_setup(2)``, ``io_submit(2)``, ``io_getevents(2)``) through raw syscalls.

The C library does not wrap these system calls (libaio does, and nubis does not depend on it),
and Python does not either, so they go through ``syscall(2)`` with ctypes, on x86_64 only. The
two structures of ``<linux/aio_abi.h>`` are declared once as ``ctypes.Structure`` (the
reference, pinned by tests against the header) and once as ``struct.Struct`` (what the hot path
packs and unpacks, faster than ctypes attribute access); a test checks that both agree.

Native AIO is only asynchronous for files opened ``O_DIRECT``: on a buffered file ``io_submit``
does the copy itself before it returns. Completions are counted on an eventfd named in each
iocb (``IOCB_FLAG_RESFD``), so a device worker's epoll learns about them without a thread.

Completions are read without a system call where the kernel allows it: ``io_setup`` maps the
context's completion ring (``struct aio_ring`` of ``fs/aio.c``) into the process at the address
it returns as the context handle. The kernel appends each ``io_event`` at ``tail``; whoever
consumes events advances ``head``, which is what ``io_getevents`` does in the kernel and what
the kernel reads back to know how much room the ring has. :meth:`AioContext.take_events` does
the same in user space when the ring's header carries the magic number and no incompatible
feature bits (the kernel's promise that this layout holds), and says so otherwise, so the caller
falls back to ``io_getevents``.

:class:`AioContext` is a thin object over one kernel AIO context. Every call goes through the
``syscall`` callable it was created with, which tests replace to inject short submissions and
``EAGAIN``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable

__all__ = [
    "AIO_RING",
    "AIO_RING_MAGIC",
    "IOCB",
    "IOCB_CMD_PREADV",
    "IOCB_CMD_PWRITEV",
    "IOCB_FLAG_RESFD",
    "IOVEC",
    "IO_EVENT",
    "SYS_IO_DESTROY",
    "SYS_IO_GETEVENTS",
    "SYS_IO_SETUP",
    "SYS_IO_SUBMIT",
    "AioContext",
    "IoEvent",
    "Iocb",
    "Syscall",
    "syscall",
]

# <asm/unistd_64.h>
SYS_IO_SETUP = 206
SYS_IO_DESTROY = 207
SYS_IO_GETEVENTS = 208
SYS_IO_SUBMIT = 209

# <linux/aio_abi.h>: aio_lio_opcode values and aio_flags bits.
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8
IOCB_FLAG_RESFD = 1


class Iocb(ctypes.Structure):
    """struct iocb (<linux/aio_abi.h>, little-endian field order): 64 bytes."""

    _fields_ = (
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_uint32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    )


class IoEvent(ctypes.Structure):
    """struct io_event (<linux/aio_abi.h>): 32 bytes."""

    _fields_ = (
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    )


#: :class:`Iocb` as a ``struct.Struct``, in field order.
IOCB = struct.Struct("<QIIHhIQQqQII")
#: :class:`IoEvent` as a ``struct.Struct``: data, obj, res, res2.
IO_EVENT = struct.Struct("<QQqq")
#: struct iovec (<linux/uio.h>): base address, length.
IOVEC = struct.Struct("<QQ")
#: The header of struct aio_ring (fs/aio.c): id, nr (events the ring holds), head, tail, magic,
#: compat_features, incompat_features, header_length; ``nr`` io_events follow it.
AIO_RING = struct.Struct("<8I")
AIO_RING_MAGIC = 0xA10A10A1
_RING_HEAD = 2  # u32 index of head in the header
_RING_TAIL = 3

Syscall = Callable[[int, int, int, int, int, int], int]
"""``syscall(2)`` with the number and five arguments (unused ones 0); -1 and errno on failure."""

_libc = ctypes.CDLL(None, use_errno=True)
# Fetched by item, not attribute, so that these argtypes stay private to this module.
_syscall = _libc["syscall"]
_syscall.argtypes = [ctypes.c_long] * 6
_syscall.restype = ctypes.c_long
syscall: Syscall = _syscall
"""The real ``syscall(2)`` (the GIL is released while it runs)."""


# A zero struct timespec: io_getevents returns at once with what has completed.
_NO_WAIT = (ctypes.c_int64 * 2)()
_NO_WAIT_ADDRESS = ctypes.addressof(_NO_WAIT)


def _error(name: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{name} failed: {os.strerror(err)}")


class AioContext:
    """One kernel AIO context able to hold ``nr_events`` requests in flight.

    Raises OSError when the kernel refuses one (ENOSYS without CONFIG_AIO, EAGAIN when
    ``fs.aio-max-nr`` is exhausted).
    """

    def __init__(self, nr_events: int, *, call: Syscall | None = None) -> None:
        self._call: Syscall = syscall if call is None else call
        handle = ctypes.c_ulong(0)
        if self._call(SYS_IO_SETUP, nr_events, ctypes.addressof(handle), 0, 0, 0) < 0:
            raise _error("io_setup")
        self.handle: int = handle.value
        self.nr_events = nr_events
        self._ring: memoryview | None = None
        self._ring_words = memoryview(b"").cast("I")
        self._ring_size = 0
        # A replaced ``syscall`` stands for the kernel in tests: completions then go through it.
        if self._call is _syscall:
            self._map_ring()

    def _map_ring(self) -> None:
        """Use the completion ring at the context's address if its header is one nubis knows."""
        header = AIO_RING.unpack(bytes((ctypes.c_char * AIO_RING.size).from_address(self.handle)))
        _id, size, head, tail, magic, _compat, incompat, header_length = header
        if (
            magic != AIO_RING_MAGIC
            or incompat
            or header_length != AIO_RING.size
            or not size
            or head >= size
            or tail >= size
        ):
            return
        raw = (ctypes.c_char * (AIO_RING.size + IO_EVENT.size * size)).from_address(self.handle)
        self._ring = memoryview(raw).cast("B")
        self._ring_words = self._ring[: AIO_RING.size].cast("I")
        self._ring_size = size

    @property
    def user_ring(self) -> bool:
        """Whether :meth:`take_events` reads completions in user space."""
        return self._ring is not None

    def submit(self, iocb_pointers: int, count: int) -> int:
        """Submit ``count`` iocbs from the array of pointers at host address ``iocb_pointers``.

        Returns how many the kernel took (the first ones; maybe fewer than ``count``); raises
        OSError when it took none (EAGAIN: no room; otherwise the first iocb is bad).
        """
        taken = self._call(SYS_IO_SUBMIT, self.handle, count, iocb_pointers, 0, 0)
        if taken < 0:
            raise _error("io_submit")
        return taken

    def get_events(self, events: int, max_events: int) -> int:
        """Copy up to ``max_events`` completions to the io_event array at host address
        ``events`` without waiting; returns how many.
        """
        count = self._call(SYS_IO_GETEVENTS, self.handle, 0, max_events, events, _NO_WAIT_ADDRESS)
        if count < 0:
            raise _error("io_getevents")
        return count

    def take_events(self) -> list[tuple[int, int]] | None:
        """Consume every completion in the ring: ``(aio_data, res)`` pairs, oldest first.

        Returns None when the ring cannot be read in user space (use :meth:`get_events`).
        Raises OSError if the ring's indices are out of range, which the kernel never does.
        """
        ring = self._ring
        if ring is None:
            return None
        words = self._ring_words
        head = words[_RING_HEAD]
        tail = words[_RING_TAIL]
        if head == tail:
            return []
        size = self._ring_size
        if head >= size or tail >= size:
            raise OSError(errno.EIO, f"the AIO completion ring has head {head}, tail {tail}")
        start = AIO_RING.size
        step = IO_EVENT.size
        # Every event is read (copied out) before head moves, so the kernel cannot reuse its
        # slot under us; on x86 the store to head is not reordered before those loads.
        if head < tail:
            events = list(IO_EVENT.iter_unpack(ring[start + step * head : start + step * tail]))
        else:
            events = list(IO_EVENT.iter_unpack(ring[start + step * head : start + step * size]))
            events += IO_EVENT.iter_unpack(ring[start : start + step * tail])
        words[_RING_HEAD] = tail
        return [(data, result) for data, _obj, result, _res2 in events]

    def destroy(self) -> None:
        """Release the context (the kernel waits for requests still in flight); idempotent."""
        if self.handle:
            handle, self.handle = self.handle, 0
            if self._ring is not None:
                self._ring_words.release()
                self._ring.release()
                self._ring = None
            if self._call(SYS_IO_DESTROY, handle, 0, 0, 0, 0) < 0:
                raise _error("io_destroy")
