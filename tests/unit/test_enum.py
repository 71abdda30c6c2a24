"""nubis's light enumerations behave as :mod:`enum`'s do where nubis relies on them."""

from __future__ import annotations

import copy
import enum
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nubis import _enum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _pair(kind: str) -> tuple[Any, Any]:
    """The same enumeration declared with :mod:`enum` and with :mod:`nubis._enum`."""
    made = []
    for module in (enum, _enum):
        base = getattr(module, kind)
        if kind == "Enum":
            body = {"RED": "r", "GREEN": "g", "CRIMSON": "r", "describe": lambda self: self.name}
        else:
            body = {"A": 1, "B": 2, "C": 4, "ALSO_A": 1, "_private": 8}
        made.append(type(base)("Colour", (base,), _namespace(type(base), body)))
    return made[0], made[1]


def _namespace(meta: Any, body: dict[str, Any]) -> Any:
    namespace = meta.__prepare__("Colour", ()) if hasattr(meta, "__prepare__") else {}
    namespace["__module__"] = __name__
    namespace["__qualname__"] = "Colour"
    for key, value in body.items():
        namespace[key] = value
    return namespace


@pytest.mark.parametrize("kind", ["Enum", "IntEnum", "IntFlag"])
def test_members_names_values_and_aliases_match_enum(kind: str) -> None:
    real, light = _pair(kind)
    assert [(m.name, m.value) for m in light] == [(m.name, m.value) for m in real]
    assert len(light) == len(real)
    assert list(light.__members__) == list(real.__members__)
    for name in real.__members__:
        assert light[name].name == real[name].name
        assert light(real[name].value) is light[name]
    alias = "CRIMSON" if kind == "Enum" else "ALSO_A"
    assert light[alias] is light(light[alias].value)
    if kind != "Enum":
        assert light["_private"].value == real["_private"].value == 8


@pytest.mark.parametrize("kind", ["Enum", "IntEnum"])
def test_an_unknown_or_unhashable_value_is_a_value_error(kind: str) -> None:
    real, light = _pair(kind)
    for value in (99, "nope", {"a": 1}, [1]):
        with pytest.raises(ValueError):
            real(value)
        with pytest.raises(ValueError):
            light(value)


def test_plain_members_compare_by_identity_and_print_like_enum() -> None:
    real, light = _pair("Enum")
    assert light.RED != "r"
    assert light.RED == light.RED
    assert str(light.RED) == str(real.RED) == "Colour.RED"
    assert f"{light.GREEN}" == f"{real.GREEN}"
    assert repr(light.RED) == repr(real.RED)
    assert light.RED.describe() == "RED"
    assert light.RED in light
    assert {light.RED: 1}[light.CRIMSON] == 1


@pytest.mark.parametrize("kind", ["IntEnum", "IntFlag"])
def test_integer_members_are_their_values(kind: str) -> None:
    real, light = _pair(kind)
    for r, m in zip(real, light, strict=True):
        assert isinstance(m, int)
        assert isinstance(m, light)
        assert m == r == r.value
        assert hash(m) == hash(m.value)
        assert str(m) == str(r)
        assert f"{m:#04x}" == f"{r:#04x}"
        assert f"{m}" == f"{r}"
        assert m + 1 == r + 1
        assert {m.value: "x"}[m] == "x"


@given(st.integers(min_value=0, max_value=15))
def test_any_combination_of_flag_bits_is_valid(value: int) -> None:
    real, light = _pair("IntFlag")
    assert light(value) == real(value) == value
    assert light(value).name == real(value).name


def test_clearing_a_flag_from_a_register_value_clears_only_that_bit() -> None:
    _, light = _pair("IntFlag")
    register = 0xFF
    register &= ~light.B
    assert register == 0xFD
    assert (light.A | light.C) == 5


def test_members_survive_copy_and_pickle_and_cannot_be_reassigned() -> None:
    for kind in ("Enum", "IntEnum"):
        _, light = _pair(kind)
        member = next(iter(light))
        assert copy.copy(member) is member
        assert copy.deepcopy([member])[0] is member
        with pytest.raises(AttributeError):
            setattr(light, member.name, 3)
    assert pickle.loads(pickle.dumps(_enum_member_for_pickle())) is _enum_member_for_pickle()


class _Pickled(_enum.IntEnum):
    ONE = 1


def _enum_member_for_pickle() -> _Pickled:
    return _Pickled.ONE
