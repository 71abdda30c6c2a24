"""A small encoder for ACPI Machine Language, enough for nubis's DSDT.

Each term is a small immutable object whose ``to_aml_bytes()`` returns its encoding; terms
compose into scopes, devices and methods. Encodings follow ACPI 6.4 chapter 20 ("ACPI Machine
Language (AML) Specification"): section 20.2.2 for name strings, 20.2.3 for data objects,
20.2.4 for package lengths, 20.2.5 for named objects and control flow, 20.2.6 for Local/Arg.
Resource descriptors inside ``ResourceTemplate`` follow section 6.4 ("Resource Data Types
for ACPI").

Python ``int`` and ``str`` values may stand for Integer and String terms wherever a term is
expected.
"""

from __future__ import annotations

from collections.abc import Sequence

from nubis._frozen import Frozen
from nubis._typing import Protocol
from nubis.acpi.errors import AcpiError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final, TypeAlias

__all__ = [
    "ONE",
    "ONES",
    "ZERO",
    "Aml",
    "AmlError",
    "AmlTerm",
    "And",
    "Arg",
    "Buffer",
    "DWordMemory",
    "Device",
    "EisaId",
    "Else",
    "EndTag",
    "Field",
    "FieldAccess",
    "FieldUpdate",
    "If",
    "Integer",
    "Interrupt",
    "Io",
    "IrqNoFlags",
    "LEqual",
    "Local",
    "Memory32Fixed",
    "Method",
    "Name",
    "NamePath",
    "Notify",
    "OperationRegion",
    "Package",
    "QWordMemory",
    "RegionSpace",
    "ResourceTemplate",
    "Return",
    "Scope",
    "Store",
    "String",
    "WordBusNumber",
    "WordIo",
    "crs",
    "encode_pkg_length",
    "hid",
    "sta",
    "to_aml",
    "uid",
]


class AmlError(AcpiError):
    """A value that cannot be encoded as AML (bad name, integer out of range, ...)."""


class Aml(Protocol):
    """Anything that encodes itself as AML bytes."""

    def to_aml_bytes(self) -> bytes:
        """The AML encoding of this term."""
        ...


AmlTerm: TypeAlias = Aml | int | str

# Opcodes (ACPI 6.4 section 20.3, "AML Byte Stream Byte Values").
ZERO_OP: Final = 0x00
ONE_OP: Final = 0x01
NAME_OP: Final = 0x08
BYTE_PREFIX: Final = 0x0A
WORD_PREFIX: Final = 0x0B
DWORD_PREFIX: Final = 0x0C
STRING_PREFIX: Final = 0x0D
QWORD_PREFIX: Final = 0x0E
SCOPE_OP: Final = 0x10
BUFFER_OP: Final = 0x11
PACKAGE_OP: Final = 0x12
METHOD_OP: Final = 0x14
DUAL_NAME_PREFIX: Final = 0x2E
MULTI_NAME_PREFIX: Final = 0x2F
EXT_OP_PREFIX: Final = 0x5B
ROOT_CHAR: Final = 0x5C
PARENT_PREFIX_CHAR: Final = 0x5E
NULL_NAME: Final = 0x00
LOCAL0_OP: Final = 0x60
ARG0_OP: Final = 0x68
STORE_OP: Final = 0x70
AND_OP: Final = 0x7B
NOTIFY_OP: Final = 0x86
LEQUAL_OP: Final = 0x93
IF_OP: Final = 0xA0
ELSE_OP: Final = 0xA1
RETURN_OP: Final = 0xA4
ONES_OP: Final = 0xFF
# Second bytes after EXT_OP_PREFIX.
OP_REGION_OP: Final = 0x80
FIELD_OP: Final = 0x81
DEVICE_OP: Final = 0x82

_MAX_PKG_LENGTH: Final = (1 << 28) - 1
_UPPER: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX_DIGITS: Final = frozenset("0123456789ABCDEF")
_NAME_LEAD: Final = _UPPER | {"_"}
_NAME_CHARS: Final = _NAME_LEAD | frozenset("0123456789")


