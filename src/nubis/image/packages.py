"""Adding Debian packages' programs, and the shared libraries they need, to a guest root.

For each requested package the files under bin/sbin are copied; every ELF among them is read for
its DT_NEEDED libraries and its interpreter, recursively, and each library is looked for in the
packages unpacked so far. Libraries not found make the search download the next layer of the
packages' Depends (library packages first), so only packages that are actually needed are
fetched, and nothing is taken from the host's own /lib.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from nubis.image import elf
from nubis.image.debian import Apt, DebPackage
from nubis.image.errors import ImageError
from nubis.image.workspace import Workspace

log = logging.getLogger(__name__)

BIN_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin")
LIB_DIRS = (
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
)
GUEST_LIB_DIR = "lib/x86_64-linux-gnu"
#: How many layers of Depends the library search may download before giving up.
MAX_DEPTH = 8


def resolve_in_tree(tree: Path, rel: str) -> Path | None:
    """Follow symlinks of ``rel`` treating ``tree`` as the root directory; None if dangling."""
    current = rel.lstrip("/")
    for _ in range(40):
        path = tree / current
        if path.is_symlink():
            target = os.readlink(path)
            current = (
                target.lstrip("/")
                if target.startswith("/")
                else os.path.normpath(os.path.join(os.path.dirname(current), target))
            )
            continue
        return path if path.is_file() else None
    return None


_LIBRARY_INDEX: dict[Path, dict[str, str]] = {}


def _find_library(tree: Path, soname: str) -> Path | None:
    """Find a library in a tree's library directories, including private subdirectories.

    Libraries such as librados reach theirs (``.../ceph/libceph-common.so.2``) through
    DT_RUNPATH; the guest gets them all in one directory, so the search simply includes them.
    """
    for directory in LIB_DIRS:
        hit = resolve_in_tree(tree, f"{directory}/{soname}")
        if hit is not None:
            return hit
    if tree not in _LIBRARY_INDEX:
        index: dict[str, str] = {}
        for directory in LIB_DIRS:
            for dirpath, _, filenames in os.walk(tree / directory):
                for name in filenames:
                    rel = os.path.relpath(os.path.join(dirpath, name), tree)
                    index.setdefault(name, rel)
        _LIBRARY_INDEX[tree] = index
    found = _LIBRARY_INDEX[tree].get(soname)
    return resolve_in_tree(tree, found) if found is not None else None


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == elf.ELF_MAGIC


def _copy_binaries(tree: Path, root: Path) -> list[Path]:
    copied = []
    for bin_dir in BIN_DIRS:
        source_dir = tree / bin_dir
        if not source_dir.is_dir():
            continue
        for entry in sorted(source_dir.iterdir()):
            real = resolve_in_tree(tree, f"{bin_dir}/{entry.name}")
            if real is None or not os.access(real, os.X_OK):
                continue
            dest = root / bin_dir / entry.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            shutil.copyfile(real, dest)
            dest.chmod(stat.S_IMODE(real.stat().st_mode) | 0o555)
            copied.append(dest)
    return copied


def install_packages(
    apt: Apt, workspace: Workspace, names: Sequence[str], root: Path
) -> list[DebPackage]:
    """Copy the named packages' programs and needed libraries into ``root``.

    Returns every package used (the requested ones and those that supplied libraries).
    """
    if not names:
        return []
    requested = apt.resolve(names)
    fetched: dict[str, DebPackage] = dict(requested)
    trees = [workspace.tree(p) for p in requested.values()]
    elves: list[Path] = []
    for package in requested.values():
        binaries = [p for p in _copy_binaries(workspace.tree(package), root) if _is_elf(p)]
        if not binaries:
            raise ImageError(f"The Debian package {package.name!r} holds no programs to install.")
        elves.extend(binaries)

    found: dict[str, Path] = {}
    interpreters: set[str] = set()
    depth = 0
    while True:
        unresolved: set[str] = set()
        pending = list(elves)
        seen: set[Path] = set()
        while pending:
            path = pending.pop()
            if path in seen:
                continue
            seen.add(path)
            data = path.read_bytes()
            interp = elf.interpreter(data)
            if interp:
                interpreters.add(interp)
            for soname in elf.needed_libraries(data):
                if soname not in found:
                    hit = next(
                        (h for t in trees if (h := _find_library(t, soname)) is not None), None
                    )
                    if hit is None:
                        unresolved.add(soname)
                        continue
                    found[soname] = hit
                pending.append(found[soname])
        if not unresolved:
            break
        depth += 1
        layer = [d for p in list(fetched.values()) for d in p.depends if d not in fetched]
        layer = list(dict.fromkeys(sorted(layer, key=lambda n: not n.startswith("lib"))))
        if depth > MAX_DEPTH or not layer:
            raise ImageError(
                f"No dependency of {', '.join(names)} provides the library {sorted(unresolved)[0]!r}."
            )
        log.info("looking for %s in %s", sorted(unresolved), layer)
        new = apt.try_resolve(layer)
        fetched.update(new)
        trees.extend(workspace.tree(p) for p in new.values())
        for name in layer:
            if name not in new:
                fetched[name] = DebPackage(name, "virtual", "all", "", ())

    lib_dir = root / GUEST_LIB_DIR
    lib_dir.mkdir(parents=True, exist_ok=True)
    for soname, source in sorted(found.items()):
        shutil.copyfile(source, lib_dir / soname)
    for interp in sorted(interpreters):
        interp_file = next(
            (h for t in trees if (h := resolve_in_tree(t, interp)) is not None), None
        )
        if interp_file is None:
            raise ImageError(f"No unpacked package provides the program interpreter {interp!r}.")
        dest = root / interp.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(interp_file, dest)
        dest.chmod(0o755)
    return [p for p in fetched.values() if p.version != "virtual"]
