"""Tests for the ACPI tables: layouts, checksums, iasl disassembly, placement in guest memory."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nubis.acpi import AcpiConfig, AcpiError, GedConfig, create_acpi_tables
from nubis.acpi.dsdt import build_dsdt
from nubis.acpi.fadt import Fadt, GenericAddress, build_fadt
from nubis.acpi.madt import (
    MadtFixed,
    MadtInterruptSourceOverride,
    MadtIoApic,
    MadtLocalApic,
    MadtLocalApicNmi,
    build_madt,
)
from nubis.acpi.mcfg import McfgAllocation, build_mcfg
from nubis.acpi.rsdp import Rsdp, build_rsdp
from nubis.acpi.sdt import SdtHeader, checksum
from nubis.acpi.tables import build_acpi_tables
from nubis.acpi.xsdt import build_xsdt
from nubis.arch.x86_64 import layout
from nubis.arch.x86_64.layout import GiB, MiB
from nubis.memory import GuestMemory

CONFIG = AcpiConfig.for_guest(2, 512 * MiB)
GED = GedConfig(mmio_address=0xFED0_0000, gsi=5)


def _u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


# Layouts.


def test_layouts_are_pinned() -> None:
    assert ctypes.sizeof(SdtHeader) == 36
    assert SdtHeader.checksum.offset == 9
    assert SdtHeader.oem_id.offset == 10
    assert SdtHeader.creator_revision.offset == 32
    assert ctypes.sizeof(Rsdp) == 36
    assert Rsdp.revision.offset == 15
    assert Rsdp.length.offset == 20
    assert Rsdp.xsdt_address.offset == 24
    assert Rsdp.extended_checksum.offset == 32
    assert ctypes.sizeof(GenericAddress) == 12
    assert ctypes.sizeof(Fadt) == 276
    offsets = {
        "sci_int": 46,
        "iapc_boot_arch": 109,
        "flags": 112,
        "reset_reg": 116,
        "reset_value": 128,
        "fadt_minor_version": 131,
        "x_dsdt": 140,
        "sleep_control_reg": 244,
        "sleep_status_reg": 256,
        "hypervisor_vendor_identity": 268,
    }
    for name, offset in offsets.items():
        assert getattr(Fadt, name).offset == offset, name
    assert ctypes.sizeof(MadtFixed) == 44
    assert ctypes.sizeof(MadtLocalApic) == 8
    assert ctypes.sizeof(MadtIoApic) == 12
    assert ctypes.sizeof(MadtInterruptSourceOverride) == 10
    assert ctypes.sizeof(MadtLocalApicNmi) == 6
    assert ctypes.sizeof(McfgAllocation) == 16


# Table contents.


def test_rsdp_checksums_and_pointer() -> None:
    rsdp = build_rsdp(0xE0400)
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0
    assert sum(rsdp) % 256 == 0
    assert rsdp[15] == 2
    assert rsdp[9:15] == b"NUBIS "
    assert _u(rsdp, 16, 4) == 0  # no RSDT
    assert _u(rsdp, 20, 4) == 36
    assert _u(rsdp, 24, 8) == 0xE0400


def test_fadt_fields() -> None:
    fadt = build_fadt(0xE0040)
    assert fadt[:4] == b"FACP" and _u(fadt, 4, 4) == 276 and fadt[8] == 6
    assert fadt[131] == 4  # FADT minor version: ACPI 6.4
    assert _u(fadt, 40, 4) == 0  # DSDT only through X_DSDT
    assert _u(fadt, 140, 8) == 0xE0040
    flags = _u(fadt, 112, 4)
    assert flags & (1 << 20) and flags & (1 << 10)  # HW_REDUCED_ACPI, RESET_REG_SUP
    assert _u(fadt, 109, 2) == 0b110  # 8042 present, VGA not present
    for offset, port in (
        (116, layout.PORT_ACPI_RESET),
        (244, layout.PORT_ACPI_SLEEP_CONTROL),
        (256, layout.PORT_ACPI_SLEEP_STATUS),
    ):
        assert fadt[offset : offset + 4] == bytes([1, 8, 0, 1])  # system I/O, 8 bits, byte access
        assert _u(fadt, offset + 4, 8) == port
    assert fadt[128] == layout.ACPI_RESET_VALUE
    assert fadt[268:276] == b"NUBISVMM"


@pytest.mark.parametrize("vcpus", [1, 2, 255])
def test_madt_entries(vcpus: int) -> None:
    madt = build_madt(vcpus)
    assert _u(madt, 4, 4) == len(madt) == 44 + 8 * vcpus + 12 + 10 + 6
    assert _u(madt, 36, 4) == layout.APIC_START
    assert _u(madt, 40, 4) == 0  # no PCAT_COMPAT: split irqchip, no 8259s
    for index in range(vcpus):
        entry = madt[44 + 8 * index : 52 + 8 * index]
        assert entry == bytes([0, 8, index, index, 1, 0, 0, 0])
    rest = madt[44 + 8 * vcpus :]
    assert rest[:12] == bytes([1, 12, 0, 0]) + layout.IOAPIC_START.to_bytes(4, "little") + bytes(4)
    assert rest[12:22] == bytes([2, 10, 0, 0, 2, 0, 0, 0, 0, 0])  # ISA IRQ 0 -> GSI 2
    assert rest[22:28] == bytes([4, 6, 0xFF, 0, 0, 1])  # NMI on LINT1, all processors


def test_madt_rejects_bad_vcpu_counts() -> None:
    for vcpus in (0, 256):
        with pytest.raises(AcpiError, match="1 to 255 vCPUs"):
            build_madt(vcpus)
        with pytest.raises(AcpiError, match="1 to 255 vCPUs"):
            AcpiConfig.for_guest(vcpus, 512 * MiB)


def test_mcfg_allocation() -> None:
    mcfg = build_mcfg()
    assert len(mcfg) == 60
    assert mcfg[36:44] == bytes(8)
    assert _u(mcfg, 44, 8) == layout.PCI_MMCONFIG_START
    assert mcfg[52:56] == bytes([0, 0, 0, 0])  # segment 0, buses 0..0


def test_xsdt_entries() -> None:
    xsdt = build_xsdt([0x1000, 0x2000])
    assert len(xsdt) == 52 and xsdt[:4] == b"XSDT"
    assert _u(xsdt, 36, 8) == 0x1000 and _u(xsdt, 44, 8) == 0x2000


def test_ged_is_off_by_default() -> None:
    assert b"ACPI0013" not in build_dsdt(CONFIG.mem64_start, CONFIG.mem64_size)
    assert b"ACPI0013" in build_dsdt(CONFIG.mem64_start, CONFIG.mem64_size, GED)


@settings(max_examples=50, deadline=None)
@given(
    vcpus=st.integers(1, 255),
    ram=st.integers(1, 1024).map(lambda n: n * 64 * MiB),
    ged=st.none() | st.builds(GedConfig, st.integers(0, (1 << 32) - 1), st.integers(0, 1023)),
)
def test_every_table_sums_to_zero(vcpus: int, ram: int, ged: GedConfig | None) -> None:
    for _, table in build_acpi_tables(AcpiConfig.for_guest(vcpus, ram, ged)):
        assert checksum(table) == 0
        if table[:4] != b"RSD ":
            assert _u(table, 4, 4) == len(table)


# Disassembly with iasl (ACPICA), the reference consumer of these bytes.

IASL = shutil.which("iasl")
ACPIEXEC = shutil.which("acpiexec")


@pytest.fixture
def tables(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Every table but the RSDP in a .dat file of its own, by signature."""
    files = {}
    for _, data in build_acpi_tables(AcpiConfig.for_guest(4, 8 * GiB, GED))[1:]:
        signature = data[:4].decode()
        files[signature] = tmp_path / f"{signature.lower()}.dat"
        files[signature].write_bytes(data)
    yield files


@pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
def test_every_table_disassembles(tables: dict[str, Path]) -> None:
    assert set(tables) == {"DSDT", "FACP", "APIC", "MCFG", "XSDT"}
    for signature, path in tables.items():
        run = subprocess.run(
            [str(IASL), "-d", path.name],
            cwd=path.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output
        assert "Error" not in output and "Warning" not in output, output
        disassembly = path.with_suffix(".dsl").read_text()
        assert "Error" not in disassembly, signature
        assert "Invalid" not in disassembly, signature
    dsdt = tables["DSDT"].with_suffix(".dsl").read_text()
    for expected in (
        "_S5_",
        "PNP0501",
        "PNP0B00",
        "PNP0A08",
        "PNP0A03",
        "Device (PCI0)",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
        "0xE7FFFFFF",
        "QWordMemory",
        "ACPI0013",
        "PNP0C0C",
        "Method (_EVT, 1, Serialized)",
        "Notify (\\_SB.PWRB, 0x80)",
        "OperationRegion (GDST, SystemMemory, 0xFED00000, One)",
    ):
        assert expected in dsdt, expected
    facp = tables["FACP"].with_suffix(".dsl").read_text()
    assert "Hardware Reduced (V5) : 1" in facp
    assert "Reset Register Supported (V2) : 1" in facp
    assert "8042 Present on ports 60/64 (V2) : 1" in facp
    madt = tables["APIC"].with_suffix(".dsl").read_text()
    assert madt.count("[Processor Local APIC]") == 4


@pytest.mark.skipif(ACPIEXEC is None, reason="acpiexec (acpica-tools) is not installed")
def test_dsdt_loads_and_evaluates_in_acpiexec(tables: dict[str, Path]) -> None:
    run = subprocess.run(
        [str(ACPIEXEC), "-b", r"evaluate \_S5; evaluate \_SB.GED._EVT 5", tables["DSDT"].name],
        cwd=tables["DSDT"].parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "AE_" not in output.replace("AE_OK", ""), output
    s5 = output[output.index(r"Evaluating \_S5") :]
    assert "[Integer] = 0000000000000005" in s5


# Placement in guest memory.


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """16 MiB of guest RAM from address 0."""
    with GuestMemory([(0, 16 * MiB)]) as mem:
        yield mem


def test_create_acpi_tables_writes_a_walkable_chain(memory: GuestMemory) -> None:
    rsdp = create_acpi_tables(memory, AcpiConfig.for_guest(2, 16 * MiB, GED))
    assert rsdp == layout.RSDP_START
    assert memory.read(rsdp, 8) == b"RSD PTR "
    xsdt = memory.read_u64(rsdp + 24)
    length = memory.read_u32(xsdt + 4)
    entries = [memory.read_u64(xsdt + 36 + 8 * i) for i in range((length - 36) // 8)]
    found = {memory.read(addr, 4): addr for addr in entries}
    assert set(found) == {b"FACP", b"APIC", b"MCFG"}
    dsdt = memory.read_u64(found[b"FACP"] + 140)
    assert memory.read(dsdt, 4) == b"DSDT"
    for addr in [xsdt, dsdt, *entries]:
        table = memory.read(addr, memory.read_u32(addr + 4))
        assert checksum(table) == 0
        assert addr % 16 == 0
        assert addr >= layout.RSDP_START and addr + len(table) <= layout.ACPI_TABLES_END


def test_tables_that_do_not_fit(memory: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "ACPI_TABLES_END", layout.RSDP_START + 0x100)
    with pytest.raises(AcpiError, match="more than the 256 bytes reserved at 0xe0000"):
        create_acpi_tables(memory, CONFIG)
    monkeypatch.undo()
    with GuestMemory([(0, 512 * 1024)]) as small, pytest.raises(AcpiError, match="guest RAM"):
        create_acpi_tables(small, CONFIG)


def test_config_checks_the_window() -> None:
    with pytest.raises(AcpiError, match="above 4 GiB"):
        AcpiConfig(num_vcpus=1, mem64_start=0xC000_0000, mem64_size=GiB)
    with pytest.raises(AcpiError, match="non-empty"):
        AcpiConfig(num_vcpus=1, mem64_start=1 << 32, mem64_size=0)
    with pytest.raises(AcpiError, match="not 32-bit"):
        GedConfig(mmio_address=1 << 32, gsi=5)