def _is_name_seg(segment: str) -> bool:
    """1-4 characters of A-Z, 0-9 and _, not starting with a digit (section 20.2.2)."""
    return (
        0 < len(segment) <= 4
        and segment[0] in _NAME_LEAD
        and all(c in _NAME_CHARS for c in segment)
    )


def _is_eisa_id(value: str) -> bool:
    """Three capitals and four upper-case hex digits, such as ``PNP0A08``."""
    return (
        len(value) == 7
        and all(c in _UPPER for c in value[:3])
        and all(c in _HEX_DIGITS for c in value[3:])
    )


def to_aml(term: AmlTerm) -> bytes:
    """Encode ``term``: an `Aml` object, an ``int`` (Integer) or a ``str`` (String)."""
    if isinstance(term, bool):
        raise AmlError("AML has no boolean type; use 0 or 1")
    if isinstance(term, int):
        return Integer(term).to_aml_bytes()
    if isinstance(term, str):
        return String(term).to_aml_bytes()
    return term.to_aml_bytes()


def _terms(terms: Sequence[AmlTerm]) -> bytes:
    return b"".join(to_aml(term) for term in terms)


def encode_pkg_length(length: int, *, include_self: bool = True) -> bytes:
    """Encode a PkgLength (ACPI 6.4 section 20.2.4) for ``length`` bytes of content.

    With ``include_self`` (the usual case) the encoded value also counts the PkgLength bytes
    themselves; field elements encode a bit count as is (``include_self=False``).
    """
    if length < 0:
        raise AmlError(f"package length {length} is negative")
    for size in range(1, 5):
        value = length + size if include_self else length
        if size == 1:
            if value < 0x40:
                return bytes([value])
            continue
        if value < 1 << (4 + 8 * (size - 1)):
            lead = ((size - 1) << 6) | (value & 0x0F)
            return bytes([lead]) + (value >> 4).to_bytes(size - 1, "little")
    raise AmlError(f"package length {length} exceeds the AML maximum of {_MAX_PKG_LENGTH}")


def _with_pkg_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + encode_pkg_length(len(body)) + body


def _name_seg(segment: str) -> bytes:
    if not _is_name_seg(segment):
        raise AmlError(
            f"AML name segment {segment!r} must be 1-4 characters of A-Z, 0-9 and _, "
            "not starting with a digit"
        )
    return segment.ljust(4, "_").encode("ascii")


class NamePath(Frozen):
    r"""A NameString (ACPI 6.4 section 20.2.2): ``\_SB.PCI0``, ``^^FOO``, ``_HID``, ``\``."""

    __slots__ = ("path",)

    path: str

    def __init__(self, path: str) -> None:
        object.__setattr__(self, "path", path)

    def to_aml_bytes(self) -> bytes:
        """Root or parent prefixes, then a NullName, one segment, a dual or a multi name."""
        rest = self.path
        prefix = b""
        if rest.startswith("\\"):
            prefix, rest = bytes([ROOT_CHAR]), rest[1:]
        else:
            while rest.startswith("^"):
                prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
        segments = [_name_seg(s) for s in rest.split(".")] if rest else []
        if not segments:
            return prefix + bytes([NULL_NAME])
        if len(segments) == 1:
            return prefix + segments[0]
        if len(segments) == 2:
            return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
        if len(segments) > 255:
            raise AmlError(f"AML name {self.path!r} has more than 255 segments")
        return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def _path(name: str | NamePath) -> bytes:
    return (name if isinstance(name, NamePath) else NamePath(name)).to_aml_bytes()


