"""Address-space and id allocators (vm-allocator counterpart)."""
