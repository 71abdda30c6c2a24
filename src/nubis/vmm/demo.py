"""``nubis demo``: build the default guest and boot it to a command that shows what it runs on.

The guest (Debian's cloud kernel, a busybox initramfs, see ``nubis.image``) prints its kernel
version and vCPU count from its own ``uname`` and ``nproc``, then powers off; nubis exits with
the guest's verdict. On a host whose /dev/kvm cannot run an unmodified Linux kernel (PVM), the
demo says so and runs the same VM inside the nested test host (``nubis.testbed``) instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nubis.arch.x86_64.host import detect_host_kvm

DEMO_COMMAND = 'echo "nubis demo: guest kernel $(uname -r) running on $(nproc) vCPUs"'


def main(argv: Sequence[str]) -> int:
    """Run the demo; returns nubis's exit status (0 when the guest powered off cleanly)."""
    parser = argparse.ArgumentParser(prog="nubis demo", description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2, help="vCPUs for the guest (default 2)")
    parser.add_argument("--memory", default="256M", help="guest memory (default 256M)")
    parser.add_argument(
        "--kernel",
        choices=("vmlinux", "bzImage"),
        default="vmlinux",
        help="boot the ELF vmlinux through PVH (default) or the bzImage",
    )
    parser.add_argument("--cache-dir", help="image cache (default ~/.cache/nubis)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds the nested test host may take (default 600)",
    )
    args = parser.parse_args(list(argv))

    from pathlib import Path

    from nubis.image import build_guest_images
    from nubis.image.errors import ImageError

    print(
        "nubis demo: building the default guest from Debian packages (cached after the first run)",
        flush=True,
    )
    try:
        images = build_guest_images(Path(args.cache_dir) if args.cache_dir else None)
    except ImageError as error:
        print(f"nubis: error: {error}", file=sys.stderr)
        return 1
    kernel = images.vmlinux if args.kernel == "vmlinux" else images.bzimage
    vm_argv = [
        sys.executable, "-m", "nubis",
        "--kernel", str(kernel), "--initramfs", str(images.initramfs),
        "--cmdline", images.cmdline(DEMO_COMMAND),
        "--cpus", f"boot={args.cpus}", "--memory", f"size={args.memory}",
        "--serial", "tty", "--no-reboot",
    ]  # fmt: skip
    host = detect_host_kvm()
    if host.can_run_linux:
        import subprocess

        print(f"nubis demo: booting {kernel.name} with {args.cpus} vCPUs", flush=True)
        return subprocess.call(vm_argv, stdin=subprocess.DEVNULL)

    from nubis.testbed import TestbedError, TestbedSession

    print(f"nubis demo: {host.reason}; running the demo VM there instead", flush=True)
    try:
        with TestbedSession(
            mode="nested", cache_dir=Path(args.cache_dir) if args.cache_dir else None
        ) as bed:
            print(
                f"nubis demo: nested test host ready in {bed.boot_seconds:.1f} s; booting {kernel.name} "
                f"with {args.cpus} vCPUs",
                flush=True,
            )
            result = bed.run(vm_argv, args.timeout, stream=sys.stdout)
    except TestbedError as error:
        print(f"nubis: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"nubis demo: nubis exited with status {result.returncode}", flush=True)
    return result.returncode
