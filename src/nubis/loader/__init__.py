"""Kernel loaders (ELF/PVH, bzImage) and boot configurators (zero page, PVH start info), command line."""
