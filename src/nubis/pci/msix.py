"""MSI-X: the capability, the vector table and the pending bit array (PCI Local Bus 3.0, 6.8.2).

The capability in configuration space tells the driver how many vectors there are and which BAR
holds the table and the PBA; its message control word carries the MSI-X enable and function mask
bits. Each table entry holds a message address, message data and a vector control word whose bit
0 masks the vector. A vector that fires while it is masked (by its own mask bit, by the function
mask, or because MSI-X is not enabled yet) sets its pending bit instead and is delivered when it
becomes unmasked, so no interrupt is lost.

The model is sans-IO: it delivers through an injected :class:`MsiInterruptRouter`, which the VMM
backs with a KVM GSI routing entry and an irqfd per vector. Device worker threads fire vectors
while vCPU threads write the table, so every operation takes one lock.
"""

from __future__ import annotations

import struct
import threading

from nubis._frozen import Frozen
from nubis._log import DEBUG, getLogger
from nubis._typing import Protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "MSIX_CAPABILITY",
    "MSIX_CAP_ID",
    "MSIX_MAX_VECTORS",
    "MSIX_TABLE_ENTRY",
    "MsiInterruptRouter",
    "MsixConfig",
    "MsixVector",
]

_log = getLogger(__name__)

MSIX_CAP_ID: Final = 0x11
MSIX_MAX_VECTORS: Final = 2048

# The capability (section 6.8.2, figure 6-10): id, next pointer, message control, table
# offset/BIR, PBA offset/BIR.
MSIX_CAPABILITY: Final = struct.Struct("<BBHII")
MSIX_MESSAGE_CONTROL_OFFSET: Final = 2
MSG_CTRL_ENABLE: Final = 1 << 15
MSG_CTRL_FUNCTION_MASK: Final = 1 << 14
MSG_CTRL_TABLE_SIZE: Final = 0x7FF

# One table entry (section 6.8.2.6-6.8.2.9): message address low and high, message data,
# vector control. Bit 0 of vector control masks the vector.
MSIX_TABLE_ENTRY: Final = struct.Struct("<IIII")
MSIX_ENTRY_SIZE: Final = MSIX_TABLE_ENTRY.size
VECTOR_CTRL_MASK: Final = 1


class MsiInterruptRouter(Protocol):
    """Where MSI-X messages go; the VMM maps each vector to a KVM MSI route and an irqfd."""

    def update(self, vector: int, address: int, data: int, masked: bool) -> None:
        """Vector ``vector`` now sends ``data`` to ``address``; ``masked`` if it may not fire."""
        ...

    def trigger(self, vector: int) -> None:
        """Deliver vector ``vector`` now (it is unmasked and its route is up to date)."""
        ...


class MsixVector(Frozen):
    """One table entry as the driver programmed it."""

    __slots__ = ("address", "data", "masked")

    address: int
    data: int
    masked: bool

    def __init__(self, address: int, data: int, masked: bool) -> None:
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "masked", masked)


