"""A virtio-blk device driven by the mock driver, for the device's unit tests."""

from __future__ import annotations

import os

from nubis.memory import GuestMemory
from nubis.virtio.block import REQUEST_HEADER, Block
from nubis.virtio.device import InterruptKind
from nubis.virtio.mock import MockChain, MockDriver


class BlockRig:
    """``block`` on one mock queue in ``memory``; data buffers aligned to ``alignment``."""

    alignment = 8

    def __init__(self, block: Block, memory: GuestMemory) -> None:
        self.block = block
        self.memory = memory
        self.driver = MockDriver(block, memory)
        self.mock = self.driver.queues[0]

    def add(self, kind: int, sector: int = 0, data: bytes = b"", read_len: int = 0) -> MockChain:
        """Make a request available: header, ``data`` to write, ``read_len`` bytes to read."""
        header = REQUEST_HEADER.pack(kind, 0, sector)
        readable = [header, data] if data else [header]
        writable = [read_len, 1] if read_len else [1]
        return self.mock.add_chain(readable, writable, alignment=self.alignment)

    def status(self, chain: MockChain) -> int:
        """The status byte the device wrote for ``chain``."""
        return self.memory.read(chain.writable[-1][0], 1)[0]

    def data(self, chain: MockChain) -> bytes:
        """The bytes the device read into ``chain``."""
        return self.mock.read_buffers(chain.writable[:-1])

    def queue_interrupts(self) -> int:
        """Interrupts raised for the request queue so far."""
        return self.driver.interrupt.events.count((InterruptKind.QUEUE, 0))

    def kick_completions(self) -> None:
        """Wake the worker for completions the fake held back (the kernel signalled them)."""
        os.eventfd_write(self.block._done_fd, 1)

    def close(self) -> None:
        """Shut the device down and release the mock driver."""
        self.block.shutdown()
        self.driver.close()
