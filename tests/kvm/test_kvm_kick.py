"""Kicking vCPUs out of KVM_RUN, parking and resuming them, and irqfd interrupt delivery."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

import pytest
from kvm_guest import RecordingBus, TinyVm

from nubis.devices.ioapic import IoApic
from nubis.kvm import Interrupted, IoOut, Kvm, MpState
from nubis.vmm.interrupts import GsiRouting
from nubis.vmm.vcpu import KICK_SIGNAL, Vcpu, VcpuEvent, VcpuState, install_kick_handler

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(30)]

# Count forever: inc dword [0x600]; jmp back.
COUNT_FOREVER = bytes.fromhex(
    "66ff060006"  # incl [0x600]
    "ebf9"  # jmp -7
)

# Halt forever with interrupts disabled (with an irqchip, HLT blocks in the kernel).
HALT_FOREVER = bytes.fromhex(
    "fa"  # cli
    "f4"  # hlt
    "ebfd"  # jmp -3 (back to hlt)
)

# Program the master PIC (vectors 0x20-0x27, only IRQ 5 unmasked), point IVT entry 0x25 at
# 0x1100, report 0x11 on port 0x10, then wait in HLT with interrupts enabled. The handler at
# 0x1100 reports 0x25 on port 0x10 and halts with interrupts off.
IRQ_GUEST = bytes.fromhex(
    "b011e620"  # mov al, 0x11; out 0x20, al      ICW1: edge, cascade, ICW4 follows
    "b020e621"  # mov al, 0x20; out 0x21, al      ICW2: vector base 0x20
    "b004e621"  # mov al, 0x04; out 0x21, al      ICW3: slave on IRQ 2
    "b001e621"  # mov al, 0x01; out 0x21, al      ICW4: 8086 mode
    "b0dfe621"  # mov al, 0xdf; out 0x21, al      OCW1: mask all but IRQ 5
    "c70694000011"  # mov word [0x94], 0x1100     IVT[0x25].offset
    "c70696000000"  # mov word [0x96], 0          IVT[0x25].segment
    "b011e610"  # mov al, 0x11; out 0x10, al      "ready"
    "fb"  # sti
    "f4ebfd"  # hlt; jmp back to hlt
).ljust(0x100, b"\0") + bytes.fromhex(
    "b025e610"  # mov al, 0x25; out 0x10, al      "got vector 0x25"
    "faf4ebfd"  # cli; hlt; jmp back to hlt
)


def _counter(tiny: TinyVm) -> int:
    return int.from_bytes(tiny.memory.read(0x600, 4), "little")


def _events() -> tuple[list[VcpuEvent], threading.Event]:
    return [], threading.Event()


def test_fcntl_ioctl_returns_eintr_instead_of_retrying(tiny_vm: TinyVm) -> None:
    """A signal ends KVM_RUN with Interrupted in a non-main thread (no PEP 475 retry)."""
    install_kick_handler()
    tiny_vm.load(COUNT_FOREVER)
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(tiny_vm.vcpu.run()))
    thread.start()
    while _counter(tiny_vm) == 0:
        time.sleep(0.001)
    assert thread.ident is not None
    signal.pthread_kill(thread.ident, KICK_SIGNAL)
    thread.join(10)
    assert not thread.is_alive()
    assert len(results) == 1
    assert isinstance(results[0], Interrupted)


def test_immediate_exit_returns_without_entering_the_guest(tiny_vm: TinyVm) -> None:
    tiny_vm.load(COUNT_FOREVER)
    tiny_vm.vcpu.set_immediate_exit(True)
    assert tiny_vm.vcpu.immediate_exit
    assert isinstance(tiny_vm.vcpu.run(), Interrupted)
    assert _counter(tiny_vm) == 0
    tiny_vm.vcpu.set_immediate_exit(False)
    assert not tiny_vm.vcpu.immediate_exit


def test_busy_guest_is_parked_resumed_and_continues(tiny_vm: TinyVm) -> None:
    tiny_vm.load(COUNT_FOREVER)
    events, _ = _events()
    vcpu = Vcpu(tiny_vm.vcpu, RecordingBus(), RecordingBus(), events.append)
    vcpu.start()
    try:
        while _counter(tiny_vm) == 0:
            time.sleep(0.001)
        for _ in range(3):
            vcpu.pause(timeout=10)
            assert vcpu.state is VcpuState.PAUSED
            parked = _counter(tiny_vm)
            time.sleep(0.02)
            assert _counter(tiny_vm) == parked  # it really is out of the guest
            rip = tiny_vm.vcpu.get_regs().rip
            assert 0x1000 <= rip < 0x1007
            vcpu.resume()
            while _counter(tiny_vm) == parked:
                time.sleep(0.001)
    finally:
        vcpu.stop()
        assert vcpu.join(10)
    assert vcpu.state is VcpuState.EXITED
    assert events == []  # a requested stop is not a guest event


def test_halted_guest_with_irqchip_is_parked_and_resumed(tiny_vm_irqchip: TinyVm) -> None:
    tiny = tiny_vm_irqchip
    tiny.load(HALT_FOREVER)
    events, _ = _events()
    vcpu = Vcpu(tiny.vcpu, RecordingBus(), RecordingBus(), events.append)
    vcpu.start()
    try:
        time.sleep(0.05)  # let it reach HLT and block in the kernel
        vcpu.pause(timeout=10)
        assert vcpu.state is VcpuState.PAUSED
        assert tiny.vcpu.get_mp_state() == MpState.HALTED
        vcpu.resume()
        vcpu.pause(timeout=10)
        assert vcpu.state is VcpuState.PAUSED
        vcpu.resume()
    finally:
        vcpu.stop()
        assert vcpu.join(10)
    assert events == []


def test_start_paused_parks_before_entering_the_guest(tiny_vm: TinyVm) -> None:
    tiny_vm.load(COUNT_FOREVER)
    vcpu = Vcpu(tiny_vm.vcpu, RecordingBus(), RecordingBus(), lambda event: None)
    vcpu.start(paused=True)
    try:
        assert vcpu.state is VcpuState.PAUSED
        time.sleep(0.02)
        assert _counter(tiny_vm) == 0
        vcpu.resume()
        while _counter(tiny_vm) == 0:
            time.sleep(0.001)
    finally:
        vcpu.stop()
        assert vcpu.join(10)


def test_irqfd_raises_an_interrupt_the_guest_handles(tiny_vm_irqchip: TinyVm) -> None:
    tiny = tiny_vm_irqchip
    tiny.load(IRQ_GUEST)
    irq_fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        tiny.vm.register_irqfd(irq_fd, 5)
        exit_ = tiny.vcpu.run()
        assert isinstance(exit_, IoOut)
        assert bytes(exit_.data) == b"\x11"  # guest is ready and about to halt
        os.eventfd_write(irq_fd, 1)
        exit_ = tiny.vcpu.run()  # blocks in HLT until the interrupt arrives
        assert isinstance(exit_, IoOut)
        assert bytes(exit_.data) == b"\x25"
        tiny.vm.unregister_irqfd(irq_fd, 5)
    finally:
        os.close(irq_fd)


def test_irq_line_sets_the_pic_request_register(tiny_vm_irqchip: TinyVm) -> None:
    tiny = tiny_vm_irqchip
    assert tiny.vm.get_irqchip(0).chip.pic.irr & (1 << 3) == 0
    tiny.vm.irq_line(3, True)
    tiny.vm.irq_line(3, False)
    assert tiny.vm.get_irqchip(0).chip.pic.irr & (1 << 3)


# Point IVT entry 0x25 at 0x1100, report 0x11 on port 0x10, then wait in HLT with interrupts
# enabled; the handler reports 0x25 and halts with interrupts off. No PIC programming: with a
# split irqchip the interrupt comes from the local APIC, sent there by the IOAPIC's MSI route.
APIC_IRQ_GUEST = (
    bytes.fromhex(
        "c70694000011"  # mov word [0x94], 0x1100     IVT[0x25].offset
        "c70696000000"  # mov word [0x96], 0          IVT[0x25].segment
        "b011e610"  # mov al, 0x11; out 0x10, al      "ready"
        "fb"  # sti
        "f4ebfd"  # hlt; jmp back to hlt
    ).ljust(0x100, b"\0")
    + IRQ_GUEST[0x100:]
)


def _software_enable_lapic(tiny: TinyVm) -> None:
    """Set the APIC's spurious-vector register enable bit, as an OS would (SVR, offset 0xf0)."""
    state = tiny.vcpu.get_lapic()
    page = bytearray(ctypes.string_at(ctypes.addressof(state), ctypes.sizeof(state)))
    page[0xF0:0xF4] = (0x1FF).to_bytes(4, "little")
    ctypes.memmove(ctypes.addressof(state), bytes(page), len(page))
    tiny.vcpu.set_lapic(state)


