"""Pin nubis.virtio.aio to <linux/aio_abi.h> and exercise one real AIO context.

The sizes and offsets were compiled from the kernel UAPI header (x86_64, gcc ``sizeof`` and
``offsetof``); where the header is installed (``linux-libc-dev``), the constants and the field
order are also read from it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import select
from pathlib import Path

import pytest

from nubis.virtio import aio

AIO_ABI_H = Path("/usr/include/linux/aio_abi.h")
UNISTD_64_H = [
    Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    Path("/usr/include/asm/unistd_64.h"),
]

IOCB_OFFSETS = {
    "aio_data": 0,
    "aio_key": 8,
    "aio_rw_flags": 12,
    "aio_lio_opcode": 16,
    "aio_reqprio": 18,
    "aio_fildes": 20,
    "aio_buf": 24,
    "aio_nbytes": 32,
    "aio_offset": 40,
    "aio_reserved2": 48,
    "aio_flags": 56,
    "aio_resfd": 60,
}
IO_EVENT_OFFSETS = {"data": 0, "obj": 8, "res": 16, "res2": 24}


def test_struct_sizes_and_offsets() -> None:
    assert ctypes.sizeof(aio.Iocb) == aio.IOCB.size == 64
    assert ctypes.sizeof(aio.IoEvent) == aio.IO_EVENT.size == 32
    assert aio.IOVEC.size == 16
    for name, offset in IOCB_OFFSETS.items():
        assert getattr(aio.Iocb, name).offset == offset, name
    for name, offset in IO_EVENT_OFFSETS.items():
        assert getattr(aio.IoEvent, name).offset == offset, name


def test_numbers() -> None:
    assert (aio.SYS_IO_SETUP, aio.SYS_IO_DESTROY) == (206, 207)
    assert (aio.SYS_IO_GETEVENTS, aio.SYS_IO_SUBMIT) == (208, 209)
    assert (aio.IOCB_CMD_PREADV, aio.IOCB_CMD_PWRITEV, aio.IOCB_FLAG_RESFD) == (7, 8, 1)


def test_packed_structs_match_the_ctypes_ones() -> None:
    # Distinct values in every field, with the sign bit set in the signed ones.
    values = [
        0x0102030405060708,
        0x11121314,
        0x21222324,
        0x3132,
        -2,
        0x41424344,
        0x5152535455565758,
        0x6162636465666768,
        -3,
        0x8182838485868788,
        0x91929394,
        0xA1A2A3A4,
    ]
    iocb = aio.Iocb(*values)
    assert aio.IOCB.pack(*values) == bytes(iocb)
    event = aio.IoEvent(1, 2, -5, -6)
    assert aio.IO_EVENT.unpack(bytes(event)) == (1, 2, -5, -6)


def _header_text() -> str:
    if not AIO_ABI_H.exists():
        pytest.skip(f"{AIO_ABI_H} is not installed (package linux-libc-dev)")
    return AIO_ABI_H.read_text()


def test_constants_match_the_header() -> None:
    text = _header_text()
    constants = dict(re.findall(r"\b(IOCB_CMD_\w+)\s*=\s*(\d+)", text))
    assert int(constants["IOCB_CMD_PREADV"]) == aio.IOCB_CMD_PREADV
    assert int(constants["IOCB_CMD_PWRITEV"]) == aio.IOCB_CMD_PWRITEV
    match = re.search(r"#define\s+IOCB_FLAG_RESFD\s+\(1 << (\d+)\)", text)
    assert match is not None and 1 << int(match.group(1)) == aio.IOCB_FLAG_RESFD
    for header in UNISTD_64_H:
        if header.exists():
            numbers = dict(re.findall(r"#define __NR_(io_\w+)\s+(\d+)", header.read_text()))
            assert int(numbers["io_setup"]) == aio.SYS_IO_SETUP
            assert int(numbers["io_destroy"]) == aio.SYS_IO_DESTROY
            assert int(numbers["io_getevents"]) == aio.SYS_IO_GETEVENTS
            assert int(numbers["io_submit"]) == aio.SYS_IO_SUBMIT
            break


def _fields(text: str, struct_name: str) -> list[str]:
    body = re.search(r"struct " + struct_name + r" \{(.*?)\n\};", text, re.S)
    assert body is not None
    lines = body.group(1)
    # struct iocb orders aio_key and aio_rw_flags by byte order; x86_64 is little-endian.
    lines = re.sub(r"#elif.*?#endif", "", lines, flags=re.S)
    lines = re.sub(r"/\*.*?\*/", "", lines, flags=re.S)
    return re.findall(r"(\w+);", lines)


def test_field_order_matches_the_header() -> None:
    text = _header_text()
    assert _fields(text, "iocb") == [name for name, _ in aio.Iocb._fields_]
    assert _fields(text, "io_event") == [name for name, _ in aio.IoEvent._fields_]


def test_a_context_reads_a_file_and_signals_the_eventfd(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 32)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    resfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        context = aio.AioContext(4)
    except OSError as exc:
        os.close(fd)
        os.close(resfd)
        pytest.skip(f"the kernel refuses an AIO context: {exc}")
    buffer = mmap.mmap(-1, 4096)
    try:
        anchor = ctypes.c_char.from_buffer(buffer)
        iovec = ctypes.create_string_buffer(aio.IOVEC.pack(ctypes.addressof(anchor), 1000))
        del anchor
        iocb = ctypes.create_string_buffer(
            aio.IOCB.pack(
                77,
                0,
                0,
                aio.IOCB_CMD_PREADV,
                0,
                fd,
                ctypes.addressof(iovec),
                1,
                300,
                0,
                aio.IOCB_FLAG_RESFD,
                resfd,
            )
        )
        pointers = (ctypes.c_uint64 * 1)(ctypes.addressof(iocb))
        assert context.submit(ctypes.addressof(pointers), 1) == 1
        assert select.select([resfd], [], [], 10)[0] == [resfd]
        events = ctypes.create_string_buffer(aio.IO_EVENT.size * 4)
        assert context.get_events(ctypes.addressof(events), 4) == 1
        data, obj, res, _ = aio.IO_EVENT.unpack_from(events)
        assert (data, obj, res) == (77, ctypes.addressof(iocb), 1000)
        assert buffer[:1000] == path.read_bytes()[300:1300]
        # Nothing more has completed: the call does not wait.
        assert context.get_events(ctypes.addressof(events), 4) == 0
    finally:
        context.destroy()
        context.destroy()  # idempotent
        buffer.close()
        os.close(fd)
        os.close(resfd)


def test_failures_raise_oserror_with_errno() -> None:
    def refusing(number: int, *args: int) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    with pytest.raises(OSError, match="io_setup failed") as info:
        aio.AioContext(8, call=refusing)
    assert info.value.errno == errno.ENOSYS
    context = aio.AioContext(8)
    try:
        # A null iocb pointer array: the kernel refuses the first iocb.
        with pytest.raises(OSError, match="io_submit failed") as info:
            context.submit(0, 1)
        assert info.value.errno == errno.EFAULT
    finally:
        context.destroy()


def _ring_header(context: aio.AioContext) -> tuple[int, ...]:
    raw = ctypes.string_at(context.handle, aio.AIO_RING.size)
    return aio.AIO_RING.unpack(raw)


def test_completions_are_read_from_the_ring_in_user_space_across_its_wrap(tmp_path: Path) -> None:
    """take_events consumes what io_getevents would, in order, and the kernel sees it consumed.

    Enough rounds go through the ring to wrap its indices more than once; each round's reads
    land at known offsets of a file of known bytes.
    """
    data = bytes(range(256)) * 64
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    resfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    context = aio.AioContext(8)
    try:
        assert context.user_ring
        _id, size, head, tail, magic, _compat, incompat, header_length = _ring_header(context)
        assert (magic, incompat, header_length) == (aio.AIO_RING_MAGIC, 0, aio.AIO_RING.size)
        assert head == tail == 0 and size >= 8
        buffers = [ctypes.create_string_buffer(64) for _ in range(3)]
        iovecs = [
            ctypes.create_string_buffer(aio.IOVEC.pack(ctypes.addressof(b), 64)) for b in buffers
        ]
        scratch = ctypes.create_string_buffer(aio.IO_EVENT.size * 8)
        rounds = 2 * size // 3 + 5
        for round_ in range(rounds):
            offsets = [(round_ * 3 + i) * 17 % (len(data) - 64) for i in range(3)]
            iocbs = [
                ctypes.create_string_buffer(
                    aio.IOCB.pack(
                        1000 * round_ + i,
                        0,
                        0,
                        aio.IOCB_CMD_PREADV,
                        0,
                        fd,
                        ctypes.addressof(iovecs[i]),
                        1,
                        offsets[i],
                        0,
                        aio.IOCB_FLAG_RESFD,
                        resfd,
                    )
                )
                for i in range(3)
            ]
            pointers = (ctypes.c_uint64 * 3)(*(ctypes.addressof(i) for i in iocbs))
            assert context.submit(ctypes.addressof(pointers), 3) == 3
            seen: list[tuple[int, int]] = []
            while len(seen) < 3:
                assert select.select([resfd], [], [], 10)[0] == [resfd]
                os.eventfd_read(resfd)
                taken = context.take_events()
                assert taken is not None
                seen += taken
            assert sorted(seen) == [(1000 * round_ + i, 64) for i in range(3)]
            for i in range(3):
                assert buffers[i].raw == data[offsets[i] : offsets[i] + 64]
            # The kernel agrees that nothing is left, and the ring is empty again.
            assert context.get_events(ctypes.addressof(scratch), 8) == 0
            assert context.take_events() == []
            head, tail = _ring_header(context)[2:4]
            assert head == tail == (round_ + 1) * 3 % size
        assert rounds * 3 > 2 * size
    finally:
        context.destroy()
        os.close(fd)
        os.close(resfd)


def test_a_ring_index_out_of_range_is_an_error_not_a_stray_read() -> None:
    context = aio.AioContext(4)
    try:
        size = _ring_header(context)[1]
        tail = ctypes.c_uint32.from_address(context.handle + 12)
        tail.value = size + 5  # as a corrupt ring would have it
        with pytest.raises(OSError, match="AIO completion ring") as info:
            context.take_events()
        assert info.value.errno == errno.EIO
        tail.value = 0
    finally:
        context.destroy()


def test_a_replaced_syscall_reads_completions_through_io_getevents() -> None:
    calls: list[int] = []

    def call(number: int, *args: int) -> int:
        calls.append(number)
        return aio.syscall(number, *args)

    context = aio.AioContext(4, call=call)
    try:
        assert not context.user_ring
        assert context.take_events() is None
        events = ctypes.create_string_buffer(aio.IO_EVENT.size)
        assert context.get_events(ctypes.addressof(events), 1) == 0
        assert calls == [aio.SYS_IO_SETUP, aio.SYS_IO_GETEVENTS]
    finally:
        context.destroy()
