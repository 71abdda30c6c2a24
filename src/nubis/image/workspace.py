"""Unpacked Debian packages shared by the build steps of one image build.

Unpacking a kernel package takes a second or two, and both the kernel and the initramfs steps
need it; a `Workspace` unpacks each package at most once per build (in a scratch directory under
the cache, removed at the end) and runs depmod on kernel packages.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import TracebackType

from nubis.image.cache import Cache
from nubis.image.debian import Apt, DebPackage
from nubis.image.kernel import kernel_release
from nubis.image.modules import run_depmod


class Workspace:
    """Unpacks packages on demand into a scratch directory; use it as a context manager."""

    def __init__(self, cache: Cache, apt: Apt) -> None:
        self.cache = cache
        self.apt = apt
        self._root: Path | None = None
        self._trees: dict[str, Path] = {}
        self._depmod: dict[str, str] = {}

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove every unpacked tree."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
            self._trees.clear()
            self._depmod.clear()

    def tree(self, package: DebPackage) -> Path:
        """Return a directory holding the package's unpacked files."""
        if package.sha256 not in self._trees:
            if self._root is None:
                self._root = self.cache.scratch_dir("unpacked")
            dest = self._root / f"{package.name}-{package.sha256[:12]}"
            self._trees[package.sha256] = self.apt.extract(package, dest)
        return self._trees[package.sha256]

    def modules_dep(self, kernel_package: DebPackage) -> tuple[Path, str, str]:
        """Return a kernel package's tree, release and modules.dep text (running depmod once)."""
        tree = self.tree(kernel_package)
        release = kernel_release(tree)
        if kernel_package.sha256 not in self._depmod:
            self._depmod[kernel_package.sha256] = run_depmod(tree, release)
        return tree, release, self._depmod[kernel_package.sha256]
