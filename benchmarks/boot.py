"""Boot time to the guest's userspace marker, nubis against QEMU, in one testbed session.

Every VMM is timed the same way: the VMM is started with its serial console on its standard
output, read through a pipe, and the time from starting the VMM to the arrival of the line with
the init's ``NUBIS-USERSPACE`` marker is one sample. Each VMM runs ``--runs`` times (interleaved),
and the medians are compared. The timing loop runs inside the testbed (the nested test host on
PVM machines, where absolute times are TCG-inflated and only the ratio means something): this
script starts one `TestbedSession` and runs itself there with ``--inner``.

VMMs are command templates (lists of words) with ``{kernel}``, ``{initramfs}``, ``{cmdline}``
and ``{bindir}`` (the virtual environment's bin directory) placeholders; add one to `VMMS` to
compare it too. If nubis does not reach the
marker (for instance because it cannot boot a kernel yet), QEMU alone is measured and the JSON
line reports ``"nubis": null`` with the reason.

Usage: ``.venv/bin/python benchmarks/boot.py [--runs N] [--kernel bzimage|vmlinux]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _guestrun import Killer, l1_cpus_argument
from _report import emit

MARKER = b"NUBIS-USERSPACE"
REFERENCE = "qemu"
VMMS: dict[str, list[str]] = {
    "qemu": [
        "qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host", "-smp", "2",
        "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-kernel", "{kernel}", "-initrd", "{initramfs}", "-append", "{cmdline}", "-no-reboot",
    ],
    "nubis": [
        "{bindir}/nubis", "--kernel", "{kernel}", "--initramfs", "{initramfs}",
        "--cmdline", "{cmdline}", "--cpus", "boot=2", "--memory", "size=256M", "--serial", "tty",
        "--no-reboot",
    ],
}  # fmt: skip
#: Seconds one boot may take (to the marker and then to the VMM's exit) before it is killed.
RUN_TIMEOUT = 300.0


def time_boot(argv: list[str], timeout: float) -> tuple[float | None, str]:
    """Start ``argv``, read its console through a pipe; return seconds to the marker and the log."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    marker_at: float | None = None
    lines: list[bytes] = []
    killer = Killer(proc, timeout)
    for line in iter(proc.stdout.readline, b""):
        if marker_at is None and MARKER in line:
            marker_at = time.monotonic() - started
        lines.append(line)
    proc.wait()
    killer.cancel()
    return marker_at, b"".join(lines).decode(errors="replace")


def inner(config: dict[str, object]) -> int:
    """Run every VMM ``runs`` times (interleaved) and print the samples as JSON."""
    runs = int(config["runs"])  # type: ignore[call-overload]
    templates: dict[str, list[str]] = config["vmms"]  # type: ignore[assignment]
    values = {k: str(v) for k, v in config["values"].items()}  # type: ignore[attr-defined]
    samples: dict[str, list[float]] = {name: [] for name in templates}
    failures: dict[str, str] = {}
    for _ in range(runs):
        for name, template in templates.items():
            if name in failures:
                continue
            argv = [word.format(**values) for word in template]
            seconds, log = time_boot(argv, RUN_TIMEOUT)
            if seconds is None:
                # One more try, for the nested host's sake; the failed console is shown.
                print(f"{name} failed once; console tail:\n{log[-3000:]}", file=sys.stderr)
                seconds, log = time_boot(argv, RUN_TIMEOUT)
            if seconds is None:
                failures[name] = "no NUBIS-USERSPACE marker; console tail: " + " | ".join(
                    log.strip().splitlines()[-5:]
                )
            else:
                samples[name].append(seconds)
            print(f"{name}: {seconds}", file=sys.stderr, flush=True)
    print(json.dumps({"samples": samples, "failures": failures}), flush=True)
    return 0


def main() -> int:
    """Build images, start one testbed session, time each VMM inside it and emit the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kernel", choices=["bzimage", "vmlinux"], default="bzimage")
    parser.add_argument(
        "--vmm",
        action="append",
        choices=sorted(VMMS),
        default=None,
        help="VMMs to time (default all)",
    )
    l1_cpus_argument(parser)
    parser.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:
        return inner(json.loads(args.inner))

    from nubis.image import build_guest_images
    from nubis.testbed import TestbedSession

    images = build_guest_images()
    kernel = images.bzimage if args.kernel == "bzimage" else images.vmlinux
    names = args.vmm or list(VMMS)
    config = {
        "runs": args.runs,
        "vmms": {name: VMMS[name] for name in names},
        "values": {
            "kernel": kernel,
            "initramfs": images.initramfs,
            "cmdline": images.cmdline("true"),
            "bindir": os.path.dirname(sys.executable),
        },
    }
    with TestbedSession(cpus=args.l1_cpus) as testbed:
        print(f"boot: {testbed.description}", file=sys.stderr)
        budget = RUN_TIMEOUT * args.runs * len(names) + 60
        result = testbed.run(
            [sys.executable, os.path.abspath(__file__), "--inner", json.dumps(config, default=str)],
            budget,
            stream=sys.stderr,
        )
    if result.returncode != 0:
        print(f"boot: the timing run failed with status {result.returncode}", file=sys.stderr)
        return 1
    data = json.loads(result.output.strip().splitlines()[-1])
    samples: dict[str, list[float]] = data["samples"]
    for name, reason in data["failures"].items():
        print(f"boot: {name} was not measured: {reason}", file=sys.stderr)
    if not samples.get(REFERENCE):
        print("boot: the reference VMM (QEMU) could not be measured", file=sys.stderr)
        return 1
    reference = statistics.median(samples[REFERENCE])
    nubis_samples = samples.get("nubis") or []
    nubis = statistics.median(nubis_samples) if nubis_samples else None
    emit(
        "boot_to_userspace",
        "s",
        nubis,
        reference,
        "qemu-microvm",
        "lower",
        kernel=args.kernel,
        runs=args.runs,
        samples=samples,
        testbed=testbed.mode,
        l1_cpus=args.l1_cpus,
        nubis_failure=data["failures"].get("nubis"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
