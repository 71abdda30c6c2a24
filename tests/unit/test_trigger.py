"""Tests for nubis.devices.interrupt: the eventfd-backed trigger."""

from __future__ import annotations

import fcntl
import os

import pytest

from nubis.devices.interrupt import EventFdTrigger, Trigger


def test_trigger_adds_one_per_call() -> None:
    with EventFdTrigger() as trig:
        assert trig.consume() == 0
        trig.trigger()
        trig.trigger()
        assert os.eventfd_read(trig.fd) == 2
        assert trig.consume() == 0


def test_eventfd_is_cloexec_and_nonblocking() -> None:
    with EventFdTrigger() as trig:
        assert not os.get_inheritable(trig.fd)
        assert fcntl.fcntl(trig.fd, fcntl.F_GETFL) & os.O_NONBLOCK


def test_saturated_counter_does_not_raise() -> None:
    with EventFdTrigger() as trig:
        os.eventfd_write(trig.fd, 0xFFFF_FFFF_FFFF_FFFE)
        trig.trigger()
        assert trig.consume() == 0xFFFF_FFFF_FFFF_FFFE


def test_close_is_idempotent() -> None:
    trig = EventFdTrigger()
    fd = trig.fd
    trig.close()
    trig.close()
    assert trig.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_satisfies_the_protocol() -> None:
    with EventFdTrigger() as trig:
        as_protocol: Trigger = trig
        as_protocol.trigger()
        assert trig.consume() == 1
