"""Tests for nubis.vmm.tap that need no network namespace: layouts, ioctl numbers, errors."""

from __future__ import annotations

import pytest

from nubis.virtio.net import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
)
from nubis.vmm import tap
from nubis.vmm.config import ConfigError


def _iow(nr: int) -> int:
    """_IOW('T', nr, int): direction write (1), size 4, type 'T'."""
    return 1 << 30 | 4 << 16 | ord("T") << 8 | nr


def test_ioctl_numbers_and_layouts_are_pinned() -> None:
    assert _iow(202) == tap.TUNSETIFF
    assert _iow(208) == tap.TUNSETOFFLOAD
    assert _iow(216) == tap.TUNSETVNETHDRSZ
    assert _iow(217) == tap.TUNSETQUEUE
    assert 2 << 30 | 4 << 16 | ord("T") << 8 | 210 == tap.TUNGETIFF
    for layout in (tap.IFREQ_FLAGS, tap.IFREQ_INT, tap.IFREQ_INET, tap.IFREQ_HWADDR):
        assert layout.size == 40  # sizeof(struct ifreq) on x86-64
    assert tap.IFREQ_INET.pack(b"x", 2, b"", b"\x0a\0\0\x01")[16:24] == b"\x02\0\0\0\x0a\0\0\x01"


def test_guest_offloads_map_to_tun_flags() -> None:
    csum = 1 << VIRTIO_NET_F_GUEST_CSUM
    tso = 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6
    assert tap.guest_offloads_to_tun(0) == 0
    assert tap.guest_offloads_to_tun(csum) == tap.TUN_F_CSUM
    assert tap.guest_offloads_to_tun(csum | tso) == tap.TUN_F_CSUM | tap.TUN_F_TSO4 | tap.TUN_F_TSO6
    # The kernel refuses TSO without checksums; so does nubis.
    assert tap.guest_offloads_to_tun(tso) == 0


def test_generated_macs_are_local_unicast() -> None:
    for _ in range(50):
        first = int(tap.generate_mac().split(":")[0], 16)
        assert first & 0x02 and not first & 0x01


def test_errors_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert issubclass(tap.TapError, ConfigError)
    with pytest.raises(tap.TapError, match="longer than the 15 bytes"):
        tap.open_tap("x" * 16)
    with pytest.raises(tap.TapError, match="at least one queue"):
        tap.open_tap("nubis-none", queue_pairs=0)
    monkeypatch.setattr(tap, "TUN_DEVICE", "/nonexistent/tun")
    with pytest.raises(tap.TapError) as info:
        tap.open_tap("nubis-absent0")
    assert str(info.value) == (
        "cannot create tap device nubis-absent0: /nonexistent/tun is missing "
        "(is the tun module loaded?)"
    )
