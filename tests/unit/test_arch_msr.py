"""Boot MSR list and its application (Intel SDM Vol. 4 table 2-2)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
    assert msr.boot_msrs([0x10, 0x2FF, 0x12345], mtrr=False) == {0x10: 0, 0x2FF: 0x806}
    assert msr.boot_msrs([0x10, 0x12345], mtrr=False) == {0x10: 0}
    assert msr.boot_msrs([], mtrr=False) == {}


def test_mtrr_default_type_kept_when_cpuid_has_mtrr() -> None:
    # KVM_GET_MSR_INDEX_LIST leaves the MTRR MSRs out although KVM emulates them.
    assert msr.boot_msrs([0x10], mtrr=True) == {0x10: 0, 0x2FF: 0x806}


class FakeVcpu:
    def __init__(self, ignore: int | None = None) -> None:
        self.ignore = ignore
        self.values: dict[int, int] = {}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        self.values.update({i: v for i, v in values.items() if i != self.ignore})

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        return {i: self.values.get(i, 0xDEAD) for i in indices}


def test_apply_msrs_sets_and_verifies() -> None:
    msrs = msr.boot_msrs((index for index, _ in msr.BOOT_MSRS), mtrr=True)
    vcpu = FakeVcpu()
    msr.apply_msrs(vcpu, msrs)
    assert vcpu.values == msrs


def test_apply_msrs_catches_an_ignored_write() -> None:
    msrs = msr.boot_msrs((index for index, _ in msr.BOOT_MSRS), mtrr=True)
    with pytest.raises(RuntimeError, match=r"MSR 0x2ff reads back as 0xdead after nubis set it"):
        msr.apply_msrs(FakeVcpu(ignore=0x2FF), msrs)
    msr.apply_msrs(FakeVcpu(ignore=0x10), msrs)  # the TSC is not read back: it keeps counting
