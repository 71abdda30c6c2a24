"""Device plumbing (PIO/MMIO buses, interrupt triggers) and legacy device register models."""
