"""End-to-end tests of nubis's REST API: a real Linux guest driven through the API socket with
``nubis-remote``, in the nested test host.

Each test boots once (about 30-40 s there). A driver script runs in the testbed: it starts
``nubis --api-socket``, sends requests with ``nubis-remote`` and watches the guest's serial log,
printing what it observes as ``OBS name=<json>`` lines that the test asserts on. The first test
walks the whole lifecycle (refused requests, create, boot, info, pause and resume, counters,
the power button and shutdown-vmm); the second presses the power button of a guest running from
its ext4 root disk and checks that the disk was left clean.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nubis.image import GuestImages, parse_markers
from nubis.testbed import CommandTimeoutError, TestbedSession

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 240.0
LIFECYCLE_TIMEOUT = 600.0
ROOTFS_TIMEOUT = 420.0
PAUSE_SECONDS = 3.0
MEMORY = 256 << 20

# Shell snippet: wait (up to 10 s) until the init's acpid has opened the input devices.
WAIT_ACPID = (
    "n=0; while [ ! -e /run/nubis-acpi/acpid.pid ] && [ $n -lt 100 ]; do usleep 100000; "
    "n=$((n+1)); done; [ -e /run/nubis-acpi/acpid.pid ] && echo ACPID-READY; "
)
TICK_LOOP = "i=0; while true; do echo TICK=$i; i=$((i+1)); sleep 0.1; done"

# The driver, run in the testbed with a JSON spec. It prints REMOTE lines (every nubis-remote
# call) and OBS lines (observations, JSON values); it never fails by itself, the test decides.
DRIVER = r"""
import json, os, re, subprocess, sys, tempfile, time

spec = json.load(open(sys.argv[1]))
PY = sys.executable
serial, mode = spec["serial"], spec["mode"]
# A short path: a Unix socket's path must fit in 108 bytes.
sock = os.path.join(tempfile.mkdtemp(prefix="nubis-api-"), "api.sock")


def obs(name, value):
    print(f"OBS {name}={json.dumps(value)}", flush=True)


def remote(*args, timeout=120):
    argv = [PY, "-m", "nubis.api.remote", "--api-socket", f"path={sock}", *args]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"REMOTE {' '.join(args)} timed out", flush=True)
        return None, "", "timed out"
    print(f"REMOTE {' '.join(args)} rc={p.returncode} stderr={p.stderr.strip()!r}", flush=True)
    return p.returncode, p.stdout, p.stderr


def refusal(*args):
    rc, out, err = remote(*args)
    return {"rc": rc, "stdout": out, "stderr": err}


def console():
    try:
        with open(serial, errors="replace") as f:
            return f.read().replace("\r", "")
    except FileNotFoundError:
        return ""


def last_tick():
    found = re.findall(r"TICK=(\d+)$", console(), re.M)
    return int(found[-1]) if found else None


def wait_until(pred, timeout, step=0.2):
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > end:
            return value
        time.sleep(step)


def state():
    rc, out, _ = remote("info")
    if rc != 0:
        return None
    try:
        return json.loads(out)["state"]
    except (ValueError, KeyError, TypeError):
        return None


log = open(spec["vmm_log"], "w")
vmm = subprocess.Popen([PY, "-m", "nubis", "--api-socket", f"path={sock}"], stdout=log, stderr=log)
try:
    wait_until(lambda: os.path.exists(sock) or vmm.poll() is not None, 120)
    obs("socket", os.path.exists(sock))
    if not os.path.exists(sock):
        sys.exit(1)
    if mode == "lifecycle":
        obs("pause_before_create", refusal("pause"))
    obs("create", remote("create", spec["config"])[0])
    if mode == "lifecycle":
        obs("pause_before_boot", refusal("pause"))
        obs("state_created", state())
    t_boot = time.monotonic()
    booted = remote("boot")[0]
    obs("boot", booted)
    if booted != 0:
        sys.exit(1)
    obs("state_booted", state())
    obs("ready", bool(wait_until(lambda: spec["ready"] in console(), spec["boot_timeout"])))
    obs("boot_seconds", round(time.monotonic() - t_boot, 1))
    if mode == "lifecycle":
        obs("resume_while_running", refusal("resume"))
        wait_until(lambda: (last_tick() or 0) >= 5, 60)
        obs("pause", remote("pause")[0])
        time.sleep(0.5)
        before = last_tick()
        time.sleep(spec["pause_seconds"])
        after = last_tick()
        obs("paused_ticks", [before, after])
        obs("state_paused", state())
        obs("resume", remote("resume")[0])
        base = after if after is not None else 0
        wait_until(lambda: (last_tick() or 0) >= base + 5, 60)
        obs("resumed_tick", last_tick())
        obs("state_resumed", state())
        rc, out, _ = remote("counters")
        try:
            obs("counters", json.loads(out) if rc == 0 else None)
        except ValueError:
            obs("counters", out)
    obs("power_button", remote("power-button")[0])
    obs("powered_off", bool(wait_until(lambda: "NUBIS-POWEROFF" in console(), 120)))
    obs("state_after_button", wait_until(lambda: state() == "Shutdown" and "Shutdown", 60))
    if mode == "lifecycle":
        obs("power_button_after_shutdown", refusal("power-button"))
    obs("shutdown_vmm", remote("shutdown-vmm")[0])
    try:
        obs("vmm_status", vmm.wait(timeout=60))
    except subprocess.TimeoutExpired:
        obs("vmm_status", "still running")
