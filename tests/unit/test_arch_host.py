"""Host KVM detection over fake /proc, /sys and /dev/kvm."""

from __future__ import annotations

from pathlib import Path

import pytest

from nubis.arch.x86_64.host import KvmKind, detect_host_kvm


def make_host(
    tmp_path: Path, *, flags: str = "fpu lm", modules: tuple[str, ...] = (), dev_kvm: bool = True
) -> dict[str, Path]:
    proc = tmp_path / "proc"
    sys = tmp_path / "sys"
    dev = tmp_path / "dev" / "kvm"
    proc.mkdir()
    (sys / "module").mkdir(parents=True)
    dev.parent.mkdir()
    text = "".join(
        f"processor\t: {n}\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\n" for n in range(2)
    )
    (proc / "cpuinfo").write_text(text)
    for module in modules:
        (sys / "module" / module).mkdir()
    if dev_kvm:
        dev.write_bytes(b"")
    return {"proc_root": proc, "sys_root": sys, "dev_kvm": dev}


def test_pvm_cannot_run_linux(tmp_path: Path) -> None:
    host = detect_host_kvm(**make_host(tmp_path, modules=("kvm", "kvm_pvm")))
    assert host.kind is KvmKind.PVM
    assert host.dev_kvm_present
    assert not host.can_run_linux
    assert "is PVM (kvm_pvm), which cannot run an unmodified Linux kernel" in host.reason
    assert "nested test host" in host.reason
    assert host.reason.count(". ") == 0  # one sentence


def test_pvm_wins_over_cpu_flags(tmp_path: Path) -> None:
    host = detect_host_kvm(**make_host(tmp_path, flags="fpu svm lm", modules=("kvm_pvm",)))
    assert host.kind is KvmKind.PVM
    assert not host.can_run_linux


@pytest.mark.parametrize(
    ("flags", "kind"), [("fpu vmx lm", KvmKind.VMX), ("fpu svm lm", KvmKind.SVM)]
)
def test_hardware_virtualization_runs_linux(tmp_path: Path, flags: str, kind: KvmKind) -> None:
    host = detect_host_kvm(**make_host(tmp_path, flags=flags, modules=("kvm",)))
    assert host.kind is kind
    assert host.can_run_linux
    assert host.dev_kvm_accessible


def test_vendor_module_without_flag_counts(tmp_path: Path) -> None:
    host = detect_host_kvm(**make_host(tmp_path, modules=("kvm", "kvm_amd")))
    assert host.kind is KvmKind.SVM
    assert host.can_run_linux


def test_no_dev_kvm(tmp_path: Path) -> None:
    host = detect_host_kvm(**make_host(tmp_path, flags="fpu vmx", dev_kvm=False))
    assert host.kind is KvmKind.NONE
    assert not host.dev_kvm_present
    assert not host.can_run_linux
    assert "has no" in host.reason


def test_unknown_kind_when_no_flags_or_modules(tmp_path: Path) -> None:
    host = detect_host_kvm(**make_host(tmp_path, flags="fpu lm"))
    assert host.kind is KvmKind.UNKNOWN
    assert not host.can_run_linux
    assert "neither VMX nor SVM" in host.reason


def test_missing_cpuinfo_is_not_an_error(tmp_path: Path) -> None:
    roots = make_host(tmp_path)
    (roots["proc_root"] / "cpuinfo").unlink()
    assert detect_host_kvm(**roots).kind is KvmKind.UNKNOWN
