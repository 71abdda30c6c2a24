"""KVM behind the PCI layer's interrupt and doorbell protocols.

* :class:`GsiRouting` owns the VM's whole GSI routing table (KVM_SET_GSI_ROUTING replaces it
  wholesale). The VM has a split irqchip, so every route is an MSI route: GSIs 0-23 carry the
  messages of the userspace IOAPIC's unmasked pins (``nubis.devices.ioapic``), the GSIs above
  them one MSI-X vector each.
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
from nubis.kvm.vm import MsiRoute

_MAX_GSI = 1023


class GsiRouting:
    """The VM's GSI routing table of MSI routes, pushed to KVM on every change."""

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
            self._vm.set_gsi_routing(list(self._msi.values()))

    def remove(self, gsi: int) -> None:
        """Drop the route of ``gsi``: KVM then ignores signals on it."""
        with self._lock:
            if self._msi.pop(gsi, None) is not None:
                self._vm.set_gsi_routing(list(self._msi.values()))


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
