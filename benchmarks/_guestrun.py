"""Running a VMM whose Linux guest reports on its console, for benchmarks in the testbed.

A benchmark guest announces each measured job with ``BENCH-JOB-START NAME`` and
``BENCH-JOB-END NAME STATUS`` lines and hands over a tool's JSON report as
``BENCH-JSON NAME DATA`` (``DATA`` is the report gzipped and base64-encoded, so it fits on one
line). :func:`run_vmm` starts the VMM with its console on standard output, reads it line by
line, takes the VMM process's CPU time at each job's start and end (every thread, so the guest's
vCPU time too, as for any KVM VMM) and returns what the guest reported; :func:`run_rounds`
runs several VMMs in interleaved rounds, and the rest are the statistics the reports share.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONSOLE_TAIL_LINES = 25

#: The start of both VMMs' command lines for a guest with the read-only root disk: the same
#: kernel, initramfs, command line, 2 vCPUs and 256 MiB; console on standard output, a reset ends
#: the VMM. QEMU runs microvm with a PCIe host bridge, so the guest's drivers are virtio-pci as
#: with nubis, and names its threads (``debug-threads``) so CPU time can be told apart by thread
#: as with nubis. Placeholders: ``{kernel}``, ``{initramfs}``, ``{cmdline}``, ``{rootfs}``,
#: ``{bindir}`` (the virtual environment's bin directory).
QEMU_ROOT_DISK_ARGV: tuple[str, ...] = (
    "qemu-system-x86_64", "-M", "microvm,pcie=on", "-enable-kvm", "-cpu", "host",
    "-smp", "2", "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none",
    "-serial", "stdio", "-kernel", "{kernel}", "-initrd", "{initramfs}",
    "-append", "{cmdline}", "-no-reboot", "-name", "reference,debug-threads=on",
    "-drive", "if=none,id=root,file={rootfs},format=raw,readonly=on",
    "-device", "virtio-blk-pci,drive=root,num-queues=1",
)  # fmt: skip
NUBIS_ROOT_DISK_ARGV: tuple[str, ...] = (
    "{bindir}/nubis", "--kernel", "{kernel}", "--initramfs", "{initramfs}",
    "--cmdline", "{cmdline}", "--cpus", "boot=2", "--memory", "size=256M", "--serial", "tty",
    "--no-reboot",
)  # fmt: skip

#: Guest shell function printing file $2 as a ``BENCH-JSON $1`` line.
GUEST_REPORT_FUNCTION = "report() { echo BENCH-JSON $1 $(gzip -c $2 | base64 | tr -d '\\n'); }\n"


def _stat_times(path: str) -> tuple[str, float, float] | None:
    """The command name, user and system seconds of a proc(5) ``stat`` file, or None."""
    try:
        with open(path, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    end = stat.rindex(b")")
    fields = stat[end + 2 :].split()
    # Fields 14 and 15 of proc(5), counted from the state (field 3) after the command name.
    tick = os.sysconf("SC_CLK_TCK")
    name = stat[stat.index(b"(") + 1 : end].decode(errors="replace")
    return name, int(fields[11]) / tick, int(fields[12]) / tick


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system time of every thread of process ``pid`` so far, from /proc."""
    times = _stat_times(f"/proc/{pid}/stat")
    return None if times is None else times[1] + times[2]


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User and system time so far of process ``pid``'s threads, summed by thread kind.

    Keys are ``KIND user`` and ``KIND sys``. For a vCPU thread, time in the guest counts as user.
    A thread's kind is its kernel name with each run of digits replaced by ``#`` (``vcpu0`` and
    ``vcpu1`` are ``vcpu#``; QEMU's ``CPU 0/KVM`` is ``CPU #/KVM``). Threads that ended are not
    counted.
    """
    kinds: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kinds
    for tid in tids:
        times = _stat_times(f"/proc/{pid}/task/{tid}/stat")
        if times is None:
            continue
        name, user, system = times
        kind = re.sub(r"\d+", "#", name)
        for key, seconds in ((f"{kind} user", user), (f"{kind} sys", system)):
            kinds[key] = kinds.get(key, 0.0) + seconds
    return kinds


KVM_DEBUGFS = "/sys/kernel/debug/kvm"


def mount_debugfs() -> None:
    """Mount debugfs if it is not, so :func:`kvm_stats` can read KVM's per-VM counters.

    Needs root; without it (or without debugfs) the counters are simply not reported.
    """
    if not os.path.isdir(KVM_DEBUGFS):
        subprocess.run(
            ["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"],
            check=False,
            capture_output=True,
        )


def kvm_stats(pid: int) -> dict[str, int]:
    """KVM's counters for the VMs of process ``pid`` (vCPU counters summed over its vCPUs).

    KVM keeps one debugfs directory per VM, ``PID-FD``, holding one file per counter: exits by
    reason (``io_exits``, ``mmio_exits``, ``irq_exits``, ``halt_exits``...), interrupts injected,
    halt polling. The same counters exist for every VMM, so they compare the work each one makes
    the host's KVM do. Empty when debugfs is not mounted.
    """
    stats: dict[str, int] = {}
    try:
        names = [n for n in os.listdir(KVM_DEBUGFS) if n.startswith(f"{pid}-")]
    except OSError:
        return stats
    for name in names:
        directory = os.path.join(KVM_DEBUGFS, name)
        try:
            counters = os.listdir(directory)
        except OSError:
            continue
        for counter in counters:
            try:
                with open(os.path.join(directory, counter), "rb") as f:
                    value = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            stats[counter] = stats.get(counter, 0) + value
    return stats


#: The KVM counters a job reports (see :func:`kvm_stats`), when they moved.
KVM_REPORTED_STATS = (
    "exits",
    "io_exits",
    "mmio_exits",
    "irq_exits",
    "halt_exits",
    "request_irq_exits",
    "signal_exits",
    "irq_window_exits",
    "irq_injections",
    "halt_successful_poll",
    "halt_attempted_poll",
    "halt_wakeup",
    "halt_poll_success_ns",
    "halt_wait_ns",
    "pf_taken",
    "pf_fixed",
    "tlb_flush",
    "invlpg",
    "pages_4k",
    "pages_2m",
)


def _kvm_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    # pages_4k and pages_2m are levels (pages mapped now), not counts: the later value is kept.
    return {
        name: after[name] if name.startswith("pages_") else after[name] - before.get(name, 0)
        for name in KVM_REPORTED_STATS
        if name in after and (name.startswith("pages_") or after[name] != before.get(name, 0))
    }


def _thread_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        kind: round(seconds - before.get(kind, 0.0), 2)
        for kind, seconds in sorted(after.items(), key=lambda item: -item[1])
        if seconds - before.get(kind, 0.0) > 0
    }


class Killer:
    """Kills a process that outlives its timeout (so a hung guest cannot stall a benchmark)."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Arm the timer for ``proc``."""
        self.fired = False

        def kill() -> None:
            self.fired = True
            proc.kill()

        self._timer = threading.Timer(timeout, kill)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        """Disarm the timer."""
        self._timer.cancel()


