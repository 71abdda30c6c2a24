"""virtio-blk throughput inside a Linux guest, nubis against QEMU, in one testbed session.

The guest (Debian's cloud kernel, the default initramfs, and the ext4 root disk with Debian's
``fio`` added, read-only on /dev/vda) runs three fio jobs against a raw data disk on /dev/vdb,
each with ``--direct=1 --ioengine=libaio --iodepth=32 --time_based`` and ``--runtime=8`` by default:

* ``seq_read``: sequential 1 MiB reads, MiB/s;
* ``randread_4k``: 4 KiB random reads, IOPS;
* ``seq_write``: sequential 1 MiB writes, MiB/s.

fio writes JSON to the guest's /tmp; the guest hands it over as a ``BENCH-JSON <job> <data>``
console line (gzipped and base64-encoded, see ``_guestrun``), which is parsed here. Both VMMs boot the same kernel,
initramfs, root disk and the same data disk file (256 MiB, filled with random bytes once per
invocation, in the testbed's shared work directory), with 2 vCPUs and 256 MiB; they run
``--runs`` times each, interleaved, the order alternating from one round to the next, and the
medians are compared.

Disk set-ups, chosen to do the same work per request:

* the data disk: by default (``--data-on loop``) the image is copied to /tmp on the machine
  that runs the VMMs (L1's tmpfs in the nested test host) and attached as a loop block device,
  a fast local disk as a cloud host would have. ``--data-on file`` uses the image file where
  it is, in the work directory: in the nested test host that is a 9p share, where a 1 MiB
  O_DIRECT read costs about 20 ms and a 4 KiB one about 6 ms, so the figures then measure how
  well each VMM overlaps 9p's latency rather than its own cost.
* nubis: ``--disk path=DATA,direct=on``, so the disk is opened with O_DIRECT; on a block
  device (or a local ext4 or XFS file) nubis's queue worker submits reads and writes by native
  AIO (``io_submit``), many in flight at once, as QEMU does; on 9p, where ``io_submit`` is
  synchronous, a pool of I/O threads calls ``preadv``/``pwritev`` instead.
* QEMU 7.2: ``-M microvm,pcie=on`` (no emulated motherboard, as with nubis, plus a PCIe host
  bridge described by ACPI so the guest's driver is virtio-blk-pci, as with nubis, not
  virtio-mmio), ``-drive ...,format=raw,cache=none,aio=native`` (cache=none is O_DIRECT on the
  host with a write-back cache towards the guest, which is what nubis offers with
  VIRTIO_BLK_F_FLUSH; aio=native is the Linux AIO that cloud set-ups pair with cache=none, and
  lets QEMU keep many requests in flight) and ``virtio-blk-pci,num-queues=1`` (QEMU's default is
  one queue per vCPU; nubis has one).

CPU cost: the user and system time of the VMM process (every thread, so including the guest's
own vCPU time, as for any KVM VMM) is read from ``/proc/PID/stat`` at each job's
``BENCH-JOB-START`` and ``BENCH-JOB-END`` console lines (``_guestrun.run_vmm``; fio's
``exec_prerun`` repeats the start line when its I/O begins, and the later reading counts, so
fio's own start-up is left out), and divided by the MiB that job moved (fio's ``io_kbytes``):
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
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _guestrun import (
    GUEST_REPORT_FUNCTION,
    NUBIS_ROOT_DISK_ARGV,
    QEMU_ROOT_DISK_ARGV,
    GuestRun,
    cpu_per_unit,
    geometric_mean,
    median,
    rounded,
    run_rounds,
    vmm_arguments,
)
from _report import emit

REFERENCE = "qemu"
REFERENCE_NAME = "qemu-microvm-pcie"
VMMS: dict[str, list[str]] = {
    "qemu": [
        *QEMU_ROOT_DISK_ARGV,
        "-drive", "if=none,id=data,file={data},format=raw,cache=none,aio=native",
        "-device", "virtio-blk-pci,drive=data,num-queues=1",
    ],
    "nubis": [
        *NUBIS_ROOT_DISK_ARGV,
        "--disk", "path={rootfs},readonly=on", "path={data},direct=on",
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

# The guest's command (busybox sh). It waits for the data disk, reports its size, and runs each
# job between BENCH-JOB-START and BENCH-JOB-END lines; fio repeats the start line when the job's
# I/O begins (its exec_prerun command, whose output fio redirects to <job>.prerun.txt in the
# working directory, hence /tmp and the tee to the console). fio's JSON follows on one
# BENCH-JSON line (the report function of _guestrun).
GUEST_SCRIPT = """\
cd /tmp
i=0; while [ ! -b {dev} ] && [ $i -lt 200 ]; do usleep 100000; i=$((i+1)); done
echo BENCH-DATA-SECTORS=$(cat /sys/block/{name}/size)
j() {{
n=$1; shift; echo BENCH-JOB-START $n
fio --name=$n --filename={dev} --direct=1 --ioengine=libaio --iodepth={iodepth} \
--runtime={runtime} --time_based --output-format=json --output=$n.json \
--exec_prerun="echo BENCH-JOB-START $n | tee /dev/console" "$@" >$n.err 2>&1
s=$?; echo BENCH-JOB-END $n $s
[ $s = 0 ] || {{ tail -5 $n.err; exit $s; }}
report $n $n.json
}}
"""


def guest_command(runtime: int) -> str:
    """The shell command the guest's init runs: every job of `JOBS` against the data disk."""
    script = GUEST_REPORT_FUNCTION + GUEST_SCRIPT.format(
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


def measure(run: GuestRun) -> dict[str, Any] | None:
    """Each job's figure and CPU cost from a finished run, or None (with run.problems)."""
    sectors = None
    for line in run.log.splitlines():
        if line.startswith("BENCH-DATA-SECTORS="):
            value = line.partition("=")[2].strip()
            sectors = int(value) if value.isdigit() else None
    if sectors != DATA_DISK_MIB * MIB // 512:
        run.problems.append(
            f"the guest saw {sectors} sectors on {DATA_DEVICE}, not {DATA_DISK_MIB} MiB"
        )
    jobs: dict[str, dict[str, Any]] = {}
    for name, _args, direction, unit, _target in JOBS:
        fio = run.reports.get(name)
        if fio is None or run.job_status.get(name) != 0:
            run.problems.append(f"no fio result for {name}")
            continue
        job = fio["jobs"][0]
        if job.get("error"):
            run.problems.append(f"fio reported error {job['error']} for {name}")
            continue
        stats = job[direction]
        jobs[name] = {
            "value": stats["bw"] / 1024 if unit == "MiB/s" else stats["iops"],
            "mib": stats["io_kbytes"] / 1024,
            "runtime_s": stats["runtime"] / 1000,
            "cpu_s": run.job_cpu_s.get(name, math.nan),
            "threads": run.job_thread_cpu_s.get(name, {}),
            "kvm": run.job_kvm.get(name, {}),
        }
    if run.problems:
        return None
    return {"jobs": jobs, "process_cpu_s": run.process_cpu_s, "wall_s": run.wall_s}


def _describe(result: dict[str, Any]) -> str:
    return ", ".join(
        f"{job} {m['value']:.1f} ({m['cpu_s']:.2f} s CPU for {m['mib']:.0f} MiB "
        f"in {m['runtime_s']:.1f} s; by thread {m['threads']})"
        for job, m in result["jobs"].items()
    )


def _attach_loop(image: str) -> tuple[str, str]:
    """Copy ``image`` to this machine's /tmp and attach it as a loop block device.

    Returns the device and the copy. In the nested test host /tmp is L1's tmpfs, so the device
    stands for a fast local disk and the figures measure the VMMs, not the 9p share that carries
    the work directory (where a 4 KiB O_DIRECT read takes milliseconds of emulated round trips).
    """
    fd, local = tempfile.mkstemp(prefix="nubis-bench-block-", suffix=".img", dir="/tmp")
    os.close(fd)
    shutil.copyfile(image, local)
    try:
        done = subprocess.run(
            ["losetup", "--find", "--show", local], check=True, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        os.unlink(local)
        detail = getattr(exc, "stderr", "") or exc
        raise SystemExit(f"block: cannot attach the data disk to a loop device: {detail}") from exc
    return done.stdout.strip(), local


def inner(config: dict[str, Any]) -> int:
    """Run every VMM ``runs`` times (interleaved, alternating order) and print the results."""
    values = config["values"]
    device = local = None
    if config["data_on"] == "loop":
        device, local = _attach_loop(values["data"])
        values["data"] = device
        print(f"block: the data disk is {device}, a loop device over {local}", file=sys.stderr)
    try:
        outcome = run_rounds("block", config, RUN_TIMEOUT, measure, _describe)
    finally:
        if device is not None:
            subprocess.run(["losetup", "--detach", device], check=False)
        if local is not None:
            os.unlink(local)
    print(json.dumps(outcome), flush=True)
    return 0


def _cpu_ms_per_mib(runs: list[dict[str, Any]], jobs: list[str]) -> float | None:
    """Median over runs of the job windows' CPU milliseconds per MiB moved in them."""
    return cpu_per_unit(runs, jobs, "mib", 1000.0)


def _process_cpu_ms_per_mib(runs: list[dict[str, Any]]) -> float | None:
    per_run = [
        run["process_cpu_s"] * 1000 / sum(j["mib"] for j in run["jobs"].values()) for run in runs
    ]
    return statistics.median(per_run) if per_run else None


def report(
    samples: dict[str, list[dict[str, Any]]], failures: dict[str, str], **common: Any
) -> int:
    """Emit one JSON line per job, then the combined summary line."""
    reference_runs = samples.get(REFERENCE) or []
    nubis_runs = samples.get("nubis") or []
    ratios: dict[str, float | None] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for name, _args, _direction, unit, target in JOBS:
        reference = median([r["jobs"][name]["value"] for r in reference_runs])
        nubis = median([r["jobs"][name]["value"] for r in nubis_runs])
        if reference is None:
            return 1
        ratio = None if nubis is None else nubis / reference
        ratios[name] = ratio
        extra = {
            "target_ratio": target,
            "meets_target": None if ratio is None else ratio >= target,
            "nubis_cpu_ms_per_mib": rounded(_cpu_ms_per_mib(nubis_runs, [name])),
            "qemu_cpu_ms_per_mib": rounded(_cpu_ms_per_mib(reference_runs, [name])),
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
            "thread_cpu_s": {
                vmm: [r["jobs"][name]["threads"] for r in runs] for vmm, runs in samples.items()
            },
            "kvm_stats": {
                vmm: [r["jobs"][name].get("kvm", {}) for r in runs] for vmm, runs in samples.items()
            },
            **common,
            "nubis_failure": failures.get("nubis"),
        }
        metrics[name] = {"unit": unit, "nubis": rounded(nubis, 2), "qemu": rounded(reference, 2)}
        emit(f"block_{name}", unit, nubis, reference, REFERENCE_NAME, "higher", **extra)
    geomean = geometric_mean(list(ratios.values()))
    all_jobs = [name for name, *_ in JOBS]
    emit(
        "block",
        "geomean of ratios",
        geomean,
        1.0,
        REFERENCE_NAME,
        "higher",
        ratios={k: rounded(v) for k, v in ratios.items()},
        metrics=metrics,
        targets={name: target for name, *_, target in JOBS},
        nubis_cpu_ms_per_mib=rounded(_cpu_ms_per_mib(nubis_runs, all_jobs)),
        qemu_cpu_ms_per_mib=rounded(_cpu_ms_per_mib(reference_runs, all_jobs)),
        nubis_process_cpu_ms_per_mib=rounded(_process_cpu_ms_per_mib(nubis_runs)),
        qemu_process_cpu_ms_per_mib=rounded(_process_cpu_ms_per_mib(reference_runs)),
        wall_s={vmm: [round(r["wall_s"], 1) for r in runs] for vmm, runs in samples.items()},
        **common,
        nubis_failure=failures.get("nubis"),
    )
    return 0


def main() -> int:
    """Build images, start one testbed session, run each VMM inside it and emit the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    vmm_arguments(parser, list(VMMS), "seconds per fio job (default 8)")
    parser.add_argument(
        "--data-on",
        choices=("loop", "file"),
        default="loop",
        help="the data disk as a loop device over a copy in /tmp (default) or the image file "
        "itself, in the work directory (a 9p share in the nested test host)",
    )
    args = parser.parse_args()
    if args.inner is not None:
        return inner(json.loads(args.inner))

    from nubis.image import build_guest_images
    from nubis.testbed import TestbedError, TestbedSession

    images = build_guest_images(rootfs_packages=["fio"])
    names = args.vmm or list(VMMS)
    testbed = TestbedSession(cpus=args.l1_cpus)
    data = testbed.workdir / "bench-block" / "data.img"
    make_data_disk(data, DATA_DISK_MIB)
    config = {
        "runs": args.runs,
        "data_on": args.data_on,
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
        data_on=args.data_on,
        testbed=testbed.mode,
        l1_cpus=args.l1_cpus,
        elapsed_s=round(time.monotonic() - started, 1),
    )


if __name__ == "__main__":
    sys.exit(main())
