"""The few :mod:`typing` constructs nubis needs at run time, without importing :mod:`typing`.

:mod:`typing` (which imports :mod:`re`) is one of the larger imports on nubis's start path, yet
nubis uses it almost only in annotations, which ``from __future__ import annotations`` leaves
unevaluated: modules import those names under ``if TYPE_CHECKING:``. Three constructs run as code:

* ``Protocol``: a base class of the structural interfaces; at run time plain ``object``, since
  nubis never checks a protocol with ``isinstance``.
* ``NamedTuple``: the class syntax for a named tuple; at run time a base whose metaclass hands
  the class body to :func:`collections.namedtuple`, as :class:`typing.NamedTuple` does.
* ``NewType``: at run time an identity function carrying the new type's name.

Type checkers see :mod:`typing`'s own definitions.
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
    from typing import NewType as NewType
    from typing import Protocol as Protocol
else:
    Protocol = object

    _NAMEDTUPLE_SKIP = frozenset(
        {"__module__", "__qualname__", "__annotations__", "__orig_bases__", "__slots__"}
    )

    class _NamedTupleMeta(type):
        def __new__(mcls, name, bases, namespace):
            if not bases:
                return super().__new__(mcls, name, bases, namespace)
            fields = list(namespace.get("__annotations__", {}))
            defaults = [namespace[field] for field in fields if field in namespace]
            cls = collections.namedtuple(
                name, fields, defaults=defaults, module=namespace["__module__"]
            )
            cls.__qualname__ = namespace.get("__qualname__", name)
            cls.__annotations__ = dict(namespace.get("__annotations__", {}))
            for key, value in namespace.items():
                if key not in _NAMEDTUPLE_SKIP and key not in fields:
                    setattr(cls, key, value)
            return cls

    class NamedTuple(metaclass=_NamedTupleMeta):
        """Base class of a named tuple declared with annotated fields."""

    def NewType(name, supertype):
        def new_type(value):
            return value

        new_type.__name__ = name
        new_type.__qualname__ = name
        new_type.__supertype__ = supertype
        return new_type
