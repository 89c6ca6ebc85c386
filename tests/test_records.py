"""``localproxy.records.record`` behaves as ``dataclasses.dataclass`` (issue 21).

Each shape is built twice, by ``@dataclass`` and by ``@record``, and the two are held to the
same behaviour. No event loop here.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import pickle
import subprocess
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from localproxy.records import record

REPO = Path(__file__).resolve().parent.parent
Decorator = Callable[..., Any]

# --- the shapes: each function builds one class with the decorator it is given ------------


def plain(deco: Decorator) -> type:
    @deco
    class Plain:
        """Mutable, one default."""

        a: int
        b: str = "b"

    return Plain


def frozen(deco: Decorator) -> type:
    @deco(frozen=True)
    class Frozen:
        """Frozen, defaults of several kinds."""

        a: int
        b: str | None = None
        c: tuple[int, ...] = ()

    return Frozen


def slotted(deco: Decorator) -> type:
    @deco(slots=True)
    class Slotted:
        """Slots, a default."""

        key: int
        data: bytes = b""

    return Slotted


def frozen_slotted(deco: Decorator) -> type:
    @deco(frozen=True, slots=True)
    class FrozenSlotted:
        read: bool
        reset: int | None = None
        stalled_for: float = 0.0

    return FrozenSlotted


def factories(deco: Decorator) -> type:
    @deco
    class Factories:
        """default_factory, repr=False and compare=False fields, a ClassVar."""

        LIMIT: ClassVar[int] = 3
        name: str
        token: str = field(repr=False, default="secret")
        items: list[int] = field(default_factory=list)
        seen: dict[str, int] = field(default_factory=dict, compare=False)

    return Factories


def post_init(deco: Decorator) -> type:
    @deco(frozen=True)
    class PostInit:
        """Frozen, __post_init__ normalising a field (as ProxyConfig does)."""

        mode: str
        secret: str = field(repr=False)
        names: frozenset[str] = frozenset()
        mapping: dict[str, int] = field(default_factory=dict)

        def __post_init__(self) -> None:
            object.__setattr__(self, "names", frozenset(self.names))

    return PostInit


def undocumented(deco: Decorator) -> type:
    @deco(frozen=True)
    class Undocumented:
        service_id: str
        stream_id: int
        flag: bool = True

    return Undocumented


def empty(deco: Decorator) -> type:
    @deco(frozen=True)
    class Empty:
        """No fields (InProcess)."""

    return Empty


def unordered(deco: Decorator) -> type:
    @deco(eq=False, repr=False)
    class Unordered:
        """eq and repr off: identity and object's repr."""

        x: int = 0

    return Unordered


def self_field(deco: Decorator) -> type:
    @deco
    class SelfField:
        self: int
        other: int = 2

    return SelfField


SHAPES = [plain, frozen, slotted, frozen_slotted, factories, post_init, undocumented, empty, unordered, self_field]
# Arguments for each shape's constructor: one value, another value, a third equal to the first.
ARGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "plain": ({"a": 1}, {"a": 1, "b": "c"}),
    "frozen": ({"a": 1, "c": (1, 2)}, {"a": 2}),
    "slotted": ({"key": 1, "data": b"x"}, {"key": 2}),
    "frozen_slotted": ({"read": True}, {"read": False, "reset": 3, "stalled_for": 1.5}),
    "factories": ({"name": "n", "items": [1]}, {"name": "n", "token": "other"}),
    "post_init": ({"mode": "m", "secret": "s", "names": ["a", "b"]}, {"mode": "m", "secret": "t"}),
    "undocumented": ({"service_id": "SSH", "stream_id": 1}, {"service_id": "SSH", "stream_id": 2, "flag": False}),
    "empty": ({}, {}),
    "unordered": ({"x": 1}, {"x": 2}),
    "self_field": ({"self": 1}, {"self": 1, "other": 3}),
}


def twins(shape: Callable[[Decorator], type]) -> tuple[type, type]:
    """The shape by @dataclass and by @record, as module globals (pickle finds classes by name)."""
    pair = []
    for prefix, deco in (("D_", dataclass), ("R_", record)):
        cls = shape(deco)
        cls.__qualname__ = prefix + cls.__name__
        globals()[cls.__qualname__] = cls
        pair.append(cls)
    return pair[0], pair[1]


