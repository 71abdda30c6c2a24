"""virtio-blk throughput inside a Linux guest, nubis against QEMU, in one testbed session.

The guest (Debian's cloud kernel, the default initramfs, and the ext4 root disk with Debian's
``fio`` added, read-only on /dev/vda) runs three fio jobs against a raw data disk on /dev/vdb,
each with ``--direct=1 --ioengine=libaio --iodepth=32 --time_based`` and ``--runtime=8`` by default:

* ``seq_read``: sequential 1 MiB reads, MiB/s;
* ``randread_4k``: 4 KiB random reads, IOPS;
* ``seq_write``: sequential 1 MiB writes, MiB/s.

fio writes JSON to the guest's /tmp; the guest prints it gzipped and base64-encoded on one
``BENCH-FIO <job> <data>`` console line, which is parsed here. Both VMMs boot the same kernel,
initramfs, root disk and the same data disk file (256 MiB, filled with random bytes once per
invocation, in the testbed's shared work directory), with 2 vCPUs and 256 MiB; they run
``--runs`` times each, interleaved, the order alternating from one round to the next, and the
medians are compared.

Disk set-ups, chosen to do the same work per request:

* nubis: ``--disk path=DATA,direct=on``, so the image is opened with O_DIRECT; nubis serves its
  single request queue from one worker thread with synchronous ``preadv``/``pwritev``, one
  request at a time, so its throughput is bounded by the backing's latency per request where
  QEMU keeps up to ``iodepth`` requests in flight. In the nested test host the image reaches L1
  over 9p, where a 1 MiB O_DIRECT read costs about 20 ms and a 4 KiB one about 6 ms.
* QEMU 7.2: ``-M microvm,pcie=on`` (no emulated motherboard, as with nubis, plus a PCIe host
  bridge described by ACPI so the guest's driver is virtio-blk-pci, as with nubis, not
  virtio-mmio), ``-drive ...,format=raw,cache=none,aio=native`` (cache=none is O_DIRECT on the
  host with a write-back cache towards the guest, which is what nubis offers with
  VIRTIO_BLK_F_FLUSH; aio=native is the Linux AIO that cloud set-ups pair with cache=none, and
  lets QEMU keep many requests in flight) and ``virtio-blk-pci,num-queues=1`` (QEMU's default is
  one queue per vCPU; nubis has one).

CPU cost: the user and system time of the VMM process (every thread, so including the guest's
own vCPU time, as for any KVM VMM) is read from ``/proc/PID/stat`` when fio announces the start
and the end of a job's I/O on the console (its ``exec_prerun`` and ``exec_postrun`` commands;
the shell's markers around the whole fio run are the fallback), and divided by the MiB that job
moved (fio's ``io_kbytes``):
``*_cpu_ms_per_mib``. The whole process's time from ``os.wait4`` (boot and shutdown included)
per MiB moved in all jobs is reported as ``*_process_cpu_ms_per_mib`` for context.

Targets: sequential read and write ratios (nubis / QEMU) >= 1.0; random-read IOPS ratio >= 0.8.

Output: one JSON line of ``benchmarks/_report.py`` per metric (``block_seq_read``,
``block_randread_4k``, ``block_seq_write``), then, last, ``block`` whose value is the geometric
mean of the three ratios (reference 1.0). In the nested test host (PVM machines) everything runs
under TCG and the data disk reaches L1 over 9p, so absolute figures mean little; the ratios do.

Usage: ``.venv/bin/python benchmarks/block.py [--runs N] [--runtime S] [--vmm NAME]``.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit

REFERENCE = "qemu"
REFERENCE_NAME = "qemu-microvm-pcie"
VMMS: dict[str, list[str]] = {
    "qemu": [
        "qemu-system-x86_64", "-M", "microvm,pcie=on", "-enable-kvm", "-cpu", "host",
        "-smp", "2", "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-kernel", "{kernel}", "-initrd", "{initramfs}",
        "-append", "{cmdline}", "-no-reboot",
        "-drive", "if=none,id=root,file={rootfs},format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root,num-queues=1",
        "-drive", "if=none,id=data,file={data},format=raw,cache=none,aio=native",
        "-device", "virtio-blk-pci,drive=data,num-queues=1",
    ],
    "nubis": [
        "{bindir}/nubis", "--kernel", "{kernel}", "--initramfs", "{initramfs}",
        "--cmdline", "{cmdline}", "--cpus", "boot=2", "--memory", "size=256M", "--serial", "tty",
        "--no-reboot", "--disk", "path={rootfs},readonly=on", "path={data},direct=on",
    ],
}  # fmt: skip

MIB = 1 << 20
DATA_DISK_MIB = 256
DATA_DEVICE = "/dev/vdb"
IODEPTH = 32
#: (job name, fio arguments, the direction fio reports it under, unit, target ratio to QEMU).
JOBS: tuple[tuple[str, str, str, str, float], ...] = (
    ("seq_read", "--rw=read --bs=1M", "read", "MiB/s", 1.0),
    ("randread_4k", "--rw=randread --bs=4k", "read", "IOPS", 0.8),
    ("seq_write", "--rw=write --bs=1M", "write", "MiB/s", 1.0),
)
#: Seconds one VMM run (boot, the three jobs, power-off) may take before it is killed.
RUN_TIMEOUT = 420.0
CONSOLE_TAIL_LINES = 25

# The guest's command (busybox sh). It waits for the data disk, reports its size, and runs each
# job between BENCH-JOB-START and BENCH-JOB-END lines; fio itself prints BENCH-IO-START and
# BENCH-IO-END around the job's I/O (its exec_prerun and exec_postrun commands, whose output
# fio redirects to <job>.prerun.txt in the working directory, hence /tmp and the tee to the
# console). fio's JSON follows on one line.
GUEST_SCRIPT = """\
cd /tmp
i=0; while [ ! -b {dev} ] && [ $i -lt 200 ]; do usleep 100000; i=$((i+1)); done
echo BENCH-DATA-SECTORS=$(cat /sys/block/{name}/size)
j() {{
n=$1; shift; echo BENCH-JOB-START $n
fio --name=$n --filename={dev} --direct=1 --ioengine=libaio --iodepth={iodepth} \
--runtime={runtime} --time_based --output-format=json --output=$n.json \
--exec_prerun="echo BENCH-IO-START $n | tee /dev/console" \
--exec_postrun="echo BENCH-IO-END $n | tee /dev/console" "$@" >$n.err 2>&1
s=$?; echo BENCH-JOB-END $n $s
[ $s = 0 ] || {{ tail -5 $n.err; exit $s; }}
echo BENCH-FIO $n $(gzip -c $n.json | base64 | tr -d '\\n')
}}
"""


def guest_command(runtime: int) -> str:
    """The shell command the guest's init runs: every job of `JOBS` against the data disk."""
    script = GUEST_SCRIPT.format(
        dev=DATA_DEVICE, name=DATA_DEVICE.rsplit("/", 1)[1], iodepth=IODEPTH, runtime=runtime
    )
    return script + "".join(f"j {name} {args}\n" for name, args, *_ in JOBS)


