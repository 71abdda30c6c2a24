"""Boot MSR list and its application (Intel SDM Vol. 4 table 2-2)."""

from __future__ import annotations

import pytest

from nubis.arch.x86_64 import msr


def test_boot_msrs_values() -> None:
    values = dict(msr.BOOT_MSRS)
    assert values[0x2FF] == 0x806  # MTRRs enabled, default write-back
    assert values[0x1A0] & 1  # fast strings
    for index in (0x10, 0x174, 0x175, 0x176, 0xC000_0081, 0xC000_0082, 0xC000_0083,
                  0xC000_0084, 0xC000_0102):  # fmt: skip
        assert values[index] == 0


def test_boot_msrs_keep_only_supported() -> None:
    chosen = msr.boot_msrs([0x10, 0x2FF, 0x12345])
    assert chosen == [(0x10, 0), (0x2FF, 0x806)]
    assert msr.boot_msrs([]) == []


class FakeVcpu:
    def __init__(self, accept: int) -> None:
        self.accept = accept
        self.seen: list[tuple[int, int]] = []

    def set_msrs(self, msrs: list[tuple[int, int]]) -> int:
        self.seen = list(msrs)
        return min(self.accept, len(msrs))


def test_apply_msrs_checks_the_count() -> None:
    msrs = msr.boot_msrs(index for index, _ in msr.BOOT_MSRS)
    vcpu = FakeVcpu(accept=len(msrs))
    msr.apply_msrs(vcpu, msrs)
    assert vcpu.seen == msrs
    with pytest.raises(
        RuntimeError, match=r"KVM set 3 of 11 boot MSRs \(it stopped at MSR 0xc0000081\)"
    ):
        msr.apply_msrs(FakeVcpu(accept=3), msrs)
