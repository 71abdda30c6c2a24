"""ctypes declarations of the ``<linux/kvm.h>`` structures and constants nubis uses (x86_64).

Each structure mirrors the kernel UAPI header byte for byte (``include/uapi/linux/kvm.h`` and
``arch/x86/include/uapi/asm/kvm.h``; semantics in the kernel's Documentation/virt/kvm/api.rst,
section 4 for the ioctls and section 5 for ``struct kvm_run``). ``tests/unit/test_kvm_bindings.py``
pins sizes and offsets against values compiled from the header, so a typo here fails a test
rather than corrupting a guest.

Structures that end in a flexible array (``kvm_msrs``, ``kvm_cpuid2``, ``kvm_msr_list``,
``kvm_irq_routing``) are declared as their fixed header; ``msrs_buffer`` and friends build a
correctly sized buffer type for ``n`` entries.
"""

from __future__ import annotations

import ctypes

from nubis._enum import IntEnum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32
s64 = ctypes.c_int64

KVM_API_VERSION: Final = 12
KVMIO: Final = 0xAE

KVM_NR_INTERRUPTS: Final = 256
KVM_APIC_REG_SIZE: Final = 0x400
KVM_IOAPIC_NUM_PINS: Final = 24
KVM_MAX_XCRS: Final = 16
KVM_MAX_CPUID_ENTRIES: Final = 256  # what nubis asks KVM_GET_SUPPORTED_CPUID for at first
SYNC_REGS_SIZE_BYTES: Final = 2048

# kvm_userspace_memory_region.flags
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1

# kvm_irqfd.flags
KVM_IRQFD_FLAG_DEASSIGN: Final = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE: Final = 1 << 1

# kvm_ioeventfd.flags
KVM_IOEVENTFD_FLAG_DATAMATCH: Final = 1 << 0
KVM_IOEVENTFD_FLAG_PIO: Final = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN: Final = 1 << 2

# kvm_irq_routing_entry.type
KVM_IRQ_ROUTING_IRQCHIP: Final = 1
KVM_IRQ_ROUTING_MSI: Final = 2

# kvm_irqchip.chip_id
KVM_IRQCHIP_PIC_MASTER: Final = 0
KVM_IRQCHIP_PIC_SLAVE: Final = 1
KVM_IRQCHIP_IOAPIC: Final = 2

# kvm_pit_config.flags
KVM_PIT_SPEAKER_DUMMY: Final = 1

# kvm_run.io.direction
KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

# kvm_cpuid_entry2.flags
KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Final = 1 << 0

# kvm_vcpu_events.flags
KVM_VCPUEVENT_VALID_NMI_PENDING: Final = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR: Final = 0x02
KVM_VCPUEVENT_VALID_SHADOW: Final = 0x04
KVM_VCPUEVENT_VALID_SMM: Final = 0x08


class ExitReason(IntEnum):
    """``kvm_run.exit_reason`` values (api.rst section 5, "KVM_EXIT_*")."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    WATCHDOG = 21
    EPR = 23
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37


class SystemEventType(IntEnum):
    """``kvm_run.system_event.type`` values."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class InternalErrorSuberror(IntEnum):
    """``kvm_run.internal.suberror`` values."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class MpState(IntEnum):
    """``kvm_mp_state.mp_state`` values (api.rst 4.38)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