class Integer(Frozen):
    """An integer data object in its shortest encoding (ACPI 6.4 section 20.2.3).

    ``width`` (8, 16, 32 or 64) forces ByteConst, WordConst, DWordConst or QWordConst.
    """

    __slots__ = ("value", "width")

    value: int
    width: int | None

    def __init__(self, value: int, width: int | None = None) -> None:
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "width", width)

    def to_aml_bytes(self) -> bytes:
        """ZeroOp, OneOp, OnesOp or a prefixed constant."""
        value = self.value
        if not 0 <= value < 1 << 64:
            raise AmlError(f"AML integer {value} is outside 0..2**64-1")
        if self.width is None:
            if value == 0:
                return bytes([ZERO_OP])
            if value == 1:
                return bytes([ONE_OP])
            if value == (1 << 64) - 1:
                return bytes([ONES_OP])
            width = next(w for w in (8, 16, 32, 64) if value < 1 << w)
        else:
            width = self.width
        prefixes = {8: BYTE_PREFIX, 16: WORD_PREFIX, 32: DWORD_PREFIX, 64: QWORD_PREFIX}
        if width not in prefixes:
            raise AmlError(f"AML integer width {width} is not 8, 16, 32 or 64")
        if value >= 1 << width:
            raise AmlError(f"AML integer {value:#x} does not fit in {width} bits")
        return bytes([prefixes[width]]) + value.to_bytes(width // 8, "little")


ZERO: Final = Integer(0)
ONE: Final = Integer(1)
ONES: Final = Integer((1 << 64) - 1)


class String(Frozen):
    """A String data object: ASCII characters 0x01-0x7f, NUL terminated (section 20.2.3)."""

    __slots__ = ("value",)

    value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "value", value)

    def to_aml_bytes(self) -> bytes:
        """StringPrefix, the characters, NullChar."""
        if not self.value.isascii() or "\x00" in self.value:
            raise AmlError(f"AML string {self.value!r} must be ASCII without NUL")
        return bytes([STRING_PREFIX]) + self.value.encode("ascii") + b"\x00"


class EisaId(Frozen):
    """A compressed EISA id such as ``PNP0A08``, encoded as a DWordConst (section 19.6.36)."""

    __slots__ = ("eisa_id",)

    eisa_id: str

    def __init__(self, eisa_id: str) -> None:
        object.__setattr__(self, "eisa_id", eisa_id)

    def to_aml_bytes(self) -> bytes:
        """Three 5-bit letters and four hex digits, big-endian within the DWORD."""
        if not _is_eisa_id(self.eisa_id):
            raise AmlError(f"EISA id {self.eisa_id!r} is not three capitals and four hex digits")
        letters = [ord(c) - 0x40 for c in self.eisa_id[:3]]
        vendor = (letters[0] << 10) | (letters[1] << 5) | letters[2]
        product = int(self.eisa_id[3:], 16)
        value = int.from_bytes(vendor.to_bytes(2, "big") + product.to_bytes(2, "big"), "little")
        return Integer(value, width=32).to_aml_bytes()


class Buffer(Frozen):
    """A Buffer of raw bytes (section 20.2.5.4, DefBuffer)."""

    __slots__ = ("data",)

    data: bytes

    def __init__(self, data: bytes) -> None:
        object.__setattr__(self, "data", data)

    def to_aml_bytes(self) -> bytes:
        """BufferOp PkgLength BufferSize ByteList."""
        return _with_pkg_length(bytes([BUFFER_OP]), to_aml(len(self.data)) + self.data)


class Package(Frozen):
    """A Package of up to 255 elements (section 20.2.5.4, DefPackage)."""

    __slots__ = ("elements",)

    elements: Sequence[AmlTerm]

    def __init__(self, elements: Sequence[AmlTerm]) -> None:
        object.__setattr__(self, "elements", elements)

    def to_aml_bytes(self) -> bytes:
        """PackageOp PkgLength NumElements PackageElementList."""
        if len(self.elements) > 255:
            raise AmlError(f"AML package has {len(self.elements)} elements, more than 255")
        body = bytes([len(self.elements)]) + _terms(self.elements)
        return _with_pkg_length(bytes([PACKAGE_OP]), body)