def make_data_disk(path: Path, mib: int) -> None:
    """Write a fresh raw disk image of ``mib`` MiB of random bytes (no holes to read cheaply)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system time of every thread of process ``pid`` so far, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    # Fields 14 and 15 of proc(5), counted from the state (field 3) after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Killer:
    """Kills a process that outlives its timeout (so a hung guest cannot stall the benchmark)."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        self.fired = False

        def kill() -> None:
            self.fired = True
            proc.kill()

        self._timer = threading.Timer(timeout, kill)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()


def run_vmm(argv: list[str], timeout: float) -> tuple[dict[str, Any] | None, str, str]:
    """Run one VMM to the end; return (its measurements or None, a failure reason, its log).

    The console (the VMM's standard output, standard error merged) is read line by line; the
    job markers take CPU readings of the VMM process, ``BENCH-FIO`` lines carry fio's results.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    killer = _Killer(proc, timeout)
    lines: list[str] = []
    cpu_start: dict[str, float | None] = {}
    cpu_end: dict[str, float | None] = {}
    window: dict[str, list[float]] = {}
    fio: dict[str, dict[str, Any]] = {}
    sectors: int | None = None
    problems: list[str] = []
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        words = line.split()
        if words[:1] in (["BENCH-JOB-START"], ["BENCH-IO-START"]) and len(words) == 2:
            # fio's own marker comes later and replaces the shell's.
            cpu_start[words[1]] = process_cpu_seconds(proc.pid)
            window[words[1]] = [time.monotonic()]
        elif words[:1] in (["BENCH-IO-END"], ["BENCH-JOB-END"]) and len(words) >= 2:
            # fio's own marker comes first and is kept.
            if words[1] not in cpu_end:
                cpu_end[words[1]] = process_cpu_seconds(proc.pid)
                window.setdefault(words[1], [math.nan]).append(time.monotonic())
        elif words[:1] == ["BENCH-FIO"] and len(words) == 3:
            try:
                fio[words[1]] = json.loads(gzip.decompress(base64.b64decode(words[2])))
            except (ValueError, OSError) as exc:
                problems.append(f"fio's output for {words[1]} did not decode ({exc})")
            line = f"BENCH-FIO {words[1]} ({len(words[2])} bytes)"
        elif line.startswith("BENCH-DATA-SECTORS="):
            sectors = int(line.partition("=")[2] or "0")
        lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    killer.cancel()
    wall = time.monotonic() - started
    log = "\n".join(lines)

    if killer.fired:
        problems.append(f"killed after {timeout:.0f} s")
    if sectors != DATA_DISK_MIB * MIB // 512:
        problems.append(
            f"the guest saw {sectors} sectors on {DATA_DEVICE}, not {DATA_DISK_MIB} MiB"
        )
    jobs: dict[str, dict[str, float]] = {}
    for name, _args, direction, unit, _target in JOBS:
        if name not in fio:
            problems.append(f"no fio result for {name}")
            continue
        job = fio[name]["jobs"][0]
        if job.get("error"):
            problems.append(f"fio reported error {job['error']} for {name}")
            continue
        stats = job[direction]
        mib = stats["io_kbytes"] / 1024
        before, after = cpu_start.get(name), cpu_end.get(name)
        cpu = None if before is None or after is None else after - before
        jobs[name] = {
            "value": stats["bw"] / 1024 if unit == "MiB/s" else stats["iops"],
            "mib": mib,
            "runtime_s": stats["runtime"] / 1000,
            "cpu_s": cpu if cpu is not None else math.nan,
            "window_s": window[name][-1] - window[name][0]
            if len(window.get(name, [])) == 2
            else math.nan,
        }
    if proc.returncode != 0:
        problems.append(f"the VMM exited with status {proc.returncode}")
    if problems:
        return None, "; ".join(problems), log
    return (
        {
            "jobs": jobs,
            "process_cpu_s": usage.ru_utime + usage.ru_stime,
            "wall_s": wall,
        },
        "",
        log,
    )


def _tail(log: str) -> str:
    return " | ".join(log.strip().splitlines()[-CONSOLE_TAIL_LINES:])


def inner(config: dict[str, Any]) -> int:
    """Run every VMM ``runs`` times (interleaved, alternating order) and print the results."""
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
            result, reason, log = run_vmm(argv, RUN_TIMEOUT)
            if result is None:
                failures[name] = f"{reason}; console tail: {_tail(log)}"
                print(f"block: {name} failed: {reason}\n{log[-4000:]}", file=sys.stderr)
                continue
            samples[name].append(result)
            summary = ", ".join(
                f"{job} {m['value']:.1f} ({m['cpu_s']:.2f} s CPU in {m['window_s']:.1f} s "
                f"for {m['mib']:.0f} MiB)"
                for job, m in result["jobs"].items()
            )
            print(
                f"block: {name} round {round_ + 1}: {summary}; {result['wall_s']:.0f} s wall",
                file=sys.stderr,
                flush=True,
            )
    print(json.dumps({"samples": samples, "failures": failures}), flush=True)
    return 0


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else None


def _cpu_ms_per_mib(runs: list[dict[str, Any]], jobs: list[str]) -> float | None:
    """Median over runs of the job windows' CPU milliseconds per MiB moved in them."""
    per_run = []
    for run in runs:
        cpu = sum(run["jobs"][j]["cpu_s"] for j in jobs)
        mib = sum(run["jobs"][j]["mib"] for j in jobs)
        if mib > 0 and not math.isnan(cpu):
            per_run.append(cpu * 1000 / mib)
    return statistics.median(per_run) if per_run else None