def test_split_irqchip_delivers_an_ioapic_pin_through_its_msi_route(kvm: Kvm) -> None:
    """nubis's interrupt path for legacy lines: irqfd on GSI 4, routed by the userspace IOAPIC."""
    tiny = TinyVm(kvm, split_irqchip=True)
    irq_fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        routing = GsiRouting(tiny.vm)
        ioapic = IoApic(
            lambda pin, message: (
                routing.remove(pin) if message is None else routing.set_msi(pin, *message)
            )
        )
        tiny.vm.register_irqfd(irq_fd, 4)
        _software_enable_lapic(tiny)
        tiny.load(APIC_IRQ_GUEST)
        # What Linux does through the MMIO window: destination APIC 0, then vector 0x25 unmasked.
        for index, value in ((0x19, 0), (0x18, 0x25)):
            ioapic.write(0, 0x00, memoryview(bytearray(index.to_bytes(4, "little"))))
            ioapic.write(0, 0x10, memoryview(bytearray(value.to_bytes(4, "little"))))
        assert ioapic.message(4) == (0xFEE0_0000, 0x25)
        exit_ = tiny.vcpu.run()
        assert isinstance(exit_, IoOut)
        assert bytes(exit_.data) == b"\x11"
        os.eventfd_write(irq_fd, 1)
        exit_ = tiny.vcpu.run()  # blocks in HLT until KVM delivers the MSI
        assert isinstance(exit_, IoOut)
        assert bytes(exit_.data) == b"\x25"
        tiny.vm.unregister_irqfd(irq_fd, 4)
    finally:
        os.close(irq_fd)
        tiny.close()
