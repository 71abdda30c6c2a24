"""The testbed: where nubis's end-to-end tests find a /dev/kvm that runs unmodified Linux.

On this project's machines /dev/kvm is PVM, which cannot run Debian's kernels, so the testbed
boots a nested test host (an L1 Linux under QEMU TCG with emulated SVM) and runs commands there,
chrooted into this machine's file system; on a VMX/SVM machine it runs them directly. See
`TestbedSession` and ``python -m nubis.testbed run -- CMD...``.
"""

from __future__ import annotations

from nubis.testbed.host import HostInfo, HostKind, detect_host
from nubis.testbed.session import (
    CommandResult,
    CommandTimeoutError,
    TestbedError,
    TestbedSession,
)

__all__ = [
    "CommandResult",
    "CommandTimeoutError",
    "HostInfo",
    "HostKind",
    "TestbedError",
    "TestbedSession",
    "detect_host",
]