TWINS = {shape.__name__: twins(shape) for shape in SHAPES}
shapes = pytest.mark.parametrize("name", list(TWINS))


def shown(obj: object) -> str:
    """repr without the class name (the twins' names differ by their prefix)."""
    return repr(obj).removeprefix(type(obj).__qualname__)


@shapes
def test_repr_init_and_equality_match(name: str) -> None:
    (d_cls, r_cls), (first, second) = TWINS[name], ARGS[name]
    d1, d2, r1, r2 = d_cls(**first), d_cls(**second), r_cls(**first), r_cls(**second)
    if d_cls.__dataclass_params__.repr:
        assert shown(r1) == shown(d1) and shown(r2) == shown(d2)
    else:
        assert repr(r1).startswith(f"<{__name__}.R_") and " object at 0x" in repr(r1)
    # a second instance from the same arguments (copied: factories' lists stay apart)
    assert (r1 == r_cls(**copy.deepcopy(first))) == (d1 == d_cls(**copy.deepcopy(first)))
    assert (r1 == r2) == (d1 == d2)
    assert (r1 != r2) == (d1 != d2)
    # same fields, another class: __eq__ answers NotImplemented, so == falls back to identity
    assert r1 != d1 and (r1 == d1) is False
    if "__eq__" in r_cls.__dict__:
        assert r1.__eq__(d1) is NotImplemented and d1.__eq__(r1) is NotImplemented
    assert ("__eq__" in r_cls.__dict__) == ("__eq__" in d_cls.__dict__)


def outcome(action: Callable[[], object]) -> object:
    """What ``action`` returns, or the type and text of what it raises."""
    try:
        return action()
    except Exception as error:  # noqa: BLE001 - compared by the caller
        return (type(error), str(error))


@shapes
def test_hash_matches(name: str) -> None:
    (d_cls, r_cls), (first, _) = TWINS[name], ARGS[name]
    assert (r_cls.__hash__ is None) == (d_cls.__hash__ is None)
    if r_cls.__hash__ is None:
        with pytest.raises(TypeError, match="unhashable"):
            hash(r_cls(**first))
    elif r_cls.__dataclass_params__.eq:  # frozen: the fields' values (a dict field: unhashable)
        by_value = outcome(lambda: hash(d_cls(**first)))
        assert outcome(lambda: hash(r_cls(**first))) == by_value
        assert outcome(lambda: hash(r_cls(**copy.deepcopy(first)))) == by_value
    else:  # eq=False: identity
        one = r_cls(**first)
        assert hash(one) == object.__hash__(one)


@shapes
def test_frozen_refuses_set_and_delete_with_dataclass_messages(name: str) -> None:
    (d_cls, r_cls), (first, _) = TWINS[name], ARGS[name]
    d, r = d_cls(**first), r_cls(**first)
    targets = [f.name for f in dataclasses.fields(d_cls)] or ["anything"]
    for target in targets:
        outcomes = [
            (outcome(lambda: setattr(obj, target, 7)), outcome(lambda: delattr(obj, target)))  # noqa: B023
            for obj in (d, r)
        ]
        assert outcomes[0] == outcomes[1]
        if d_cls.__dataclass_params__.frozen:
            assert outcomes[1][0] == (dataclasses.FrozenInstanceError, f"cannot assign to field {target!r}")
            assert outcomes[1][1] == (dataclasses.FrozenInstanceError, f"cannot delete field {target!r}")


@shapes
def test_dataclasses_functions_see_a_dataclass(name: str) -> None:
    (d_cls, r_cls), (first, second) = TWINS[name], ARGS[name]
    d, r = d_cls(**first), r_cls(**first)
    assert dataclasses.is_dataclass(r_cls) and dataclasses.is_dataclass(r)
    assert [f.name for f in dataclasses.fields(r)] == [f.name for f in dataclasses.fields(d)]
    assert dataclasses.asdict(r) == dataclasses.asdict(d)
    assert dataclasses.astuple(r) == dataclasses.astuple(d)
    changed_r, changed_d = dataclasses.replace(r, **second), dataclasses.replace(d, **second)
    assert type(changed_r) is r_cls
    assert dataclasses.asdict(changed_r) == dataclasses.asdict(changed_d)
    assert r_cls.__match_args__ == d_cls.__match_args__
    assert repr(r_cls.__dataclass_params__) == repr(d_cls.__dataclass_params__)


