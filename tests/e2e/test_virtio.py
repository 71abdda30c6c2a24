"""End-to-end tests of nubis's PCI virtio devices with a real Linux guest in the nested test host:
virtio-blk (root disk, data integrity, FLUSH, read-only disks, DISCARD), virtio-rng and the
virtio console.

Each boot costs 30-40 s there, so every test boots once and checks several things:

* the root file system on /dev/vda, and 64 MiB written with O_DIRECT that the host reads back
  byte for byte after the guest powers off;
* data the guest flushed (``sync /dev/vda``) that is on the host's disk image even though nubis
  is then killed with SIGKILL;
* a ``direct=on`` disk on a loop block device (native AIO, requests that follow one another on
  disk merged into one iocb): a burst of writeback and large O_DIRECT reads keep every byte;
* a ``readonly=on`` disk that reads as the host file and refuses writes, a discarded disk whose
  image file gives its blocks back, and ``/dev/hwrng``;
* the init's markers on hvc0, written by ``--console file=PATH``.

The discarded disk's image lives on the testbed's own /tmp (a tmpfs), not in `e2e_dir`: the work
share reaches the testbed over 9p, which has no fallocate(2), so nubis could not punch holes in
an image there (it then keeps the data, as discarding is only a hint).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nubis.image import GuestImages

pytestmark = pytest.mark.e2e

RunGuest = Callable[..., Any]  # the run_guest fixture, returning a GuestRun

BOOT_TIMEOUT = 300.0
TEST_TIMEOUT = BOOT_TIMEOUT + 120
# 64 MiB written and read back with O_DIRECT through an emulated nested host: measured from
# 133 s to over 300 s on the same machine, so this boot gets more room.
DIRECT_TIMEOUT = 600.0
MIB = 1 << 20
DIRECT_MIB = 64
DATA_DISK_MIB = 80
SYNC_MIB = 32
LOOP_MIB = 40
LOOP_DATA_MIB = 32
RO_DISK_MIB = 8
DISCARD_MIB = 32
SHA256_RE = "[0-9a-f]{64}"

# Runs the VMM in the background (argv after the log path), waits for the guest's "synced ...
# end" line in its serial log, then kills it with SIGKILL: no chance to flush anything more.
# A guest that reaches NUBIS-HANG without that line is killed at once.
KILL_AFTER_SYNC = r"""
log=$1; shift
"$@" &
vmm=$!
n=0
synced() { grep -Eq 'synced sha256=[0-9a-f]{64} end' "$log" 2>/dev/null; }
until synced; do
    if ! kill -0 "$vmm" 2>/dev/null; then
        wait "$vmm"
        echo "wrapper: the VMM exited with $? before the guest synced"
        exit 90
    fi
    if grep -q NUBIS-HANG "$log" 2>/dev/null && ! synced; then
        kill -KILL "$vmm"
        echo "wrapper: the guest hung without syncing"
        exit 93
    fi
    n=$((n + 1))
    if [ "$n" -gt 2500 ]; then
        kill -KILL "$vmm"
        echo "wrapper: the guest did not sync in time"
        exit 91
    fi
    sleep 0.1
done
kill -KILL "$vmm"
wait "$vmm"
echo "vmm-status=$?"
"""

# Fills a disk image on the testbed's /tmp with random bytes, runs the VMM (argv after the image
# path) and reports the image's allocated 512-byte blocks, size and hash before and after.
DISCARD_IMAGE = r"""
img=$1; shift
head -c $((DISCARD_MIB * 1048576)) /dev/urandom >"$img" || exit 92
echo "image-before blocks=$(stat -c %b "$img") size=$(stat -c %s "$img")"
"$@"
status=$?
echo "vmm-status=$status"
echo "image-after blocks=$(stat -c %b "$img") size=$(stat -c %s "$img")"
echo "image-after sha256=$(sha256sum "$img" | cut -c1-64)"
rm -f "$img"
exit "$status"
""".replace("DISCARD_MIB", str(DISCARD_MIB))


# Attaches a zeroed image on the testbed's /tmp to a loop device reached through a symbolic link,
# runs the VMM (argv after the image, link, API socket and serial log paths) until the guest
# hangs at its end, prints the device counters from the API, stops the VMM with SIGTERM and
# prints its status and the hashes of the image's first LOOP_DATA_MIB MiB and of the rest.
LOOP_DISK = r"""
img=$1; link=$2; sock=$3; log=$4; shift 4
py=$1
truncate -s LOOP_MIBM "$img" || exit 92
dev=$(losetup --find --show "$img") || { echo "wrapper: no loop device"; rm -f "$img"; exit 92; }
ln -sf "$dev" "$link"
cleanup() { losetup --detach "$dev"; rm -f "$img" "$link" "$sock"; }
"$@" &
vmm=$!
n=0
until grep -q NUBIS-HANG "$log" 2>/dev/null; do
    if ! kill -0 "$vmm" 2>/dev/null; then
        wait "$vmm"
        echo "wrapper: the VMM exited with $? before the guest's end"
        cleanup
        exit 90
    fi
    n=$((n + 1))
    if [ "$n" -gt 3000 ]; then
        kill -KILL "$vmm"
        echo "wrapper: the guest did not finish in time"
        cleanup
        exit 91
    fi
    sleep 0.1
