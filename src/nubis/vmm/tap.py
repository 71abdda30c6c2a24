"""Host tap devices for virtio-net: open or create a tap and configure its host side.

A tap is opened through ``/dev/net/tun`` with ``TUNSETIFF`` (``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR``, plus ``IFF_MULTI_QUEUE`` when the device has more than one queue pair: then the
file is opened once per pair and each file is one queue of the same interface). The vnet header is
set to 12 bytes (``TUNSETVNETHDRSZ``), the size of virtio 1.2's ``struct virtio_net_hdr`` with
``num_buffers`` (5.1.6), so frames pass between the tap and guest memory without rewriting their
header. ``TUNSETOFFLOAD`` tells the kernel which offloads (checksum, TSO) the guest driver accepted,
so the tap never hands the guest a frame it cannot take. The files are non-blocking: the device
worker waits for them with epoll.

The host side (address, netmask, MAC, MTU, up) is configured with the classic ``SIOCSIF*`` socket
ioctls. Why plain ioctls rather than a netlink library (pyroute2) or ``ip`` in a subprocess: each
step is one fixed-size ``struct ifreq`` that the standard library's ``fcntl.ioctl`` passes as is,
the interface is stable, and it costs microseconds, whereas pyroute2 is a dependency whose import
alone costs tens of milliseconds on every start (more in the nested test host, where Python reads
its files over 9p) and ``ip`` costs a fork and exec per step and must be on ``PATH``. Netlink would
be the right tool for what ioctls cannot do (IPv6 addresses, several addresses, routes); nubis
needs none of that.

A name that is empty or absent lets the kernel pick one (``tap0``, ``tap1``...). An existing tap is
attached; a tap nubis created disappears when its files are closed. Every failure raises
:class:`TapError`, a :class:`~nubis.vmm.config.ConfigError`, whose message is one sentence, so the
VMM reports it like any other bad configuration (exit status 2).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence

from nubis.virtio.net import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VNET_HDR,
)
from nubis.vmm.config import TAP_NAME_MAX, ConfigError

TUN_DEVICE = "/dev/net/tun"

# <linux/if_tun.h> ioctls: _IOW('T', nr, int) is 0x40045400 | nr, _IOR is 0x80045400 | nr.
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9

# <linux/if_tun.h> flags for TUNSETIFF and TUNSETQUEUE.
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# <linux/if_tun.h> offload flags for TUNSETOFFLOAD.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

# <linux/sockios.h> interface ioctls.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
IFF_UP = 0x1
ARPHRD_ETHER = 1

#: struct ifreq with a short (ifr_flags): 16-byte name, then a 24-byte union (40 bytes).
IFREQ_FLAGS = struct.Struct("16sH22x")
#: struct ifreq with an int (ifr_mtu).
IFREQ_INT = struct.Struct("16si20x")
#: struct ifreq with a struct sockaddr_in (ifr_addr, ifr_netmask): family, port, address.
IFREQ_INET = struct.Struct("16sH2s4s16x")
#: struct ifreq with a struct sockaddr (ifr_hwaddr): family, 14 bytes of data (the MAC first).
IFREQ_HWADDR = struct.Struct("16sH14s8x")

#: The netmask used when an address is given without one.
DEFAULT_NETMASK = "255.255.255.0"


class TapError(ConfigError):
    """A tap device cannot be created, attached or configured; one sentence for a person."""


def guest_offloads_to_tun(features: int) -> int:
    """The ``TUN_F_*`` flags matching the virtio-net guest offload features the driver accepted.

    The tap must only produce what the guest takes: partial checksums with GUEST_CSUM, TCP
    segmentation with GUEST_TSO4/6 (which the kernel accepts only together with checksums).
    """
    flags = 0
    if features >> VIRTIO_NET_F_GUEST_CSUM & 1:
        flags |= TUN_F_CSUM
        if features >> VIRTIO_NET_F_GUEST_TSO4 & 1:
            flags |= TUN_F_TSO4
        if features >> VIRTIO_NET_F_GUEST_TSO6 & 1:
            flags |= TUN_F_TSO6
    return flags


def generate_mac() -> str:
    """A random locally administered unicast MAC address for a guest that was given none."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def _ifname(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > TAP_NAME_MAX:
        raise TapError(
            f"tap name {name!r} is longer than the {TAP_NAME_MAX} bytes an interface name may have"
        )
    return raw


def _exists(name: str) -> bool:
    if not name:
        return False
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _reason(exc: OSError) -> str:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.EPERM:
        return f"{reason} (nubis needs CAP_NET_ADMIN for it)"
    if exc.errno == errno.ENOENT:
        return f"{TUN_DEVICE} is missing (is the tun module loaded?)"
    if exc.errno == errno.EINVAL:
        return f"{reason} (is it a tun device, or a tap with another queue mode?)"
    if exc.errno == errno.EBUSY:
        return f"{reason} (another program holds it)"
    return reason


