"""The GED power-button register: a press is read once, then the register reads zero."""

from __future__ import annotations

from nubis.acpi.dsdt import GED_EVENT_POWER_BUTTON
from nubis.devices.ged import GenericEventDevice


class CountingTrigger:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


def read(device: GenericEventDevice, size: int = 1, offset: int = 0) -> bytes:
    data = memoryview(bytearray(b"\xaa" * size))
    device.read(0, offset, data)
    return bytes(data)


def test_press_interrupts_and_reads_once() -> None:
    trigger = CountingTrigger()
    ged = GenericEventDevice(trigger)
    assert read(ged) == b"\x00"
    ged.press_power_button()
    assert trigger.count == 1
    ged.write(0, 0, memoryview(bytearray(b"\x00")))  # writes do not clear or set anything
    assert read(ged, 4) == bytes([GED_EVENT_POWER_BUTTON, 0, 0, 0])
    assert read(ged) == b"\x00"


def test_read_at_other_offsets_does_not_consume_the_event() -> None:
    ged = GenericEventDevice(CountingTrigger())
    ged.press_power_button()
    assert read(ged, offset=1) == b"\x00"
    assert read(ged) == bytes([GED_EVENT_POWER_BUTTON])