finally:
    if vmm.poll() is None:
        vmm.kill()
        vmm.wait()
    log.close()
"""


def observations(output: str) -> dict[str, Any]:
    """The driver's ``OBS name=<json>`` lines as a dict."""
    found: dict[str, Any] = {}
    for match in re.finditer(r"^OBS (\w+)=(.*)$", output, re.MULTILINE):
        found[match.group(1)] = json.loads(match.group(2))
    return found


def run_driver(
    testbed: TestbedSession, e2e_dir: Path, config: dict[str, Any], mode: str, ready: str,
    timeout: float,
) -> tuple[dict[str, Any], str, str]:  # fmt: skip
    """Run the driver in the testbed; return its observations, output and the guest console."""
    serial = e2e_dir / "serial.log"
    config = {**config, "serial": {"mode": "File", "file": str(serial)}}
    (e2e_dir / "config.json").write_text(json.dumps(config))
    (e2e_dir / "driver.py").write_text(DRIVER)
    spec = {
        "serial": str(serial),
        "config": str(e2e_dir / "config.json"),
        "vmm_log": str(e2e_dir / "nubis.log"),
        "mode": mode,
        "ready": ready,
        "boot_timeout": BOOT_TIMEOUT,
        "pause_seconds": PAUSE_SECONDS,
    }
    (e2e_dir / "spec.json").write_text(json.dumps(spec))
    try:
        result = testbed.run(
            [sys.executable, str(e2e_dir / "driver.py"), str(e2e_dir / "spec.json")], timeout
        )
    except CommandTimeoutError as error:
        console = serial.read_text(errors="replace") if serial.exists() else ""
        pytest.fail(f"{error}\n--- guest console ---\n{console[-6000:]}")
    console = serial.read_text(errors="replace") if serial.exists() else ""
    log = e2e_dir / "nubis.log"
    vmm_log = log.read_text(errors="replace") if log.exists() else ""
    output = (
        f"{result.output}\n--- nubis's output ---\n{vmm_log}\n"
        f"--- guest console ---\n{console[-6000:]}"
    )
    return observations(result.output), output, console


def payload(guest_images: GuestImages, command: str, **options: Any) -> dict[str, Any]:
    return {
        "kernel": str(guest_images.bzimage),
        "initramfs": str(guest_images.initramfs),
        "cmdline": guest_images.cmdline(command, end="hang", **options),
    }


def one_line_refusal(found: dict[str, Any], name: str, words: str) -> None:
    answer = found.get(name)
    assert answer is not None, f"the driver observed no {name}"
    assert answer["rc"] == 1, f"{name}: nubis-remote exited with {answer['rc']}: {answer}"
    assert answer["stdout"] == "", f"{name}: printed {answer['stdout']!r} on standard output"
    lines = answer["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nubis-remote: error: "), answer
    assert words in lines[0], f"{name}: {lines[0]!r} does not say {words!r}"


