"""REST API on a Unix socket (cloud-hypervisor's endpoints) and its remote client."""
