"""virtio-net TCP throughput over a tap, nubis against QEMU, in one testbed session.

The guest (Debian's cloud kernel, the default initramfs, and the ext4 root disk with Debian's
``iperf3`` added, read-only on /dev/vda) configures the NIC with nubis's MAC and runs two
``iperf3 -c HOST -t RUNTIME -J`` jobs against an ``iperf3 -s`` on the host side of the tap:

* ``guest_to_host``: the guest sends (TCP), MiB/s received by the host;
* ``host_to_guest``: the same with ``-R``, the host sends, MiB/s received by the guest.

iperf3's JSON report reaches the host as a ``BENCH-JSON`` console line (see ``_guestrun``); the
figure taken is ``end.sum_received.bits_per_second``.

Both VMMs use the same persistent tap (``ip tuntap add ... mode tap vnet_hdr``), made once in a
network namespace of this benchmark's own (``unshare --net``, inside the nested test host), with
the host address and the iperf3 server on it; each VMM attaches to it in turn:

* nubis: ``--net tap=nbench0,mac=MAC`` (virtio-net on the tap with the vnet header, checksum
  and TSO offloads both ways, mergeable receive buffers);
* QEMU 7.2: ``-M microvm,pcie=on`` (no emulated motherboard, a PCIe host bridge so the guest's
  driver is virtio-net-pci as with nubis), ``-netdev tap,ifname=nbench0,vhost=off`` (this kernel
  has no vhost-net, and vhost would move the data path out of the VMM) and
  ``virtio-net-pci`` with its default offloads.

Same kernel, initramfs, root disk, 2 vCPUs and 256 MiB; ``--runs`` runs of each VMM, interleaved
with the order alternating, and medians compared. CPU cost: the VMM process's user and system
time (every thread, the guest's vCPUs included, as for any KVM VMM) over each job's window,
per GiB moved: ``*_cpu_s_per_gib``. The guest's NIC counters (``/sys/class/net/*/statistics``)
give the mean size of the frames it received and sent in each job, ``guest_frame_bytes``
([received, sent] per run): with TSO and GSO a frame can be a 64 KiB train of segments, and the
sizes tell how many frames, so how many per-frame costs, a GiB took with each VMM.

Targets: both ratios (nubis / QEMU) >= 1.0.

Output: one JSON line of ``benchmarks/_report.py`` per direction (``net_guest_to_host``,
``net_host_to_guest``), then, last, ``net`` whose value is the geometric mean of the two ratios
(reference 1.0). In the nested test host everything runs under TCG, so absolute figures mean
little; the ratios do.

Usage: ``.venv/bin/python benchmarks/net.py [--runs N] [--runtime S] [--vmm NAME]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
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
REFERENCE_NAME = "qemu-microvm-pcie-tap"
TAP = "nbench0"
HOST_IP = "192.168.251.1"
GUEST_IP = "192.168.251.2"
MAC = "02:6e:75:62:01:01"
VMMS: dict[str, list[str]] = {
    "qemu": [
        *QEMU_ROOT_DISK_ARGV,
        "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
    ],
    "nubis": [
        *NUBIS_ROOT_DISK_ARGV,
        "--disk", "path={rootfs},readonly=on", "--net", f"tap={TAP},mac={MAC}",
    ],
}  # fmt: skip

GIB = 1 << 30
MIB = 1 << 20
#: (job name, extra iperf3 arguments).
JOBS: tuple[tuple[str, str], ...] = (("guest_to_host", ""), ("host_to_guest", "-R"))
TARGET_RATIO = 1.0
#: Seconds one VMM run (boot, both jobs, power-off) may take before it is killed.
RUN_TIMEOUT = 420.0

# The guest's command (busybox sh): find the NIC by MAC, address it, wait for the carrier and the
# host's answer, then run each job between BENCH-JOB-START and BENCH-JOB-END lines.
GUEST_SCRIPT = """\
for d in /sys/class/net/*; do [ "$(cat $d/address)" = {mac} ] && i=${{d##*/}}; done
[ -n "$i" ] || {{ echo BENCH-NO-NIC; ls /sys/class/net; exit 97; }}
ip addr add {guest}/24 dev $i && ip link set $i up
n=0; while [ "$(cat /sys/class/net/$i/carrier)" != 1 ] && [ $n -lt 100 ]; do
usleep 100000; n=$((n+1)); done
ping -c 3 -W 5 {host} >/dev/null || echo BENCH-NO-PING
nic() {{ for f in rx_packets rx_bytes tx_packets tx_bytes; do
cat /sys/class/net/$i/statistics/$f; done | tr '\\n' , | sed 's/,$//'; }}
j() {{
n=$1; shift; a=$(nic); echo BENCH-JOB-START $n
iperf3 -c {host} -t {runtime} -J "$@" >/tmp/$n.json 2>/tmp/$n.err
s=$?; echo BENCH-JOB-END $n $s
[ $s = 0 ] || {{ tail -5 /tmp/$n.err; head -c 3000 /tmp/$n.json; exit $s; }}
report $n /tmp/$n.json
echo "{{\\"before\\": [$a], \\"after\\": [$(nic)]}}" >/tmp/$n.nic
report $n.nic /tmp/$n.nic
}}
"""


def guest_command(runtime: int) -> str:
    """The shell command the guest's init runs: every job of `JOBS`."""
    script = GUEST_REPORT_FUNCTION + GUEST_SCRIPT.format(
        mac=MAC, guest=GUEST_IP, host=HOST_IP, runtime=runtime
    )
    return script + "".join(f"j {name} {args}\n" for name, args in JOBS)


