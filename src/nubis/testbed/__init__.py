"""The nested KVM test host: a Linux VM under QEMU TCG with emulated SVM offering a real /dev/kvm."""
