"""What kind of KVM this machine offers, which decides how the testbed runs commands.

A host whose CPU advertises VMX or SVM and whose /dev/kvm is the ordinary kvm_intel/kvm_amd can
boot unmodified Linux guests itself, so commands run directly. A host whose /dev/kvm is PVM
(``/sys/module/kvm_pvm``), or that has no /dev/kvm, cannot; commands then run inside the nested
test host, a Linux VM under QEMU's TCG with emulated SVM.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path


class HostKind(enum.Enum):
    """The virtualization this machine offers."""

    NATIVE = "native"  # /dev/kvm backed by VMX or SVM
    PVM = "pvm"  # /dev/kvm is kvm_pvm: no unmodified Linux guests
    NONE = "none"  # no usable /dev/kvm or no VMX/SVM


@dataclass(frozen=True)
class HostInfo:
    """How this machine's KVM was classified, and why."""

    kind: HostKind
    reason: str


def detect_host(
    cpuinfo: Path = Path("/proc/cpuinfo"),
    sys_module: Path = Path("/sys/module"),
    dev_kvm: Path = Path("/dev/kvm"),
) -> HostInfo:
    """Classify this machine's KVM (paths are parameters so tests can fake them)."""
    if (sys_module / "kvm_pvm").exists():
        return HostInfo(
            HostKind.PVM, "/dev/kvm is provided by kvm_pvm, which cannot run unmodified Linux"
        )
    try:
        flags = re.findall(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.MULTILINE)
    except OSError:
        flags = []
    words = set(flags[0].split()) if flags else set()
    feature = "vmx" if "vmx" in words else "svm" if "svm" in words else None
    if feature is None:
        return HostInfo(HostKind.NONE, "the CPU advertises neither vmx nor svm")
    if not dev_kvm.exists() or not os.access(dev_kvm, os.R_OK | os.W_OK):
        return HostInfo(
            HostKind.NONE, f"the CPU has {feature} but /dev/kvm is missing or not usable"
        )
    return HostInfo(HostKind.NATIVE, f"the CPU has {feature} and /dev/kvm is usable")