class Name(Frozen):
    """``Name(path, value)`` (section 20.2.5.1, DefName)."""

    __slots__ = ("name", "value")

    name: str | NamePath
    value: AmlTerm

    def __init__(self, name: str | NamePath, value: AmlTerm) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "value", value)

    def to_aml_bytes(self) -> bytes:
        """NameOp NameString DataRefObject."""
        return bytes([NAME_OP]) + _path(self.name) + to_aml(self.value)


class Scope(Frozen):
    """``Scope(path) { terms }`` (section 20.2.5.1, DefScope)."""

    __slots__ = ("name", "terms")

    name: str | NamePath
    terms: Sequence[AmlTerm]

    def __init__(self, name: str | NamePath, terms: Sequence[AmlTerm]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "terms", terms)

    def to_aml_bytes(self) -> bytes:
        """ScopeOp PkgLength NameString TermList."""
        return _with_pkg_length(bytes([SCOPE_OP]), _path(self.name) + _terms(self.terms))


class Device(Frozen):
    """``Device(path) { terms }`` (section 20.2.5.2, DefDevice)."""

    __slots__ = ("name", "terms")

    name: str | NamePath
    terms: Sequence[AmlTerm]

    def __init__(self, name: str | NamePath, terms: Sequence[AmlTerm]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "terms", terms)

    def to_aml_bytes(self) -> bytes:
        """ExtOpPrefix DeviceOp PkgLength NameString TermList."""
        return _with_pkg_length(
            bytes([EXT_OP_PREFIX, DEVICE_OP]), _path(self.name) + _terms(self.terms)
        )


class Method(Frozen):
    """``Method(path, args, Serialized|NotSerialized) { terms }`` (section 20.2.5.2)."""

    __slots__ = ("args", "name", "serialized", "sync_level", "terms")

    name: str | NamePath
    args: int
    terms: Sequence[AmlTerm]
    serialized: bool
    sync_level: int

    def __init__(
        self,
        name: str | NamePath,
        args: int,
        terms: Sequence[AmlTerm],
        serialized: bool = False,
        sync_level: int = 0,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "serialized", serialized)
        object.__setattr__(self, "sync_level", sync_level)

    def to_aml_bytes(self) -> bytes:
        """MethodOp PkgLength NameString MethodFlags TermList."""
        if not 0 <= self.args <= 7:
            raise AmlError(f"AML method takes 0-7 arguments, not {self.args}")
        if not 0 <= self.sync_level <= 15:
            raise AmlError(f"AML method sync level {self.sync_level} is outside 0-15")
        flags = self.args | (0x08 if self.serialized else 0) | (self.sync_level << 4)
        body = _path(self.name) + bytes([flags]) + _terms(self.terms)
        return _with_pkg_length(bytes([METHOD_OP]), body)


class Return(Frozen):
    """``Return(value)`` (section 20.2.5.3, DefReturn)."""

    __slots__ = ("value",)

    value: AmlTerm

    def __init__(self, value: AmlTerm) -> None:
        object.__setattr__(self, "value", value)

    def to_aml_bytes(self) -> bytes:
        """ReturnOp ArgObject."""
        return bytes([RETURN_OP]) + to_aml(self.value)


class Notify(Frozen):
    """``Notify(object, value)`` (section 20.2.5.3, DefNotify)."""

    __slots__ = ("target", "value")

    target: str | NamePath
    value: AmlTerm

    def __init__(self, target: str | NamePath, value: AmlTerm) -> None:
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "value", value)

    def to_aml_bytes(self) -> bytes:
        """NotifyOp NotifyObject NotifyValue."""
        return bytes([NOTIFY_OP]) + _path(self.target) + to_aml(self.value)


