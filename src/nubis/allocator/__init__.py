"""Address-space and id allocators (vm-allocator counterpart).

`AddressAllocator` places aligned ranges (PCI BARs in the MMIO windows); `IdAllocator` hands out
small integers (GSIs, memory slots).
"""

from nubis.allocator.address import AddressAllocator, AllocatorError, AllocPolicy, ExactMatch
from nubis.allocator.ids import IdAllocator

__all__ = ["AddressAllocator", "AllocPolicy", "AllocatorError", "ExactMatch", "IdAllocator"]
