"""ACPI tables: SDT header and checksum, an AML encoder, one module per table.

The acpi_tables counterpart. `create_acpi_tables` writes the RSDP, XSDT, FADT, DSDT, MADT and
MCFG of a nubis guest (described by an `AcpiConfig`) into guest memory and returns the RSDP
address the boot configurators pass to the kernel.
"""

from nubis.acpi.dsdt import GedConfig
from nubis.acpi.tables import AcpiConfig, AcpiError, build_acpi_tables, create_acpi_tables

__all__ = ["AcpiConfig", "AcpiError", "GedConfig", "build_acpi_tables", "create_acpi_tables"]
