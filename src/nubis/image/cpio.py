"""A reproducible writer for the "newc" cpio format the Linux initramfs uses.

Format: Documentation/driver-api/early-userspace/buffer-format.rst. Each entry is a 110-byte
ASCII header (magic ``070701`` and thirteen 8-digit hex fields), the NUL-terminated name padded to
a multiple of four, then the data padded the same way; ``TRAILER!!!`` ends the archive. nubis
writes it itself so that owners, timestamps and inode numbers are fixed (the archive depends only
on its inputs) and so that device nodes such as /dev/console need no root privileges.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


class CpioWriter:
    """Writes newc cpio entries to a binary stream; every entry is owned by root with mtime 0."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._ino = 1
        self._closed = False

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
        nlink: int = 1,
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        ]
        self._ino += 1
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._stream.write(header + encoded)
        self._stream.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._stream.write(data)
        self._stream.write(b"\0" * (-len(data) % 4))

    def add_directory(self, name: str, perms: int = 0o755) -> None:
        """Add a directory entry."""
        self._entry(name, stat.S_IFDIR | perms, nlink=2)

    def add_file(self, name: str, data: bytes, perms: int = 0o644) -> None:
        """Add a regular file with the given contents."""
        self._entry(name, stat.S_IFREG | perms, data)

    def add_symlink(self, name: str, target: str) -> None:
        """Add a symbolic link pointing at ``target``."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, perms: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(name, stat.S_IFCHR | perms, rdev=(major, minor))

    def add_tree(self, root: Path) -> None:
        """Add every file, directory and symlink under ``root`` in sorted order, named relative to it."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            rel_dir = base.relative_to(root).as_posix()
            if rel_dir != ".":
                self.add_directory(rel_dir, stat.S_IMODE(base.stat().st_mode))
            entries = sorted(filenames + [d for d in dirnames if (base / d).is_symlink()])
            for name in entries:
                path = base / name
                rel = path.relative_to(root).as_posix()
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(rel, os.readlink(path))
                elif stat.S_ISREG(st.st_mode):
                    self.add_file(rel, path.read_bytes(), stat.S_IMODE(st.st_mode))
            dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]

    def close(self) -> None:
        """Write the trailer entry; the archive is complete afterwards."""
        if not self._closed:
            self._entry(TRAILER, 0, nlink=1)
            self._closed = True
