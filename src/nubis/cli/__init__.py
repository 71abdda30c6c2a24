"""Command line (cloud-hypervisor's key=value grammar) into the config model."""
