"""Architecture support; only x86_64 exists."""