@pytest.mark.timeout(LIFECYCLE_TIMEOUT + 60, func_only=True)
def test_api_drives_a_guest_through_pause_resume_counters_power_button_and_shutdown(
    testbed: TestbedSession, guest_images: GuestImages, e2e_dir: Path
) -> None:
    disk = e2e_dir / "data.img"
    disk.write_bytes(b"nubis-data\n" * 6000)  # 66000 bytes: enough for 16 reads of 4 KiB
    command = (
        "dd if=/dev/vda of=/dev/null bs=4k count=16 2>/dev/null && echo DISK-READ-OK; "
        + WAIT_ACPID
        + TICK_LOOP
    )
    config = {
        "payload": payload(guest_images, command),
        "cpus": {"boot_vcpus": 1},
        "memory": {"size": MEMORY},
        "disks": [{"path": str(disk), "readonly": True}],
    }
    found, output, console = run_driver(
        testbed, e2e_dir, config, "lifecycle", "TICK=", LIFECYCLE_TIMEOUT
    )
    context = f"\n{output}"

    # Refused requests over the real socket: one line on standard error, status 1.
    one_line_refusal(found, "pause_before_create", "no VM has been created")
    one_line_refusal(found, "pause_before_boot", "Created")
    one_line_refusal(found, "resume_while_running", "Running")
    one_line_refusal(found, "power_button_after_shutdown", "Shutdown")

    assert found.get("socket") is True, f"nubis never created its API socket{context}"
    assert found.get("create") == 0 and found.get("state_created") == "Created", context
    assert found.get("boot") == 0 and found.get("state_booted") == "Running", context
    assert found.get("ready") is True, f"the guest never printed a tick{context}"
    markers = parse_markers(console)
    assert markers.userspace and markers.module_failures == (), context
    assert "DISK-READ-OK" in console, f"the guest could not read its disk{context}"
    assert "ACPID-READY" in console, f"the guest's acpid did not start{context}"

    # Paused: the guest's ticks stand still; resumed: they move on.
    assert found.get("pause") == 0 and found.get("state_paused") == "Paused", context
    before, after = found["paused_ticks"]
    assert before is not None and before == after, (
        f"the guest ticked while paused ({before} -> {after}){context}"
    )
    assert found.get("resume") == 0 and found.get("state_resumed") == "Running", context
    assert found.get("resumed_tick") is not None and found["resumed_tick"] >= after + 5, (
        f"the guest did not tick again after resume (last {found.get('resumed_tick')}){context}"
    )

    # Counters: the disk the guest read reports the bytes.
    counters = found.get("counters")
    assert isinstance(counters, dict), f"counters answered {counters!r}{context}"
    read_bytes = [c.get("read_bytes", 0) for c in counters.values() if isinstance(c, dict)]
    assert any(n >= 16 * 4096 for n in read_bytes), f"no disk read 64 KiB: {counters}{context}"

    # The power button: acpid in the guest powers it off cleanly, the VM is shut down.
    assert found.get("power_button") == 0, context
    assert found.get("powered_off") is True, f"the guest did not power off{context}"
    assert "NUBIS-POWER-BUTTON" in console, f"the power-off was not acpid's{context}"
    assert console.index("NUBIS-POWER-BUTTON") < console.rindex("NUBIS-POWEROFF")
    assert "NUBIS-EXIT-STATUS" not in console, context
    assert found.get("state_after_button") == "Shutdown", context
    assert found.get("shutdown_vmm") == 0 and found.get("vmm_status") == 0, context


@pytest.mark.timeout(ROOTFS_TIMEOUT + 60, func_only=True)
def test_power_button_powers_off_a_root_disk_guest_and_leaves_its_file_system_clean(
    testbed: TestbedSession, guest_images: GuestImages, e2e_dir: Path
) -> None:
    disk = e2e_dir / "rootfs.ext4"
    shutil.copyfile(guest_images.rootfs, disk)
    command = "echo written >/root/nubis-written; sync; " + WAIT_ACPID + TICK_LOOP
    config = {
        "payload": payload(guest_images, command, root="/dev/vda"),
        "cpus": {"boot_vcpus": 1},
        "memory": {"size": MEMORY},
        "disks": [{"path": str(disk)}],
    }
    found, output, console = run_driver(
        testbed, e2e_dir, config, "rootfs", "ACPID-READY", ROOTFS_TIMEOUT
    )
    context = f"\n{output}"

    assert found.get("ready") is True, f"the guest's acpid did not start{context}"
    assert parse_markers(console).rootfs, f"the guest did not switch to its root disk{context}"
    assert found.get("power_button") == 0, context
    assert found.get("powered_off") is True, f"the guest did not power off{context}"
    assert "NUBIS-POWER-BUTTON" in console, context
    assert found.get("state_after_button") == "Shutdown", context
    assert found.get("shutdown_vmm") == 0 and found.get("vmm_status") == 0, context

    # The button's power-off remounted the root read-only first: no journal left to recover.
    header = subprocess.run(
        ["dumpe2fs", "-h", str(disk)], capture_output=True, text=True, check=True
    ).stdout
    features = re.search(r"^Filesystem features:(.*)$", header, re.MULTILINE)
    assert features and "needs_recovery" not in features.group(1), header
    assert re.search(r"^Filesystem state:\s+clean$", header, re.MULTILINE), header
    listing = subprocess.run(
        ["debugfs", "-R", "cat /root/nubis-written", str(disk)], capture_output=True, text=True
    ).stdout
    assert "written" in listing, f"the guest's write is not on the disk{context}"
