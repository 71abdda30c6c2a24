"""PCI: configuration space, BARs, capabilities, MSI-X, the root bus and host bridge."""
