"""An allocator of small integer ids: GSIs for interrupt routes, KVM memory slots, PCI slots.

Ids come from ``[first, last]``. The lowest free id is always handed out next, so freed ids
are reused lowest first and the numbers a guest sees stay small and predictable (the same
command line gives the same GSIs and slots).
"""

from __future__ import annotations

import heapq
import threading

from nubis.allocator.address import AllocatorError

__all__ = ["IdAllocator"]


class IdAllocator:
    """Hands out the lowest free integer in ``[first, last]``; thread-safe."""

    def __init__(self, first: int, last: int) -> None:
        if last < first:
            raise AllocatorError(f"id range [{first}, {last}] is empty")
        self.first = first
        self.last = last
        self._next = first  # every id >= _next is free unless in _allocated
        self._freed: list[int] = []  # heap of ids < _next released; may hold stale entries
        self._allocated: set[int] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"IdAllocator([{self.first}, {self.last}], {len(self._allocated)} used)"

    def allocate(self) -> int:
        """Reserve and return the lowest free id; `AllocatorError` when all are taken."""
        with self._lock:
            while self._freed:
                candidate = heapq.heappop(self._freed)
                if candidate not in self._allocated:
                    self._allocated.add(candidate)
                    return candidate
            while self._next <= self.last and self._next in self._allocated:
                self._next += 1
            if self._next > self.last:
                raise AllocatorError(f"all ids in [{self.first}, {self.last}] are in use")
            candidate = self._next
            self._next += 1
            self._allocated.add(candidate)
            return candidate

    def allocate_exact(self, id_: int) -> int:
        """Reserve ``id_`` itself (a fixed GSI, a restored slot) and return it."""
        with self._lock:
            if not self.first <= id_ <= self.last:
                raise AllocatorError(
                    f"cannot allocate id {id_}: it is outside [{self.first}, {self.last}]"
                )
            if id_ in self._allocated:
                raise AllocatorError(f"cannot allocate id {id_}: it is already in use")
            self._allocated.add(id_)
            return id_

    def free(self, id_: int) -> None:
        """Release ``id_`` so it can be handed out again."""
        with self._lock:
            if id_ not in self._allocated:
                raise AllocatorError(
                    f"cannot free id {id_}: it is not allocated (never allocated or already freed)"
                )
            self._allocated.remove(id_)
            if id_ < self._next:
                heapq.heappush(self._freed, id_)

    def is_allocated(self, id_: int) -> bool:
        """Whether ``id_`` is currently in use."""
        with self._lock:
            return id_ in self._allocated
