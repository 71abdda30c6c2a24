"""The one error type of nubis's ACPI table builders."""

from __future__ import annotations

__all__ = ["AcpiError"]


class AcpiError(ValueError):
    """ACPI tables that cannot be built or placed for this VM configuration."""
