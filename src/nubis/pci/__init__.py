"""PCI: configuration space, BARs, capabilities, MSI-X, the root bus and host bridge.

The pci crate counterpart: :mod:`nubis.pci.configuration` models one function's configuration
space (PCI Local Bus 3.0, section 6), :mod:`nubis.pci.msix` the MSI-X capability and table
(section 6.8.2), :mod:`nubis.pci.root` bus 0 with its host bridge and the 0xCF8 and ECAM access
mechanisms, and :mod:`nubis.pci.mapping` the placement of BARs in the MMIO windows.
"""

from nubis.pci.configuration import (
    BarKind,
    BarReprogramming,
    PciBar,
    PciConfiguration,
    PciHeaderOffset,
)
from nubis.pci.mapping import PciBarAllocator, PciMmioMapper
from nubis.pci.msix import MsiInterruptRouter, MsixConfig, MsixVector
from nubis.pci.root import (
    BarRelocator,
    PciBus,
    PciConfigIo,
    PciConfigMmio,
    PciDevice,
    PciHostBridge,
)

__all__ = [
    "BarKind",
    "BarRelocator",
    "BarReprogramming",
    "MsiInterruptRouter",
    "MsixConfig",
    "MsixVector",
    "PciBar",
    "PciBarAllocator",
    "PciBus",
    "PciConfigIo",
    "PciConfigMmio",
    "PciConfiguration",
    "PciDevice",
    "PciHeaderOffset",
    "PciHostBridge",
    "PciMmioMapper",
]
