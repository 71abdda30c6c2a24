"""Guest physical memory: `GuestAddress`, `GuestMemory` made of mmap/memfd regions, bounds-checked access."""
