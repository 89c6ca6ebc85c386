"""``@record``: ``dataclasses.dataclass`` for our run-path classes, cheaper to create at import.

On Python 3.11 and 3.12, ``dataclass()`` compiles each method it generates with an ``exec``
of its own (six for a frozen class: ``__init__``, ``__repr__``, ``__eq__``, ``__hash__``,
``__setattr__``, ``__delattr__``), which made up most of the proxy's import time spent on
its ~40 classes (issue 21). Python 3.13 compiles them all in one ``exec``; ``record`` does
the same on 3.11/3.12: ``dataclass(init=False, repr=False, eq=False)`` works out the fields
(and sets ``__dataclass_fields__``, ``__match_args__``) without an ``exec``, then one
``exec`` defines the methods ``dataclass()`` would have written, with the same code. So a
record *is* a dataclass: ``fields``, ``replace``, ``asdict``, ``is_dataclass``, pickle,
``copy`` and ``inspect.signature`` see what they would see with ``@dataclass``.

Options: ``frozen``, ``slots``, ``eq`` and ``repr`` (``init``, ``match_args`` on). A class
with bases (other than ``object``) or its own ``__match_args__`` is handed to ``dataclass()``
as is; an ``InitVar``, ``kw_only`` or ``init=False`` field is refused (none of ours has one).
"""

import dataclasses
import inspect
import sys
from collections.abc import Callable
from reprlib import recursive_repr
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["record"]

_T = TypeVar("_T")

# 3.13 batches the methods itself (dataclasses._FuncBuilder): nothing to gain here.
_DATACLASS_BATCHES = sys.version_info >= (3, 13)


