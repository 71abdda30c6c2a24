"""KVM behind the PCI layer's interrupt and doorbell protocols.

* :class:`GsiRouting` owns the VM's whole GSI routing table (KVM_SET_GSI_ROUTING replaces it
  wholesale): the default routes of the in-kernel irqchip — GSI n to IOAPIC pin n, and the ISA
  IRQs 0-15 to the 8259s as well, with GSI 2 carrying the PIT's IRQ 0 — plus one MSI route per
  MSI-X vector in use.
* :class:`MsiVectors` implements ``nubis.pci.msix.MsiInterruptRouter`` for one device: each
  vector gets a GSI and an eventfd registered as an irqfd, so delivering an interrupt is one
  eventfd write and KVM injects the MSI without an exit.
* :class:`KvmIoEvents` implements ``nubis.virtio.pci.IoEventRegistrar``: virtio doorbells become
  ioeventfds, so a guest notification never enters a vCPU thread.
"""

from __future__ import annotations

import os
import threading

from nubis.allocator import IdAllocator
from nubis.arch.x86_64 import layout
from nubis.kvm import VmFd
from nubis.kvm.vm import IrqchipRoute, IrqRoute, MsiRoute

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
_MAX_GSI = 1023


def default_irqchip_routes() -> list[IrqRoute]:
    """The routes KVM sets up with the in-kernel irqchip, which a new table must repeat."""
    routes: list[IrqRoute] = []
    for gsi in range(layout.IOAPIC_NUM_PINS):
        if gsi < 16 and gsi != 2:
            chip = KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE
            routes.append(IrqchipRoute(gsi, chip, gsi % 8))
        pin = 2 if gsi == 0 else gsi  # ISA IRQ 0 (the PIT) arrives on IOAPIC pin 2
        if gsi != 2:
            routes.append(IrqchipRoute(gsi, KVM_IRQCHIP_IOAPIC, pin))
    return routes


class GsiRouting:
    """The VM's GSI routing table: irqchip defaults plus MSI routes, pushed to KVM on change."""

    def __init__(self, vm: VmFd) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        self._msi: dict[int, MsiRoute] = {}
        self._gsis = IdAllocator(layout.FIRST_DEVICE_GSI, _MAX_GSI)

    def allocate_gsi(self) -> int:
        """A GSI for an MSI route."""
        return self._gsis.allocate()

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to the MSI message (address, data)."""
        with self._lock:
            route = MsiRoute(gsi, address, data)
            if self._msi.get(gsi) == route:
                return
            self._msi[gsi] = route
            self._vm.set_gsi_routing([*default_irqchip_routes(), *self._msi.values()])


class MsiVectors:
    """One device's MSI-X vectors as GSIs with irqfds (``MsiInterruptRouter``)."""

    def __init__(self, vm: VmFd, routing: GsiRouting, num_vectors: int) -> None:
        self._vm = vm
        self._routing = routing
        self._gsis = [routing.allocate_gsi() for _ in range(num_vectors)]
        self._fds: list[int] = []
        for gsi in self._gsis:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._fds.append(fd)
            vm.register_irqfd(fd, gsi)

    def update(self, vector: int, address: int, data: int, masked: bool) -> None:
        """Point the vector's GSI at the message; a masked vector keeps its route but is never
        triggered (the MSI-X model holds its pending bit instead)."""
        if 0 <= vector < len(self._gsis) and (address or data):
            self._routing.set_msi(self._gsis[vector], address, data)

    def trigger(self, vector: int) -> None:
        """Deliver the vector: one eventfd write, KVM injects the MSI."""
        if 0 <= vector < len(self._fds):
            try:
                os.eventfd_write(self._fds[vector], 1)
            except BlockingIOError:
                pass  # the counter is saturated: an interrupt is already pending

    def close(self) -> None:
        """Unregister and close the irqfds."""
        for fd, gsi in zip(self._fds, self._gsis, strict=True):
            try:
                self._vm.unregister_irqfd(fd, gsi)
            except OSError:
                pass
            os.close(fd)
        self._fds = []


class KvmIoEvents:
    """Doorbells as MMIO ioeventfds matching any write width (``IoEventRegistrar``)."""

    def __init__(self, vm: VmFd) -> None:
        self._vm = vm

    def register(self, fd: int, address: int) -> None:
        """Signal ``fd`` on any guest write at ``address``."""
        self._vm.register_ioevent(fd, address, 0)

    def unregister(self, fd: int, address: int) -> None:
        """Undo :meth:`register`."""
        self._vm.unregister_ioevent(fd, address, 0)