done
echo "counters=$("$py" -m nubis.api.remote --api-socket "path=$sock" counters | tr -d '\n')"
kill -TERM "$vmm"
wait "$vmm"
echo "vmm-status=$?"
echo "image-data sha256=$(head -c $((LOOP_DATA_MIB * 1048576)) "$img" | sha256sum | cut -c1-64)"
echo "image-rest sha256=$(tail -c +$((LOOP_DATA_MIB * 1048576 + 1)) "$img" | sha256sum | cut -c1-64)"
cleanup
""".replace("LOOP_DATA_MIB", str(LOOP_DATA_MIB)).replace("LOOP_MIB", str(LOOP_MIB))


def wait_for_disks(*names: str) -> str:
    """Shell lines waiting up to 20 s for each block device (init only waits for ``root=``);
    without them a write to a device node not yet created would make a regular file instead.
    """
    return (
        f"for d in {' '.join(names)}; do n=0\n"
        '  while [ ! -b "$d" ] && [ "$n" -lt 200 ]; do usleep 100000; n=$((n + 1)); done\n'
        '  [ -b "$d" ] || { echo "disk-missing=$d"; exit 97; }\n'
        "done\n"
    )


def nubis(guest_images: GuestImages, cmdline: str, disks: list[str], *extra: str) -> list[str]:
    """nubis booting the default guest with 2 vCPUs and 256 MiB, serial console to ``{serial}``."""
    return [
        sys.executable, "-m", "nubis", "--kernel", str(guest_images.bzimage),
        "--initramfs", str(guest_images.initramfs), "--cmdline", cmdline,
        "--cpus", "boot=2", "--memory", "size=256M", "--no-reboot",
        "--serial", "file={serial}", *(["--disk", *disks] if disks else []), *extra,
    ]  # fmt: skip


def guest_value(console: str, name: str, pattern: str = r"\S*") -> str:
    """The value of the guest's ``name=value`` line."""
    match = re.search(rf"^{re.escape(name)}=({pattern})\r?$", console, re.MULTILINE)
    assert match, f"the guest printed no {name}= line matching {pattern!r}"
    return match.group(1)


def output_value(output: str, pattern: str) -> int:
    match = re.search(pattern, output, re.MULTILINE)
    assert match, f"the wrapper printed no line matching {pattern!r}: {output}"
    return int(match.group(1))


def sha256_of(path: Path, size: int) -> str:
    with path.open("rb") as f:
        data = f.read(size)
    assert len(data) == size, f"{path} holds {len(data)} bytes, expected at least {size}"
    return hashlib.sha256(data).hexdigest()


def assert_powered_off(run: Any) -> None:
    assert run.markers.userspace, "the guest never reached init"
    assert run.markers.module_failures == ()
    assert run.markers.exit_status == 0
    assert run.markers.poweroff and run.markers.ending == "NUBIS-POWEROFF"
    assert run.returncode == 0, f"nubis exited with {run.returncode}: {run.output}"