def _process_cpu_ms_per_mib(runs: list[dict[str, Any]]) -> float | None:
    per_run = [
        run["process_cpu_s"] * 1000 / sum(j["mib"] for j in run["jobs"].values()) for run in runs
    ]
    return statistics.median(per_run) if per_run else None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def report(
    samples: dict[str, list[dict[str, Any]]], failures: dict[str, str], **common: Any
) -> int:
    """Emit one JSON line per job, then the combined summary line."""
    reference_runs = samples.get(REFERENCE) or []
    nubis_runs = samples.get("nubis") or []
    ratios: dict[str, float | None] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for name, _args, _direction, unit, target in JOBS:
        reference = _median([r["jobs"][name]["value"] for r in reference_runs])
        nubis = _median([r["jobs"][name]["value"] for r in nubis_runs])
        if reference is None:
            return 1
        ratio = None if nubis is None else nubis / reference
        ratios[name] = ratio
        extra = {
            "target_ratio": target,
            "meets_target": None if ratio is None else ratio >= target,
            "nubis_cpu_ms_per_mib": _round(_cpu_ms_per_mib(nubis_runs, [name])),
            "qemu_cpu_ms_per_mib": _round(_cpu_ms_per_mib(reference_runs, [name])),
            "samples": {
                vmm: [round(r["jobs"][name]["value"], 2) for r in runs]
                for vmm, runs in samples.items()
            },
            "mib_moved": {
                vmm: [round(r["jobs"][name]["mib"], 1) for r in runs]
                for vmm, runs in samples.items()
            },
            "cpu_s": {
                vmm: [round(r["jobs"][name]["cpu_s"], 2) for r in runs]
                for vmm, runs in samples.items()
            },
            **common,
            "nubis_failure": failures.get("nubis"),
        }
        metrics[name] = {"unit": unit, "nubis": _round(nubis, 2), "qemu": _round(reference, 2)}
        emit(f"block_{name}", unit, nubis, reference, REFERENCE_NAME, "higher", **extra)
    known = [r for r in ratios.values() if r is not None]
    geomean = (
        math.exp(statistics.fmean(math.log(r) for r in known)) if len(known) == len(JOBS) else None
    )
    all_jobs = [name for name, *_ in JOBS]
    emit(
        "block",
        "geomean of ratios",
        geomean,
        1.0,
        REFERENCE_NAME,
        "higher",
        ratios={k: _round(v) for k, v in ratios.items()},
        metrics=metrics,
        targets={name: target for name, *_, target in JOBS},
        nubis_cpu_ms_per_mib=_round(_cpu_ms_per_mib(nubis_runs, all_jobs)),
        qemu_cpu_ms_per_mib=_round(_cpu_ms_per_mib(reference_runs, all_jobs)),
        nubis_process_cpu_ms_per_mib=_round(_process_cpu_ms_per_mib(nubis_runs)),
        qemu_process_cpu_ms_per_mib=_round(_process_cpu_ms_per_mib(reference_runs)),
        wall_s={vmm: [round(r["wall_s"], 1) for r in runs] for vmm, runs in samples.items()},
        **common,
        nubis_failure=failures.get("nubis"),
    )
    return 0


