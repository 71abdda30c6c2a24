"""The only code that issues KVM ioctls: ctypes structures of <linux/kvm.h>, `Kvm`, `VmFd`, `VcpuFd`, typed exits."""
