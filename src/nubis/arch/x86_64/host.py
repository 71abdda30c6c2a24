"""What kind of KVM this host offers, and whether it can run an unmodified Linux guest.

Three kinds of /dev/kvm matter to nubis (see PLATFORM.md):

* VMX (Intel VT-x, SDM Vol. 3C chapter 23) or SVM (AMD-V, APM Vol. 2 chapter 15): hardware
  virtualization, which runs any x86-64 guest. The processor advertises it in CPUID, which
  Linux shows as the ``vmx`` or ``svm`` flag in ``/proc/cpuinfo``.
* PVM (the ``kvm_pvm`` module, visible as ``/sys/module/kvm_pvm``): a shadow-paging KVM whose
  guest kernel runs at CPL 3. Tiny guests run, but an unmodified Linux kernel stops early on
  instructions PVM cannot emulate; only PVM-enlightened kernels boot.
* none: no /dev/kvm, or one nubis cannot open.

The check reads only files, under roots that tests replace with fake trees.
"""

from __future__ import annotations

import os

from nubis._enum import Enum
from nubis._frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

NESTED_HOST_HINT: Final = (
    "use the nested test host (a Linux VM under QEMU TCG with emulated SVM, see nubis.testbed)"
)


class KvmKind(Enum):
    """The virtualization technology behind /dev/kvm."""

    NONE = "none"
    PVM = "pvm"
    VMX = "vmx"
    SVM = "svm"
    UNKNOWN = "unknown"


class HostKvm(Frozen):
    """The result of ``detect_host_kvm``: what /dev/kvm is here and what it can run."""

    __slots__ = ("can_run_linux", "dev_kvm_accessible", "dev_kvm_present", "kind", "reason")

    dev_kvm_present: bool
    dev_kvm_accessible: bool
    kind: KvmKind
    can_run_linux: bool
    reason: str

    def __init__(
        self,
        dev_kvm_present: bool,
        dev_kvm_accessible: bool,
        kind: KvmKind,
        can_run_linux: bool,
        reason: str,
    ) -> None:
        object.__setattr__(self, "dev_kvm_present", dev_kvm_present)
        object.__setattr__(self, "dev_kvm_accessible", dev_kvm_accessible)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "can_run_linux", can_run_linux)
        object.__setattr__(self, "reason", reason)


def _cpu_flags(cpuinfo: str) -> set[str]:
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except OSError:
        return set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return set()


def detect_host_kvm(
    proc_root: str | os.PathLike[str] = "/proc",
    sys_root: str | os.PathLike[str] = "/sys",
    dev_kvm: str | os.PathLike[str] = "/dev/kvm",
) -> HostKvm:
    """Tell whether /dev/kvm exists, which kind it is and whether it can boot unmodified Linux.

    ``reason`` is one sentence, suitable as an error message when ``can_run_linux`` is false.
    """
    cpuinfo = os.path.join(os.fspath(proc_root), "cpuinfo")
    modules = os.path.join(os.fspath(sys_root), "module")
    dev = os.fspath(dev_kvm)
    present = os.path.exists(dev)
    accessible = present and os.access(dev, os.R_OK | os.W_OK)
    if not present:
        return HostKvm(
            False,
            False,
            KvmKind.NONE,
            False,
            f"this host has no {dev}, so it cannot run virtual machines; {NESTED_HOST_HINT}",
        )
    if os.path.exists(os.path.join(modules, "kvm_pvm")):
        return HostKvm(
            True,
            accessible,
            KvmKind.PVM,
            False,
            f"this host's {dev} is PVM (kvm_pvm), which cannot run an unmodified Linux "
            f"kernel; {NESTED_HOST_HINT}",
        )
    flags = _cpu_flags(cpuinfo)
    if "vmx" in flags or os.path.exists(os.path.join(modules, "kvm_intel")):
        kind = KvmKind.VMX
    elif "svm" in flags or os.path.exists(os.path.join(modules, "kvm_amd")):
        kind = KvmKind.SVM
    else:
        return HostKvm(
            True,
            accessible,
            KvmKind.UNKNOWN,
            False,
            f"this host's {dev} is neither VMX nor SVM (no vmx or svm flag in "
            f"{cpuinfo}), so it may not run an unmodified Linux kernel; "
            f"{NESTED_HOST_HINT}",
        )
    if not accessible:
        return HostKvm(
            True,
            False,
            kind,
            False,
            f"this host's {dev} ({kind.name}) cannot be opened for reading and writing by "
            "this user; add the user to the kvm group or run as root",
        )
    return HostKvm(
        True,
        True,
        kind,
        True,
        f"this host's {dev} uses {kind.name}, which runs unmodified Linux kernels",
    )
