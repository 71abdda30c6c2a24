"""virtio: split virtqueues (sans-IO), the PCI transport, one module per device."""