@dataclass
class GuestRun:
    """What one VMM run produced: console log, per-job CPU seconds and statuses, reports."""

    log: str = ""
    returncode: int = 0
    killed: bool = False
    wall_s: float = 0.0
    process_cpu_s: float = 0.0
    job_cpu_s: dict[str, float] = field(default_factory=dict)
    job_thread_cpu_s: dict[str, dict[str, float]] = field(default_factory=dict)
    job_kvm: dict[str, dict[str, int]] = field(default_factory=dict)
    job_status: dict[str, int] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def tail(self) -> str:
        """The last console lines, joined for a one-line failure reason."""
        return " | ".join(self.log.strip().splitlines()[-CONSOLE_TAIL_LINES:])


def run_vmm(argv: list[str], timeout: float) -> GuestRun:
    """Run ``argv`` to its end (killed after ``timeout`` seconds) and collect its guest's reports."""
    run = GuestRun()
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    killer = Killer(proc, timeout)
    lines: list[str] = []
    cpu_start: dict[str, float | None] = {}
    threads_start: dict[str, dict[str, float]] = {}
    kvm_start: dict[str, dict[str, int]] = {}
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        words = line.split()
        if words[:1] == ["BENCH-JOB-START"] and len(words) == 2:
            cpu_start[words[1]] = process_cpu_seconds(proc.pid)
            threads_start[words[1]] = thread_cpu_seconds(proc.pid)
            kvm_start[words[1]] = kvm_stats(proc.pid)
        elif words[:1] == ["BENCH-JOB-END"] and len(words) == 3:
            before, after = cpu_start.get(words[1]), process_cpu_seconds(proc.pid)
            if before is not None and after is not None:
                run.job_cpu_s[words[1]] = after - before
                run.job_thread_cpu_s[words[1]] = _thread_delta(
                    threads_start.get(words[1], {}), thread_cpu_seconds(proc.pid)
                )
                run.job_kvm[words[1]] = _kvm_delta(kvm_start.get(words[1], {}), kvm_stats(proc.pid))
            run.job_status[words[1]] = int(words[2]) if words[2].isdigit() else -1
        elif words[:1] == ["BENCH-JSON"] and len(words) == 3:
            try:
                run.reports[words[1]] = json.loads(gzip.decompress(base64.b64decode(words[2])))
            except (ValueError, OSError, EOFError, zlib.error) as exc:
                # A line cut short or garbled on the serial port (the nested host loses
                # characters now and then) fails this run, which is then tried again.
                run.problems.append(f"the report of {words[1]} did not decode ({exc})")
            line = f"BENCH-JSON {words[1]} ({len(words[2])} bytes)"
        lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    killer.cancel()
    run.returncode = os.waitstatus_to_exitcode(status)
    run.killed = killer.fired
    run.wall_s = time.monotonic() - started
    run.process_cpu_s = usage.ru_utime + usage.ru_stime
    run.log = "\n".join(lines)
    if run.killed:
        run.problems.append(f"killed after {timeout:.0f} s")
    elif run.returncode != 0:
        run.problems.append(f"the VMM exited with status {run.returncode}")
    return run