class If(Frozen):
    """``If(predicate) { terms }`` (section 20.2.5.3, DefIfElse without the Else)."""

    __slots__ = ("predicate", "terms")

    predicate: AmlTerm
    terms: Sequence[AmlTerm]

    def __init__(self, predicate: AmlTerm, terms: Sequence[AmlTerm]) -> None:
        object.__setattr__(self, "predicate", predicate)
        object.__setattr__(self, "terms", terms)

    def to_aml_bytes(self) -> bytes:
        """IfOp PkgLength Predicate TermList."""
        return _with_pkg_length(bytes([IF_OP]), to_aml(self.predicate) + _terms(self.terms))


class Else(Frozen):
    """``Else { terms }``, placed right after an `If` (section 20.2.5.3, DefElse)."""

    __slots__ = ("terms",)

    terms: Sequence[AmlTerm]

    def __init__(self, terms: Sequence[AmlTerm]) -> None:
        object.__setattr__(self, "terms", terms)

    def to_aml_bytes(self) -> bytes:
        """ElseOp PkgLength TermList."""
        return _with_pkg_length(bytes([ELSE_OP]), _terms(self.terms))


class Local(Frozen):
    """``LocalN``, N in 0-7 (section 20.2.6.2)."""

    __slots__ = ("index",)

    index: int

    def __init__(self, index: int) -> None:
        object.__setattr__(self, "index", index)

    def to_aml_bytes(self) -> bytes:
        """Local0Op + N."""
        if not 0 <= self.index <= 7:
            raise AmlError(f"AML has Local0-Local7, not Local{self.index}")
        return bytes([LOCAL0_OP + self.index])


class Arg(Frozen):
    """``ArgN``, N in 0-6 (section 20.2.6.1)."""

    __slots__ = ("index",)

    index: int

    def __init__(self, index: int) -> None:
        object.__setattr__(self, "index", index)

    def to_aml_bytes(self) -> bytes:
        """Arg0Op + N."""
        if not 0 <= self.index <= 6:
            raise AmlError(f"AML has Arg0-Arg6, not Arg{self.index}")
        return bytes([ARG0_OP + self.index])


Target: TypeAlias = Local | Arg | NamePath


class Store(Frozen):
    """``Store(value, target)`` (section 20.2.5.4, DefStore)."""

    __slots__ = ("target", "value")

    value: AmlTerm
    target: Target

    def __init__(self, value: AmlTerm, target: Target) -> None:
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "target", target)

    def to_aml_bytes(self) -> bytes:
        """StoreOp TermArg SuperName."""
        return bytes([STORE_OP]) + to_aml(self.value) + self.target.to_aml_bytes()


class And(Frozen):
    """``And(a, b, target)``, bitwise; no target gives a NullName (section 20.2.5.4)."""

    __slots__ = ("left", "right", "target")

    left: AmlTerm
    right: AmlTerm
    target: Target | None

    def __init__(self, left: AmlTerm, right: AmlTerm, target: Target | None = None) -> None:
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)
        object.__setattr__(self, "target", target)

    def to_aml_bytes(self) -> bytes:
        """AndOp Operand Operand Target."""
        target = self.target.to_aml_bytes() if self.target is not None else bytes([NULL_NAME])
        return bytes([AND_OP]) + to_aml(self.left) + to_aml(self.right) + target


class LEqual(Frozen):
    """``LEqual(a, b)`` (section 20.2.5.4, DefLEqual)."""

    __slots__ = ("left", "right")

    left: AmlTerm
    right: AmlTerm

    def __init__(self, left: AmlTerm, right: AmlTerm) -> None:
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)

    def to_aml_bytes(self) -> bytes:
        """LEqualOp Operand Operand."""
        return bytes([LEQUAL_OP]) + to_aml(self.left) + to_aml(self.right)


class RegionSpace:
    """OperationRegion address spaces (ACPI 6.4 section 19.6.100, RegionSpaceKeyword)."""

    SYSTEM_MEMORY: Final = 0x00
    SYSTEM_IO: Final = 0x01
    PCI_CONFIG: Final = 0x02