@pytest.mark.timeout(DIRECT_TIMEOUT + 120, func_only=True)
def test_ext4_root_on_vda_and_direct_writes_reach_the_image_intact(
    run_guest: RunGuest, guest_images: GuestImages, e2e_dir: Path
) -> None:
    rootfs = e2e_dir / "rootfs.ext4"
    shutil.copyfile(guest_images.rootfs, rootfs)
    data = e2e_dir / "data.img"
    with data.open("wb") as f:
        f.truncate(DATA_DISK_MIB * MIB)
    command = wait_for_disks("/dev/vdb") + (
        "grep ' / ext4 ' /proc/mounts\n"
        "echo written-by-the-guest >/nubis-virtio-test\n"
        "echo vdb-sectors=$(cat /sys/block/vdb/size)\n"
        f"dd if=/dev/urandom of=/dev/vdb bs=1M count={DIRECT_MIB} oflag=direct 2>/dev/null\n"
        "echo dd-status=$?\n"
        f"h=$(dd if=/dev/vdb bs=1M count={DIRECT_MIB} iflag=direct 2>/dev/null | sha256sum)\n"
        'echo "direct-sha256=${h%% *}"\n'
    )
    cmdline = guest_images.cmdline(command, root="/dev/vda")
    run = run_guest(
        nubis(guest_images, cmdline, [f"path={rootfs}", f"path={data}"]), DIRECT_TIMEOUT
    )

    console = run.console
    assert "NUBIS-ROOT=/dev/vda" in console, "init did not mount /dev/vda as the root"
    assert re.search(r"^NUBIS-ROOTFS\r?$", console, re.MULTILINE), "init never ran from the root"
    assert re.search(r"^/dev/vda / ext4 rw[ ,]", console, re.MULTILINE), "/ is not ext4 rw"
    assert int(guest_value(console, "vdb-sectors", r"\d+")) == DATA_DISK_MIB * MIB // 512
    assert guest_value(console, "dd-status") == "0", "the O_DIRECT write failed in the guest"
    assert_powered_off(run)

    guest_hash = guest_value(console, "direct-sha256", SHA256_RE)
    assert sha256_of(data, DIRECT_MIB * MIB) == guest_hash, (
        "the image's first 64 MiB differ from what the guest wrote and read back"
    )
    with data.open("rb") as f:
        f.seek(DIRECT_MIB * MIB)
        assert f.read() == bytes((DATA_DISK_MIB - DIRECT_MIB) * MIB), "bytes past 64 MiB changed"
    assert data.stat().st_size == DATA_DISK_MIB * MIB

    # The root file system's write is on the image too (once its journal is replayed).
    fsck = subprocess.run(
        ["e2fsck", "-fy", str(rootfs)], capture_output=True, text=True, check=False
    )
    assert fsck.returncode in (0, 1), f"e2fsck found errors: {fsck.stdout}{fsck.stderr}"
    cat = subprocess.run(
        ["debugfs", "-R", "cat /nubis-virtio-test", str(rootfs)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert cat.stdout == "written-by-the-guest\n", cat.stderr


@pytest.mark.timeout(TEST_TIMEOUT, func_only=True)
def test_flushed_data_survives_sigkill_of_nubis(
    run_guest: RunGuest, guest_images: GuestImages, e2e_dir: Path
) -> None:
    data = e2e_dir / "data.img"
    with data.open("wb") as f:
        f.truncate(SYNC_MIB * MIB)
    # A buffered write, then fsync of the device (a virtio-blk FLUSH); the hash is of the bytes
    # written, kept on the guest's tmpfs.
    command = wait_for_disks("/dev/vda") + (
        "echo write-cache=$(cat /sys/block/vda/queue/write_cache)\n"
        f"head -c {SYNC_MIB * MIB} /dev/urandom >/tmp/data\n"
        "h=$(sha256sum </tmp/data)\n"
        "dd if=/tmp/data of=/dev/vda bs=1M 2>/dev/null && sync /dev/vda && "
        'echo "synced sha256=${h%% *} end"\n'
    )
    cmdline = guest_images.cmdline(command, end="hang")
    argv = nubis(guest_images, cmdline, [f"path={data}"])
    run = run_guest(["sh", "-c", KILL_AFTER_SYNC, "sh", "{serial}", *argv], BOOT_TIMEOUT)

    assert run.returncode == 0, f"the wrapper failed: {run.output}"
    assert "vmm-status=137" in run.output, f"nubis was not killed by SIGKILL: {run.output}"
    assert run.markers.module_failures == ()
    # VIRTIO_BLK_F_FLUSH makes the guest treat the disk as a write-back cache, so its fsync
    # sends a FLUSH request.
    assert guest_value(run.console, "write-cache", "[a-z ]+") == "write back"
    match = re.search(rf"synced sha256=({SHA256_RE}) end", run.console)
    assert match, "the guest never reported its synced data"
    assert sha256_of(data, SYNC_MIB * MIB) == match.group(1), (
        "data the guest flushed is not on the image after nubis was killed"
    )


@pytest.mark.timeout(TEST_TIMEOUT, func_only=True)
def test_a_direct_disk_on_a_block_device_merges_requests_and_keeps_every_byte(
    run_guest: RunGuest, guest_images: GuestImages, e2e_dir: Path
) -> None:
    name = uuid.uuid4().hex
    image = f"/tmp/nubis-e2e-loop-{name}.img"  # the testbed's tmpfs, behind a loop device
    link = f"/tmp/nubis-e2e-loop-{name}.dev"
    socket = f"/tmp/nubis-e2e-loop-{name}.sock"  # a short path on a file system with sockets
    size = LOOP_DATA_MIB * MIB
    # Writeback of a buffered write sends runs of requests that follow one another; a 4 MiB
    # O_DIRECT read is split by the guest into several requests in flight at once.
    command = wait_for_disks("/dev/vda") + (
        f"head -c {size} /dev/urandom >/tmp/data\n"
        "h=$(sha256sum </tmp/data)\n"
        'echo "written-sha256=${h%% *}"\n'
        "dd if=/tmp/data of=/dev/vda bs=1M 2>/dev/null && sync /dev/vda && echo synced=yes\n"
        f"h=$(dd if=/dev/vda bs=4M count={LOOP_DATA_MIB // 4} iflag=direct 2>/dev/null"
        " | sha256sum)\n"
        'echo "read-sha256=${h%% *}"\n'
    )
    cmdline = guest_images.cmdline(command, end="hang")
    argv = nubis(
        guest_images, cmdline, [f"path={link},direct=on,id=loop"],
        "--api-socket", f"path={socket}",
    )  # fmt: skip
    wrapper = [image, link, socket, "{serial}", *argv]
    run = run_guest(["sh", "-c", LOOP_DISK, "sh", *wrapper], BOOT_TIMEOUT)

    assert "vmm-status=0" in run.output, f"nubis did not stop cleanly: {run.output}"
    console = run.console
    assert run.markers.module_failures == ()
    assert guest_value(console, "synced") == "yes", "the guest's write or sync failed"
    written = guest_value(console, "written-sha256", SHA256_RE)
    assert guest_value(console, "read-sha256", SHA256_RE) == written, (
        "the guest's O_DIRECT read-back differs from what it wrote"
    )
    assert f"image-data sha256={written}" in run.output, "the image differs from the guest's data"
    zeroes = hashlib.sha256(bytes((LOOP_MIB - LOOP_DATA_MIB) * MIB)).hexdigest()
    assert f"image-rest sha256={zeroes}" in run.output, "bytes past the guest's data changed"
    line = re.search(r"^counters=(.*)$", run.output, re.MULTILINE)
    assert line, f"the wrapper printed no counters: {run.output}"
    counters = json.loads(line.group(1))["loop"]
    assert counters["io_errors"] == 0
    assert counters["write_bytes"] >= size and counters["read_bytes"] >= size
    assert counters["flush_ops"] >= 1, "the guest's fsync sent no FLUSH"
    # The disk went through native AIO, and requests shared iocbs.
    assert counters["merged_requests"] > 0, counters


@pytest.mark.timeout(TEST_TIMEOUT, func_only=True)
def test_readonly_disk_discard_and_hwrng(
    run_guest: RunGuest, guest_images: GuestImages, e2e_dir: Path
) -> None:
    readonly = e2e_dir / "readonly.img"
    readonly.write_bytes(os.urandom(RO_DISK_MIB * MIB))
    os.utime(readonly, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    ro_hash = sha256_of(readonly, RO_DISK_MIB * MIB)
    ro_mtime = readonly.stat().st_mtime_ns
    discard_image = f"/tmp/nubis-e2e-discard-{uuid.uuid4().hex}.img"  # the testbed's tmpfs
    command = wait_for_disks("/dev/vda", "/dev/vdb") + (
        "echo ro-flag=$(blockdev --getro /dev/vda)\n"
        "h=$(sha256sum </dev/vda)\n"
        'echo "ro-sha256=${h%% *}"\n'
        "if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then\n"
        "echo ro-write=accepted; else echo ro-write=refused; fi\n"
        "echo discard-max=$(cat /sys/block/vdb/queue/discard_max_bytes)\n"
        "blkdiscard /dev/vdb\n"
        "echo discard-status=$?\n"
        "h=$(sha256sum </dev/vdb)\n"
        'echo "discarded-sha256=${h%% *}"\n'
        "echo hwrng-current=$(cat /sys/class/misc/hw_random/rng_current)\n"
        "echo hwrng=$(head -c 64 /dev/hwrng | od -An -tx1 -v | tr -d ' \\n')\n"
    )
    cmdline = guest_images.cmdline(command)
    disks = [f"path={readonly},readonly=on", f"path={discard_image}"]
    argv = nubis(guest_images, cmdline, disks)
    run = run_guest(["sh", "-c", DISCARD_IMAGE, "sh", discard_image, *argv], BOOT_TIMEOUT)

    console = run.console
    assert_powered_off(run)
    # The read-only disk: the guest sees it read-only, reads the host's bytes, cannot write.
    assert guest_value(console, "ro-flag") == "1", "the guest does not see /dev/vda as read-only"
    assert guest_value(console, "ro-sha256", SHA256_RE) == ro_hash
    assert guest_value(console, "ro-write") == "refused", "a write to the read-only disk worked"
    assert sha256_of(readonly, RO_DISK_MIB * MIB) == ro_hash, "the read-only image changed"
    assert readonly.stat().st_size == RO_DISK_MIB * MIB
    assert readonly.stat().st_mtime_ns == ro_mtime, "the read-only image's mtime changed"

    # Discard: the guest's blkdiscard punches holes in the image, which keeps its size.
    assert int(guest_value(console, "discard-max", r"\d+")) > 0, "vdb does not offer discard"
    assert guest_value(console, "discard-status") == "0", "blkdiscard failed in the guest"
    zeroes = hashlib.sha256(bytes(DISCARD_MIB * MIB)).hexdigest()
    assert guest_value(console, "discarded-sha256", SHA256_RE) == zeroes
    before = output_value(run.output, r"^image-before blocks=(\d+) ")
    after = output_value(run.output, r"^image-after blocks=(\d+) ")
    assert before >= DISCARD_MIB * MIB // 512, f"the image was not fully allocated: {before}"
    assert after <= before // 8, f"the image kept {after} of its {before} blocks after discard"
    assert output_value(run.output, r"^image-after blocks=\d+ size=(\d+)$") == DISCARD_MIB * MIB
    assert f"image-after sha256={zeroes}" in run.output

    # virtio-rng: the guest's hwrng is nubis's device and gives 64 bytes, not all zero.
    assert guest_value(console, "hwrng-current").startswith("virtio_rng")
    entropy = bytes.fromhex(guest_value(console, "hwrng", "[0-9a-f]*"))
    assert len(entropy) == 64, f"/dev/hwrng gave {len(entropy)} bytes"
    assert entropy != bytes(64)


@pytest.mark.timeout(TEST_TIMEOUT, func_only=True)
def test_virtio_console_carries_the_init_markers(
    run_guest: RunGuest, guest_images: GuestImages, e2e_dir: Path, parse_markers: Any
) -> None:
    console_log = e2e_dir / "hvc0.log"
    cmdline = guest_images.cmdline("echo hello-over-hvc0; exit 3", console="hvc0")
    argv = nubis(guest_images, cmdline, [], "--console", f"file={console_log}")
    run = run_guest(argv, BOOT_TIMEOUT)

    assert run.returncode == 0, f"nubis exited with {run.returncode}: {run.output}"
    assert console_log.exists(), "nubis wrote no hvc0 log"
    hvc0 = console_log.read_text(errors="replace")
    markers = parse_markers(hvc0)
    assert markers.userspace, f"no NUBIS-USERSPACE on hvc0: {hvc0[-2000:]}"
    assert markers.module_failures == ()
    assert re.search(r"^hello-over-hvc0\r?$", hvc0, re.MULTILINE)
    assert markers.exit_status == 3
    assert markers.poweroff and markers.ending == "NUBIS-POWEROFF"
    # With console=hvc0 nothing of the init's goes to the serial port.
    assert "NUBIS-USERSPACE" not in run.console
