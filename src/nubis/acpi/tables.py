"""Build every ACPI table of a nubis guest and write them to guest memory.

The RSDP goes at ``layout.RSDP_START`` (inside the 0xE0000-0xFFFFF range where Linux also
scans for it, ACPI 6.4 section 5.2.5.1), followed by the DSDT, FADT, MADT, MCFG and XSDT,
each 16-byte aligned, all below ``layout.ACPI_TABLES_END``. The chain the OS walks is
RSDP → XSDT → {FADT → DSDT, MADT, MCFG} (ACPI 6.4 section 5.2).
"""

from __future__ import annotations

from nubis._frozen import Frozen
from nubis.acpi.dsdt import GedConfig, build_dsdt
from nubis.acpi.errors import AcpiError
from nubis.acpi.fadt import build_fadt
from nubis.acpi.madt import MAX_VCPUS, build_madt
from nubis.acpi.mcfg import build_mcfg
from nubis.acpi.rsdp import build_rsdp
from nubis.acpi.xsdt import build_xsdt
from nubis.arch.x86_64 import layout
from nubis.memory import GuestMemory, GuestMemoryError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["TABLE_ALIGNMENT", "AcpiConfig", "AcpiError", "create_acpi_tables"]

TABLE_ALIGNMENT: Final = 16


class AcpiConfig(Frozen):
    """What the ACPI tables describe: vCPUs, the 64-bit PCI window and an optional GED."""

    __slots__ = ("ged", "mem64_size", "mem64_start", "num_vcpus")

    num_vcpus: int
    mem64_start: int
    mem64_size: int
    ged: GedConfig | None

    def __init__(
        self, num_vcpus: int, mem64_start: int, mem64_size: int, ged: GedConfig | None = None
    ) -> None:
        object.__setattr__(self, "num_vcpus", num_vcpus)
        object.__setattr__(self, "mem64_start", mem64_start)
        object.__setattr__(self, "mem64_size", mem64_size)
        object.__setattr__(self, "ged", ged)
        self._check()

    def _check(self) -> None:
        if not 1 <= self.num_vcpus <= MAX_VCPUS:
            raise AcpiError(f"ACPI tables describe 1 to {MAX_VCPUS} vCPUs, not {self.num_vcpus}")
        if self.mem64_size <= 0 or self.mem64_start < layout.FIRST_ADDR_PAST_32BITS:
            raise AcpiError(
                f"64-bit PCI window [{self.mem64_start:#x}, +{self.mem64_size:#x}) must be "
                "non-empty and above 4 GiB"
            )
        if self.mem64_start + self.mem64_size > 1 << 64:
            raise AcpiError("64-bit PCI window extends past the 64-bit address space")

    @classmethod
    def for_guest(cls, num_vcpus: int, ram_size: int, ged: GedConfig | None = None) -> AcpiConfig:
        """The configuration for a guest of ``ram_size`` bytes, with nubis's 64-bit window."""
        return cls(
            num_vcpus=num_vcpus,
            mem64_start=layout.mem_64bit_devices_start(ram_size),
            mem64_size=layout.MEM_64BIT_DEVICES_SIZE,
            ged=ged,
        )


def _align(value: int) -> int:
    return (value + TABLE_ALIGNMENT - 1) & ~(TABLE_ALIGNMENT - 1)


def build_acpi_tables(config: AcpiConfig, base: int = layout.RSDP_START) -> list[tuple[int, bytes]]:
    """Every table as ``(guest address, bytes)``, the RSDP first, laid out from ``base``."""
    placed: list[tuple[int, bytes]] = []
    cursor = _align(base + 36)  # the RSDP is 36 bytes; it is built last, once XSDT is placed

    def place(table: bytes) -> int:
        nonlocal cursor
        addr = cursor
        placed.append((addr, table))
        cursor = _align(addr + len(table))
        return addr

    dsdt = place(build_dsdt(config.mem64_start, config.mem64_size, config.ged))
    fadt = place(build_fadt(dsdt))
    madt = place(build_madt(config.num_vcpus))
    mcfg = place(build_mcfg())
    xsdt = place(build_xsdt([fadt, madt, mcfg]))
    return [(base, build_rsdp(xsdt)), *placed]


def create_acpi_tables(memory: GuestMemory, config: AcpiConfig) -> int:
    """Write the ACPI tables for ``config`` into ``memory``; return the RSDP address."""
    tables = build_acpi_tables(config)
    end = max(addr + len(data) for addr, data in tables)
    if end > layout.ACPI_TABLES_END:
        raise AcpiError(
            f"ACPI tables need {end - layout.RSDP_START} bytes, more than the "
            f"{layout.ACPI_TABLES_END - layout.RSDP_START} bytes reserved at {layout.RSDP_START:#x}"
        )
    try:
        for addr, data in tables:
            memory.write(addr, data)
    except GuestMemoryError as exc:
        raise AcpiError(f"ACPI tables do not fit in guest RAM: {exc}") from None
    return layout.RSDP_START