class OperationRegion(Frozen):
    """``OperationRegion(name, space, offset, length)`` (section 20.2.5.2, DefOpRegion)."""

    __slots__ = ("length", "name", "offset", "space")

    name: str | NamePath
    space: int
    offset: AmlTerm
    length: AmlTerm

    def __init__(self, name: str | NamePath, space: int, offset: AmlTerm, length: AmlTerm) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "space", space)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "length", length)

    def to_aml_bytes(self) -> bytes:
        """ExtOpPrefix OpRegionOp NameString RegionSpace RegionOffset RegionLen."""
        return (
            bytes([EXT_OP_PREFIX, OP_REGION_OP])
            + _path(self.name)
            + bytes([self.space])
            + to_aml(self.offset)
            + to_aml(self.length)
        )


class FieldAccess:
    """Field AccessType values, bits 0-3 of FieldFlags (section 20.2.5.2)."""

    ANY: Final = 0
    BYTE: Final = 1
    WORD: Final = 2
    DWORD: Final = 3
    QWORD: Final = 4


class FieldUpdate:
    """Field UpdateRule values, bits 5-6 of FieldFlags (section 20.2.5.2)."""

    PRESERVE: Final = 0
    WRITE_AS_ONES: Final = 1
    WRITE_AS_ZEROS: Final = 2


class Field(Frozen):
    """``Field(region, access, lock, update) { name, bits; ... }`` (section 20.2.5.2).

    Each element is ``(name, bits)``; a name of ``None`` is a reserved (skipped) field.
    """

    __slots__ = ("access", "elements", "lock", "region", "update")

    region: str | NamePath
    elements: Sequence[tuple[str | None, int]]
    access: int
    lock: bool
    update: int

    def __init__(
        self,
        region: str | NamePath,
        elements: Sequence[tuple[str | None, int]],
        access: int = FieldAccess.BYTE,
        lock: bool = False,
        update: int = FieldUpdate.PRESERVE,
    ) -> None:
        object.__setattr__(self, "region", region)
        object.__setattr__(self, "elements", elements)
        object.__setattr__(self, "access", access)
        object.__setattr__(self, "lock", lock)
        object.__setattr__(self, "update", update)

    def to_aml_bytes(self) -> bytes:
        """ExtOpPrefix FieldOp PkgLength NameString FieldFlags FieldList."""
        flags = self.access | (0x10 if self.lock else 0) | (self.update << 5)
        elements = b""
        for name, bits in self.elements:
            if bits <= 0:
                raise AmlError(f"AML field {name!r} has non-positive width {bits}")
            head = _name_seg(name) if name is not None else bytes([0x00])
            elements += head + encode_pkg_length(bits, include_self=False)
        body = _path(self.region) + bytes([flags]) + elements
        return _with_pkg_length(bytes([EXT_OP_PREFIX, FIELD_OP]), body)


# Resource descriptors (ACPI 6.4 section 6.4).


class Io(Frozen):
    """I/O port descriptor, small item type 0x08 (section 6.4.2.5), 16-bit decode."""

    __slots__ = ("alignment", "length", "maximum", "minimum")

    minimum: int
    maximum: int
    alignment: int
    length: int

    def __init__(self, minimum: int, maximum: int, alignment: int, length: int) -> None:
        object.__setattr__(self, "minimum", minimum)
        object.__setattr__(self, "maximum", maximum)
        object.__setattr__(self, "alignment", alignment)
        object.__setattr__(self, "length", length)

    def to_aml_bytes(self) -> bytes:
        """8 bytes: tag 0x47, decode flag, min, max, alignment, length."""
        return (
            bytes([0x47, 0x01])
            + self.minimum.to_bytes(2, "little")
            + self.maximum.to_bytes(2, "little")
            + bytes([self.alignment, self.length])
        )


