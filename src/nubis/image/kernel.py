"""Kernel images from Debian's linux-image packages: the bzImage and the ELF vmlinux inside it.

The x86 boot protocol (Documentation/arch/x86/boot.rst) puts the compressed kernel at
``payload_offset`` (relative to the protected-mode code, which starts after ``setup_sects`` + 1
sectors) for ``payload_length`` bytes. Debian compresses with LZ4 in its "legacy" frame format
(magic 0x184C2102), which the kernel's build follows with a 4-byte little-endian uncompressed
size; ``lz4 -dc`` decompresses the stream without that trailer. The result must be an ELF image
with the Xen PVH entry note, which is what a PVH boot needs.
"""

from __future__ import annotations

import logging
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nubis.image import elf
from nubis.image.cache import Cache, content_key, sha256_file, write_manifest
from nubis.image.debian import Apt, DebPackage, package_key
from nubis.image.errors import ImageError
from nubis.image.tools import run_tool

log = logging.getLogger(__name__)

#: Bumped when the kernel artifact's layout or extraction changes.
KERNEL_FORMAT = 1

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"  # 0x184C2102 little-endian
XZ_MAGIC = b"\xfd7zXZ\x00"
#: Decompressors for the payload formats Debian's kernels use, by magic.
_DECOMPRESSORS = ((LZ4_LEGACY_MAGIC, ["lz4", "-dc"]), (XZ_MAGIC, ["xz", "-dc", "--single-stream"]))
_HDRS_MAGIC = b"HdrS"
_OFF_SETUP_SECTS = 0x1F1
_OFF_HEADER = 0x202
_OFF_VERSION = 0x206
_OFF_PAYLOAD = 0x248  # payload_offset, payload_length (u32 each), boot protocol >= 2.08


@dataclass(frozen=True)
class KernelImages:
    """A kernel package's bzImage and decompressed vmlinux, with their checksums."""

    bzimage: Path
    vmlinux: Path
    release: str
    package: str
    package_version: str
    bzimage_sha256: str
    vmlinux_sha256: str
    pvh_entry: int


def find_payload(bzimage: bytes) -> bytes:
    """Return the compressed kernel inside a bzImage (without the size trailer)."""
    if len(bzimage) < 0x250 or bzimage[_OFF_HEADER : _OFF_HEADER + 4] != _HDRS_MAGIC:
        raise ImageError("The kernel is not a bzImage (no HdrS boot header).")
    (version,) = struct.unpack_from("<H", bzimage, _OFF_VERSION)
    if version < 0x208:
        raise ImageError(
            f"The bzImage's boot protocol {version:#x} predates payload fields (2.08)."
        )
    setup_sects = bzimage[_OFF_SETUP_SECTS] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, _OFF_PAYLOAD)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if any(payload.startswith(magic) for magic, _ in _DECOMPRESSORS):
        return payload[:-4]
    found = bzimage.find(LZ4_LEGACY_MAGIC)
    if found < 0:
        raise ImageError("The bzImage's payload is neither LZ4 (0x184C2102) nor XZ compressed.")
    return bzimage[found:]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Decompress the ELF vmlinux out of a bzImage and check it can boot by PVH."""
    payload = find_payload(bzimage)
    argv = next(cmd for magic, cmd in _DECOMPRESSORS if payload.startswith(magic))
    vmlinux = run_tool(argv, input=payload, what="Decompressing vmlinux")
    elf.pvh_entry(vmlinux)
    return vmlinux


def kernel_release(tree: Path) -> str:
    """Return the kernel release (``uname -r``) of an unpacked linux-image package."""
    releases = sorted(p.name for p in (tree / "lib" / "modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise ImageError(f"Expected one kernel release in the package, found {releases}.")
    return releases[0]


def kernel_key(package: DebPackage, with_vmlinux: bool = True) -> str:
    """Return the cache key of the kernel artifacts of a linux-image package."""
    return content_key(
        {"format": KERNEL_FORMAT, "package": package_key([package]), "vmlinux": with_vmlinux}
    )


def build_kernel(
    cache: Cache,
    apt: Apt,
    package: DebPackage,
    unpack: Callable[[], Path] | None = None,
    with_vmlinux: bool = True,
) -> KernelImages:
    """Return the bzImage and vmlinux of a linux-image package, building them if not cached.

    ``unpack`` returns the package's unpacked tree, if the caller can share one. With
    ``with_vmlinux`` false only the bzImage is kept (its vmlinux path is then absent and its
    checksum empty), for kernels that are never booted by PVH.
    """
    key = kernel_key(package, with_vmlinux)
    manifest = cache.load("kernel", key)
    if manifest is None:
        with cache.building("kernel", key) as out:
            log.info("extracting kernel %s %s", package.name, package.version)
            scratch = None
            if unpack is not None:
                tree = unpack()
            else:
                scratch = cache.scratch_dir("kernel")
                tree = apt.extract(package, scratch)
            release = kernel_release(tree)
            vmlinuz = tree / "boot" / f"vmlinuz-{release}"
            bz = vmlinuz.read_bytes()
            shutil.copyfile(vmlinuz, out / "bzImage")
            entry = 0
            if with_vmlinux:
                vmlinux = extract_vmlinux(bz)
                (out / "vmlinux").write_bytes(vmlinux)
                entry = elf.pvh_entry(vmlinux)
            config = tree / "boot" / f"config-{release}"
            if config.exists():
                shutil.copyfile(config, out / "config")
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            write_manifest(
                out,
                {
                    "package": package.name,
                    "package_version": package.version,
                    "package_sha256": package.sha256,
                    "release": release,
                    "bzImage_sha256": sha256_file(out / "bzImage"),
                    "vmlinux_sha256": sha256_file(out / "vmlinux") if with_vmlinux else "",
                    "pvh_entry": entry,
                },
            )
        manifest = cache.load("kernel", key)
        assert manifest is not None
    directory = cache.path("kernel", key)
    return KernelImages(
        bzimage=directory / "bzImage",
        vmlinux=directory / "vmlinux",
        release=manifest["release"],
        package=manifest["package"],
        package_version=manifest["package_version"],
        bzimage_sha256=manifest["bzImage_sha256"],
        vmlinux_sha256=manifest["vmlinux_sha256"],
        pvh_entry=manifest["pvh_entry"],
    )
