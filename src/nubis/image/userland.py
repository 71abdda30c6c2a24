"""The small userland every nubis guest image shares: busybox, kernel modules and an init.

The same staging directory becomes the initramfs (as a cpio archive) and the ext4 root disk
(through ``mke2fs -d``), so both boot paths run the same programs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nubis.image.debian import DebPackage
from nubis.image.errors import ImageError
from nubis.image.modules import load_order, parse_builtin, parse_modules_dep
from nubis.image.workspace import Workspace

_DIRECTORIES = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "root",
    "etc/nubis",
    "mnt",
    "newroot",
    "var",
    "lib",
)


@dataclass(frozen=True)
class UserlandSpec:
    """What goes into a guest userland: packages, modules and the init program."""

    kernel: DebPackage
    busybox: DebPackage
    modules: tuple[str, ...]
    optional_modules: tuple[str, ...]
    init: bytes


def busybox_applets(busybox: Path) -> list[str]:
    """Return the applet paths (``usr/bin/[`` ...) the busybox binary installs itself as."""
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"Could not list busybox's applets ({exc}).") from exc
    return sorted(line.strip() for line in out.decode().splitlines() if line.strip())


def stage_userland(root: Path, spec: UserlandSpec, workspace: Workspace) -> list[str]:
    """Fill ``root`` with busybox, the modules in load order and the init; return the order."""
    for directory in _DIRECTORIES:
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    busybox = workspace.tree(spec.busybox) / "bin" / "busybox"
    if not busybox.exists():
        raise ImageError(f"The package {spec.busybox.name} holds no bin/busybox.")
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in busybox_applets(busybox):
        link = root / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)

    tree, release, dep_text = workspace.modules_dep(spec.kernel)
    mod_dir = tree / "lib" / "modules" / release
    builtin = parse_builtin((mod_dir / "modules.builtin").read_text())
    order = load_order(
        parse_modules_dep(dep_text),
        (*spec.modules, *spec.optional_modules),
        builtin=builtin,
        optional=spec.optional_modules,
    )
    dest_dir = root / "lib" / "modules" / release
    for rel in order:
        dest = dest_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mod_dir / rel, dest)
    (root / "etc" / "nubis" / "modules").write_text("".join(f"{rel}\n" for rel in order))
    (root / "init").write_bytes(spec.init)
    (root / "init").chmod(0o755)
    (root / "sbin" / "init").unlink(missing_ok=True)
    os.symlink("/init", root / "sbin" / "init")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "hostname").write_text("nubis-guest\n")
    return order


def userland_key(spec: UserlandSpec) -> dict[str, object]:
    """Return the inputs of a userland for a content key."""
    import hashlib

    return {
        "kernel": [spec.kernel.name, spec.kernel.version, spec.kernel.sha256],
        "busybox": [spec.busybox.name, spec.busybox.version, spec.busybox.sha256],
        "modules": list(spec.modules),
        "optional_modules": list(spec.optional_modules),
        "init": hashlib.sha256(spec.init).hexdigest(),
    }


def normalise_times(root: Path, paths: Sequence[Path] = ()) -> None:
    """Set the timestamps of everything under ``root`` to the epoch, for reproducible images."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.utime(os.path.join(dirpath, name), (0, 0), follow_symlinks=False)
    os.utime(root, (0, 0))
    for path in paths:
        os.utime(path, (0, 0), follow_symlinks=False)
