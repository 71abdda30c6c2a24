"""Enumerations for nubis's start path, without importing :mod:`enum`.

Importing :mod:`enum` and building nubis's thirty-odd enumerations with it cost several
milliseconds of every ``nubis`` launch (about a tenth of it), for features nubis does not use.
This module gives the same class syntax and the behaviour nubis relies on:

* members are class attributes with ``name`` and ``value``; ``Cls(value)`` looks a member up
  (``ValueError`` if there is none); iteration and ``len`` cover the members in definition order;
  ``Cls[name]`` finds one by name; a second name for a value is an alias of the first member;
* ``Enum`` members compare by identity and print as ``Cls.NAME``;
* ``IntEnum`` and ``IntFlag`` members are ``int`` instances: they compare, hash, format and
  do arithmetic as their value (operators return plain ``int``, so ``reg & ~Flag.X`` clears a
  bit in a register value as it would with integers);
* ``IntFlag(value)`` accepts any combination of bits, as :class:`enum.IntFlag` does.

Type checkers see :mod:`enum`'s own classes (``TYPE_CHECKING``), so annotations and
exhaustiveness checks are those of real enumerations.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from enum import Enum as Enum
    from enum import IntEnum as IntEnum
    from enum import IntFlag as IntFlag
else:

    def _is_member_name(key, value):
        if len(key) > 2 and key[0] == key[-1] == "_":  # _sunder_ and __dunder__ names
            return False
        return not (callable(value) or isinstance(value, (classmethod, staticmethod, property)))

    class _EnumType(type):
        def __new__(mcls, name, bases, namespace):
            members = {k: v for k, v in namespace.items() if _is_member_name(k, v)}
            body = {k: v for k, v in namespace.items() if k not in members}
            cls = super().__new__(mcls, name, bases, body)
            cls._member_map_ = {}
            cls._value_map_ = {}
            cls._members_ = []
            for key, value in members.items():
                member = cls._value_map_.get(value)
                if member is None:
                    member = cls._new_member(value)
                    member._name_ = key
                    member._value_ = value
                    cls._value_map_[value] = member
                    cls._members_.append(member)
                cls._member_map_[key] = member
                type.__setattr__(cls, key, member)
            return cls

        def __call__(cls, value):
            try:
                member = cls._value_map_.get(value)
            except TypeError:  # an unhashable value is no member's value
                member = None
            if member is not None:
                return member
            return cls._missing_(value)

        def __iter__(cls):
            return iter(cls._members_)

        def __len__(cls):
            return len(cls._members_)

        def __getitem__(cls, name):
            return cls._member_map_[name]

        def __contains__(cls, member):
            return isinstance(member, cls) and member._name_ in cls._member_map_

        @property
        def __members__(cls):
            return dict(cls._member_map_)

        def __setattr__(cls, key, value):
            if key in cls.__dict__.get("_member_map_", ()):
                raise AttributeError(f"cannot reassign member {key!r}")
            super().__setattr__(key, value)

    class Enum(metaclass=_EnumType):
        """A set of named constants compared by identity."""

        @classmethod
        def _new_member(cls, value):
            return object.__new__(cls)

        @classmethod
        def _missing_(cls, value):
            raise ValueError(f"{value!r} is not a valid {cls.__qualname__}")

        @property
        def name(self):
            return self._name_

        @property
        def value(self):
            return self._value_

        def __repr__(self):
            return f"<{type(self).__name__}.{self._name_}: {self._value_!r}>"

        def __str__(self):
            return f"{type(self).__name__}.{self._name_}"

        def __format__(self, spec):
            return format(str(self), spec)

        def __reduce_ex__(self, protocol):
            return type(self), (self._value_,)

        def __copy__(self):
            return self

        def __deepcopy__(self, memo):
            return self

    class IntEnum(int, Enum):
        """Named integer constants; members are ``int`` instances."""

        @classmethod
        def _new_member(cls, value):
            return int.__new__(cls, value)

        __str__ = int.__repr__
        __format__ = int.__format__

    class IntFlag(IntEnum):
        """Named bits; any combination of bits is a valid value."""

        @classmethod
        def _missing_(cls, value):
            if not isinstance(value, int):
                raise ValueError(f"{value!r} is not a valid {cls.__qualname__}")
            pseudo = int.__new__(cls, value)
            names = [
                m._name_ for m in cls._members_ if m._value_ and value & m._value_ == m._value_
            ]
            pseudo._name_ = "|".join(names) if names else None
            pseudo._value_ = value
            return pseudo
