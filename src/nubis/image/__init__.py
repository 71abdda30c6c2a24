"""Guest images built from Debian packages into a content-addressed cache.

nubis's end-to-end tests boot Debian's cloud kernel (as a bzImage, and as the ELF vmlinux inside
it for PVH boots) with a small initramfs (busybox, the virtio and vsock modules, nubis's init) or
an ext4 root disk with the same userland plus chosen Debian programs. Everything comes from
Debian packages through ``apt-get download``, keyed by the packages' checksums, so rebuilding is
reproducible and a warm cache answers immediately. The CLI is ``python -m nubis.image build``.
"""

from __future__ import annotations

from nubis.image.cache import Cache, default_cache_dir
from nubis.image.errors import ImageError, MissingToolError, PackageNotFoundError
from nubis.image.guest import (
    GUEST_MODULES,
    GuestImages,
    build_boot_images,
    build_guest_images,
    encode_command,
    guest_cmdline,
    init_script,
    write_script_disk,
)
from nubis.image.markers import InitMarkers, parse_markers

__all__ = [
    "GUEST_MODULES",
    "Cache",
    "GuestImages",
    "ImageError",
    "InitMarkers",
    "MissingToolError",
    "PackageNotFoundError",
    "build_boot_images",
    "build_guest_images",
    "default_cache_dir",
    "encode_command",
    "guest_cmdline",
    "init_script",
    "parse_markers",
    "write_script_disk",
]
