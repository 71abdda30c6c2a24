"""`Frozen`: the base of nubis's small immutable value classes.

A frozen dataclass generates its methods with ``exec()`` when its module is imported, about a
millisecond per class on a fast host and many times that under emulation; the start path has
dozens of them. A `Frozen` subclass annotates its fields in ``__init__``'s parameter order, lists them in
``__slots__`` and stores them in a hand-written ``__init__`` with ``object.__setattr__``;
equality, hashing, ``repr``, copying and the refusal to assign come from here, defined once.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar, TypeVar


class Frozen:
    """An immutable value: its fields are the annotated attributes of its class and its bases."""

    __slots__ = ()
    _field_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            if klass is not Frozen and issubclass(klass, Frozen):
                # Own annotations only; inspect.get_annotations would cost an import of inspect.
                names.extend(klass.__dict__.get("__annotations__", ()))  # noqa: RUF063
        cls._field_names = tuple(names)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._field_names)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Frozen)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._field_names)
        return f"{type(self).__qualname__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a {type(self).__name__}")

    def __reduce__(self) -> tuple[type[Frozen], tuple[Any, ...]]:
        return (type(self), self._values())


if TYPE_CHECKING:
    _F = TypeVar("_F", bound=Frozen)


def replace(value: _F, /, **changes: Any) -> _F:
    """A copy of ``value`` with some fields changed, as ``dataclasses.replace`` makes one."""
    fields = dict(zip(value._field_names, value._values(), strict=True))
    fields.update(changes)
    return type(value)(**fields)