class Tap:
    """An open tap device: its name and one non-blocking file per queue pair.

    It satisfies :class:`nubis.virtio.net.NetBackend`: ``fds``, ``set_guest_offloads`` and
    ``set_queue_enabled``. The files are closed by :meth:`close`.
    """

    def __init__(self, name: str, fds: Sequence[int], *, created: bool) -> None:
        """Wrap files already set up by :func:`open_tap`."""
        self.name = name
        self.fds = tuple(fds)
        self.created = created
        self._closed = False

    def is_up(self) -> bool:
        """Whether the host side of the tap is administratively up (SIOCGIFFLAGS: IFF_UP).

        False as well when the tap is gone. virtio-net polls this to report link changes.
        """
        raw = self.name.encode()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                answer = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, IFREQ_FLAGS.pack(raw, 0))
        except OSError:
            return False
        return bool(IFREQ_FLAGS.unpack(answer)[1] & IFF_UP)

    @property
    def multi_queue(self) -> bool:
        """Whether the tap has one queue per file (IFF_MULTI_QUEUE)."""
        return len(self.fds) > 1

    def set_guest_offloads(self, features: int) -> None:
        """Apply the virtio-net guest offload features the driver accepted (TUNSETOFFLOAD)."""
        flags = guest_offloads_to_tun(features)
        for fd in self.fds:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            except OSError as exc:
                raise TapError(
                    f"cannot set offloads {flags:#x} on tap device {self.name}: {_reason(exc)}"
                ) from exc

    def set_queue_enabled(self, pair: int, enabled: bool) -> None:
        """Attach or detach queue ``pair`` (TUNSETQUEUE), so the kernel steers frames only to
        queues the guest uses; a no-op for a single-queue tap.
        """
        if not self.multi_queue:
            return
        request = IFREQ_FLAGS.pack(b"", IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE)
        try:
            fcntl.ioctl(self.fds[pair], TUNSETQUEUE, request)
        except OSError as exc:
            # Attaching an attached queue (or detaching a detached one) answers EINVAL.
            if exc.errno != errno.EINVAL:
                raise TapError(
                    f"cannot {'attach' if enabled else 'detach'} queue {pair} of tap device "
                    f"{self.name}: {_reason(exc)}"
                ) from exc

    def close(self) -> None:
        """Close every file; a tap nubis created disappears with them."""
        if self._closed:
            return
        self._closed = True
        for fd in self.fds:
            os.close(fd)

    def __enter__(self) -> Tap:
        """Use the tap in a ``with`` block that closes it."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the tap."""
        self.close()


def _open_queue(name: bytes, flags: int) -> tuple[int, str]:
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, IFREQ_FLAGS.pack(name, flags))
        actual = IFREQ_FLAGS.unpack(answer)[0].rstrip(b"\0").decode()
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR.size))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd, actual


def open_tap(
    name: str | None = None,
    *,
    queue_pairs: int = 1,
    ip: str | None = None,
    mask: str | None = None,
    host_mac: str | None = None,
    mtu: int | None = None,
) -> Tap:
    """Open tap ``name`` (created if missing; named by the kernel if empty) and configure it.

    ``queue_pairs`` files are opened (more than one makes a multi-queue tap); ``ip`` and
    ``mask`` give the host side an IPv4 address, ``host_mac`` its MAC address and ``mtu`` its
    MTU; the interface is then brought up. Raises :class:`TapError`.
    """
    if queue_pairs < 1:
        raise TapError(f"a tap device needs at least one queue, not {queue_pairs}")
    requested = name or ""
    raw = _ifname(requested)
    existed = _exists(requested)
    label = requested or "(any name)"
    action = "attach" if existed else "create"
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    if queue_pairs > 1:
        flags |= IFF_MULTI_QUEUE
    fds: list[int] = []
    try:
        fd, actual = _open_queue(raw, flags)
        fds.append(fd)
        for _ in range(queue_pairs - 1):
            fds.append(_open_queue(actual.encode(), flags)[0])
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise TapError(f"cannot {action} tap device {label}: {_reason(exc)}") from exc
    tap = Tap(actual, fds, created=not existed)
    try:
        configure_host_side(actual, ip=ip, mask=mask, host_mac=host_mac, mtu=mtu)
    except BaseException:
        tap.close()
        raise
    return tap


def configure_host_side(
    name: str,
    *,
    ip: str | None = None,
    mask: str | None = None,
    host_mac: str | None = None,
    mtu: int | None = None,
) -> None:
    """Set interface ``name``'s MAC, MTU and IPv4 address and netmask, then bring it up."""
    raw = _ifname(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:

        def apply(what: str, request: int, data: bytes) -> bytes:
            try:
                return fcntl.ioctl(sock.fileno(), request, data)
            except OSError as exc:
                raise TapError(
                    f"cannot set the {what} of tap device {name}: {_reason(exc)}"
                ) from exc

        if host_mac is not None:
            mac = bytes.fromhex(host_mac.replace(":", ""))
            if len(mac) != 6:
                raise TapError(f"host MAC {host_mac!r} is not a MAC address like 12:34:56:78:9a:bc")
            apply("MAC address", SIOCSIFHWADDR, IFREQ_HWADDR.pack(raw, ARPHRD_ETHER, mac))
        if mtu is not None:
            apply("MTU", SIOCSIFMTU, IFREQ_INT.pack(raw, mtu))
        if ip is not None:
            address = ipaddress.IPv4Address(ip).packed
            netmask = ipaddress.IPv4Address(mask or DEFAULT_NETMASK).packed
            apply("address", SIOCSIFADDR, IFREQ_INET.pack(raw, socket.AF_INET, b"", address))
            apply("netmask", SIOCSIFNETMASK, IFREQ_INET.pack(raw, socket.AF_INET, b"", netmask))
        current = IFREQ_FLAGS.unpack(apply("flags", SIOCGIFFLAGS, IFREQ_FLAGS.pack(raw, 0)))[1]
        if not current & IFF_UP:
            apply("flags", SIOCSIFFLAGS, IFREQ_FLAGS.pack(raw, current | IFF_UP))
