"""ACPI tables: SDT header and checksum, an AML encoder, one module per table."""
