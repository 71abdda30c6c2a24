"""Bounded reads from user-supplied kernel and initramfs files.

Loaders take any seekable binary file (an open file or ``io.BytesIO``) and read it through
these helpers, which turn every short read into a `LoaderError` and copy segment data
straight into guest memory (``GuestMemory.slice``) without an intermediate copy.
"""

from __future__ import annotations

import os

from nubis._typing import Protocol
from nubis.loader.errors import LoaderError
from nubis.memory import GuestMemory, GuestMemoryError

TYPE_CHECKING = False

__all__ = ["KernelFile", "file_size", "read_at", "read_into_guest"]


class KernelFile(Protocol):
    """A seekable binary file: what ``open(path, "rb")`` and ``io.BytesIO`` provide."""

    def seek(self, offset: int, whence: int = 0, /) -> int:
        """Move to ``offset`` relative to ``whence`` and return the new position."""
        ...

    def read(self, size: int = -1, /) -> bytes:
        """Read up to ``size`` bytes."""
        ...

    def readinto(self, buffer: memoryview, /) -> int | None:
        """Read into ``buffer`` and return the number of bytes read."""
        ...


def file_size(file: KernelFile) -> int:
    """The size of ``file`` in bytes."""
    return file.seek(0, os.SEEK_END)


def read_at(file: KernelFile, offset: int, size: int, what: str) -> bytes:
    """Read exactly ``size`` bytes at ``offset``; ``what`` names the data in the error."""
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise LoaderError(f"{what} at file offset {offset:#x} is truncated")
    return data


def read_into_guest(
    memory: GuestMemory, file: KernelFile, offset: int, addr: int, size: int, what: str
) -> None:
    """Copy ``size`` bytes at file ``offset`` to guest address ``addr``, straight into RAM."""
    try:
        target = memory.slice(addr, size)
    except GuestMemoryError as exc:
        raise LoaderError(f"{what} does not fit in guest RAM: {exc}") from None
    file.seek(offset)
    done = 0
    while done < size:
        count = file.readinto(target[done:])
        if not count:
            raise LoaderError(f"{what} at file offset {offset:#x} is truncated")
        done += count
