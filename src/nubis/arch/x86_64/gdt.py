"""Segment descriptors, the boot GDT and the empty boot IDT.

A segment descriptor is the 8-byte structure of Intel SDM Vol. 3A §3.4.5 ("Segment
Descriptors", figure 3-8) and AMD APM Vol. 2 §4.7 / §4.8 (legacy and long-mode descriptors)::

    bits  0-15  limit 15:0          bits 40-47  access byte: type (4), S, DPL (2), P
    bits 16-39  base 23:0           bits 48-51  limit 19:16
                                    bits 52-55  flags: AVL, L, D/B, G
                                    bits 56-63  base 31:24

nubis writes a four-entry GDT at ``BOOT_GDT_START`` (null, code, data, TSS; selectors 0x00,
0x08, 0x10, 0x18) and loads the same descriptors into the vCPU's hidden segment registers
through ``KVM_SET_SREGS`` (KVM API document §4.14), because a vCPU starts with the cached
parts of its segment registers, not with what a GDT in memory says. The code descriptor is
64-bit (L=1) for the Linux 64-bit boot protocol and 32-bit (D=1) for PVH; the Xen PVH ABI
(xen/include/public/arch-x86/hvm/start_info.h, "Boot state") asks for flat 4 GiB 32-bit code
and data segments and a loaded 32-bit TSS. The 64-bit entry in the Linux boot protocol
(Documentation/arch/x86/boot.rst, "64-bit Boot Protocol") asks for flat 4 GiB code and data
segments; the kernel loads its own GDT before it relies on any selector value.

The IDT is a single zero gate: the guest starts with interrupts disabled and installs its own.
"""

from __future__ import annotations

import struct

from nubis._frozen import Frozen
from nubis.arch.x86_64.layout import BOOT_GDT_MAX_ENTRIES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

# Descriptor "flags" values as a 16-bit pair: the access byte in bits 0-7 and the flags nibble
# (AVL, L, D/B, G) in bits 12-15, the way the two halves sit in the descriptor's high word.
FLAGS_NULL: Final = 0x0000
FLAGS_CODE64: Final = 0xA09B  # G, L, P, S, type 0xb: execute/read, accessed, 64-bit
FLAGS_CODE32: Final = 0xC09B  # G, D, P, S, type 0xb: execute/read, accessed, 32-bit
FLAGS_DATA: Final = 0xC093  # G, B, P, S, type 0x3: read/write, accessed
# P, type 0xb, byte-granular limit: a busy TSS. Type 0xb means "32-bit TSS" in protected mode
# and "64-bit TSS" in long mode (SDM Vol. 3A §3.5, table 3-2); KVM needs TR to be busy.
FLAGS_TSS: Final = 0x008B

# Selectors of the boot GDT (index << 3, TI = 0, RPL = 0).
SELECTOR_CODE: Final = 0x08
SELECTOR_DATA: Final = 0x10
SELECTOR_TSS: Final = 0x18

# The smallest TSS: 104 bytes (SDM Vol. 3A §8.2.1 and §8.7), so the limit is 0x67.
TSS_LIMIT: Final = 0x67
FLAT_LIMIT: Final = 0xFFFFF  # 20-bit limit in 4 KiB units: 4 GiB

GDT_ENTRY_SIZE: Final = 8
IDT_ENTRY_SIZE: Final = 8
BOOT_GDT_LIMIT: Final = BOOT_GDT_MAX_ENTRIES * GDT_ENTRY_SIZE - 1
BOOT_IDT_LIMIT: Final = IDT_ENTRY_SIZE - 1

_U64: Final = struct.Struct("<Q")