def _frame_sizes(nic: dict[str, list[int]] | None) -> dict[str, float]:
    """The mean size of the frames the guest's NIC received and sent in one job, in bytes.

    Counted by the guest's driver (``/sys/class/net/*/statistics``), so the same for both VMMs;
    with the TSO and GSO offloads a frame can be a 64 KiB segment train, and the mean tells how
    many frames, and so how many per-frame costs, a GiB took.
    """
    if nic is None:
        return {}
    rx_packets, rx_bytes, tx_packets, tx_bytes = (
        after - before for before, after in zip(nic["before"], nic["after"], strict=True)
    )
    return {
        "rx_frame_bytes": round(rx_bytes / max(rx_packets, 1)),
        "tx_frame_bytes": round(tx_bytes / max(tx_packets, 1)),
    }


def measure(run: GuestRun) -> dict[str, Any] | None:
    """Throughput and CPU cost of each job of a finished run, or None (with run.problems)."""
    jobs: dict[str, dict[str, Any]] = {}
    for name, _args in JOBS:
        report = run.reports.get(name)
        if report is None or run.job_status.get(name) != 0:
            run.problems.append(f"no iperf3 result for {name}")
            continue
        if report.get("error"):
            run.problems.append(f"iperf3 reported {report['error']!r} for {name}")
            continue
        received = report["end"]["sum_received"]
        gib = received["bytes"] / GIB
        cpu = run.job_cpu_s.get(name, math.nan)
        jobs[name] = {
            "value": received["bits_per_second"] / 8 / MIB,
            "gib": gib,
            "seconds": received["seconds"],
            "cpu_s": cpu,
            "threads": run.job_thread_cpu_s.get(name, {}),
            "kvm": run.job_kvm.get(name, {}),
            "retransmits": report["end"].get("sum_sent", {}).get("retransmits", -1),
            **_frame_sizes(run.reports.get(f"{name}.nic")),
        }
    if run.problems:
        return None
    return {"jobs": jobs, "wall_s": run.wall_s, "process_cpu_s": run.process_cpu_s}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _describe(result: dict[str, Any]) -> str:
    return ", ".join(
        f"{job} {m['value']:.2f} MiB/s ({m['cpu_s']:.2f} s CPU for {m['gib'] * 1024:.0f} MiB, "
        f"{m['retransmits']} retransmits; mean frame rx {m.get('rx_frame_bytes')} "
        f"tx {m.get('tx_frame_bytes')} bytes; by thread {m['threads']})"
        for job, m in result["jobs"].items()
    )


