"""Device plumbing (PIO/MMIO buses, interrupt triggers) and legacy device register models.

- `nubis.devices.bus`: `Bus` of non-overlapping ranges and the `BusDevice` protocol;
- `nubis.devices.interrupt`: the `Trigger` protocol and the irqfd-ready `EventFdTrigger`;
- register models, each a `BusDevice` that knows nothing about file descriptors:
  `serial.Serial16550` (COM1), `i8042.I8042` (reset line), `rtc.CmosRtc`,
  `debug_port.DebugPort` (port 0x80 boot markers), `acpi_pm.AcpiPmDevice` (S5 and reset).
"""
