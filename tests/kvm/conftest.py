"""Fixtures for the kvm tier (helpers live in kvm_guest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kvm_guest import TinyVm

from nubis.kvm import Kvm


@pytest.fixture(scope="session")
def kvm() -> Iterator[Kvm]:
    """The host's /dev/kvm; the kvm tier fails (never skips) without it."""
    if not os.path.exists("/dev/kvm"):
        pytest.fail("/dev/kvm is missing: run the kvm tier on a KVM host or the nested test host")
    with Kvm() as handle:
        yield handle


@pytest.fixture
def tiny_vm(kvm: Kvm) -> Iterator[TinyVm]:
    """A fresh `TinyVm` without an irqchip."""
    vm = TinyVm(kvm)
    yield vm
    vm.close()


@pytest.fixture
def tiny_vm_irqchip(kvm: Kvm) -> Iterator[TinyVm]:
    """A fresh `TinyVm` with the in-kernel irqchip (PIC, IOAPIC, LAPIC)."""
    vm = TinyVm(kvm, irqchip=True)
    yield vm
    vm.close()
