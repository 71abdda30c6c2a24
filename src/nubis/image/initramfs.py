"""The initramfs: the shared userland as an uncompressed newc cpio archive.

Uncompressed on purpose: the archive is a few megabytes, so copying it costs less than
decompressing it would, especially inside the nested test host where the guest kernel's
decompressor runs under software emulation; every kernel accepts it (no CONFIG_RD_* needed);
and a VMM under test only has to place the bytes in guest memory. The archive is written by
nubis's own `CpioWriter`, so it depends only on its inputs.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from nubis.image.cache import Cache, content_key, sha256_file, write_manifest
from nubis.image.cpio import CpioWriter
from nubis.image.userland import UserlandSpec, stage_userland, userland_key
from nubis.image.workspace import Workspace

log = logging.getLogger(__name__)

#: Bumped when the archive's layout changes.
INITRAMFS_FORMAT = 1
FILENAME = "initramfs.cpio"


@dataclass(frozen=True)
class InitramfsImage:
    """A built initramfs and the modules it loads, in order."""

    path: Path
    sha256: str
    modules: tuple[str, ...]


def initramfs_key(spec: UserlandSpec) -> str:
    """Return the cache key of an initramfs built from ``spec``."""
    return content_key({"format": INITRAMFS_FORMAT, "userland": userland_key(spec)})


def build_initramfs(cache: Cache, workspace: Workspace, spec: UserlandSpec) -> InitramfsImage:
    """Return the initramfs for ``spec``, building it if it is not cached."""
    key = initramfs_key(spec)
    manifest = cache.load("initramfs", key)
    if manifest is None:
        with cache.building("initramfs", key) as out:
            log.info("building initramfs %s", key)
            staging = cache.scratch_dir("initramfs-staging")
            try:
                order = stage_userland(staging, spec, workspace)
                (staging / "etc" / "nubis" / "initramfs").write_text("")
                with (out / FILENAME).open("wb") as stream:
                    writer = CpioWriter(stream)
                    writer.add_tree(staging)
                    writer.add_char_device("dev/console", 5, 1)
                    writer.add_char_device("dev/null", 1, 3, 0o666)
                    writer.close()
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            write_manifest(
                out,
                {
                    "sha256": sha256_file(out / FILENAME),
                    "modules": order,
                    "inputs": userland_key(spec),
                },
            )
        manifest = cache.load("initramfs", key)
        assert manifest is not None
    return InitramfsImage(
        path=cache.path("initramfs", key) / FILENAME,
        sha256=manifest["sha256"],
        modules=tuple(manifest["modules"]),
    )