@shapes
def test_signature_doc_and_annotations_match(name: str) -> None:
    d_cls, r_cls = TWINS[name]
    assert str(inspect.signature(r_cls)) == str(inspect.signature(d_cls))
    assert str(inspect.signature(r_cls.__init__)) == str(inspect.signature(d_cls.__init__))
    assert r_cls.__doc__ == d_cls.__doc__  # a generated one too, from the signature
    assert r_cls.__init__.__annotations__ == d_cls.__init__.__annotations__
    assert typing.get_type_hints(r_cls.__init__) == typing.get_type_hints(d_cls.__init__)
    assert r_cls.__init__.__qualname__ == d_cls.__init__.__qualname__.replace("D_", "R_")


@shapes
def test_pickle_and_copy_round_trip(name: str) -> None:
    (_, r_cls), (first, second) = TWINS[name], ARGS[name]
    for args in (first, second):
        r = r_cls(**args)
        for clone in (pickle.loads(pickle.dumps(r)), copy.copy(r), copy.deepcopy(r)):
            assert type(clone) is r_cls
            assert dataclasses.asdict(clone) == dataclasses.asdict(r)


@shapes
def test_slots_as_dataclass_makes_them(name: str) -> None:
    (d_cls, r_cls), (first, _) = TWINS[name], ARGS[name]
    assert getattr(r_cls, "__slots__", None) == getattr(d_cls, "__slots__", None)
    r = r_cls(**first)
    assert hasattr(r, "__dict__") == hasattr(d_cls(**first), "__dict__")
    if "__slots__" in r_cls.__dict__:
        assert not hasattr(r, "__dict__")
        with pytest.raises((AttributeError, TypeError)):
            r.not_a_field = 1  # no __dict__ to put it in (frozen: refused first)
        assert ("__getstate__" in r_cls.__dict__) == ("__getstate__" in d_cls.__dict__)


@shapes
def test_a_missing_or_unknown_argument_is_a_type_error(name: str) -> None:
    (d_cls, r_cls), _ = TWINS[name], ARGS[name]
    for cls in (d_cls, r_cls):
        required = [p for p in inspect.signature(cls).parameters.values() if p.default is p.empty]
        if required:
            with pytest.raises(TypeError, match=f"missing 1 required positional argument: '{required[-1].name}'"):
                cls(**{p.name: 1 for p in required[:-1]})
        with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
            cls(**dict.fromkeys((p.name for p in required), 1), nope=1)


def test_default_factory_makes_a_new_object_each_time() -> None:
    _, r_cls = TWINS["factories"]
    one, two = r_cls("a"), r_cls("a")
    assert one.items == [] and one.items is not two.items
    assert r_cls.LIMIT == 3 and "LIMIT" not in [f.name for f in dataclasses.fields(r_cls)]
    assert one == r_cls("a", seen={"x": 1})  # compare=False


def test_post_init_runs() -> None:
    _, r_cls = TWINS["post_init"]
    assert r_cls("m", "s", names=["a", "a"]).names == frozenset({"a"})
    assert "secret" not in repr(r_cls("m", "s"))


def test_eq_and_hash_compare_field_tuples() -> None:
    # dataclass() compares (self.a,...) tuples: identity first, so the same NaN object is equal
    nan = float("nan")
    for deco in (dataclass, record):

        @deco(frozen=True)
        class One:
            x: float

        @deco(frozen=True)
        class Two:
            x: float
            y: int = 0

        assert One(nan) == One(nan) and One(float("nan")) != One(float("nan"))
        assert Two(nan) == Two(nan) and Two(1.0) != Two(1.0, 1)
        assert hash(One(1.0)) == hash((1.0,)) and hash(Two(1.0)) == hash((1.0, 0))


def test_a_record_that_contains_itself_repr_is_bounded() -> None:
    _, r_cls = TWINS["plain"]
    obj = r_cls(1)
    obj.b = [obj]
    assert repr(obj) == "R_Plain(a=1, b=[...])"


