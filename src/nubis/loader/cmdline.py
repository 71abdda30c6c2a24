"""The kernel command line, built with validation against the space the boot protocol allows.

Linux reads the command line as a NUL-terminated string at ``cmd_line_ptr`` (zero page) or
``cmdline_paddr`` (PVH ``hvm_start_info``); ``Documentation/arch/x86/boot.rst`` ("The kernel
command line") bounds it by the header's ``cmdline_size``. `Cmdline` is created with the
capacity in bytes, including the terminating NUL, and refuses anything that would exceed it.
"""

from __future__ import annotations

from nubis.arch.x86_64 import layout
from nubis.loader.errors import LoaderError
from nubis.memory import GuestMemory, GuestMemoryError

__all__ = ["Cmdline", "load_cmdline"]


def _check_text(text: str, what: str) -> None:
    if "\x00" in text:
        raise LoaderError(f"kernel command line {what} {text!r} contains a NUL character")
    if not text.isascii() or not text.isprintable():
        raise LoaderError(
            f"kernel command line {what} {text!r} has characters other than printable ASCII"
        )


class Cmdline:
    """A kernel command line of at most ``capacity`` bytes including its NUL terminator."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise LoaderError(f"kernel command line capacity {capacity} leaves no room for NUL")
        self.capacity = capacity
        self._parts: list[str] = []

    def __str__(self) -> str:
        return " ".join(self._parts)

    def __repr__(self) -> str:
        return f"Cmdline({str(self)!r}, capacity={self.capacity})"

    def __len__(self) -> int:
        """Length in bytes without the NUL terminator."""
        return len(str(self))

    def _append(self, part: str) -> None:
        length = len(self) + (1 if self._parts else 0) + len(part) + 1
        if length > self.capacity:
            raise LoaderError(
                f"kernel command line would need {length} bytes with its NUL terminator, "
                f"more than the limit of {self.capacity}"
            )
        self._parts.append(part)

    def insert(self, key: str, value: str) -> None:
        """Append ``key=value``; neither may contain whitespace and the key no ``=``."""
        _check_text(key, "key")
        _check_text(value, "value")
        if not key or any(c.isspace() or c == "=" for c in key):
            raise LoaderError(
                f"kernel command line key {key!r} must be non-empty, without spaces or '='"
            )
        if any(c.isspace() for c in value):
            raise LoaderError(f"kernel command line value {value!r} for {key!r} contains spaces")
        self._append(f"{key}={value}")

    def insert_str(self, text: str) -> None:
        """Append ``text`` verbatim (it may hold several space-separated parameters)."""
        _check_text(text, "text")
        text = text.strip()
        if text:
            self._append(text)

    def as_bytes(self) -> bytes:
        """The command line as ASCII bytes with the terminating NUL."""
        return str(self).encode("ascii") + b"\x00"


def load_cmdline(memory: GuestMemory, cmdline: Cmdline, addr: int = layout.CMDLINE_START) -> None:
    """Write ``cmdline`` with its NUL terminator to guest address ``addr``."""
    data = cmdline.as_bytes()
    if len(data) > layout.CMDLINE_MAX_SIZE:
        raise LoaderError(
            f"kernel command line of {len(data)} bytes exceeds the "
            f"{layout.CMDLINE_MAX_SIZE}-byte area nubis reserves for it"
        )
    try:
        memory.write(addr, data)
    except GuestMemoryError as exc:
        raise LoaderError(f"kernel command line does not fit in guest RAM: {exc}") from None
