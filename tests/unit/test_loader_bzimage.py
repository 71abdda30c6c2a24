"""Tests for nubis.loader.bzimage: setup header checks, loading at 1 MiB, hostile bzImages."""

from __future__ import annotations

import ctypes
import io
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nubis.arch.x86_64.layout import HIGH_RAM_START, MiB
from nubis.loader import LoaderError, load_bzimage
from nubis.loader.bootproto import SETUP_HEADER_OFFSET, SetupHeader
from nubis.loader.bzimage import parse_setup_header
from nubis.memory import GuestMemory

RAM_SIZE = 8 * MiB
SETUP_SECTS = 2
PAYLOAD = bytes(range(256)) * 16


def build_bzimage(payload: bytes = PAYLOAD, **fields: int) -> bytes:
    """A bzImage with a 64-bit capable header and ``payload`` after its setup sectors."""
    values = {
        "setup_sects": SETUP_SECTS,
        "boot_flag": 0xAA55,
        "header": 0x53726448,
        "version": 0x020F,
        "loadflags": 0x01,
        "kernel_alignment": 2 * MiB,
        "relocatable_kernel": 1,
        "xloadflags": 0x03,
        "cmdline_size": 2047,
        "initrd_addr_max": 0x7FFFFFFF,
        "pref_address": 2 * MiB,
        "init_size": 1 * MiB,
    }
    values.update(fields)
    image = bytearray(((values["setup_sects"] or 4) + 1) * 512)
    header = SetupHeader.from_buffer(image, SETUP_HEADER_OFFSET)
    for name, value in values.items():
        setattr(header, name, value)
    del header
    return bytes(image) + payload


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """8 MiB of guest RAM from address 0."""
    with GuestMemory([(0, RAM_SIZE)]) as mem:
        yield mem


def test_setup_header_is_pinned() -> None:
    assert SETUP_HEADER_OFFSET == 0x1F1
    assert ctypes.sizeof(SetupHeader) == 0x26C - 0x1F1
    offsets = {
        "boot_flag": 0x1FE,
        "header": 0x202,
        "version": 0x206,
        "type_of_loader": 0x210,
        "loadflags": 0x211,
        "code32_start": 0x214,
        "ramdisk_image": 0x218,
        "ramdisk_size": 0x21C,
        "cmd_line_ptr": 0x228,
        "initrd_addr_max": 0x22C,
        "kernel_alignment": 0x230,
        "relocatable_kernel": 0x234,
        "xloadflags": 0x236,
        "cmdline_size": 0x238,
        "pref_address": 0x258,
        "init_size": 0x260,
        "kernel_info_offset": 0x268,
    }
    for name, offset in offsets.items():
        assert getattr(SetupHeader, name).offset + SETUP_HEADER_OFFSET == offset, name


def test_loads_protected_mode_kernel_at_1mib(memory: GuestMemory) -> None:
    result = load_bzimage(memory, io.BytesIO(build_bzimage()))
    assert result.load_addr == HIGH_RAM_START
    assert result.entry_64 == HIGH_RAM_START + 0x200
    # Relocatable: runs at max(align_up(1 MiB, 2 MiB), pref_address) = 2 MiB, needs init_size.
    assert result.kernel_end == 3 * MiB
    assert memory.read(HIGH_RAM_START, len(PAYLOAD)) == PAYLOAD
    assert result.header.cmdline_size == 2047
    assert result.header.initrd_addr_max == 0x7FFFFFFF


def test_zero_setup_sects_means_four(memory: GuestMemory) -> None:
    image = build_bzimage(setup_sects=0)
    assert len(image) == 5 * 512 + len(PAYLOAD)
    result = load_bzimage(memory, io.BytesIO(image))
    assert memory.read(result.load_addr, len(PAYLOAD)) == PAYLOAD


def test_kernel_end_covers_a_long_payload_and_a_fixed_kernel(memory: GuestMemory) -> None:
    payload = bytes(3 * MiB)
    assert load_bzimage(memory, io.BytesIO(build_bzimage(payload))).kernel_end == 4 * MiB
    fixed = build_bzimage(relocatable_kernel=0, pref_address=4 * MiB)
    assert load_bzimage(memory, io.BytesIO(fixed)).kernel_end == 5 * MiB


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"", "too short"),
        (build_bzimage(header=0x12345678), "no 'HdrS' magic"),
        (build_bzimage(boot_flag=0), "boot_flag"),
        (build_bzimage(version=0x020B), "boot protocol 2.11, nubis needs 2.12"),
        (build_bzimage(loadflags=0), "LOADED_HIGH"),
        (build_bzimage(xloadflags=0x2), "XLF_KERNEL_64"),
        (build_bzimage(kernel_alignment=3 * MiB), "not a power of two"),
        (build_bzimage(init_size=0), "init_size is 0"),
        (build_bzimage(b""), "no protected-mode kernel"),
        (build_bzimage(init_size=7 * MiB), "needs guest RAM up to 0x900000"),
    ],
)
def test_rejects_bad_bzimages(memory: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        load_bzimage(memory, io.BytesIO(image))
    assert memory.read(HIGH_RAM_START, 16) == bytes(16)


def test_parse_setup_header_alone() -> None:
    header = parse_setup_header(build_bzimage())
    assert header.version == 0x020F
    assert header.setup_sects == SETUP_SECTS


LOW_AREA_ZEROS = bytes(HIGH_RAM_START)


def _load_hostile(image: bytes) -> None:
    with GuestMemory([(0, RAM_SIZE)]) as mem:
        try:
            result = load_bzimage(mem, io.BytesIO(image))
        except LoaderError as exc:
            assert str(exc)
        else:
            assert result.load_addr == HIGH_RAM_START
            assert result.kernel_end <= RAM_SIZE
        assert mem.read(0, HIGH_RAM_START) == LOW_AREA_ZEROS


_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD = build_bzimage()


@_settings
@given(cut=st.integers(0, len(GOOD)))
def test_truncated_bzimages_fail_cleanly(cut: int) -> None:
    _load_hostile(GOOD[:cut])


@_settings
@given(
    edits=st.lists(
        st.tuples(st.integers(SETUP_HEADER_OFFSET, 0x26C - 1), st.integers(0, 255)),
        min_size=1,
        max_size=12,
    )
)
def test_corrupted_setup_headers_fail_cleanly(edits: list[tuple[int, int]]) -> None:
    image = bytearray(GOOD)
    for offset, value in edits:
        image[offset] = value
    _load_hostile(bytes(image))