class _Factory:
    """The default of a ``default_factory`` parameter: ``<factory>`` in signatures, as dataclasses'."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


@overload
def record(cls: type[_T], /) -> type[_T]: ...


@overload
def record(
    cls: None = None, /, *, frozen: bool = False, slots: bool = False, eq: bool = True, repr: bool = True
) -> Callable[[type[_T]], type[_T]]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def record(
    cls: type[_T] | None = None, /, *, frozen: bool = False, slots: bool = False, eq: bool = True, repr: bool = True
) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """``@dataclass`` (with these options), its methods compiled in one ``exec``."""

    def wrap(cls: type[_T]) -> type[_T]:
        if _DATACLASS_BATCHES or cls.__bases__ != (object,) or "__match_args__" in cls.__dict__:
            # Inheritance brings rules (frozen bases, inherited slots and fields) left to dataclasses.
            return dataclasses.dataclass(cls, frozen=frozen, slots=slots, eq=eq, repr=repr)
        built: type[_T] = _build(cls, frozen, slots, eq, repr)
        return built

    return wrap if cls is None else wrap(cls)


def _build(cls: Any, frozen: bool, slots: bool, eq: bool, repr: bool) -> Any:
    body = cls.__dict__
    has_doc = bool(body.get("__doc__"))
    # dataclass() decides __hash__ from the class as written (its "has-explicit-hash").
    own_hash = body.get("__hash__", dataclasses.MISSING)
    explicit_hash = not (own_hash is dataclasses.MISSING or (own_hash is None and "__eq__" in body))
    if frozen and ("__setattr__" in body or "__delattr__" in body):
        name = "__setattr__" if "__setattr__" in body else "__delattr__"
        raise TypeError(f"Cannot overwrite attribute {name} in class {cls.__name__}")
    if slots and "__slots__" in body:
        raise TypeError(f"{cls.__name__} already specifies __slots__")
    if not has_doc:
        cls.__doc__ = "-"  # spares dataclass() a signature of the class without __init__; set below
    # Fields, defaults, ClassVars, mutable-default checks; frozen=False: its frozen methods exec.
    cls = dataclasses.dataclass(cls, init=False, repr=False, eq=False)
    fields = dataclasses.fields(cls)
    names = tuple(f.name for f in fields)
    if cls.__match_args__ != names:  # dataclass() lists InitVars, leaves kw_only and init=False out
        raise TypeError(f"@record {cls.__name__}: InitVar, kw_only or init=False field; use @dataclass")
    params = cls.__dataclass_params__  # a new object per class: set the options asked for
    params.init, params.repr, params.eq, params.frozen = True, repr, eq, frozen
    if hasattr(params, "slots"):  # 3.12
        params.slots = slots
    if slots:  # a new class, as dataclass() makes it: slots cannot be added to a class
        namespace = {key: value for key, value in cls.__dict__.items() if key not in names}
        namespace.pop("__dict__", None)
        namespace.pop("__weakref__", None)
        namespace["__slots__"] = names
        qualname = cls.__qualname__
        cls = type(cls)(cls.__name__, cls.__bases__, namespace)
        cls.__qualname__ = qualname
    methods = _methods(cls, fields, frozen, slots, eq, repr, explicit_hash)
    for name, method in methods.items():
        method.__qualname__ = f"{cls.__qualname__}.{name}"
        if name == "__repr__":
            method = recursive_repr()(method)  # "..." for a record that contains itself
        if name == "__hash__" or name not in body:  # dataclass() keeps the class's own methods
            setattr(cls, name, method)
    if eq and not frozen and not explicit_hash:
        cls.__hash__ = None  # mutable and compared by value: unhashable, as with dataclass()
    if not has_doc:
        try:
            cls.__doc__ = cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
        except (TypeError, ValueError):
            cls.__doc__ = cls.__name__
    return cls


def _methods(
    cls: type, fields: tuple[dataclasses.Field[Any], ...], frozen: bool, slots: bool, eq: bool, repr: bool,
    explicit_hash: bool,
) -> dict[str, Any]:
    """The methods dataclass() (3.11/3.12) writes, in its words, from one exec."""
    names = [f.name for f in fields]
    self = "__dataclass_self__" if "self" in names else "self"
    # What the methods use, passed to __create_fn__ so that they close over it.
    env: dict[str, Any] = {
        "cls": cls,
        "FrozenInstanceError": dataclasses.FrozenInstanceError,
        "__dataclass_builtins_object__": object,
        "__dataclass_HAS_DEFAULT_FACTORY__": _FACTORY,
    }
    params, assigns = [], []
    seen_default = False
    for f in fields:
        env[f"__dataclass_type_{f.name}__"] = f.type
        default, value = "", f.name
        if f.default_factory is not dataclasses.MISSING:
            env[f"__dataclass_dflt_{f.name}__"] = f.default_factory
            default = "=__dataclass_HAS_DEFAULT_FACTORY__"
            value = f"__dataclass_dflt_{f.name}__() if {f.name} is __dataclass_HAS_DEFAULT_FACTORY__ else {f.name}"
        elif f.default is not dataclasses.MISSING:
            env[f"__dataclass_dflt_{f.name}__"] = f.default
            default = f"=__dataclass_dflt_{f.name}__"
        if default:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
        params.append(f"{f.name}:__dataclass_type_{f.name}__{default}")
        if frozen:  # the frozen __setattr__ refuses: set as object does
            assigns.append(f"__dataclass_builtins_object__.__setattr__({self},{f.name!r},{value})")
        else:
            assigns.append(f"{self}.{f.name}={value}")
    if hasattr(cls, "__post_init__"):
        assigns.append(f"{self}.__post_init__()")
    lines = [f" def __init__({','.join([self, *params])})->None:", *(f"  {a}" for a in assigns or ["pass"])]
    if repr:
        shown = ", ".join(f"{f.name}={{self.{f.name}!r}}" for f in fields if f.repr)
        lines += [" def __repr__(self):", f'  return self.__class__.__qualname__ + f"({shown})"']
    if eq:
        compared = [f.name for f in fields if f.compare]
        lines += [
            " def __eq__(self, other):",
            "  if other.__class__ is self.__class__:",
            f"   return {_tuple('self', compared)}=={_tuple('other', compared)}",
            "  return NotImplemented",
        ]
        if frozen and not explicit_hash:
            hashed = [f.name for f in fields if (f.compare if f.hash is None else f.hash)]
            lines += [" def __hash__(self):", f"  return hash({_tuple('self', hashed)})"]
    if frozen:
        condition = "type(self) is cls" + (f" or name in {set(names)!r}" if names else "")
        lines += [
            " def __setattr__(self, name, value):",
            f"  if {condition}:",
            '   raise FrozenInstanceError(f"cannot assign to field {name!r}")',
            "  super(cls, self).__setattr__(name, value)",
            " def __delattr__(self, name):",
            f"  if {condition}:",
            '   raise FrozenInstanceError(f"cannot delete field {name!r}")',
            "  super(cls, self).__delattr__(name)",
        ]
        if slots:  # pickle and copy would restore slots with setattr, which refuses
            lines += [
                " def __getstate__(self):",
                f"  return [{_tuple('self', names)[1:-1]}]",
                " def __setstate__(self, state):",
                f"  for name, value in zip({tuple(names)!r}, state):",
                "   __dataclass_builtins_object__.__setattr__(self, name, value)",
            ]
    defined = [line[5:].split("(", 1)[0] for line in lines if line.startswith(" def ")]
    returned = ", ".join(f"{name!r}: {name}" for name in defined)
    source = "\n".join([f"def __create_fn__({', '.join(env)}):", *lines, f" return {{{returned}}}"])
    # The module's globals, as dataclass() uses: get_type_hints(cls.__init__) resolves there.
    module = sys.modules.get(cls.__module__)
    namespace: dict[str, Any] = {}
    # dont_inherit: no compiler flags from here (the annotations must stay objects, not text).
    code = compile(source, "<string>", "exec", dont_inherit=True)
    exec(code, module.__dict__ if module else {}, namespace)  # noqa: S102 - our own text, as dataclass() does
    methods: dict[str, Any] = namespace["__create_fn__"](**env)
    return methods


def _tuple(obj: str, names: list[str]) -> str:
    """``(self.a,self.b,)``: the fields as dataclass() compares and hashes them."""
    return f"({','.join(f'{obj}.{name}' for name in names)},)" if names else "()"
