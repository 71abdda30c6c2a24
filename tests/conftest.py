"""Shared pytest configuration for nubis's test tiers."""

import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _supports_direct_io(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(bytes(4096))
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    buffer = mmap.mmap(-1, 4096)
    try:
        return os.preadv(fd, [buffer], 0) == 4096
    except OSError:
        return False
    finally:
        buffer.close()
        os.close(fd)
        probe.unlink()


@pytest.fixture(scope="session")
def direct_dir() -> Iterator[Path]:
    """A scratch directory on a filesystem that supports O_DIRECT (tmpfs does not).

    Under /var/tmp, else next to the tests; the test is skipped when neither supports it.
    """
    for parent in (Path("/var/tmp"), Path(__file__).resolve().parent):
        try:
            directory = Path(tempfile.mkdtemp(prefix="nubis-direct-", dir=parent))
        except OSError:
            continue
        if _supports_direct_io(directory):
            try:
                yield directory
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            return
        shutil.rmtree(directory, ignore_errors=True)
    pytest.skip("no scratch directory supports O_DIRECT (tmpfs does not), which native AIO needs")