class Cap(IntEnum):
    """``KVM_CAP_*`` extension numbers for ``KVM_CHECK_EXTENSION`` (api.rst section 8)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    CLOCKSOURCE = 8
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    NOP_IO_DELAY = 12
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    USER_NMI = 22
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQ_INJECT_STATUS = 26
    MCE = 31
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    ENABLE_CAP = 54
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    ONE_REG = 70
    TSC_DEADLINE_TIMER = 72
    SYNC_REGS = 74
    KVMCLOCK_CTRL = 76
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    IRQFD_RESAMPLE = 82
    ENABLE_CAP_VM = 98
    IOEVENTFD_NO_LENGTH = 100
    CHECK_EXTENSION_VM = 105
    SPLIT_IRQCHIP = 121
    IOEVENTFD_ANY_LENGTH = 122
    MAX_VCPU_ID = 128
    X2APIC_API = 129
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    GET_MSR_FEATURES = 153
    COALESCED_PIO = 162
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    SREGS2 = 200
    XSAVE2 = 208
    SYSTEM_EVENT_DATA = 215
    X86_TRIPLE_FAULT_EVENT = 218


# --- memory slots, interrupts (include/uapi/linux/kvm.h) -----------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    """A guest-physical range backed by host memory (KVM_SET_USER_MEMORY_REGION, api.rst 4.35)."""

    _fields_ = (
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    )


class kvm_irq_level(ctypes.Structure):
    """A GSI and its new level (KVM_IRQ_LINE, api.rst 4.25); ``irq`` doubles as ``status``."""

    _fields_ = (("irq", u32), ("level", u32))


class kvm_pic_state(ctypes.Structure):
    """The state of one emulated 8259 PIC (inside ``kvm_irqchip``)."""

    _fields_ = (
        ("last_irr", u8),
        ("irr", u8),
        ("imr", u8),
        ("isr", u8),
        ("priority_add", u8),
        ("irq_base", u8),
        ("read_reg_select", u8),
        ("poll", u8),
        ("special_mask", u8),
        ("init_state", u8),
        ("auto_eoi", u8),
        ("rotate_on_auto_eoi", u8),
        ("special_fully_nested_mode", u8),
        ("init4", u8),
        ("elcr", u8),
        ("elcr_mask", u8),
    )


class kvm_ioapic_state(ctypes.Structure):
    """The state of the emulated IOAPIC; each redirection entry is kept as its raw 64 bits."""

    _fields_ = (
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    )


class _kvm_irqchip_union(ctypes.Union):
    _fields_ = (
        ("dummy", u8 * 512),
        ("pic", kvm_pic_state),
        ("ioapic", kvm_ioapic_state),
    )


class kvm_irqchip(ctypes.Structure):
    """One in-kernel interrupt controller's state (KVM_GET/SET_IRQCHIP, api.rst 4.26)."""

    _fields_ = (("chip_id", u32), ("pad", u32), ("chip", _kvm_irqchip_union))


class kvm_pit_config(ctypes.Structure):
    """Arguments of KVM_CREATE_PIT2 (api.rst 4.59)."""

    _fields_ = (("flags", u32), ("pad", u32 * 15))


class kvm_pit_channel_state(ctypes.Structure):
    """One channel of the in-kernel i8254 PIT."""

    _fields_ = (
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", s64),
    )


class kvm_pit_state2(ctypes.Structure):
    """The in-kernel PIT's state (KVM_GET/SET_PIT2, api.rst 4.71)."""

    _fields_ = (
        ("channels", kvm_pit_channel_state * 3),
        ("flags", u32),
        ("reserved", u32 * 9),
    )


class kvm_clock_data(ctypes.Structure):
    """The VM's kvmclock value (KVM_GET/SET_CLOCK, api.rst 4.55)."""

    _fields_ = (
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    )


class kvm_mp_state(ctypes.Structure):
    """A vCPU's multiprocessing state (KVM_GET/SET_MP_STATE, api.rst 4.38)."""

    _fields_ = (("mp_state", u32),)


class kvm_irqfd(ctypes.Structure):
    """Binds an eventfd to a GSI (KVM_IRQFD, api.rst 4.75)."""

    _fields_ = (
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    )


class kvm_ioeventfd(ctypes.Structure):
    """Binds an eventfd to a guest PIO/MMIO write (KVM_IOEVENTFD, api.rst 4.59)."""

    _fields_ = (
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    )


class kvm_irq_routing_irqchip(ctypes.Structure):
    """A GSI routed to a pin of an in-kernel irqchip."""

    _fields_ = (("irqchip", u32), ("pin", u32))