def encode_descriptor(flags: int, base: int, limit: int) -> int:
    """Encode a segment descriptor from a 16-bit flags pair, a 32-bit base and a 20-bit limit.

    ``flags`` carries the access byte in bits 0-7 and AVL/L/D/G in bits 12-15 (see the
    ``FLAGS_*`` constants); bits 8-11 must be zero because they are the limit's high nibble.
    """
    if flags & ~0xF0FF:
        raise ValueError(f"descriptor flags {flags:#x} overlap the limit's high nibble")
    if not 0 <= base <= 0xFFFF_FFFF:
        raise ValueError(f"descriptor base {base:#x} does not fit in 32 bits")
    if not 0 <= limit <= 0xFFFFF:
        raise ValueError(f"descriptor limit {limit:#x} does not fit in 20 bits")
    return (
        (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | (flags & 0xFF) << 40
        | (limit >> 16) << 48
        | ((flags >> 12) & 0xF) << 52
        | (base >> 24) << 56
    )


class Segment(Frozen):
    """A segment register's hidden part, field for field the ``struct kvm_segment`` of KVM.

    ``limit`` is the byte-granular limit the processor caches (already scaled when ``g`` is
    set), as ``KVM_SET_SREGS`` expects it.
    """

    __slots__ = (
        "avl",
        "base",
        "db",
        "dpl",
        "g",
        "l",
        "limit",
        "present",
        "s",
        "selector",
        "type",
        "unusable",
    )

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the field is named so in struct kvm_segment
    g: int
    avl: int
    unusable: int

    def __init__(
        self,
        base: int,
        limit: int,
        selector: int,
        type: int,
        present: int,
        dpl: int,
        db: int,
        s: int,
        l: int,  # noqa: E741 - named so in struct kvm_segment
        g: int,
        avl: int,
        unusable: int,
    ) -> None:
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "limit", limit)
        object.__setattr__(self, "selector", selector)
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "present", present)
        object.__setattr__(self, "dpl", dpl)
        object.__setattr__(self, "db", db)
        object.__setattr__(self, "s", s)
        object.__setattr__(self, "l", l)
        object.__setattr__(self, "g", g)
        object.__setattr__(self, "avl", avl)
        object.__setattr__(self, "unusable", unusable)

    @classmethod
    def from_descriptor(cls, index: int, descriptor: int) -> Segment:
        """Decode the descriptor at GDT ``index`` into the segment register it loads."""
        base = ((descriptor >> 16) & 0xFF_FFFF) | ((descriptor >> 56) & 0xFF) << 24
        raw_limit = (descriptor & 0xFFFF) | ((descriptor >> 48) & 0xF) << 16
        g = (descriptor >> 55) & 1
        limit = (raw_limit << 12) | 0xFFF if g else raw_limit
        present = (descriptor >> 47) & 1
        return cls(
            base=base,
            limit=limit,
            selector=index * GDT_ENTRY_SIZE,
            type=(descriptor >> 40) & 0xF,
            present=present,
            dpl=(descriptor >> 45) & 3,
            db=(descriptor >> 54) & 1,
            s=(descriptor >> 44) & 1,
            l=(descriptor >> 53) & 1,
            g=g,
            avl=(descriptor >> 52) & 1,
            unusable=0 if present else 1,
        )


class BootGdt(Frozen):
    """The four boot descriptors (null, code, data, TSS) and the segments they load."""

    __slots__ = ("descriptors",)

    descriptors: tuple[int, int, int, int]

    def __init__(self, descriptors: tuple[int, int, int, int]) -> None:
        object.__setattr__(self, "descriptors", descriptors)

    @property
    def code(self) -> Segment:
        """The segment loaded into CS."""
        return Segment.from_descriptor(SELECTOR_CODE >> 3, self.descriptors[1])

    @property
    def data(self) -> Segment:
        """The segment loaded into DS, ES, FS, GS and SS."""
        return Segment.from_descriptor(SELECTOR_DATA >> 3, self.descriptors[2])

    @property
    def tss(self) -> Segment:
        """The segment loaded into TR."""
        return Segment.from_descriptor(SELECTOR_TSS >> 3, self.descriptors[3])

    def to_bytes(self) -> bytes:
        """The GDT as it is written to guest memory at ``BOOT_GDT_START``."""
        return b"".join(_U64.pack(d) for d in self.descriptors)


def long_mode_gdt() -> BootGdt:
    """The boot GDT for the Linux 64-bit boot protocol: 64-bit code, flat data, 64-bit TSS."""
    return BootGdt(
        (
            encode_descriptor(FLAGS_NULL, 0, 0),
            encode_descriptor(FLAGS_CODE64, 0, FLAT_LIMIT),
            encode_descriptor(FLAGS_DATA, 0, FLAT_LIMIT),
            encode_descriptor(FLAGS_TSS, 0, TSS_LIMIT),
        )
    )


def protected_mode_gdt() -> BootGdt:
    """The boot GDT for PVH: flat 4 GiB 32-bit code and data, 32-bit TSS."""
    return BootGdt(
        (
            encode_descriptor(FLAGS_NULL, 0, 0),
            encode_descriptor(FLAGS_CODE32, 0, FLAT_LIMIT),
            encode_descriptor(FLAGS_DATA, 0, FLAT_LIMIT),
            encode_descriptor(FLAGS_TSS, 0, TSS_LIMIT),
        )
    )


def empty_idt() -> bytes:
    """The boot IDT: one zero gate, written at ``BOOT_IDT_START``."""
    return bytes(IDT_ENTRY_SIZE)
