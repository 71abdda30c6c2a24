"""PCI: configuration space, BARs, capabilities, MSI-X, the root bus and host bridge.

The pci crate counterpart: :mod:`nubis.pci.configuration` models one function's configuration
space (PCI Local Bus 3.0, section 6), :mod:`nubis.pci.msix` the MSI-X capability and table
(section 6.8.2), :mod:`nubis.pci.root` bus 0 with its host bridge and the 0xCF8 and ECAM access
mechanisms, and :mod:`nubis.pci.mapping` the placement of BARs in the MMIO windows.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
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

# The names are loaded on first use (PEP 562): a VM without PCI devices needs only the root bus
# and the BAR mapper, and a launch should not pay for MSI-X.
_EXPORTS = {
    "BarKind": "configuration",
    "BarRelocator": "root",
    "BarReprogramming": "configuration",
    "MsiInterruptRouter": "msix",
    "MsixConfig": "msix",
    "MsixVector": "msix",
    "PciBar": "configuration",
    "PciBarAllocator": "mapping",
    "PciBus": "root",
    "PciConfigIo": "root",
    "PciConfigMmio": "root",
    "PciConfiguration": "configuration",
    "PciDevice": "root",
    "PciHeaderOffset": "configuration",
    "PciHostBridge": "root",
    "PciMmioMapper": "mapping",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nubis.pci' has no attribute {name!r}")
    value: object = getattr(__import__(f"nubis.pci.{module}", fromlist=[name]), name)
    globals()[name] = value
    return value


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
