"""nubis: a lightweight virtual machine monitor in Python on Linux KVM.

A nubis VM is guest memory, vCPUs, a few virtio devices on one flat PCI segment, the legacy
devices a Linux guest still needs (16550 UART, i8042 for reset, CMOS RTC) and ACPI tables that
describe exactly that. See the package table in the README for which subpackage does what.
"""

__version__ = "0.1.0"

# nubis's own modules come from one pre-compiled file when there is an up-to-date one
# (see nubis._bundle): it takes a tenth off every launch.
from nubis import _bundle

_bundle.install(__path__[0])