class MsixConfig:
    """The MSI-X state of one function: message control, ``num_vectors`` entries and the PBA.

    ``table_bar``/``table_offset`` and ``pba_bar``/``pba_offset`` say where the owner maps the
    table and the PBA (offsets 8-byte aligned); the owner forwards BAR accesses in those ranges
    to :meth:`read_table`, :meth:`write_table` and :meth:`read_pba`.
    """

    def __init__(
        self,
        num_vectors: int,
        router: MsiInterruptRouter,
        *,
        table_bar: int = 0,
        table_offset: int = 0,
        pba_bar: int = 0,
        pba_offset: int = 0,
    ) -> None:
        if not 1 <= num_vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X table size {num_vectors} is not between 1 and 2048")
        for name, value in (("table", table_offset), ("PBA", pba_offset)):
            if value % 8 or not 0 <= value <= 0xFFFF_FFF8:
                raise ValueError(f"MSI-X {name} offset {value:#x} is not 8-byte aligned")
        for name, value in (("table", table_bar), ("PBA", pba_bar)):
            if not 0 <= value <= 5:
                raise ValueError(f"MSI-X {name} BAR {value} is not between 0 and 5")
        self.num_vectors = num_vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.pba_bar = pba_bar
        self.pba_offset = pba_offset
        self._router = router
        self._lock = threading.Lock()
        self._table = bytearray(MSIX_ENTRY_SIZE * num_vectors)
        for vector in range(num_vectors):
            self._table[vector * MSIX_ENTRY_SIZE + 12] = VECTOR_CTRL_MASK
        self._pending = bytearray(self.pba_size)
        self._enabled = False
        self._function_masked = False

    @property
    def table_size(self) -> int:
        """Bytes the table occupies in its BAR."""
        return MSIX_ENTRY_SIZE * self.num_vectors

    @property
    def pba_size(self) -> int:
        """Bytes the PBA occupies in its BAR (whole qwords)."""
        return (self.num_vectors + 63) // 64 * 8

    # The capability.

    def capability(self) -> tuple[bytes, bytes]:
        """The capability bytes and their writable mask, for ``PciConfiguration.add_capability``."""
        body = MSIX_CAPABILITY.pack(
            MSIX_CAP_ID,
            0,
            self.message_control,
            self.table_offset | self.table_bar,
            self.pba_offset | self.pba_bar,
        )
        mask = MSIX_CAPABILITY.pack(0, 0, MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK, 0, 0)
        return body, mask

    @property
    def message_control(self) -> int:
        """The message control word: enable, function mask, table size minus one."""
        return (
            (MSG_CTRL_ENABLE if self._enabled else 0)
            | (MSG_CTRL_FUNCTION_MASK if self._function_masked else 0)
            | (self.num_vectors - 1)
        )

    @property
    def enabled(self) -> bool:
        """The MSI-X enable bit."""
        return self._enabled

    @property
    def function_masked(self) -> bool:
        """The function mask bit."""
        return self._function_masked

    def set_message_control(self, value: int) -> None:
        """Apply the driver's message control word (only enable and function mask are writable)."""
        with self._lock:
            before = [self._effectively_masked(v) for v in range(self.num_vectors)]
            self._enabled = bool(value & MSG_CTRL_ENABLE)
            self._function_masked = bool(value & MSG_CTRL_FUNCTION_MASK)
            for vector, was_masked in enumerate(before):
                if self._effectively_masked(vector) != was_masked:
                    self._route_changed(vector)

    # The table and the PBA.

    def _entry(self, vector: int) -> tuple[int, int, int, int]:
        return MSIX_TABLE_ENTRY.unpack_from(self._table, vector * MSIX_ENTRY_SIZE)

    def vector(self, vector: int) -> MsixVector:
        """Entry ``vector`` of the table."""
        if not 0 <= vector < self.num_vectors:
            raise ValueError(f"MSI-X vector {vector} is outside the {self.num_vectors}-entry table")
        with self._lock:
            low, high, data, control = self._entry(vector)
        return MsixVector(low | high << 32, data, bool(control & VECTOR_CTRL_MASK))

    def is_pending(self, vector: int) -> bool:
        """The pending bit of ``vector``."""
        if not 0 <= vector < self.num_vectors:
            return False
        return bool(self._pending[vector // 8] >> (vector % 8) & 1)

    def _effectively_masked(self, vector: int) -> bool:
        control = self._table[vector * MSIX_ENTRY_SIZE + 12]
        return not self._enabled or self._function_masked or bool(control & VECTOR_CTRL_MASK)

    def _route_changed(self, vector: int) -> None:
        low, high, data, _ = self._entry(vector)
        masked = self._effectively_masked(vector)
        self._router.update(vector, low | high << 32, data, masked)
        if not masked and self.is_pending(vector):
            self._pending[vector // 8] &= ~(1 << (vector % 8)) & 0xFF
            self._router.trigger(vector)

    @staticmethod
    def _access_fits(offset: int, size: int, limit: int) -> bool:
        return size in (1, 2, 4, 8) and offset % size == 0 and 0 <= offset <= limit - size

    def read_table(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from the table at ``offset``; invalid accesses read as zero."""
        size = len(data)
        if not self._access_fits(offset, size, self.table_size):
            data[:] = bytes(size)
            return
        with self._lock:
            data[:] = self._table[offset : offset + size]

    def write_table(self, offset: int, data: memoryview) -> None:
        """Apply a driver write to the table; naturally aligned 1-8 byte accesses only."""
        size = len(data)
        if not self._access_fits(offset, size, self.table_size):
            if _log.isEnabledFor(DEBUG):
                _log.debug("dropped MSI-X table write of %d bytes at %#x", size, offset)
            return
        vector = offset // MSIX_ENTRY_SIZE
        with self._lock:
            before = (self._entry(vector), self._effectively_masked(vector))
            self._table[offset : offset + size] = data
            if (self._entry(vector), self._effectively_masked(vector)) != before:
                self._route_changed(vector)

    def read_pba(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from the pending bit array; invalid accesses read as zero."""
        size = len(data)
        if not self._access_fits(offset, size, self.pba_size):
            data[:] = bytes(size)
            return
        with self._lock:
            data[:] = self._pending[offset : offset + size]

    def write_pba(self, offset: int, data: memoryview) -> None:
        """The PBA is read-only; driver writes are dropped."""

    # Delivery.

    def trigger(self, vector: int) -> None:
        """Fire ``vector``: deliver it now, or set its pending bit while it is masked."""
        if not 0 <= vector < self.num_vectors:
            if _log.isEnabledFor(DEBUG):
                _log.debug("dropped MSI-X vector %d outside the table", vector)
            return
        with self._lock:
            if self._effectively_masked(vector):
                self._pending[vector // 8] |= 1 << (vector % 8)
            else:
                self._router.trigger(vector)