class IrqNoFlags(Frozen):
    """IRQ descriptor without the information byte, small item type 0x04 (section 6.4.2.1)."""

    __slots__ = ("irq",)

    irq: int

    def __init__(self, irq: int) -> None:
        object.__setattr__(self, "irq", irq)

    def to_aml_bytes(self) -> bytes:
        """3 bytes: tag 0x22 and the 16-bit IRQ mask (edge, active high, exclusive)."""
        if not 0 <= self.irq <= 15:
            raise AmlError(f"IRQ descriptor takes ISA IRQs 0-15, not {self.irq}")
        return bytes([0x22]) + (1 << self.irq).to_bytes(2, "little")


class Interrupt(Frozen):
    """Extended interrupt descriptor, large item 0x09 (section 6.4.3.6), one GSI."""

    __slots__ = ("active_low", "consumer", "edge_triggered", "gsi", "shared")

    gsi: int
    consumer: bool
    edge_triggered: bool
    active_low: bool
    shared: bool

    def __init__(
        self,
        gsi: int,
        consumer: bool = True,
        edge_triggered: bool = True,
        active_low: bool = False,
        shared: bool = False,
    ) -> None:
        object.__setattr__(self, "gsi", gsi)
        object.__setattr__(self, "consumer", consumer)
        object.__setattr__(self, "edge_triggered", edge_triggered)
        object.__setattr__(self, "active_low", active_low)
        object.__setattr__(self, "shared", shared)

    def to_aml_bytes(self) -> bytes:
        """Tag 0x89, length 6, flags, table length 1, the 32-bit interrupt number."""
        flags = (
            (0x01 if self.consumer else 0)
            | (0x02 if self.edge_triggered else 0)
            | (0x04 if self.active_low else 0)
            | (0x08 if self.shared else 0)
        )
        return bytes([0x89, 6, 0, flags, 1]) + self.gsi.to_bytes(4, "little")


class Memory32Fixed(Frozen):
    """32-bit fixed memory range descriptor, large item 0x06 (section 6.4.3.4)."""

    __slots__ = ("base", "length", "read_write")

    base: int
    length: int
    read_write: bool

    def __init__(self, base: int, length: int, read_write: bool = True) -> None:
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "read_write", read_write)

    def to_aml_bytes(self) -> bytes:
        """12 bytes: tag 0x86, length 9, information, base, length."""
        return (
            bytes([0x86, 9, 0, 1 if self.read_write else 0])
            + self.base.to_bytes(4, "little")
            + self.length.to_bytes(4, "little")
        )


_RESOURCE_MEMORY: Final = 0
_RESOURCE_IO: Final = 1
_RESOURCE_BUS_NUMBER: Final = 2
# General flags: producer (bit 0 clear), positive decode, min and max fixed.
_ADDRESS_GENERAL_FLAGS: Final = 0x0C
_MEMORY_READ_WRITE: Final = 0x01
_IO_ENTIRE_RANGE: Final = 0x03


def _address_space(
    tag: int, size: int, kind: int, type_flags: int, minimum: int, length: int
) -> bytes:
    """A Word (0x88), DWord (0x87) or QWord (0x8A) address space descriptor (6.4.3.5)."""
    if length <= 0:
        raise AmlError(f"address range at {minimum:#x} has non-positive length {length}")
    maximum = minimum + length - 1
    if maximum >= 1 << (8 * size):
        raise AmlError(f"address range ending at {maximum:#x} does not fit in {size} bytes")
    fields = (0, minimum, maximum, 0, length)  # granularity, min, max, translation, length
    body = bytes([kind, _ADDRESS_GENERAL_FLAGS, type_flags]) + b"".join(
        value.to_bytes(size, "little") for value in fields
    )
    return bytes([tag]) + len(body).to_bytes(2, "little") + body


class WordBusNumber(Frozen):
    """``WordBusNumber`` producer descriptor for buses ``first..last`` (section 6.4.3.5.3)."""

    __slots__ = ("first", "last")

    first: int
    last: int

    def __init__(self, first: int, last: int) -> None:
        object.__setattr__(self, "first", first)
        object.__setattr__(self, "last", last)

    def to_aml_bytes(self) -> bytes:
        """Word address space descriptor of resource type 2 (bus number)."""
        length = self.last - self.first + 1
        return _address_space(0x88, 2, _RESOURCE_BUS_NUMBER, 0, self.first, length)


