"""End-to-end tests of nubis's virtio-net over tap devices, with a real Linux guest in the
nested test host.

Every test runs a driver (Python, written into `e2e_dir`) inside a network namespace of its own
(``unshare --net``) in the testbed: the taps nubis creates, their addresses and all traffic stay
there, between the driver and its guest. The driver starts nubis in the background with
``--net tap=nubist0,ip=192.168.249.1,...``, serves the TCP transfers, and carries out the host-side
actions the guest asks for on its serial console (``host-do=link-down nubist1``).

Each boot costs 40 s or more in the nested test host, so there are three boots:

* one NIC: the guest configures it with busybox ``ip`` and pings the host side 20 times;
* one NIC: a TCP transfer each way (busybox ``nc`` in the guest, Python sockets in the driver),
  with matching SHA-256 and the measured throughput in the output;
* two NICs on two taps: both carry pings, and the second tap brought down (then up) on the host
  side shows as the guest's carrier going to 0 (then back to 1).

The guest finds its interfaces by MAC address (``mac=`` on each ``--net``), not by name order.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nubis.image import GuestImages

pytestmark = pytest.mark.e2e

RunGuest = Callable[..., Any]  # the run_guest fixture, returning a GuestRun

BOOT_TIMEOUT = 300.0
TRANSFER_TIMEOUT = 1200.0
#: Seconds the guest gives each nc before it gives up.
NC_TIMEOUT = 420
MIB = 1 << 20
#: Bytes sent each way in the transfer test (see its docstring for why this size).
TRANSFER_MIB = 256
#: The guest's outgoing data is copies of one random block of this many bytes (a prime).
BLOCK_BYTES = 1_000_003
SHA256_RE = "[0-9a-f]{64}"
UP_PORT = 5001
DOWN_PORT = 5002
PINGS = 20
# Locally administered MAC addresses for the guest's NICs, and the taps' host sides.
MAC0 = "02:6e:75:62:00:01"
MAC1 = "02:6e:75:62:00:02"
NET0 = "tap=nubist0,ip=192.168.249.1,mask=255.255.255.0,mac=" + MAC0
NET1 = "tap=nubist1,ip=192.168.250.1,mask=255.255.255.0,mac=" + MAC1

# Runs in the testbed as ``DRIVER SERIAL CONFIG -- NUBIS-ARGV...`` inside a fresh network
# namespace. Listens for the transfers on all addresses (the
# namespace has no interface but nubis's taps; the host-to-guest data is generated and hashed as
# it is sent), starts nubis, and obeys the guest's
# ``host-do=ACTION TAP`` lines in the serial log (for the taps named in the config only). Prints
# ``host: ...`` lines, kills nubis at the deadline and exits with nubis's status.
DRIVER = r"""
import fcntl, hashlib, json, os, random, re, socket, struct, subprocess, sys, termios, threading, time

serial, config_path = sys.argv[1:3]
argv = sys.argv[4:]
config = json.load(open(config_path))
deadline = time.monotonic() + config["deadline"]


def say(text):
    print(f"host: {text}", flush=True)


def listener(port):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(1)
    return sock


progress = {}


def receive(sock):
    conn, peer = sock.accept()
    start = time.monotonic()
    digest, count = hashlib.sha256(), 0
    while data := conn.recv(1 << 20):
        digest.update(data)
        count += len(data)
        progress["up"] = (count, time.monotonic() - start)
    seconds = time.monotonic() - start
    conn.close()
    say(f"up-received bytes={count} sha256={digest.hexdigest()} seconds={seconds:.3f}")