class kvm_irq_routing_msi(ctypes.Structure):
    """A GSI routed to an MSI message."""

    _fields_ = (("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32))


class _kvm_irq_routing_entry_union(ctypes.Union):
    _fields_ = (
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", u32 * 8),
    )


class kvm_irq_routing_entry(ctypes.Structure):
    """One GSI routing entry (KVM_SET_GSI_ROUTING, api.rst 4.52)."""

    _fields_ = (
        ("gsi", u32),
        ("type", u32),
        ("flags", u32),
        ("pad", u32),
        ("u", _kvm_irq_routing_entry_union),
    )


class kvm_irq_routing(ctypes.Structure):
    """Header of the GSI routing table; ``irq_routing_buffer`` adds the entries."""

    _fields_ = (("nr", u32), ("flags", u32))


class kvm_msi(ctypes.Structure):
    """An MSI message to inject directly (KVM_SIGNAL_MSI, api.rst 4.70)."""

    _fields_ = (
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    )


class kvm_dirty_log(ctypes.Structure):
    """A slot and the user buffer that receives its dirty bitmap (KVM_GET_DIRTY_LOG, api.rst 4.8)."""

    _fields_ = (("slot", u32), ("padding1", u32), ("dirty_bitmap", u64))


class kvm_enable_cap(ctypes.Structure):
    """Arguments of KVM_ENABLE_CAP (api.rst 4.37)."""

    _fields_ = (("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64))


# --- x86 vCPU state (arch/x86/include/uapi/asm/kvm.h) --------------------------------------


class kvm_regs(ctypes.Structure):
    """General-purpose registers (KVM_GET/SET_REGS, api.rst 4.11)."""

    _fields_ = tuple(
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    )  # fmt: skip


class kvm_segment(ctypes.Structure):
    """A segment register with its hidden descriptor cache."""

    _fields_ = (
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    )


class kvm_dtable(ctypes.Structure):
    """A descriptor table register (GDTR/IDTR)."""

    _fields_ = (("base", u64), ("limit", u16), ("padding", u16 * 3))


class kvm_sregs(ctypes.Structure):
    """Special registers (KVM_GET/SET_SREGS, api.rst 4.13); 312 bytes."""

    _fields_ = (
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class kvm_fpu(ctypes.Structure):
    """x87/SSE state in FXSAVE layout (KVM_GET/SET_FPU, api.rst 4.22)."""

    _fields_ = (
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    )


class kvm_msr_entry(ctypes.Structure):
    """One MSR index and value."""

    _fields_ = (("index", u32), ("reserved", u32), ("data", u64))


class kvm_msrs(ctypes.Structure):
    """Header of an MSR list (KVM_GET/SET_MSRS, api.rst 4.18); ``msrs_buffer`` adds entries."""

    _fields_ = (("nmsrs", u32), ("pad", u32))


class kvm_msr_list(ctypes.Structure):
    """Header of KVM_GET_MSR_INDEX_LIST's answer; ``msr_list_buffer`` adds the indices."""

    _fields_ = (("nmsrs", u32),)


class kvm_cpuid_entry2(ctypes.Structure):
    """One CPUID leaf/subleaf (KVM_SET_CPUID2, api.rst 4.46)."""

    _fields_ = (
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    )


class kvm_cpuid2(ctypes.Structure):
    """Header of a CPUID table; ``cpuid_buffer`` adds the entries."""

    _fields_ = (("nent", u32), ("padding", u32))


class kvm_lapic_state(ctypes.Structure):
    """The local APIC's register page (KVM_GET/SET_LAPIC, api.rst 4.57); 1024 bytes."""

    _fields_ = (("regs", u8 * KVM_APIC_REG_SIZE),)


class _kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = (
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    )


class _kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = (("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8))


class _kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = (("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8))


class _kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = (("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8))


class kvm_vcpu_events(ctypes.Structure):
    """Pending exceptions, interrupts, NMIs and SMIs (KVM_GET/SET_VCPU_EVENTS, api.rst 4.31)."""

    _fields_ = (
        ("exception", _kvm_vcpu_events_exception),
        ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _kvm_vcpu_events_smi),
        ("triple_fault_pending", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    )


class kvm_xsave(ctypes.Structure):
    """The XSAVE area (KVM_GET/SET_XSAVE, api.rst 4.42); the 4096-byte legacy size."""

    _fields_ = (("region", u32 * 1024),)


class kvm_xcr(ctypes.Structure):
    """One extended control register."""

    _fields_ = (("xcr", u32), ("reserved", u32), ("value", u64))


class kvm_xcrs(ctypes.Structure):
    """Extended control registers (KVM_GET/SET_XCRS, api.rst 4.44)."""

    _fields_ = (
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    )


class kvm_sync_regs(ctypes.Structure):
    """Registers shared through ``kvm_run.s`` when KVM_CAP_SYNC_REGS is used."""

    _fields_ = (("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events))


# --- struct kvm_run (api.rst section 5) ------------------------------------------------------


class kvm_run_hw(ctypes.Structure):
    """KVM_EXIT_UNKNOWN payload."""

    _fields_ = (("hardware_exit_reason", u64),)


class kvm_run_fail_entry(ctypes.Structure):
    """KVM_EXIT_FAIL_ENTRY payload."""

    _fields_ = (("hardware_entry_failure_reason", u64), ("cpu", u32))


class kvm_run_ex(ctypes.Structure):
    """KVM_EXIT_EXCEPTION payload."""

    _fields_ = (("exception", u32), ("error_code", u32))


class kvm_run_io(ctypes.Structure):
    """KVM_EXIT_IO payload; the data lives at ``data_offset`` from the start of kvm_run."""

    _fields_ = (
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    )


class kvm_run_mmio(ctypes.Structure):
    """KVM_EXIT_MMIO payload."""

    _fields_ = (("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8))


class kvm_run_hypercall(ctypes.Structure):
    """KVM_EXIT_HYPERCALL payload."""

    _fields_ = (
        ("nr", u64),
        ("args", u64 * 6),
        ("ret", u64),
        ("longmode", u32),
        ("pad", u32),
    )


class kvm_run_internal(ctypes.Structure):
    """KVM_EXIT_INTERNAL_ERROR payload."""

    _fields_ = (("suberror", u32), ("ndata", u32), ("data", u64 * 16))


class kvm_run_system_event(ctypes.Structure):
    """KVM_EXIT_SYSTEM_EVENT payload; ``data[0]`` is the legacy ``flags``."""

    _fields_ = (("type", u32), ("ndata", u32), ("data", u64 * 16))


class kvm_run_exit_union(ctypes.Union):
    """The exit-specific part of ``kvm_run``, fixed at 256 bytes."""

    _fields_ = (
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("padding", u8 * 256),
    )


class kvm_run_sync_union(ctypes.Union):
    """The synced-register area at the end of ``kvm_run``."""

    _fields_ = (("regs", kvm_sync_regs), ("padding", u8 * SYNC_REGS_SIZE_BYTES))


class kvm_run(ctypes.Structure):
    """The shared page a vCPU fd mmaps (api.rst section 5); PIO data follows it in the mapping."""

    _fields_ = (
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", kvm_run_exit_union),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", kvm_run_sync_union),
    )


# --- variable-length helpers --------------------------------------------------------------


def msrs_buffer(count: int) -> type[ctypes.Structure]:
    """A ``kvm_msrs`` type with room for ``count`` entries."""
    return type(
        f"kvm_msrs_{count}",
        (ctypes.Structure,),
        {"_fields_": (("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * count))},
    )


def msr_list_buffer(count: int) -> type[ctypes.Structure]:
    """A ``kvm_msr_list`` type with room for ``count`` indices."""
    return type(
        f"kvm_msr_list_{count}",
        (ctypes.Structure,),
        {"_fields_": (("nmsrs", u32), ("indices", u32 * count))},
    )


def cpuid_buffer(count: int) -> type[ctypes.Structure]:
    """A ``kvm_cpuid2`` type with room for ``count`` entries."""
    return type(
        f"kvm_cpuid2_{count}",
        (ctypes.Structure,),
        {"_fields_": (("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * count))},
    )


def irq_routing_buffer(count: int) -> type[ctypes.Structure]:
    """A ``kvm_irq_routing`` type with room for ``count`` entries."""
    return type(
        f"kvm_irq_routing_{count}",
        (ctypes.Structure,),
        {
            "_fields_": (
                ("nr", u32),
                ("flags", u32),
                ("entries", kvm_irq_routing_entry * count),
            )
        },
    )