def inner(config: dict[str, Any]) -> int:
    """In a fresh network namespace: make the tap and the server, run every VMM, print JSON."""
    _ip("tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
    _ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
    _ip("link", "set", TAP, "up")
    server = subprocess.Popen(
        ["iperf3", "-s", "-B", HOST_IP], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        outcome = run_rounds("net", config, RUN_TIMEOUT, measure, _describe)
    finally:
        server.kill()
        server.wait()
    print(json.dumps(outcome), flush=True)
    return 0


def _cpu_s_per_gib(runs: list[dict[str, Any]], jobs: list[str]) -> float | None:
    """Median over runs of the job windows' CPU seconds per GiB moved in them."""
    return cpu_per_unit(runs, jobs, "gib", 1.0)


def report(
    samples: dict[str, list[dict[str, Any]]], failures: dict[str, str], **common: Any
) -> int:
    """Emit one JSON line per direction, then the combined summary line."""
    reference_runs = samples.get(REFERENCE) or []
    nubis_runs = samples.get("nubis") or []
    ratios: dict[str, float | None] = {}
    for name, _args in JOBS:
        reference = median([r["jobs"][name]["value"] for r in reference_runs])
        nubis = median([r["jobs"][name]["value"] for r in nubis_runs])
        if reference is None:
            return 1
        ratio = None if nubis is None else nubis / reference
        ratios[name] = ratio
        emit(
            f"net_{name}",
            "MiB/s",
            rounded(nubis, 2),
            round(reference, 2),
            REFERENCE_NAME,
            "higher",
            target_ratio=TARGET_RATIO,
            meets_target=None if ratio is None else ratio >= TARGET_RATIO,
            nubis_cpu_s_per_gib=rounded(_cpu_s_per_gib(nubis_runs, [name]), 1),
            qemu_cpu_s_per_gib=rounded(_cpu_s_per_gib(reference_runs, [name]), 1),
            samples={
                vmm: [round(r["jobs"][name]["value"], 2) for r in runs]
                for vmm, runs in samples.items()
            },
            thread_cpu_s={
                vmm: [r["jobs"][name]["threads"] for r in runs] for vmm, runs in samples.items()
            },
            kvm_stats={
                vmm: [r["jobs"][name].get("kvm", {}) for r in runs] for vmm, runs in samples.items()
            },
            retransmits={
                vmm: [r["jobs"][name]["retransmits"] for r in runs] for vmm, runs in samples.items()
            },
            guest_frame_bytes={
                vmm: [
                    [r["jobs"][name].get("rx_frame_bytes"), r["jobs"][name].get("tx_frame_bytes")]
                    for r in runs
                ]
                for vmm, runs in samples.items()
            },
            **common,
            nubis_failure=failures.get("nubis"),
        )
    geomean = geometric_mean(list(ratios.values()))
    all_jobs = [name for name, _ in JOBS]
    emit(
        "net",
        "geomean of ratios",
        rounded(geomean),
        1.0,
        REFERENCE_NAME,
        "higher",
        ratios={k: rounded(v) for k, v in ratios.items()},
        target_ratio=TARGET_RATIO,
        nubis_cpu_s_per_gib=rounded(_cpu_s_per_gib(nubis_runs, all_jobs), 1),
        qemu_cpu_s_per_gib=rounded(_cpu_s_per_gib(reference_runs, all_jobs), 1),
        wall_s={vmm: [round(r["wall_s"], 1) for r in runs] for vmm, runs in samples.items()},
        **common,
        nubis_failure=failures.get("nubis"),
    )
    return 0


def main() -> int:
    """Build images, start one testbed session, run each VMM inside it and emit the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    vmm_arguments(parser, list(VMMS), "seconds per iperf3 job (default 8)")
    args = parser.parse_args()
    if args.inner is not None:
        return inner(json.loads(args.inner))

    from nubis.image import build_guest_images
    from nubis.testbed import TestbedError, TestbedSession

    images = build_guest_images(rootfs_packages=["iperf3"])
    names = args.vmm or list(VMMS)
    config = {
        "runs": args.runs,
        "vmms": {name: VMMS[name] for name in names},
        "values": {
            "kernel": images.bzimage,
            "initramfs": images.initramfs,
            "rootfs": images.rootfs,
            "cmdline": images.cmdline(guest_command(args.runtime), root="/dev/vda", extra=["ro"]),
            "bindir": os.path.dirname(sys.executable),
        },
    }
    started = time.monotonic()
    try:
        with TestbedSession(cpus=args.l1_cpus) as testbed:
            print(f"net: {testbed.description}", file=sys.stderr)
            budget = RUN_TIMEOUT * args.runs * len(names) + 120
            command = ["unshare", "--net", sys.executable, os.path.abspath(__file__)]
            result = testbed.run(
                [*command, "--inner", json.dumps(config, default=str)],
                budget,
                stream=sys.stderr,
            )
    except TestbedError as exc:
        print(f"net: the testbed failed: {exc}", file=sys.stderr)
        return 1
    if result.returncode != 0:
        print(f"net: the measuring run failed with status {result.returncode}", file=sys.stderr)
        return 1
    outcome = json.loads(result.output.strip().splitlines()[-1])
    samples: dict[str, list[dict[str, Any]]] = outcome["samples"]
    failures: dict[str, str] = outcome["failures"]
    for name, reason in failures.items():
        print(f"net: {name} was not measured: {reason}", file=sys.stderr)
    if not samples.get(REFERENCE):
        print("net: the reference VMM (QEMU) could not be measured", file=sys.stderr)
        return 1
    return report(
        samples,
        failures,
        runs=args.runs,
        iperf3_runtime_s=args.runtime,
        testbed=testbed.mode,
        l1_cpus=args.l1_cpus,
        elapsed_s=round(time.monotonic() - started, 1),
    )


if __name__ == "__main__":
    sys.exit(main())
