"""Guest physical memory: `GuestAddress`, `GuestMemory` made of mmap/memfd regions, bounds-checked access.

The vm-memory counterpart; see `nubis.memory.guest` for the model.
"""

from nubis.memory.guest import (
    PAGE_SIZE,
    GuestAddress,
    GuestMemory,
    GuestMemoryError,
    GuestRegion,
)

__all__ = ["PAGE_SIZE", "GuestAddress", "GuestMemory", "GuestMemoryError", "GuestRegion"]
