"""The ext4 root disk: the shared userland plus any Debian packages' programs.

The image is made with ``mke2fs -d`` from a staging directory, so building needs no loop mounts
and no root privileges beyond reading the packages. Timestamps are pinned to the epoch and the
UUID and directory hash seed are fixed, so the image depends only on its inputs.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nubis.image.cache import Cache, content_key, sha256_file, write_manifest
from nubis.image.debian import Apt, package_key
from nubis.image.packages import install_packages
from nubis.image.tools import run_tool
from nubis.image.userland import UserlandSpec, normalise_times, stage_userland, userland_key
from nubis.image.workspace import Workspace

log = logging.getLogger(__name__)

#: Bumped when the disk's layout changes.
ROOTFS_FORMAT = 1
FILENAME = "rootfs.ext4"
FIXED_UUID = "6e756269-7300-4000-8000-726f6f746673"
#: Free space left in the file system beyond what the files take.
DEFAULT_FREE_MIB = 64


@dataclass(frozen=True)
class RootfsImage:
    """A built ext4 root disk and the Debian packages installed into it."""

    path: Path
    sha256: str
    packages: tuple[str, ...]


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def rootfs_key(spec: UserlandSpec, packages: Sequence[list[str]], free_mib: int) -> str:
    """Return the cache key of a root disk."""
    return content_key(
        {
            "format": ROOTFS_FORMAT,
            "userland": userland_key(spec),
            "packages": list(packages),
            "free_mib": free_mib,
        }
    )


def build_rootfs(
    cache: Cache,
    apt: Apt,
    workspace: Workspace,
    spec: UserlandSpec,
    packages: Sequence[str] = (),
    free_mib: int = DEFAULT_FREE_MIB,
) -> RootfsImage:
    """Return the ext4 root disk for ``spec`` plus ``packages``, building it if not cached."""
    requested = apt.resolve(packages) if packages else {}
    key = rootfs_key(spec, package_key(list(requested.values())), free_mib)
    manifest = cache.load("rootfs", key)
    if manifest is None:
        with cache.building("rootfs", key) as out:
            log.info("building root disk %s", key)
            staging = cache.scratch_dir("rootfs-staging")
            try:
                stage_userland(staging, spec, workspace)
                used = install_packages(apt, workspace, list(packages), staging)
                normalise_times(staging)
                size_mib = _tree_size(staging) // (1 << 20) + free_mib + 16
                image = out / FILENAME
                run_tool(
                    [
                        "mke2fs",
                        "-q",
                        "-F",
                        "-t",
                        "ext4",
                        "-L",
                        "nubis-root",
                        "-U",
                        FIXED_UUID,
                        "-E",
                        f"hash_seed={FIXED_UUID},root_owner=0:0",
                        "-d",
                        str(staging),
                        str(image),
                        f"{size_mib}M",
                    ],
                    what="Making the ext4 root disk",
                    env={"E2FSPROGS_FAKE_TIME": "1", "SOURCE_DATE_EPOCH": "1"},
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            write_manifest(
                out,
                {
                    "sha256": sha256_file(image),
                    "packages": sorted(f"{p.name}={p.version}" for p in used),
                    "inputs": userland_key(spec),
                },
            )
        manifest = cache.load("rootfs", key)
        assert manifest is not None
    return RootfsImage(
        path=cache.path("rootfs", key) / FILENAME,
        sha256=manifest["sha256"],
        packages=tuple(manifest["packages"]),
    )