class WordIo(Frozen):
    """``WordIO`` producer descriptor for ports ``minimum..maximum`` (section 6.4.3.5.3)."""

    __slots__ = ("maximum", "minimum")

    minimum: int
    maximum: int

    def __init__(self, minimum: int, maximum: int) -> None:
        object.__setattr__(self, "minimum", minimum)
        object.__setattr__(self, "maximum", maximum)

    def to_aml_bytes(self) -> bytes:
        """Word address space descriptor of resource type 1 (I/O), entire range."""
        length = self.maximum - self.minimum + 1
        return _address_space(0x88, 2, _RESOURCE_IO, _IO_ENTIRE_RANGE, self.minimum, length)


class DWordMemory(Frozen):
    """``DWordMemory`` producer descriptor, read-write, non-cacheable (section 6.4.3.5.2)."""

    __slots__ = ("base", "length")

    base: int
    length: int

    def __init__(self, base: int, length: int) -> None:
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "length", length)

    def to_aml_bytes(self) -> bytes:
        """DWord address space descriptor of resource type 0 (memory)."""
        return _address_space(0x87, 4, _RESOURCE_MEMORY, _MEMORY_READ_WRITE, self.base, self.length)


class QWordMemory(Frozen):
    """``QWordMemory`` producer descriptor, read-write, non-cacheable (section 6.4.3.5.1)."""

    __slots__ = ("base", "length")

    base: int
    length: int

    def __init__(self, base: int, length: int) -> None:
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "length", length)

    def to_aml_bytes(self) -> bytes:
        """QWord address space descriptor of resource type 0 (memory)."""
        return _address_space(0x8A, 8, _RESOURCE_MEMORY, _MEMORY_READ_WRITE, self.base, self.length)


class EndTag(Frozen):
    """End tag, small item type 0x0F (section 6.4.2.9), with the template's checksum."""

    __slots__ = ("checksum",)

    checksum: int

    def __init__(self, checksum: int = 0) -> None:
        object.__setattr__(self, "checksum", checksum)

    def to_aml_bytes(self) -> bytes:
        """2 bytes: tag 0x79 and the checksum."""
        return bytes([0x79, self.checksum & 0xFF])


class ResourceTemplate(Frozen):
    """``ResourceTemplate() { descriptors }``: a Buffer of descriptors and an end tag.

    The end tag's checksum makes all bytes of the template sum to zero (section 6.4.2.9).
    """

    __slots__ = ("descriptors",)

    descriptors: Sequence[Aml]

    def __init__(self, descriptors: Sequence[Aml]) -> None:
        object.__setattr__(self, "descriptors", descriptors)

    def to_aml_bytes(self) -> bytes:
        """A Buffer holding the descriptors and a checksummed end tag."""
        data = b"".join(d.to_aml_bytes() for d in self.descriptors) + bytes([0x79])
        return Buffer(data + bytes([-sum(data) & 0xFF])).to_aml_bytes()


def hid(value: str) -> Name:
    """``Name(_HID, ...)``: an EISA id for ``AAA####`` names, otherwise a string (ACPI0013)."""
    if _is_eisa_id(value):
        return Name("_HID", EisaId(value))
    return Name("_HID", String(value))


def uid(value: int) -> Name:
    """``Name(_UID, value)``."""
    return Name("_UID", value)


def crs(descriptors: Sequence[Aml]) -> Name:
    """``Name(_CRS, ResourceTemplate() { descriptors })``."""
    return Name("_CRS", ResourceTemplate(descriptors))


def sta(value: int = 0x0F) -> Name:
    """``Name(_STA, value)``; 0x0F is present, enabled, shown in UI and functioning."""
    return Name("_STA", value)