Measure = Callable[[GuestRun], "dict[str, Any] | None"]
Describe = Callable[["dict[str, Any]"], str]


def run_rounds(
    label: str,
    config: dict[str, Any],
    timeout: float,
    measure: Measure,
    describe: Describe,
) -> dict[str, Any]:
    """Run each VMM of ``config`` ``runs`` times, interleaved with the order alternating.

    ``config`` holds ``runs``, ``vmms`` (name to argv template) and ``values`` (the templates'
    placeholders). ``measure`` turns a finished run into a sample (None when the run failed,
    with its reasons in ``run.problems``); a failed run is tried once more (the nested host has
    bad moments), and a VMM that fails twice is left out of later rounds. Returns
    ``{"samples": {name: [sample...]}, "failures": {name: reason}}``.
    """
    mount_debugfs()
    runs = int(config["runs"])
    templates: dict[str, list[str]] = config["vmms"]
    values = {k: str(v) for k, v in config["values"].items()}
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in templates}
    failures: dict[str, str] = {}
    names = list(templates)
    for round_ in range(runs):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if name in failures:
                continue
            argv = [word.format(**values) for word in templates[name]]
            run = run_vmm(argv, timeout)
            result = measure(run)
            if result is None:
                print(
                    f"{label}: {name} failed once: {'; '.join(run.problems)}\n{run.log[-4000:]}",
                    file=sys.stderr,
                )
                run = run_vmm(argv, timeout)
                result = measure(run)
            if result is None:
                reason = "; ".join(run.problems)
                failures[name] = f"{reason}; console tail: {run.tail()}"
                print(f"{label}: {name} failed: {reason}\n{run.log[-4000:]}", file=sys.stderr)
                continue
            samples[name].append(result)
            print(
                f"{label}: {name} round {round_ + 1}: {describe(result)}; "
                f"{result['wall_s']:.0f} s wall",
                file=sys.stderr,
                flush=True,
            )
    return {"samples": samples, "failures": failures}


def median(values: list[float]) -> float | None:
    """The median of the values that are numbers (NaN marks a missing one), or None."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else None


def rounded(value: float | None, digits: int = 3) -> float | None:
    """``round`` that lets None through."""
    return None if value is None else round(value, digits)


def geometric_mean(ratios: list[float | None]) -> float | None:
    """The geometric mean of the ratios, or None when any is missing."""
    if not ratios or any(r is None for r in ratios):
        return None
    return math.exp(statistics.fmean(math.log(r) for r in ratios if r is not None))


def cpu_per_unit(
    runs: list[dict[str, Any]], jobs: list[str], amount: str, scale: float
) -> float | None:
    """Median over runs of the jobs' CPU seconds (times ``scale``) per unit of ``amount`` moved.

    Each run's ``jobs[name]`` carries ``cpu_s`` and the amount moved under the key ``amount``.
    """
    per_run = []
    for run in runs:
        cpu = sum(run["jobs"][j]["cpu_s"] for j in jobs)
        moved = sum(run["jobs"][j][amount] for j in jobs)
        if moved > 0 and not math.isnan(cpu):
            per_run.append(cpu * scale / moved)
    return statistics.median(per_run) if per_run else None


#: vCPUs of the nested test host when a benchmark runs there. The tests' default is one (see
#: nubis.testbed.session.DEFAULT_CPUS), but on one CPU the VMM's device threads and the guest's
#: two vCPUs take turns, which measures an oversubscribed host; with two, a device thread has a
#: CPU of its own beside the guest's, as on the hosts these VMMs serve. ``--l1-cpus 1`` gives
#: the CPU-bound view.
L1_CPUS = 2


def l1_cpus_argument(parser: argparse.ArgumentParser) -> None:
    """The --l1-cpus option: the nested test host's vCPUs (default `L1_CPUS`)."""
    parser.add_argument(
        "--l1-cpus",
        type=int,
        default=L1_CPUS,
        help=f"vCPUs of the nested test host (default {L1_CPUS})",
    )


def vmm_arguments(parser: argparse.ArgumentParser, vmms: list[str], runtime_help: str) -> None:
    """The options every guest benchmark takes: --runs, --runtime, --vmm, --l1-cpus, --inner."""
    parser.add_argument("--runs", type=int, default=2, help="runs of each VMM (default 2)")
    parser.add_argument("--runtime", type=int, default=8, help=runtime_help)
    parser.add_argument(
        "--vmm",
        action="append",
        choices=sorted(vmms),
        default=None,
        help="VMMs to run (default all; QEMU is needed for the report)",
    )
    l1_cpus_argument(parser)
    parser.add_argument("--inner", default=None, help=argparse.SUPPRESS)
