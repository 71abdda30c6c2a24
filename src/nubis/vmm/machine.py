"""The builder: the one place that wires components into a running VM.

``Machine(kvm, config, on_exit)`` turns a validated :class:`VmConfig` into a KVM VM: guest
memory and its slots, the local APICs in KVM, the legacy devices on the port bus, the kernel,
initramfs and command line loaded, ACPI tables, and one configured vCPU per ``boot_vcpus``.
``start`` runs the vCPU threads; what ends the machine (power-off, reset, failure) arrives once
through ``on_exit`` and the owner then calls ``close``. A reboot builds a new Machine.

Interrupt controller choice: a split irqchip (KVM_CAP_SPLIT_IRQCHIP: the local APICs in the
kernel, the IOAPIC in nubis, no 8259 PICs and no PIT) rather than KVM_CREATE_IRQCHIP with the
whole legacy set in the kernel. The guest's hardware-reduced ACPI platform means Linux uses
neither PIC nor PIT; the in-kernel ones cost milliseconds to tear down at every exit
(``nubis.devices.ioapic`` has the numbers). Interrupts stay off the Python path all the same:
every device raises them through irqfds on MSI routes (the legacy lines on the GSIs of the
IOAPIC pins, whose routes follow what the guest programs; virtio through MSI-X), the APICs and
their EOIs stay in KVM, and only the guest's rare writes to the IOAPIC's redirection table exit
to userspace.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from nubis._enum import Enum
from nubis._frozen import Frozen
from nubis._log import getLogger, import_logging
from nubis.acpi.dsdt import GedConfig
from nubis.acpi.tables import AcpiConfig, create_acpi_tables
from nubis.arch.x86_64 import layout
from nubis.arch.x86_64.regs import BootEntry, BootProtocol
from nubis.arch.x86_64.reset_vector import RESET_VECTOR, reset_vector_code
from nubis.arch.x86_64.vcpu import configure_vcpus
from nubis.devices.acpi_pm import AcpiPmDevice
from nubis.devices.bus import Bus
from nubis.devices.debug_port import DebugPort
from nubis.devices.ged import GenericEventDevice
from nubis.devices.i8042 import I8042
from nubis.devices.interrupt import EventFdTrigger
from nubis.devices.ioapic import IoApic, MsiMessage
from nubis.devices.rtc import CmosRtc
from nubis.devices.serial import Serial16550
from nubis.kvm import Kvm, VmFd
from nubis.kvm.bindings import Cap, kvm_clock_data
from nubis.loader.cmdline import Cmdline
from nubis.loader.elf import load_elf
from nubis.loader.errors import LoaderError
from nubis.loader.memmap import standard_memory_map
from nubis.loader.pvh import configure_pvh
from nubis.memory import GuestMemory
from nubis.pci.mapping import PciBarAllocator, PciMmioMapper
from nubis.pci.root import PciBus, PciConfigIo, PciConfigMmio
from nubis.vmm.config import MAX_CMDLINE_SIZE, ConsoleMode, VmConfig
from nubis.vmm.console import FdOutput, TerminalInput, open_output
from nubis.vmm.events import EventMonitor
from nubis.vmm.vcpu import GuestHalted, GuestPowerOff, GuestReset, Vcpu, VcpuEvent, VcpuFailure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nubis.loader.bootproto import SetupHeader
    from nubis.loader.initramfs import InitramfsLoadResult
    from nubis.virtio.console import Console
    from nubis.virtio.device import VirtioDevice
    from nubis.vmm.interrupts import GsiRouting

_log = getLogger(__name__)

_ELF_MAGIC = b"\x7fELF"
_BZIMAGE_MAGIC_OFFSET = 0x202
_BZIMAGE_MAGIC = b"HdrS"
_LINUX_BANNER = b"Linux version "


class ExitKind(Enum):
    """Why a machine stopped running."""

    POWER_OFF = "power-off"
    RESET = "reset"
    FAILURE = "failure"


class MachineExit(Frozen):
    """What ended a machine; ``message`` explains a failure (one sentence plus registers)."""

    __slots__ = ("kind", "message")

    kind: ExitKind
    message: str

    def __init__(self, kind: ExitKind, message: str = "") -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "message", message)


class KernelEntry(Frozen):
    """Where the kernel landed and how to enter it."""

    __slots__ = ("boot", "cmdline_capacity", "initrd_addr_max", "kernel_end", "setup_header")

    boot: BootEntry
    kernel_end: int
    initrd_addr_max: int
    cmdline_capacity: int
    setup_header: SetupHeader | None

    def __init__(
        self,
        boot: BootEntry,
        kernel_end: int,
        initrd_addr_max: int,
        cmdline_capacity: int,
        setup_header: SetupHeader | None,
    ) -> None:
        object.__setattr__(self, "boot", boot)
        object.__setattr__(self, "kernel_end", kernel_end)
        object.__setattr__(self, "initrd_addr_max", initrd_addr_max)
        object.__setattr__(self, "cmdline_capacity", cmdline_capacity)
        object.__setattr__(self, "setup_header", setup_header)


def kernel_format(path: str) -> str:
    """``"elf"`` or ``"bzimage"``; raises :class:`LoaderError` for anything else."""
    with open(path, "rb") as file:
        head = file.read(_BZIMAGE_MAGIC_OFFSET + len(_BZIMAGE_MAGIC))
    if head.startswith(_ELF_MAGIC):
        return "elf"
    if head[_BZIMAGE_MAGIC_OFFSET:] == _BZIMAGE_MAGIC:
        return "bzimage"
    raise LoaderError(f"kernel {path!r} is neither an ELF vmlinux nor a bzImage")


def _feeder(console: Console) -> Callable[[bytes], int]:
    """Terminal input into virtio-console, which queues (and bounds) what it is given."""

    def feed(data: bytes) -> int:
        console.feed(data)
        return len(data)

    return feed


def is_linux_kernel(path: str) -> bool:
    """Whether ``path`` is a Linux kernel: any bzImage, or an ELF carrying Linux's banner."""
    if kernel_format(path) == "bzimage":
        return True
    with open(path, "rb") as file:
        tail = b""
        while chunk := file.read(1 << 20):
            if _LINUX_BANNER in tail + chunk:
                return True
            tail = chunk[-len(_LINUX_BANNER) :]
    return False


