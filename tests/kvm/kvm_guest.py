"""Helpers for the kvm tier: a tiny VM (guest RAM, one vCPU in real mode) to run code blobs in.

Guests here are a few hand-assembled real-mode instructions (``as --32`` with ``.code16``,
bytes shown next to each instruction); real mode runs on every KVM flavour nubis targets,
including PVM, which does not run unmodified 64-bit kernels.
"""

from __future__ import annotations

import threading

import pytest

from nubis.kvm import Kvm, VcpuFd, VmFd
from nubis.kvm.bindings import Cap
from nubis.memory import GuestMemory
from nubis.vmm.vcpu import Vcpu, VcpuEvent

RAM_SIZE = 0x10000
CODE_ADDRESS = 0x1000


class TinyVm:
    """A VM with 64 KiB of RAM at 0 (slot 0) and one vCPU at ``CODE_ADDRESS`` in real mode.

    ``irqchip`` creates KVM's whole in-kernel irqchip, ``split_irqchip`` only its local APICs.
    """

    def __init__(
        self,
        kvm: Kvm,
        *,
        irqchip: bool = False,
        split_irqchip: bool = False,
        log_dirty_pages: bool = False,
    ) -> None:
        self.vm: VmFd = kvm.create_vm()
        self.memory = GuestMemory([(0, RAM_SIZE)])
        if irqchip:
            self.vm.set_tss_address(0xFFFBD000)
            self.vm.create_irq_chip()
        if split_irqchip:  # local APICs only, as a nubis VM has (24 GSIs kept for an IOAPIC)
            self.vm.set_tss_address(0xFFFBD000)
            self.vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)
        region = self.memory.regions[0]
        self.vm.set_user_memory_region(
            0, 0, region.size, region.host_address, log_dirty_pages=log_dirty_pages
        )
        self.vcpu: VcpuFd = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        for segment in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
            segment.base = 0
            segment.selector = 0
        self.vcpu.set_sregs(sregs)

    def load(self, code: bytes, address: int = CODE_ADDRESS) -> None:
        """Copy ``code`` into guest RAM and point the vCPU at it."""
        self.memory.write(address, code)
        regs = self.vcpu.get_regs()
        regs.rip = address
        regs.rflags = 0x2
        regs.rsp = 0x8000
        self.vcpu.set_regs(regs)

    def close(self) -> None:
        """Release the vCPU, the VM and guest RAM."""
        self.vcpu.close()
        self.vm.close()
        self.memory.close()


class RecordingBus:
    """A PIO/MMIO bus test double: records writes, answers reads from ``values`` (per address).

    Addresses in ``mapped`` (all, when it is None) return True; others return False.
    """

    def __init__(
        self, values: dict[int, bytes] | None = None, mapped: set[int] | None = None
    ) -> None:
        self.values = values or {}
        self.mapped = mapped
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def _is_mapped(self, addr: int) -> bool:
        return self.mapped is None or addr in self.mapped

    def read(self, addr: int, data: memoryview) -> bool:
        """Fill ``data`` from ``values[addr]`` (zeros if absent) and record the access."""
        self.reads.append((addr, len(data)))
        if not self._is_mapped(addr):
            return False
        value = self.values.get(addr, b"")
        data[:] = value[: len(data)].ljust(len(data), b"\0")
        return True

    def write(self, addr: int, data: memoryview) -> bool:
        """Record the write."""
        self.writes.append((addr, bytes(data)))
        return self._is_mapped(addr)


def run_to_event(
    tiny: TinyVm, pio: RecordingBus, mmio: RecordingBus | None = None, timeout: float = 10.0
) -> VcpuEvent:
    """Run the vCPU in a `Vcpu` thread until it reports an event; fail after ``timeout`` s."""
    events: list[VcpuEvent] = []
    done = threading.Event()

    def on_event(event: VcpuEvent) -> None:
        events.append(event)
        done.set()

    vcpu = Vcpu(tiny.vcpu, pio, mmio or RecordingBus(), on_event)
    vcpu.start()
    try:
        if not done.wait(timeout):
            pytest.fail(f"the guest reported nothing within {timeout} s")
    finally:
        vcpu.stop()
        assert vcpu.join(timeout)
    return events[0]
