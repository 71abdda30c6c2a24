"""Exits reach the buses, and what KVM completes in the kernel never reaches them.

Each guest is a few real-mode instructions loaded at 0x1000 (see kvm_guest.py); it ends with
HLT, which without an in-kernel irqchip ends the vCPU thread with a GuestHalted event.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
from kvm_guest import RecordingBus, TinyVm, run_to_event

from nubis.kvm import Hlt, IoIn, IoOut, Kvm, KvmError, MmioWrite
from nubis.vmm.vcpu import GuestHalted

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(30)]

# Read port 0x10, add one, write it back to port 0x10.
PIO_ADD_ONE = bytes.fromhex(
    "ba1000"  # mov dx, 0x10
    "ec"  # in al, dx
    "fec0"  # inc al
    "ee"  # out dx, al
    "f4"  # hlt
)

# Read the byte at 0x20000 (no memory slot there), add one, write it to 0x20004.
MMIO_ADD_ONE = bytes.fromhex(
    "b80020"  # mov ax, 0x2000
    "8ed8"  # mov ds, ax
    "a00000"  # mov al, [0x0]
    "fec0"  # inc al
    "a20400"  # mov [0x4], al
    "f4"  # hlt
)

# Read the byte at 0x30000 (a read-only slot), try to overwrite it, report what was read.
READONLY_SLOT = bytes.fromhex(
    "b80030"  # mov ax, 0x3000
    "8ed8"  # mov ds, ax
    "a00000"  # mov al, [0x0]
    "c606000077"  # mov byte [0x0], 0x77
    "e610"  # out 0x10, al
    "f4"  # hlt
)

# Write 1 to port 0x500 and to 0x20008 (both ioeventfds), then 1 to port 0x10.
IOEVENTFD_WRITES = bytes.fromhex(
    "b001"  # mov al, 1
    "ba0005"  # mov dx, 0x500
    "ee"  # out dx, al
    "bb0020"  # mov bx, 0x2000
    "8edb"  # mov ds, bx
    "a20800"  # mov [0x8], al
    "e610"  # out 0x10, al
    "f4"  # hlt
)

# rep outsb 4 bytes from 0x3000 to port 0x10, rep insb 4 bytes from port 0x10 to 0x3100.
REP_STRING_IO = bytes.fromhex(
    "be0030"  # mov si, 0x3000
    "b90400"  # mov cx, 4
    "ba1000"  # mov dx, 0x10
    "f36e"  # rep outsb
    "bf0031"  # mov di, 0x3100
    "b90400"  # mov cx, 4
    "f36c"  # rep insb
    "f4"  # hlt
)

# Write a byte to 0x5000 and a word to 0x9004.
DIRTY_TWO_PAGES = bytes.fromhex(
    "c606005001"  # mov byte [0x5000], 1
    "c70604900200"  # mov word [0x9004], 2
    "f4"  # hlt
)


def test_port_in_data_returns_to_the_guest(tiny_vm: TinyVm) -> None:
    tiny_vm.load(PIO_ADD_ONE)
    pio = RecordingBus(values={0x10: b"\x29"})
    event = run_to_event(tiny_vm, pio)
    assert isinstance(event, GuestHalted)
    assert pio.reads == [(0x10, 1)]
    assert pio.writes == [(0x10, b"\x2a")]


def test_raw_exits_carry_port_size_and_data(tiny_vm: TinyVm) -> None:
    tiny_vm.load(PIO_ADD_ONE)
    exit_ = tiny_vm.vcpu.run()
    assert isinstance(exit_, IoIn)
    assert (exit_.port, exit_.size, exit_.count, len(exit_.data)) == (0x10, 1, 1, 1)
    exit_.data[0] = 0x7F
    exit_ = tiny_vm.vcpu.run()
    assert isinstance(exit_, IoOut)
    assert bytes(exit_.data) == b"\x80"
    assert isinstance(tiny_vm.vcpu.run(), Hlt)


def test_mmio_exits_reach_the_mmio_bus(tiny_vm: TinyVm) -> None:
    tiny_vm.load(MMIO_ADD_ONE)
    mmio = RecordingBus(values={0x20000: b"\x10"})
    event = run_to_event(tiny_vm, RecordingBus(), mmio)
    assert isinstance(event, GuestHalted)
    assert mmio.reads == [(0x20000, 1)]
    assert mmio.writes == [(0x20004, b"\x11")]


def test_unmapped_mmio_read_returns_all_ones(tiny_vm: TinyVm) -> None:
    tiny_vm.load(MMIO_ADD_ONE)
    mmio = RecordingBus(mapped={0x20004})
    run_to_event(tiny_vm, RecordingBus(), mmio)
    assert mmio.writes == [(0x20004, b"\x00")]  # 0xff + 1


def test_readonly_slot_turns_writes_into_mmio_exits(tiny_vm: TinyVm) -> None:
    backing = mmap.mmap(-1, 0x1000)
    backing[0] = 0x33
    anchor = ctypes.c_char.from_buffer(backing)
    tiny_vm.vm.set_user_memory_region(1, 0x30000, 0x1000, ctypes.addressof(anchor), readonly=True)
    tiny_vm.load(READONLY_SLOT)
    pio, mmio = RecordingBus(), RecordingBus()
    run_to_event(tiny_vm, pio, mmio)
    assert mmio.writes == [(0x30000, b"\x77")]
    assert mmio.reads == []  # reads are served from the slot
    assert pio.writes == [(0x10, b"\x33")]
    assert backing[0] == 0x33
    del anchor
    backing.close()


def test_ioeventfd_completes_writes_without_an_exit(tiny_vm: TinyVm) -> None:
    port_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    mmio_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        tiny_vm.vm.register_ioevent(port_fd, 0x500, 1, pio=True, datamatch=1)
        tiny_vm.vm.register_ioevent(mmio_fd, 0x20008, 1)
        tiny_vm.load(IOEVENTFD_WRITES)
        pio, mmio = RecordingBus(), RecordingBus()
        run_to_event(tiny_vm, pio, mmio)
        assert pio.writes == [(0x10, b"\x01")]
        assert mmio.writes == []
        assert os.eventfd_read(port_fd) == 1
        assert os.eventfd_read(mmio_fd) == 1
        tiny_vm.vm.unregister_ioevent(port_fd, 0x500, 1, pio=True, datamatch=1)
        tiny_vm.vm.unregister_ioevent(mmio_fd, 0x20008, 1)
    finally:
        os.close(port_fd)
        os.close(mmio_fd)


def test_ioeventfd_datamatch_lets_other_values_exit(tiny_vm: TinyVm) -> None:
    port_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        tiny_vm.vm.register_ioevent(port_fd, 0x500, 1, pio=True, datamatch=2)
        tiny_vm.load(IOEVENTFD_WRITES)
        pio = RecordingBus()
        run_to_event(tiny_vm, pio, RecordingBus())
        assert pio.writes == [(0x500, b"\x01"), (0x10, b"\x01")]
        with pytest.raises(BlockingIOError):
            os.eventfd_read(port_fd)
    finally:
        os.close(port_fd)


def test_unregistering_an_unknown_ioeventfd_names_the_ioctl(tiny_vm: TinyVm) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with pytest.raises(KvmError, match="KVM_IOEVENTFD"):
            tiny_vm.vm.unregister_ioevent(fd, 0x600, 1, pio=True)
    finally:
        os.close(fd)


def test_rep_string_io_is_split_into_items(tiny_vm: TinyVm) -> None:
    tiny_vm.memory.write(0x3000, b"ABCD")
    tiny_vm.load(REP_STRING_IO)
    pio = RecordingBus(values={0x10: b"z"})
    run_to_event(tiny_vm, pio)
    assert pio.writes == [(0x10, b"A"), (0x10, b"B"), (0x10, b"C"), (0x10, b"D")]
    assert pio.reads == [(0x10, 1)] * 4
    assert tiny_vm.memory.read(0x3100, 4) == b"zzzz"


def test_mmio_write_exit_has_the_address(tiny_vm: TinyVm) -> None:
    tiny_vm.load(MMIO_ADD_ONE)
    first = tiny_vm.vcpu.run()
    first.data[0] = 5  # type: ignore[attr-defined]
    second = tiny_vm.vcpu.run()
    assert isinstance(second, MmioWrite)
    assert second.address == 0x20004
    assert bytes(second.data) == b"\x06"


def test_dirty_log_reports_exactly_the_written_pages(kvm: Kvm) -> None:
    tiny = TinyVm(kvm, log_dirty_pages=True)
    try:
        tiny.load(DIRTY_TWO_PAGES)
        assert tiny.vm.get_dirty_log(0, tiny.memory.regions[0].size) == []
        assert isinstance(tiny.vcpu.run(), Hlt)
        assert tiny.vm.get_dirty_log(0, tiny.memory.regions[0].size) == [5, 9]
        # Reading the log clears it.
        assert tiny.vm.get_dirty_log(0, tiny.memory.regions[0].size) == []
        assert tiny.memory.read(0x5000, 1) == b"\x01"
    finally:
        tiny.close()