class Machine:
    """One built VM: memory, devices, vCPUs. Not restartable: a reboot builds a new one."""

    def __init__(
        self,
        kvm: Kvm,
        config: VmConfig,
        on_exit: Callable[[MachineExit], None],
        *,
        interactive: bool = True,
        events: EventMonitor | None = None,
    ) -> None:
        self.config = config
        self._events = events
        self._on_exit = on_exit
        self._exit_lock = threading.Lock()
        self._exited = False
        self._closers: list[Callable[[], None]] = []
        self.vcpus: list[Vcpu] = []
        self._terminal: TerminalInput | None = None
        self.virtio_devices: dict[str, VirtioDevice] = {}
        self._paused_clock: kvm_clock_data | None = None
        self._gsi_routing: GsiRouting | None = None
        self.vm: VmFd = kvm.create_vm()
        self._closers.append(self.vm.close)
        try:
            self._build(kvm, interactive)
        except BaseException:
            self.close()
            raise

    # --- building -----------------------------------------------------------------------------

    def _build(self, kvm: Kvm, interactive: bool) -> None:
        vm = self.vm
        vm.set_tss_address(layout.KVM_TSS_START)
        vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_START)

        ranges = layout.ram_ranges(self.config.memory.size)
        memory = self.config.memory
        self.memory = GuestMemory(ranges, shared=memory.shared, thp=memory.thp)
        self._closers.append(self.memory.close)
        for slot, region in enumerate(self.memory.regions):
            vm.set_user_memory_region(slot, region.start, region.size, region.host_address)
        # The local APICs in KVM, the IOAPIC here (``nubis.devices.ioapic`` says why). This
        # comes after the RAM slots: once the irqchip exists (with the APIC access page it
        # maps), each KVM_SET_USER_MEMORY_REGION took about 5 ms instead of 0.2 ms on the
        # hosts measured. KVM only needs it before the first vCPU.
        vm.enable_cap(Cap.SPLIT_IRQCHIP, layout.IOAPIC_NUM_PINS)

        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self._add_legacy_devices(interactive)
        self._add_pci_devices(interactive)

        entry = self._load_kernel()
        memory_map = [tuple(e) for e in standard_memory_map(ranges)]
        rsdp = create_acpi_tables(
            self.memory,
            AcpiConfig(
                num_vcpus=self.config.cpus.boot_vcpus,
                mem64_start=layout.mem_64bit_devices_start(self.config.memory.size),
                mem64_size=layout.MEM_64BIT_DEVICES_SIZE,
                ged=GedConfig(layout.GED_MMIO_START, layout.IRQ_GED),
            ),
        )
        self.memory.write(RESET_VECTOR, reset_vector_code())
        initramfs = self._load_initramfs(entry)
        cmdline = Cmdline(entry.cmdline_capacity)
        if self.config.payload.cmdline:
            cmdline.insert_str(self.config.payload.cmdline)
        self.memory.write(layout.CMDLINE_START, cmdline.as_bytes())
        if entry.boot.protocol is BootProtocol.PVH:
            configure_pvh(
                self.memory,
                memory_map=memory_map,  # type: ignore[arg-type]
                cmdline_addr=layout.CMDLINE_START,
                initramfs=initramfs,
                rsdp_addr=rsdp,
            )
        else:
            from nubis.loader.bootparams import configure_boot_params

            configure_boot_params(
                self.memory,
                memory_map=memory_map,  # type: ignore[arg-type]
                cmdline=cmdline,
                cmdline_addr=layout.CMDLINE_START,
                setup_header=entry.setup_header,
                initramfs=initramfs,
                rsdp_addr=rsdp,
            )

        fds = []
        for vcpu_id in range(self.config.cpus.boot_vcpus):
            fd = vm.create_vcpu(vcpu_id)
            self._closers.append(fd.close)
            fds.append(fd)
        configure_vcpus(kvm, fds, self.memory, entry.boot)
        self.vcpus = [Vcpu(fd, self.pio_bus, self.mmio_bus, self._vcpu_event) for fd in fds]

    def _add_legacy_devices(self, interactive: bool) -> None:
        bus = self.pio_bus
        serial_config = self.config.serial
        output = open_output(serial_config)
        if isinstance(output, FdOutput):
            self._closers.append(output.close)
        if output is not None:
            irq = EventFdTrigger()
            self._closers.append(irq.close)
            self.vm.register_irqfd(irq.fd, layout.IRQ_COM1)
            self.serial: Serial16550 | None = Serial16550(irq, output)
            bus.insert(self.serial, layout.PORT_COM1, layout.PORT_UART_SIZE)
            if serial_config.mode is ConsoleMode.TTY and interactive:
                self._terminal = TerminalInput(self.serial.enqueue_input)
        else:
            self.serial = None
        i8042 = I8042(
            reset=lambda: self._request_exit(
                MachineExit(ExitKind.RESET, "the guest reset through the i8042 controller")
            )
        )
        bus.insert(i8042, layout.PORT_I8042_DATA, 1)
        bus.insert(i8042, layout.PORT_I8042_COMMAND, 1)
        bus.insert(CmosRtc(), layout.PORT_RTC, layout.PORT_RTC_SIZE)
        self.debug_port = DebugPort()
        bus.insert(self.debug_port, layout.PORT_DEBUG, 1)
        acpi_pm = AcpiPmDevice(
            power_off=lambda: self._request_exit(MachineExit(ExitKind.POWER_OFF)),
            reset=lambda: self._request_exit(
                MachineExit(ExitKind.RESET, "the guest wrote the ACPI reset register")
            ),
        )
        bus.insert(acpi_pm, layout.PORT_ACPI_SLEEP_CONTROL, 3)
        ged_irq = EventFdTrigger()
        self._closers.append(ged_irq.close)
        self.vm.register_irqfd(ged_irq.fd, layout.IRQ_GED)
        self.ged = GenericEventDevice(ged_irq)
        self.mmio_bus.insert(self.ged, layout.GED_MMIO_START, layout.GED_MMIO_SIZE)
        self.ioapic = IoApic(self._route_ioapic_pin, num_pins=layout.IOAPIC_NUM_PINS)
        self.mmio_bus.insert(self.ioapic, layout.IOAPIC_START, layout.IOAPIC_SIZE)

    def _routing(self) -> GsiRouting:
        """The VM's GSI routing table, made when the first route is (a VM that boots no
        device driver, such as a launch-time guest, never imports it)."""
        if self._gsi_routing is None:
            from nubis.vmm.interrupts import GsiRouting

            self._gsi_routing = GsiRouting(self.vm)
        return self._gsi_routing

    def _route_ioapic_pin(self, pin: int, message: MsiMessage | None) -> None:
        """Point GSI ``pin`` (where the legacy device's irqfd is) at the IOAPIC's message."""
        if message is None:
            self._routing().remove(pin)
        else:
            self._routing().set_msi(pin, *message)

    def _add_pci_devices(self, interactive: bool) -> None:
        """The PCI segment (CF8/CFC and ECAM) with one virtio-pci device per configured device."""
        mapper = PciMmioMapper(self.mmio_bus, PciBarAllocator.for_ram_size(self.config.memory.size))
        self.pci_bus = PciBus(mapper)
        self.pio_bus.insert(
            PciConfigIo(self.pci_bus), layout.PORT_PCI_CONFIG_ADDRESS, layout.PORT_PCI_CONFIG_SIZE
        )
        self.mmio_bus.insert(
            PciConfigMmio(self.pci_bus), layout.PCI_MMCONFIG_START, layout.PCI_MMCONFIG_SIZE
        )
        devices = self._virtio_devices(interactive)
        if not devices:
            return
        # Imported here: a VM without virtio devices (a launch-time guest) never needs the
        # transport, its queues, MSI-X or GSI routing.
        from nubis.virtio.pci import VirtioPciDevice
        from nubis.vmm.interrupts import KvmIoEvents, MsiVectors

        routing = self._routing()
        ioevents = KvmIoEvents(self.vm)
        for device_id, device in devices:
            vectors = MsiVectors(self.vm, routing, len(device.queue_max_sizes) + 1)
            self._closers.append(vectors.close)
            transport = VirtioPciDevice(
                device, self.memory, vectors, ioevents, self._device_event_sink(device_id)
            )
            self._closers.append(transport.close)
            self._closers.append(device.shutdown)
            mapper.map_device(transport)
            self.pci_bus.add_device(transport)
            self.virtio_devices[device_id] = device

    def _device_event_sink(self, device_id: str) -> Callable[[str], None] | None:
        events = self._events
        if events is None:
            return None
        return lambda event: events.device(event, device_id)

    def _virtio_devices(self, interactive: bool) -> list[tuple[str, VirtioDevice]]:
        # Each device model is imported only when the VM has one: start-up pays for what it uses.
        config = self.config
        devices: list[tuple[str, VirtioDevice]] = []
        if config.disks:
            from nubis.virtio.block import Block
        for index, disk in enumerate(config.disks):
            block = Block(
                disk.path, readonly=disk.readonly, direct=disk.direct, serial=disk.serial or disk.id
            )
            devices.append((disk.id or f"_disk{index}", block))
        if config.rng is not None:
            from nubis.virtio.rng import Rng

            devices.append(("_rng", Rng(config.rng.src)))
        output = open_output(config.console)
        if output is not None:
            if isinstance(output, FdOutput):
                self._closers.append(output.close)
            from nubis.virtio.console import Console

            console = Console(output)
            if config.console.mode is ConsoleMode.TTY and interactive:
                self._terminal = TerminalInput(_feeder(console))
            devices.append(("_console", console))
        if config.net:
            # Imported only when needed: a VM without network pays nothing for it at start.
            # The device logs through logging itself.
            import_logging()
            from nubis.virtio.net import Net
            from nubis.vmm.tap import generate_mac, open_tap
        for index, net in enumerate(config.net):
            pairs = net.num_queues // 2
            tap = open_tap(
                net.tap,
                queue_pairs=pairs,
                ip=net.ip,
                mask=net.mask,
                host_mac=net.host_mac,
                mtu=net.mtu,
            )
            self._closers.append(tap.close)
            mac = net.mac or generate_mac()
            device = Net(
                tap, mac=mac, mtu=net.mtu, num_queues=net.num_queues, name=f"net:{tap.name}"
            )
            devices.append((net.id or f"_net{index}", device))
        return devices

    def counters(self) -> dict[str, dict[str, int]]:
        """Per-device counters for the API, keyed by device id."""
        return {device_id: dev.counters() for device_id, dev in self.virtio_devices.items()}

    def _load_kernel(self) -> KernelEntry:
        path = self.config.payload.kernel
        kind = kernel_format(path)
        with open(path, "rb") as file:
            if kind == "elf":
                elf = load_elf(self.memory, file)
                if elf.pvh_entry is not None:
                    boot = BootEntry.pvh(elf.pvh_entry)
                else:
                    boot = BootEntry.linux64(elf.entry_64)
                return KernelEntry(
                    boot=boot,
                    kernel_end=elf.kernel_end,
                    initrd_addr_max=layout.MEM_32BIT_RESERVED_START - 1,
                    cmdline_capacity=MAX_CMDLINE_SIZE,
                    setup_header=None,
                )
            from nubis.loader.bzimage import load_bzimage

            bz = load_bzimage(self.memory, file)
            return KernelEntry(
                boot=BootEntry.linux64(bz.entry_64),
                kernel_end=bz.kernel_end,
                initrd_addr_max=bz.header.initrd_addr_max,
                cmdline_capacity=min(bz.header.cmdline_size + 1, MAX_CMDLINE_SIZE)
                if bz.header.cmdline_size
                else MAX_CMDLINE_SIZE,
                setup_header=bz.header,
            )

    def _load_initramfs(self, entry: KernelEntry) -> InitramfsLoadResult | None:
        path = self.config.payload.initramfs
        if path is None:
            return None
        from nubis.loader.initramfs import load_initramfs

        with open(path, "rb") as file:
            return load_initramfs(
                self.memory,
                file,
                kernel_end=entry.kernel_end,
                initrd_addr_max=entry.initrd_addr_max,
            )

    # --- running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every vCPU thread (the first call must come from the main thread)."""
        if self._terminal is not None:
            self._terminal.start()
        for vcpu in self.vcpus:
            vcpu.start()

    def pause(self) -> None:
        """Park every vCPU outside KVM_RUN and freeze the guest's clock.

        kvmclock is saved here and restored by :meth:`resume`, so the guest does not see the
        paused time pass (its wall clock then lags the host's by that much, as after a
        suspend; NTP or the next boot corrects it).
        """
        for vcpu in self.vcpus:
            vcpu.pause(timeout=10.0)
        self._paused_clock = self.vm.get_clock()

    def resume(self) -> None:
        """Restore the guest's clock and let every parked vCPU run again."""
        if self._paused_clock is not None:
            clock = self._paused_clock
            clock.flags = 0  # only the clock value; KVM_CLOCK_REALTIME etc. would advance it
            self.vm.set_clock(clock)
            self._paused_clock = None
        for vcpu in self.vcpus:
            vcpu.resume()

    def press_power_button(self) -> None:
        """Press the ACPI power button (the guest decides what to do, as on real hardware)."""
        self.ged.press_power_button()

    def close(self) -> None:
        """Stop the vCPUs, restore the terminal and release every resource, newest first."""
        for vcpu in self.vcpus:
            vcpu.stop()
        for vcpu in self.vcpus:
            if not vcpu.join(timeout=10.0):
                _log.warning("vCPU %d did not stop within 10 s", vcpu.id)
        if self._terminal is not None:
            self._terminal.stop()
            self._terminal = None
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except OSError as error:
                _log.debug("closing %r failed: %s", closer, error)

    # --- exits --------------------------------------------------------------------------------

    def _request_exit(self, exit_: MachineExit) -> None:
        with self._exit_lock:
            if self._exited:
                return
            self._exited = True
        self._on_exit(exit_)

    def _vcpu_event(self, event: VcpuEvent) -> None:
        if isinstance(event, GuestPowerOff):
            self._request_exit(MachineExit(ExitKind.POWER_OFF))
        elif isinstance(event, GuestReset):
            if event.registers:
                # A triple fault is a guest crash unless the guest meant it (some reboot that
                # way); where it happened is all there is to go on.
                _log.warning(
                    "vCPU %d: %s; registers: %s", event.vcpu_id, event.reason, event.registers
                )
            self._request_exit(MachineExit(ExitKind.RESET, event.reason))
        elif isinstance(event, VcpuFailure):
            self._request_exit(MachineExit(ExitKind.FAILURE, f"{event.message}\n{event.registers}"))
        elif isinstance(event, GuestHalted):
            self._request_exit(
                MachineExit(ExitKind.FAILURE, f"vCPU {event.vcpu_id} halted with no way to wake up")
            )
