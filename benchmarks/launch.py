"""Launch cost: process start to exit for a tiny PVH guest that resets at once, nubis vs QEMU.

Both VMMs boot the same ELF (built here by ``nubis.loader.tiny``): it prints one line on COM1
and triple-faults, and each VMM is told not to reboot (``--no-reboot`` / ``-no-reboot``), so
the process exits as soon as the guest resets. Runs on any /dev/kvm, including PVM hosts.
Wall time and peak RSS (``ru_maxrss`` of the child) are medians over ``--runs`` alternating
runs. The last line is the JSON result (time ratio); RSS figures ride along in it.

nubis runs as the installed ``nubis`` command, next to this interpreter (``.venv/bin/nubis``),
as a user starts it. Its modules are byte-compiled and bundled first (``nubis._bundle``), as
``scripts/install.sh`` does: with an editable install and ``PYTHONDONTWRITEBYTECODE`` set, a module edited since its
last ``.pyc`` would otherwise be compiled from source on every run, and an edited module is
not served from the bundle.

Targets: time ratio <= 0.8, nubis peak RSS <= 25 MiB with 128 MiB of guest memory.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nubis
from _report import emit
from nubis._bundle import build_nubis
from nubis.loader.tiny import build_pvh_elf, reset_code

MESSAGE = b"nubis-launch\n"


def measure(argv: list[str], expect: bytes) -> tuple[float, float]:
    """Run ``argv`` once; return (wall seconds, peak RSS in MiB) and check the guest ran."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    _, _, rusage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    if expect not in out:
        raise SystemExit(f"{argv[0]} did not run the guest: stdout={out!r} stderr={err[-500:]!r}")
    return elapsed, rusage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--memory-mib", type=int, default=128)
    args = parser.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
    command = Path(sys.executable).parent / "nubis"
    if not command.exists():
        raise SystemExit(f"{command} is missing: run scripts/install.sh")
    compileall.compile_dir(Path(nubis.__file__).parent, quiet=1)
    build_nubis()
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Path(tmp) / "tiny.elf"
        kernel.write_bytes(build_pvh_elf(reset_code(MESSAGE)))
        mem = args.memory_mib
        nubis_argv = [
            str(command), "--kernel", str(kernel), "--memory", f"size={mem}M",
            "--no-reboot", "--serial", "tty", "--rng", "off",
        ]  # fmt: skip
        # -cpu qemu64: QEMU's default model on a PVM host asks for MSRs it cannot set.
        qemu_argv = [
            qemu, "-M", "microvm", "-accel", "kvm", "-cpu", "qemu64", "-m", f"{mem}M",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", str(kernel), "-no-reboot",
        ]  # fmt: skip
        samples: dict[str, list[tuple[float, float]]] = {"nubis": [], "qemu": []}
        for _ in range(2):  # warm the page cache for both
            measure(nubis_argv, MESSAGE)
            measure(qemu_argv, MESSAGE)
        for _ in range(args.runs):
            samples["nubis"].append(measure(nubis_argv, MESSAGE))
            samples["qemu"].append(measure(qemu_argv, MESSAGE))
    result = {}
    for name, runs in samples.items():
        wall = statistics.median(t for t, _ in runs) * 1000
        rss = statistics.median(r for _, r in runs)
        result[name] = (wall, rss)
        print(
            f"{name:6} median wall {wall:7.1f} ms   median peak RSS {rss:6.1f} MiB   ({len(runs)} runs)"
        )
    emit(
        "launch",
        "ms",
        round(result["nubis"][0], 2),
        round(result["qemu"][0], 2),
        "qemu-microvm",
        "lower",
        nubis_peak_rss_mib=round(result["nubis"][1], 1),
        reference_peak_rss_mib=round(result["qemu"][1], 1),
        guest_memory_mib=args.memory_mib,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