def test_match_statement() -> None:
    _, r_cls = TWINS["undocumented"]
    match r_cls("SSH", 4):
        case r_cls(service, stream):
            assert (service, stream) == ("SSH", 4)
        case _:
            pytest.fail("no match")


def test_dataclass_errors_are_kept() -> None:
    with pytest.raises(ValueError, match="mutable default"):

        @record
        class Mutable:
            items: list[int] = []  # noqa: RUF012 - the error under test

    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):

        @record(frozen=True)
        class Order:
            a: int = 1
            b: int

    with pytest.raises(TypeError, match="Cannot overwrite attribute __setattr__"):

        @record(frozen=True)
        class OwnSetattr:
            a: int

            def __setattr__(self, name: str, value: object) -> None: ...


def test_what_record_does_not_do_itself() -> None:
    # an InitVar, a kw_only or init=False field: refused rather than half done
    with pytest.raises(TypeError, match="InitVar, kw_only or init=False"):

        @record
        class Later:
            a: int
            b: int = field(init=False, default=0)

    # bases: dataclass() does it all (frozen bases, inherited fields)
    @record(frozen=True)
    class Base:
        a: int

    @record(frozen=True)
    class Child(Base):
        b: int = 0

    assert [f.name for f in dataclasses.fields(Child)] == ["a", "b"]
    assert Child(1) == Child(1, 0) and Child(1) != Base(1)
    with pytest.raises(TypeError, match="cannot inherit non-frozen dataclass from a frozen one"):

        @record
        class Thawed(Base):
            c: int = 0


def test_own_methods_are_kept() -> None:
    @record(frozen=True)
    class Own:
        a: int

        def __repr__(self) -> str:
            return "own"

        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

    one = Own(1)
    assert repr(one) == "own" and one == Own(2)
    assert hash(one) == object.__hash__(one)


# --- one compile and one exec per class on 3.11/3.12 -----------------------------------------

_counting = False
_events: list[str] = []
_hooked = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _counting and event in ("exec", "compile"):
        _events.append(event)


def count_code_events(make: Callable[[], object]) -> dict[str, int]:
    """exec/compile audit events while ``make`` runs (an audit hook stays for the process:
    it is added once and does nothing outside this function)."""
    global _counting, _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    _events.clear()
    _counting = True
    try:
        make()
    finally:
        _counting = False
    return {"exec": _events.count("exec"), "compile": _events.count("compile")}


@pytest.mark.parametrize("shape", [frozen, frozen_slotted, factories, post_init, undocumented])
def test_one_exec_per_class(shape: Callable[[Decorator], type]) -> None:
    by_record = count_code_events(lambda: shape(record))
    by_dataclass = count_code_events(lambda: shape(dataclass))
    assert by_record == {"exec": 1, "compile": 1}
    if sys.version_info < (3, 13):
        assert by_dataclass["exec"] >= 3  # one per method (init, repr, eq, ...): what record saves


# --- mypy sees a record as a dataclass (typing.dataclass_transform) ------------------------------

TYPED_USE = '''
from dataclasses import field, replace
from localproxy.records import record

@record(frozen=True)
class Frozen:
    x: int
    y: str = "a"
    z: list[int] = field(default_factory=list)

@record
class Plain:
    x: int

ok: Frozen = replace(Frozen(1, z=[2]), y="b")
Plain(1).x = 2
Frozen(1).x = 2  # error: read-only
Plain("s")  # error: str for int
Frozen()  # error: missing x
'''


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is in the test extra")
def test_mypy_sees_a_dataclass(tmp_path: Path) -> None:
    (tmp_path / "use.py").write_text(TYPED_USE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), "--no-color-output",
         "--follow-imports=silent", str(tmp_path / "use.py")],
        capture_output=True, text=True, timeout=110, check=False, cwd=REPO,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    lines = TYPED_USE.splitlines()
    flagged = sorted(lines[int(line.split(":")[1]) - 1].split("#")[0].strip() for line in errors)
    assert flagged == ["Frozen()", "Frozen(1).x = 2", 'Plain("s")'], result.stdout
