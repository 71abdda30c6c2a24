"""Command line for guest images: ``python -m nubis.image build [--cache-dir D] [--package P]``.

Builds (or finds in the cache) the default guest's images and prints their manifest as JSON.
``nubis image`` calls `main` with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from nubis.image.errors import ImageError
from nubis.image.guest import build_guest_images, guest_cmdline


def main(argv: Sequence[str] | None = None) -> int:
    """Run the image command line; returns the exit status (2 for a build error)."""
    parser = argparse.ArgumentParser(prog="nubis image", description="Build nubis guest images.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the guest kernel, initramfs and root disk")
    build.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache directory (default $XDG_CACHE_HOME/nubis or ~/.cache/nubis)",
    )
    build.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="NAME",
        help="add this Debian package's programs to the root disk (repeatable)",
    )
    build.add_argument("-v", "--verbose", action="store_true", help="log each build step")
    cmdline = sub.add_parser("cmdline", help="print a kernel command line that runs a command")
    cmdline.add_argument("--console", default="ttyS0")
    cmdline.add_argument("--end", default="poweroff", choices=["poweroff", "shell", "exit", "hang"])
    cmdline.add_argument("shell_command", help="the shell command the guest runs")
    args = parser.parse_args(argv)

    if args.command == "cmdline":
        try:
            print(guest_cmdline(args.shell_command, console=args.console, end=args.end))
        except ValueError as exc:
            print(f"nubis image: {exc}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        images = build_guest_images(args.cache_dir, rootfs_packages=args.package)
    except ImageError as exc:
        print(f"nubis image: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(images.manifest(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