def send(sock, size, seed):
    conn, peer = sock.accept()
    start = time.monotonic()
    generator = random.Random(seed)
    digest, count = hashlib.sha256(), 0
    while count < size:
        chunk = generator.randbytes(min(1 << 20, size - count))
        digest.update(chunk)
        conn.sendall(chunk)
        count += len(chunk)
        progress["down"] = (count, time.monotonic() - start)
    # Done when the guest has acknowledged every byte: nothing left in the send queue.
    unacked = -1
    while time.monotonic() < deadline:
        raw = fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        unacked = struct.unpack("i", raw)[0]
        if unacked == 0:
            break
        time.sleep(0.01)
    seconds = time.monotonic() - start
    conn.shutdown(socket.SHUT_WR)
    conn.close()
    say(f"down-sent bytes={count} sha256={digest.hexdigest()} seconds={seconds:.3f} "
        f"unacked={unacked}")


def run(*command):
    result = subprocess.run(command, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines():
        say(f"  {line}")
    return result.returncode


if config.get("down_bytes"):
    up = listener(config["up_port"])
    down = listener(config["down_port"])
    threading.Thread(target=receive, args=(up,), daemon=True).start()
    threading.Thread(
        target=send, args=(down, config["down_bytes"], os.getpid()), daemon=True
    ).start()

vmm = subprocess.Popen(argv)
done = set()
while vmm.poll() is None:
    try:
        with open(serial, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    for match in re.finditer(r"^host-do=(\S+) (\S+)\r?\n", text, re.MULTILINE):
        action, tap = match.groups()
        if match.group(0) in done:
            continue
        done.add(match.group(0))
        if tap not in config["taps"]:
            say(f"refused {action} {tap}: not one of this test's taps")
        elif action in ("link-down", "link-up"):
            status = run("ip", "link", "set", tap, action[5:])
            say(f"{action} {tap} status={status}")
            run("ip", "-o", "link", "show", tap)
        elif action == "show":
            run("ip", "-o", "link", "show", tap)
            run("ip", "-o", "-4", "addr", "show", tap)
        elif action == "stats":
            run("ip", "-s", "link", "show", tap)
        else:
            say(f"unknown action {action}")
    if time.monotonic() > deadline:
        say("deadline passed, killing nubis")
        vmm.kill()
        break
    time.sleep(0.1)
code = vmm.wait()
for direction, (count, seconds) in sorted(progress.items()):
    say(f"{direction}-progress bytes={count} seconds={seconds:.3f}")
say(f"nubis-status={code}")
sys.exit(code if code >= 0 else 128 - code)
"""

# Shell functions for the guest. nic MAC NAME ADDR: find the interface with this MAC, print
# "NAME=ifname", give it ADDR (a /24) and bring it up, then wait up to 10 s for its carrier.
# carrier NAME IFACE WANT SECONDS: wait for IFACE's carrier to read WANT (1 or 0) and its
# operstate to follow ("up" or "down": the kernel updates it after the carrier, asynchronously,
# up to a second later), then print "NAME-carrier=... operstate=... waited=TENTHS".
GUEST_FUNCTIONS = r"""
nic() {
  for d in /sys/class/net/*; do
    if [ "$(cat "$d/address")" = "$1" ]; then
      i=${d##*/}; echo "$2=$i"
      ip addr add "$3/24" dev "$i" && ip link set "$i" up || echo "$2-setup=failed"
      carrier "$2" "$i" 1 10; return 0
    fi
  done
  echo "$2=missing"; ls /sys/class/net; exit 97
}
carrier() {
  n=0; s=down; [ "$3" = 1 ] && s=up
  while { [ "$(cat /sys/class/net/$2/carrier 2>/dev/null)" != "$3" ] ||
          [ "$(cat /sys/class/net/$2/operstate)" != "$s" ]; } && [ $n -lt $(($4 * 10)) ]
  do usleep 100000; n=$((n + 1)); done
  echo "$1-carrier=$(cat /sys/class/net/$2/carrier) operstate=$(cat /sys/class/net/$2/operstate)\
 waited=$n"
}
"""


def driver_argv(
    e2e_dir: Path, nubis_argv: list[str], *, taps: list[str], deadline: float, **extra: Any
) -> list[str]:
    """The testbed command running the driver (in its own network namespace) around nubis."""
    driver = e2e_dir / "driver.py"
    driver.write_text(DRIVER)
    config = e2e_dir / "driver.json"
    config.write_text(json.dumps({"taps": taps, "deadline": deadline, **extra}))
    return [
        "unshare", "--net", sys.executable, str(driver), "{serial}", str(config), "--",
        *nubis_argv,
    ]  # fmt: skip


def nubis(guest_images: GuestImages, cmdline: str, *extra: str, memory_mib: int = 256) -> list[str]:
    """nubis booting the default guest with 2 vCPUs, serial console to ``{serial}``."""
    return [
        sys.executable, "-m", "nubis", "--kernel", str(guest_images.bzimage),
        "--initramfs", str(guest_images.initramfs), "--cmdline", cmdline,
        "--cpus", "boot=2", "--memory", f"size={memory_mib}M", "--no-reboot",
        "--serial", "file={serial}", *extra,
    ]  # fmt: skip


def guest_value(console: str, name: str, pattern: str = r"\S*") -> str:
    """The value of the guest's ``name=value`` line."""
    match = re.search(rf"^{re.escape(name)}=({pattern})\r?$", console, re.MULTILINE)
    assert match, f"the guest printed no {name}= line matching {pattern!r}"
    return match.group(1)


def host_line(output: str, pattern: str) -> re.Match[str]:
    """The driver's ``host: ...`` line matching ``pattern``."""
    match = re.search(rf"^host: {pattern}\r?$", output, re.MULTILINE)
    assert match, f"the driver printed no line matching {pattern!r}: {output[-3000:]}"
    return match


def carrier(console: str, name: str) -> tuple[str, str]:
    """The carrier and operstate the guest printed for ``name``."""
    match = re.search(
        rf"^{re.escape(name)}-carrier=(\S*) operstate=(\S*) waited=\d+\r?$", console, re.MULTILINE
    )
    assert match, f"the guest printed no {name}-carrier= line"
    return match.group(1), match.group(2)


def ping_summary(console: str, name: str) -> str:
    """The statistics line of the ping the guest ran between ``NAME-begin`` and ``NAME-status``."""
    match = re.search(
        rf"^{re.escape(name)}-begin\r?$(.*?)^{re.escape(name)}-status=\d+\r?$",
        console,
        re.MULTILINE | re.DOTALL,
    )
    assert match, f"the guest's ping {name} did not finish"
    stats = re.search(r"^\d+ packets transmitted, .*$", match.group(1), re.MULTILINE)
    assert stats, f"ping {name} printed no statistics: {match.group(1)[-1000:]}"
    return stats.group(0).strip()


def ping(name: str, address: str, count: int) -> str:
    """Guest lines pinging ``address`` ``count`` times, 0.2 s apart, bracketed for `ping_summary`."""
    return f"echo {name}-begin\nping -c {count} -i 0.2 -W 5 {address}\necho {name}-status=$?\n"


def assert_powered_off(run: Any) -> None:
    assert run.markers.userspace, "the guest never reached init"
    assert run.markers.module_failures == ()
    assert run.markers.exit_status == 0
    assert run.markers.poweroff and run.markers.ending == "NUBIS-POWEROFF"
    assert run.returncode == 0, f"nubis (or the driver) exited with {run.returncode}: {run.output}"


@pytest.mark.timeout(BOOT_TIMEOUT + 120, func_only=True)
def test_guest_pings_the_host_side_of_a_tap_without_loss(
    run_guest: RunGuest, guest_images: GuestImages, e2e_dir: Path
) -> None:
    command = (
        GUEST_FUNCTIONS
        + "nic $MAC0 nic0 192.168.249.2\n"
        + "echo host-do=show nubist0\n"
        + ping("ping0", "192.168.249.1", PINGS)
        + "grep -E 'eth0|virtio' /proc/net/dev /proc/interrupts\n"
        + "echo host-do=stats nubist0\n"
        + "sleep 1\n"
    ).replace("$MAC0", MAC0)
    cmdline = guest_images.cmdline(command)
    argv = nubis(guest_images, cmdline, "--net", NET0)
    run = run_guest(
        driver_argv(e2e_dir, argv, taps=["nubist0"], deadline=BOOT_TIMEOUT), BOOT_TIMEOUT + 60
    )

    console = run.console
    assert guest_value(console, "nic0").startswith("eth"), "the guest has no NIC with nubis's MAC"
    assert carrier(console, "nic0") == ("1", "up")
    summary = ping_summary(console, "ping0")
    print(f"guest ping over nubist0: {summary}")
    assert summary == f"{PINGS} packets transmitted, {PINGS} packets received, 0% packet loss"
    assert guest_value(console, "ping0-status") == "0"
    assert_powered_off(run)


@pytest.mark.timeout(TRANSFER_TIMEOUT + 120, func_only=True)
def test_tcp_transfers_both_ways_arrive_intact(
    run_guest: RunGuest, guest_images: GuestImages, e2e_dir: Path
) -> None:
    """256 MiB each way over one tap, checked by SHA-256 at both ends.

    Everything in the nested test host is emulated by TCG, the guest most of all: there
    /dev/urandom gives about 3 MiB/s and a pipe about 6 MiB/s, so the guest neither generates
    its data on the fly nor pipes it. It fills a file in its tmpfs with copies of one random
    block of a prime number of bytes (so no two copies line up with anything TCP or virtio
    does), hashes it and sends it with busybox ``nc`` reading the file; the driver hashes what
    arrives. Then the driver sends a seeded pseudo-random stream, hashing it as it goes, and the
    guest's ``nc`` writes it to a file that the guest counts and hashes. The throughput is
    printed (``-s`` shows it); it says little about nubis itself (``benchmarks/net.py``
    compares nubis with QEMU on the same guest).
    """
    size = TRANSFER_MIB * MIB
    copies = -(-size // BLOCK_BYTES)
    command = GUEST_FUNCTIONS + (
        f"nic {MAC0} nic0 192.168.249.2\n"
        f"head -c {BLOCK_BYTES} /dev/urandom >/tmp/block\n"
        f"i=0; while [ $i -lt {copies} ]; do cat /tmp/block; i=$((i+1)); done >/tmp/up\n"
        f"truncate -s {size} /tmp/up; rm /tmp/block\n"
        'h=$(sha256sum </tmp/up); echo "up-sha256=${h%% *}"\n'
        "t=$(cut -d' ' -f1 /proc/uptime)\n"
        f"timeout {NC_TIMEOUT} nc 192.168.249.1 {UP_PORT} </tmp/up\n"
        "echo up-status=$?\n"
        "echo up-guest-seconds=$(awk -v t=$t '{print $1 - t}' /proc/uptime)\n"
        "rm /tmp/up\n"
        "t=$(cut -d' ' -f1 /proc/uptime)\n"
        f"timeout {NC_TIMEOUT} nc 192.168.249.1 {DOWN_PORT} </dev/null >/tmp/down\n"
        "echo down-status=$?\n"
        "echo down-guest-seconds=$(awk -v t=$t '{print $1 - t}' /proc/uptime)\n"
        "echo down-bytes=$(wc -c </tmp/down)\n"
        'h=$(sha256sum </tmp/down); echo "down-sha256=${h%% *}"\n'
        "grep -E 'eth0|virtio' /proc/net/dev /proc/interrupts\n"
        "echo host-do=stats nubist0\n"
        "sleep 1\n"
    )
    cmdline = guest_images.cmdline(command)
    # Room for one 256 MiB file in the guest's tmpfs at a time.
    argv = nubis(guest_images, cmdline, "--net", NET0, memory_mib=640)
    driver = driver_argv(
        e2e_dir, argv, taps=["nubist0"], deadline=TRANSFER_TIMEOUT,
        up_port=UP_PORT, down_port=DOWN_PORT, down_bytes=size,
    )  # fmt: skip
    run = run_guest(driver, TRANSFER_TIMEOUT + 60)

    console, output = run.console, run.output
    assert carrier(console, "nic0") == ("1", "up")
    # Guest to host.
    assert guest_value(console, "up-status") == "0", "the guest's nc failed sending"
    received = host_line(output, rf"up-received bytes=(\d+) sha256=({SHA256_RE}) seconds=(\S+)")
    assert int(received.group(1)) == size, "the driver received a different number of bytes"
    assert received.group(2) == guest_value(console, "up-sha256", SHA256_RE)
    # Host to guest.
    assert guest_value(console, "down-status") == "0", "the guest's nc failed receiving"
    sent = host_line(
        output, rf"down-sent bytes=(\d+) sha256=({SHA256_RE}) seconds=(\S+) unacked=(-?\d+)"
    )
    assert int(sent.group(1)) == size and sent.group(4) == "0", sent.group(0)
    assert int(guest_value(console, "down-bytes", r"\d+")) == size
    assert guest_value(console, "down-sha256", SHA256_RE) == sent.group(2)
    assert_powered_off(run)

    up_seconds, down_seconds = float(received.group(3)), float(sent.group(3))
    print(
        f"{TRANSFER_MIB} MiB guest->host in {up_seconds:.1f} s "
        f"({TRANSFER_MIB / up_seconds:.2f} MiB/s; guest clock "
        f"{guest_value(console, 'up-guest-seconds')} s), host->guest in {down_seconds:.1f} s "
        f"({TRANSFER_MIB / down_seconds:.2f} MiB/s; guest clock "
        f"{guest_value(console, 'down-guest-seconds')} s)"
    )


@pytest.mark.timeout(BOOT_TIMEOUT + 120, func_only=True)
def test_two_nics_on_two_taps_and_link_status_follows_the_host_tap(
    run_guest: RunGuest, guest_images: GuestImages, e2e_dir: Path
) -> None:
    command = "".join(
        [
            GUEST_FUNCTIONS,
            f"nic {MAC0} nic0 192.168.249.2; i0=$i\n",
            f"nic {MAC1} nic1 192.168.250.2; i1=$i\n",
            ping("ping0", "192.168.249.1", 5),
            ping("ping1", "192.168.250.1", 5),
            "echo host-do=link-down nubist1\n",
            "carrier down $i1 0 15\n",
            "carrier other $i0 1 0\n",
            ping("during0", "192.168.249.1", 3),
            "echo host-do=link-up nubist1\n",
            "carrier up $i1 1 15\n",
            ping("again1", "192.168.250.1", 5),
        ]
    )
    cmdline = guest_images.cmdline(command)
    argv = nubis(guest_images, cmdline, "--net", NET0, "--net", NET1)
    driver = driver_argv(e2e_dir, argv, taps=["nubist0", "nubist1"], deadline=BOOT_TIMEOUT)
    run = run_guest(driver, BOOT_TIMEOUT + 60)

    console, output = run.console, run.output
    names = guest_value(console, "nic0"), guest_value(console, "nic1")
    assert all(n.startswith("eth") for n in names) and names[0] != names[1], names
    assert carrier(console, "nic0") == ("1", "up")
    assert carrier(console, "nic1") == ("1", "up")
    for name in ("ping0", "ping1"):
        summary = ping_summary(console, name)
        assert summary == "5 packets transmitted, 5 packets received, 0% packet loss", name
    # The host brings nubist1 down: the guest's second NIC loses its carrier, the first keeps it.
    host_line(output, "link-down nubist1 status=0")
    assert carrier(console, "down") == ("0", "down"), (
        "the guest still sees a carrier on the NIC whose tap the host brought down"
    )
    assert carrier(console, "other") == ("1", "up")
    assert ping_summary(console, "during0").endswith(" 0% packet loss")
    # And back up: carrier again, and traffic flows.
    host_line(output, "link-up nubist1 status=0")
    assert carrier(console, "up") == ("1", "up"), (
        "the guest's NIC did not get its carrier back after the host brought its tap up again"
    )
    assert ping_summary(console, "again1").endswith(" 0% packet loss")
    assert_powered_off(run)