def main() -> int:
    """Build images, start one testbed session, run each VMM inside it and emit the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of each VMM (default 2)")
    parser.add_argument("--runtime", type=int, default=8, help="seconds per fio job (default 8)")
    parser.add_argument(
        "--vmm",
        action="append",
        choices=sorted(VMMS),
        default=None,
        help="VMMs to run (default all; QEMU is needed for the report)",
    )
    parser.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:
        return inner(json.loads(args.inner))

    from nubis.image import build_guest_images
    from nubis.testbed import TestbedError, TestbedSession

    images = build_guest_images(rootfs_packages=["fio"])
    names = args.vmm or list(VMMS)
    testbed = TestbedSession()
    data = testbed.workdir / "bench-block" / "data.img"
    make_data_disk(data, DATA_DISK_MIB)
    config = {
        "runs": args.runs,
        "vmms": {name: VMMS[name] for name in names},
        "values": {
            "kernel": images.bzimage,
            "initramfs": images.initramfs,
            "rootfs": images.rootfs,
            "data": data,
            # The root disk is read-only: its journal is never written and nothing but fio
            # touches a disk while the jobs run.
            "cmdline": images.cmdline(guest_command(args.runtime), root="/dev/vda", extra=["ro"]),
            "bindir": os.path.dirname(sys.executable),
        },
    }
    started = time.monotonic()
    try:
        with testbed:
            print(f"block: {testbed.description}", file=sys.stderr)
            budget = RUN_TIMEOUT * args.runs * len(names) + 120
            result = testbed.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--inner",
                    json.dumps(config, default=str),
                ],
                budget,
                stream=sys.stderr,
            )
    except TestbedError as exc:
        print(f"block: the testbed failed: {exc}", file=sys.stderr)
        return 1
    finally:
        data.unlink(missing_ok=True)
    if result.returncode != 0:
        print(f"block: the measuring run failed with status {result.returncode}", file=sys.stderr)
        return 1
    outcome = json.loads(result.output.strip().splitlines()[-1])
    samples: dict[str, list[dict[str, Any]]] = outcome["samples"]
    failures: dict[str, str] = outcome["failures"]
    for name, reason in failures.items():
        print(f"block: {name} was not measured: {reason}", file=sys.stderr)
    if not samples.get(REFERENCE):
        print("block: the reference VMM (QEMU) could not be measured", file=sys.stderr)
        return 1
    return report(
        samples,
        failures,
        runs=args.runs,
        fio_runtime_s=args.runtime,
        iodepth=IODEPTH,
        data_disk_mib=DATA_DISK_MIB,
        testbed=testbed.mode,
        elapsed_s=round(time.monotonic() - started, 1),
    )


if __name__ == "__main__":
    sys.exit(main())
