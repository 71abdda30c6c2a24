"""Guest images built from Debian packages into a cache: kernel, vmlinux, initramfs, ext4 rootfs."""
