"""The default nubis test guest: Debian's cloud kernel, the initramfs and the ext4 root disk.

`build_guest_images` builds (or finds in the cache) everything a test needs to boot a guest, and
`guest_cmdline` makes the kernel command line that tells the guest's init what to run.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from nubis.image.cache import Cache
from nubis.image.debian import Apt, DebPackage
from nubis.image.initramfs import InitramfsImage, build_initramfs
from nubis.image.kernel import KernelImages, build_kernel
from nubis.image.rootfs import RootfsImage, build_rootfs
from nubis.image.userland import UserlandSpec
from nubis.image.workspace import Workspace

log = logging.getLogger(__name__)

GUEST_KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: The guest's virtio and vsock drivers, which Debian's cloud kernel builds as modules.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "virtio-rng",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
)
#: Loaded when the kernel builds them as modules, skipped when built in.
GUEST_OPTIONAL_MODULES: tuple[str, ...] = ("evdev", "button")
#: The kernel's COMMAND_LINE_SIZE on x86 (arch/x86/include/asm/setup.h), including the NUL.
COMMAND_LINE_SIZE = 2048
ENDINGS = ("poweroff", "shell", "exit", "hang")


def init_script() -> bytes:
    """Return the bytes of nubis's guest init (init.sh, shipped with the package)."""
    return resources.files("nubis.image").joinpath("init.sh").read_bytes()


@dataclass(frozen=True)
class GuestImages:
    """Paths and checksums of the default guest's kernel, initramfs and root disk."""

    kernel: KernelImages
    initramfs_image: InitramfsImage
    rootfs_image: RootfsImage

    @property
    def bzimage(self) -> Path:
        """The bzImage (boot by the x86 boot protocol)."""
        return self.kernel.bzimage

    @property
    def vmlinux(self) -> Path:
        """The ELF vmlinux (boot by PVH)."""
        return self.kernel.vmlinux

    @property
    def initramfs(self) -> Path:
        """The uncompressed newc initramfs with busybox, modules and nubis's init."""
        return self.initramfs_image.path

    @property
    def rootfs(self) -> Path:
        """The ext4 root disk (boot with the initramfs and ``root=/dev/vda``)."""
        return self.rootfs_image.path

    def cmdline(self, command: str | None = None, **options: Any) -> str:
        """Return a kernel command line running ``command``; options as for `guest_cmdline`."""
        return guest_cmdline(command, **options)

    def manifest(self) -> dict[str, object]:
        """Return a JSON-ready description of every image with its SHA-256."""
        return {
            "kernel_package": f"{self.kernel.package}={self.kernel.package_version}",
            "kernel_release": self.kernel.release,
            "bzImage": {"path": str(self.bzimage), "sha256": self.kernel.bzimage_sha256},
            "vmlinux": {
                "path": str(self.vmlinux),
                "sha256": self.kernel.vmlinux_sha256,
                "pvh_entry": hex(self.kernel.pvh_entry),
            },
            "initramfs": {
                "path": str(self.initramfs),
                "sha256": self.initramfs_image.sha256,
                "modules": list(self.initramfs_image.modules),
            },
            "rootfs": {
                "path": str(self.rootfs),
                "sha256": self.rootfs_image.sha256,
                "packages": list(self.rootfs_image.packages),
            },
        }


def userland_spec(
    apt: Apt,
    kernel: DebPackage,
    modules: Sequence[str],
    optional_modules: Sequence[str],
    init: bytes,
) -> UserlandSpec:
    """Return the userland spec for a kernel package, resolving busybox."""
    busybox = apt.resolve([BUSYBOX_PACKAGE])[BUSYBOX_PACKAGE]
    return UserlandSpec(
        kernel=kernel,
        busybox=busybox,
        modules=tuple(modules),
        optional_modules=tuple(optional_modules),
        init=init,
    )


