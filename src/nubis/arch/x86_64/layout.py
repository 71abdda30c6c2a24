"""The x86_64 guest physical address map and I/O port map of a nubis VM.

Every fixed address the loaders, ACPI tables, PCI and device code agree on lives here, so the
map can be read in one place::

    0x0000_0000  real-mode IVT and BIOS data area (left zero)
    0x0000_0500  GDT                      (BOOT_GDT_START)
    0x0000_0520  IDT (empty)              (BOOT_IDT_START)
    0x0000_6000  PVH hvm_start_info       (PVH_INFO_START), memory map right after it
    0x0000_7000  zero page (boot_params)  (ZERO_PAGE_START)
    0x0000_8ff0  initial stack pointer    (BOOT_STACK_POINTER)
    0x0000_9000  PML4, PDPT, 4 PDs        (PML4_START ...) identity map of the first 4 GiB
    0x0002_0000  kernel command line      (CMDLINE_START, CMDLINE_MAX_SIZE bytes)
    0x0009_fc00  end of low RAM           (EBDA_START): 0x9fc00-0x100000 reserved in e820
    0x000e_0000  RSDP and ACPI tables     (RSDP_START), in the range Linux scans for the RSDP
    0x0010_0000  kernel                   (HIGH_RAM_START)
    0xc000_0000  32-bit MMIO hole start   (MEM_32BIT_RESERVED_START): RAM stops here
    0xc000_0000  32-bit PCI BAR window    (MEM_32BIT_DEVICES_START, _SIZE)
    0xe800_0000  PCI ECAM (MMCONFIG)      (PCI_MMCONFIG_START, _SIZE), bus 0 only
    0xfeb0_0000  ACPI GED status register (GED_MMIO_START), the power button's event source
    0xfec0_0000  IOAPIC                   (IOAPIC_START)
    0xfee0_0000  local APIC               (APIC_START)
    0xfffb_c000  KVM identity map page, then 3 TSS pages (KVM_IDENTITY_MAP_START, KVM_TSS_START)
    0x1_0000_0000  RAM above the hole, then the 64-bit PCI BAR window after the end of RAM
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

# Low memory.
BOOT_GDT_START: Final = 0x500
BOOT_GDT_MAX_ENTRIES: Final = 4
BOOT_IDT_START: Final = 0x520
PVH_INFO_START: Final = 0x6000
PVH_MEMMAP_START: Final = 0x6040  # right after the 56-byte hvm_start_info, 16-byte aligned
PVH_MEMMAP_MAX_ENTRIES: Final = 64
ZERO_PAGE_START: Final = 0x7000
BOOT_STACK_POINTER: Final = 0x8FF0
PML4_START: Final = 0x9000
PDPTE_START: Final = 0xA000
PDE_START: Final = 0xB000  # four page directories, 0xb000-0xefff, map 4 GiB with 2 MiB pages
CMDLINE_START: Final = 0x20000
CMDLINE_MAX_SIZE: Final = 0x10000
EBDA_START: Final = 0x9FC00
RSDP_START: Final = 0xE0000
ACPI_TABLES_END: Final = 0x100000
HIGH_RAM_START: Final = 0x100000

# The 32-bit MMIO hole: guest RAM never overlaps [MEM_32BIT_RESERVED_START, 4 GiB).
MEM_32BIT_RESERVED_START: Final = 0xC000_0000
MEM_32BIT_RESERVED_SIZE: Final = 1 * GiB
MEM_32BIT_DEVICES_START: Final = MEM_32BIT_RESERVED_START
MEM_32BIT_DEVICES_SIZE: Final = 640 * MiB
PCI_MMCONFIG_START: Final = 0xE800_0000
PCI_MMCONFIG_SIZE: Final = 256 * MiB  # room for 256 buses; nubis uses bus 0 only
GED_MMIO_START: Final = 0xFEB0_0000
GED_MMIO_SIZE: Final = 1
IOAPIC_START: Final = 0xFEC0_0000
IOAPIC_SIZE: Final = 0x100  # IOREGSEL, IOWIN and the EOI register at 0x40
APIC_START: Final = 0xFEE0_0000
KVM_IDENTITY_MAP_START: Final = 0xFFFB_C000
KVM_TSS_START: Final = KVM_IDENTITY_MAP_START + 0x1000
FIRST_ADDR_PAST_32BITS: Final = 1 << 32

# The 64-bit PCI BAR window starts at the first GiB boundary past the end of RAM (and past
# 4 GiB) and has this size.
MEM_64BIT_DEVICES_SIZE: Final = 64 * GiB

# I/O ports.
PORT_DEBUG: Final = 0x80
PORT_I8042_DATA: Final = 0x60
PORT_I8042_COMMAND: Final = 0x64
PORT_RTC: Final = 0x70
PORT_RTC_SIZE: Final = 2
PORT_COM1: Final = 0x3F8
PORT_UART_SIZE: Final = 8
PORT_PCI_CONFIG_ADDRESS: Final = 0xCF8
PORT_PCI_CONFIG_SIZE: Final = 8
# The ACPI hardware-reduced sleep and reset registers (FADT SLEEP_CONTROL_REG, SLEEP_STATUS_REG,
# RESET_REG), one byte each, served by nubis.devices.acpi_pm.
PORT_ACPI_SLEEP_CONTROL: Final = 0x600
PORT_ACPI_SLEEP_STATUS: Final = 0x601
PORT_ACPI_RESET: Final = 0x602
ACPI_RESET_VALUE: Final = 0x01
ACPI_S5_SLEEP_TYPE: Final = 5  # the SLP_TYP the DSDT's \_S5 package names

# Legacy interrupt lines (ISA IRQ numbers; GSI = IRQ except IRQ 0, which is GSI 2).
IRQ_COM1: Final = 4
IRQ_RTC: Final = 8
IRQ_I8042_KEYBOARD: Final = 1
IRQ_ACPI_SCI: Final = 9
IRQ_GED: Final = 5  # a free ISA line, edge-triggered as Linux's GED driver requires
# GSIs from here up are free for devices (MSI routes, GED); the IOAPIC has 24 pins.
IOAPIC_NUM_PINS: Final = 24
FIRST_DEVICE_GSI: Final = 24


def ram_ranges(size: int) -> list[tuple[int, int]]:
    """Return the (start, length) guest RAM ranges for ``size`` bytes of memory.

    RAM starts at 0; what does not fit below the 32-bit MMIO hole continues at 4 GiB.
    """
    if size <= 0:
        raise ValueError("guest memory size must be positive")
    if size <= MEM_32BIT_RESERVED_START:
        return [(0, size)]
    return [
        (0, MEM_32BIT_RESERVED_START),
        (FIRST_ADDR_PAST_32BITS, size - MEM_32BIT_RESERVED_START),
    ]


def mem_64bit_devices_start(ram_size: int) -> int:
    """Start of the 64-bit PCI BAR window for a guest with ``ram_size`` bytes of RAM."""
    end = max(FIRST_ADDR_PAST_32BITS, ranges_end(ram_ranges(ram_size)))
    return (end + GiB - 1) // GiB * GiB


def ranges_end(ranges: list[tuple[int, int]]) -> int:
    """The first address past the highest range."""
    return max(start + length for start, length in ranges)
