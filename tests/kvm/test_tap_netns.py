"""Real tap devices (nubis.vmm.tap) and virtio-net over them, each test in its own network namespace.

Every test body runs in a forked child that first enters a new network namespace
(``unshare(CLONE_NEWNET)`` through libc), so no tap or address ever appears in this machine's own namespace;
the namespace disappears with the child. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and the tun
module, as the nested test host has.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import time
import traceback
from collections.abc import Callable

import pytest

from nubis.memory import GuestMemory
from nubis.virtio.device import VIRTIO_F_VERSION_1, ActivatedQueue
from nubis.virtio.mock import MockDriver
from nubis.virtio.net import VIRTIO_NET_F_STATUS, VNET_HDR, Net
from nubis.vmm.config import ConfigError
from nubis.vmm.tap import TapError, open_tap

pytestmark = pytest.mark.kvm

CAP_NET_ADMIN = 12
CLONE_NEWNET = 0x40000000


def _unshare_net() -> None:
    """Enter a new network namespace (os.unshare arrives only in Python 3.12)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        errno_ = ctypes.get_errno()
        raise OSError(errno_, f"unshare(CLONE_NEWNET) failed: {os.strerror(errno_)}")


def in_new_netns(body: Callable[[], None]) -> None:
    """Run ``body`` in a forked child inside a fresh network namespace; re-raise its failure."""
    if os.geteuid() != 0:
        pytest.fail("tap tests need root to create a network namespace")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            os.close(read_end)
            _unshare_net()
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            body()
            status = 0
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    _, wait_status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(wait_status) != 0:
        pytest.fail(f"the test body failed in its network namespace:\n{report}")


def link(name: str) -> dict[str, object]:
    out = subprocess.run(
        ["ip", "-j", "addr", "show", "dev", name], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, object] = json.loads(out)[0]
    return result


def exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def test_create_configure_and_remove() -> None:
    def body() -> None:
        with open_tap(
            None, ip="10.11.0.1", mask="255.255.255.0", host_mac="02:aa:bb:cc:dd:01", mtu=1400
        ) as tap:
            assert tap.name.startswith("tap"), tap.name
            assert tap.created
            info = link(tap.name)
            assert info["mtu"] == 1400
            assert info["address"] == "02:aa:bb:cc:dd:01"
            assert "UP" in info["flags"]  # type: ignore[operator]
            addrs = [
                (a["local"], a["prefixlen"])
                for a in info["addr_info"]  # type: ignore[attr-defined]
                if a["family"] == "inet"
            ]  # type: ignore[attr-defined]
            assert addrs == [("10.11.0.1", 24)]
        assert not exists(tap.name)
        with open_tap("nubis-t1", queue_pairs=2) as tap:
            assert tap.name == "nubis-t1"
            assert len(tap.fds) == 2
            tap.set_queue_enabled(1, False)
            tap.set_queue_enabled(1, True)
        assert not exists("nubis-t1")

    in_new_netns(body)


def test_attach_an_existing_tap() -> None:
    def body() -> None:
        subprocess.run(["ip", "tuntap", "add", "dev", "nubis-old", "mode", "tap"], check=True)
        with open_tap("nubis-old", ip="10.12.0.1") as tap:
            assert not tap.created
            info = link("nubis-old")
            inet = [a["local"] for a in info["addr_info"] if a["family"] == "inet"]  # type: ignore[attr-defined]
            assert inet == ["10.12.0.1"]
        assert exists("nubis-old"), "a tap nubis did not create must survive it"
        # A single-queue tap cannot serve as a multi-queue one.
        try:
            open_tap("nubis-old", queue_pairs=2)
        except TapError as exc:
            assert str(exc).startswith("cannot attach tap device nubis-old: ")
        else:
            raise AssertionError("attaching a single-queue tap as multi-queue succeeded")

    in_new_netns(body)


def _drop_net_admin() -> None:
    """Remove CAP_NET_ADMIN from this process's effective capabilities (capget/capset)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0] &= ~(1 << CAP_NET_ADMIN)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def test_errors_are_one_sentence_config_errors() -> None:
    def body() -> None:
        try:
            open_tap("lo")
        except ConfigError as exc:
            assert str(exc).startswith("cannot attach tap device lo: "), exc
        else:
            raise AssertionError("a dummy interface was attached as a tap")
        _drop_net_admin()
        try:
            open_tap("nubis-noperm")
        except TapError as exc:
            message = str(exc)
            assert message.startswith("cannot create tap device nubis-noperm: "), message
            assert "CAP_NET_ADMIN" in message
            assert message.count(". ") == 0
        else:
            raise AssertionError("a tap was created without CAP_NET_ADMIN")

    in_new_netns(body)


def _udp_frame(src_mac: bytes, dst_mac: bytes, payload: bytes) -> bytes:
    """An Ethernet frame with an IPv4/UDP datagram 10.13.0.2:4000 -> 10.13.0.1:5000."""
    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            1,
            0,
            64,
            socket.IPPROTO_UDP,
            0,
            socket.inet_aton("10.13.0.2"),
            socket.inet_aton("10.13.0.1"),
        )
    )
    total = sum(struct.unpack("!10H", ip))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    ip[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return dst_mac + src_mac + b"\x08\x00" + bytes(ip) + udp


def test_frames_cross_between_virtio_net_and_the_host() -> None:
    def body() -> None:
        host_mac = bytes.fromhex("02aabbccdd02")
        guest_mac = bytes.fromhex("02aabbccdd03")
        memory = GuestMemory([(0, 0x100000)])
        with (
            open_tap(None, ip="10.13.0.1", host_mac=host_mac.hex(":")) as tap,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        ):
            server.bind(("10.13.0.1", 5000))
            server.settimeout(10)
            net = Net(tap, mac=guest_mac)
            driver = MockDriver(net, memory)
            net.ack_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_STATUS)
            net.activate(
                memory,
                driver.interrupt,
                [
                    ActivatedQueue(i, q, fd)
                    for i, (q, fd) in enumerate(
                        zip(driver.device_queues, driver.notify_fds, strict=True)
                    )
                ],
            )
            try:
                # Guest to host: a UDP datagram the host's socket receives.
                frame = _udp_frame(guest_mac, host_mac, b"hello from virtio-net")
                driver.queues[1].add_chain([VNET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame])
                driver.notify(1)
                data, peer = server.recvfrom(100)
                assert (data, peer) == (b"hello from virtio-net", ("10.13.0.2", 4000))
                # Host to guest: answering makes the host ask who has 10.13.0.2 (ARP).
                chain = driver.queues[0].add_chain(writable=[2048])
                driver.notify(0)
                server.sendto(b"reply", ("10.13.0.2", 4000))
                driver.wait_used(0, 1)
                (_, length), *_ = driver.queues[0].take_used()
                received = driver.queues[0].read_buffers(chain.writable)[:length]
                assert VNET_HDR.unpack(received[:12])[6] == 1  # num_buffers
                ethernet = received[12:]
                assert ethernet[6:12] == host_mac
                # The host's first frame is its ARP request, unless IPv6 neighbour discovery
                # or MLD on the freshly raised tap got there first.
                assert ethernet[12:14] in (b"\x08\x06", b"\x86\xdd")
                deadline = time.monotonic() + 5
                while net.counters()["rx_frames"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                counters = net.counters()
                assert counters["tx_frames"] == 1
                assert counters["tx_bytes"] == len(frame)
                assert counters["rx_frames"] >= 1
            finally:
                net.shutdown()
                driver.close()
        memory.close()

    in_new_netns(body)