def build_boot_images(
    cache: Cache,
    kernel_metapackage: str,
    modules: Sequence[str],
    optional_modules: Sequence[str],
    init: bytes,
    with_vmlinux: bool = True,
) -> tuple[KernelImages, InitramfsImage]:
    """Build a kernel and a matching initramfs with the given modules and init program.

    ``with_vmlinux`` false skips extracting the ELF vmlinux (for kernels only booted as bzImage).
    """
    apt = Apt(cache)
    kernel_package = apt.resolve_metapackage(kernel_metapackage, "linux-image-")
    spec = userland_spec(apt, kernel_package, modules, optional_modules, init)
    with Workspace(cache, apt) as workspace:
        kernel = build_kernel(
            cache, apt, kernel_package, lambda: workspace.tree(kernel_package), with_vmlinux
        )
        initramfs = build_initramfs(cache, workspace, spec)
    return kernel, initramfs


def build_guest_images(
    cache_dir: Path | None = None,
    *,
    rootfs_packages: Sequence[str] = (),
    modules: Sequence[str] = GUEST_MODULES,
    optional_modules: Sequence[str] = GUEST_OPTIONAL_MODULES,
) -> GuestImages:
    """Build, or find in the cache, the default guest's kernel, initramfs and root disk.

    ``rootfs_packages`` names Debian packages whose programs are added to the root disk.
    """
    cache = Cache(cache_dir)
    apt = Apt(cache)
    kernel_package = apt.resolve_metapackage(GUEST_KERNEL_METAPACKAGE, "linux-image-")
    spec = userland_spec(apt, kernel_package, modules, optional_modules, init_script())
    with Workspace(cache, apt) as workspace:
        kernel = build_kernel(cache, apt, kernel_package, lambda: workspace.tree(kernel_package))
        initramfs = build_initramfs(cache, workspace, spec)
        rootfs = build_rootfs(cache, apt, workspace, spec, rootfs_packages)
    return GuestImages(kernel=kernel, initramfs_image=initramfs, rootfs_image=rootfs)


def encode_command(command: str) -> str:
    """Return the ``nubis.cmd=`` parameter that makes the guest's init run a shell command."""
    return "nubis.cmd=" + base64.b64encode(command.encode()).decode()


def guest_cmdline(
    command: str | None = None,
    *,
    console: str = "ttyS0",
    script: str | None = None,
    end: str = "poweroff",
    root: str | None = None,
    quiet: bool = True,
    extra: Sequence[str] = (),
) -> str:
    """Return a kernel command line for the guest init.

    ``command`` is a shell command to run (base64-encoded into ``nubis.cmd=``); ``script`` a disk
    holding a script instead (e.g. ``/dev/vdb``); ``end`` what init does afterwards (poweroff,
    shell, exit, hang); ``root`` a root disk to switch to (e.g. ``/dev/vda``).
    """
    if end not in ENDINGS:
        raise ValueError(f"The init ending {end!r} is not one of {', '.join(ENDINGS)}.")
    parts = [f"console={console}", "panic=-1"]
    if quiet:
        parts.append("quiet")
    if root is not None:
        parts += [f"root={root}", "rw"]
    if command is not None:
        parts.append(encode_command(command))
    if script is not None:
        parts.append(f"nubis.script={script}")
    if end != "poweroff":
        parts.append(f"nubis.end={end}")
    parts += list(extra)
    cmdline = " ".join(parts)
    if len(cmdline) >= COMMAND_LINE_SIZE:
        raise ValueError(
            f"The kernel command line would be {len(cmdline)} bytes, over the kernel's limit of "
            f"{COMMAND_LINE_SIZE - 1}; pass a long command as a script disk instead."
        )
    return cmdline


def write_script_disk(script: str, path: Path) -> Path:
    """Write a shell script as a raw disk image for ``nubis.script=`` (zero-padded to 4 KiB)."""
    data = script.encode()
    if not data.endswith(b"\n"):
        data += b"\n"
    path.write_bytes(data + b"\0" * (-len(data) % 4096))
    return path
