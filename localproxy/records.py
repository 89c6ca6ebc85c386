"""``@record``: ``dataclasses.dataclass`` for our run-path classes, cheaper to create at import.

On 3.11/3.12 ``dataclass()`` compiles each method it writes, one ``exec`` each: most of the import
time of the proxy's ~40 classes (issue 21). Compiling costs by the size of the text, so ``record``
compiles ``__init__`` alone (its signature, speed and TypeErrors need real code); the other methods
are closures over the field names. ``dataclass(init=False, repr=False, eq=False)`` (no compile)
works out the fields, so a record *is* a dataclass to ``fields``, ``replace``, pickle, ``inspect``.
"""

import dataclasses
import inspect
import sys
from collections.abc import Callable, Sequence
from operator import attrgetter
from reprlib import recursive_repr
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["record"]

_T = TypeVar("_T")

# 3.13 compiles a class's methods in one exec (dataclasses._FuncBuilder): left to it.
_DATACLASS_IS_CHEAP = sys.version_info >= (3, 13)


class _Factory:
    def __repr__(self) -> str:
        return "<factory>"  # a default_factory parameter's default in signatures, as dataclasses'


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
    """``@dataclass`` with these options. On 3.13+ (one exec for all methods there), and for a class
    with bases or its own ``__match_args__``, it is ``dataclass()``; an ``InitVar``, ``kw_only``
    or ``init=False`` field is refused (none of ours has one)."""

    def wrap(cls: type[_T]) -> type[_T]:
        if _DATACLASS_IS_CHEAP or cls.__bases__ != (object,) or "__match_args__" in cls.__dict__:
            # Inheritance brings rules (frozen bases, inherited slots and fields) left to dataclasses.
            return dataclasses.dataclass(cls, frozen=frozen, slots=slots, eq=eq, repr=repr)
        built: type[_T] = _build(cls, frozen, slots, eq, repr)
        return built

    return wrap if cls is None else wrap(cls)


def _build(cls: Any, frozen: bool, slots: bool, eq: bool, repr: bool) -> Any:
    body = cls.__dict__  # the class as written: dataclass() never replaces what it defines
    has_doc = bool(body.get("__doc__"))
    own_hash = body.get("__hash__", dataclasses.MISSING)  # dataclass()'s "has-explicit-hash"
    explicit_hash = not (own_hash is dataclasses.MISSING or (own_hash is None and "__eq__" in body))
    for name in ("__setattr__", "__delattr__"):
        if frozen and name in body:
            raise TypeError(f"Cannot overwrite attribute {name} in class {cls.__name__}")
    if slots and "__slots__" in body:
        raise TypeError(f"{cls.__name__} already specifies __slots__")
    if not has_doc:
        cls.__doc__ = "-"  # spares dataclass() a signature of the class without __init__; set below
    # frozen=False: dataclass() would compile the frozen methods.
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
    methods = {"__init__": _init(cls, fields, frozen), **_methods(cls, fields, frozen, slots, eq, repr, explicit_hash)}
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


def _init(cls: type[Any], fields: tuple[dataclasses.Field[Any], ...], frozen: bool) -> Any:
    """dataclass()'s ``__init__``, from its text (3.11/3.12): one compile, one exec."""
    self = "__dataclass_self__" if "self" in {f.name for f in fields} else "self"
    # What __init__ uses, passed to __create_fn__ so that it closes over it.
    env: dict[str, Any] = {"__dataclass_builtins_object__": object, "__dataclass_HAS_DEFAULT_FACTORY__": _FACTORY}
    params, lines, seen_default = [self], [], False
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
            lines.append(f"  __dataclass_builtins_object__.__setattr__({self},{f.name!r},{value})")
        else:
            lines.append(f"  {self}.{f.name}={value}")
    if hasattr(cls, "__post_init__"):
        lines.append(f"  {self}.__post_init__()")
    header = [f"def __create_fn__({', '.join(env)}):", f" def __init__({','.join(params)})->None:"]
    source = "\n".join([*header, *(lines or ["  pass"]), " return __init__"])
    # The module's globals, as dataclass() uses: get_type_hints(cls.__init__) resolves there.
    module = sys.modules.get(cls.__module__)
    namespace: dict[str, Any] = {}
    # dont_inherit: no compiler flags from here (the annotations must stay objects, not text).
    code = compile(source, "<string>", "exec", dont_inherit=True)
    exec(code, module.__dict__ if module else {}, namespace)  # noqa: S102 - our own text, as dataclass() does
    return namespace["__create_fn__"](**env)


def _values(names: Sequence[str]) -> Callable[[Any], tuple[Any, ...]]:
    """obj -> ``(obj.a, obj.b, ...)``: the tuple dataclass() compares and hashes."""
    if len(names) != 1:
        return attrgetter(*names) if names else lambda obj: ()
    value = attrgetter(names[0])
    return lambda obj: (value(obj),)


def _methods(
    cls: type[Any], fields: tuple[dataclasses.Field[Any], ...], frozen: bool, slots: bool, eq: bool, repr: bool,
    explicit_hash: bool,
) -> dict[str, Callable[..., Any]]:
    """The other methods dataclass() writes, as closures over the field names, with its messages."""
    names = tuple(f.name for f in fields)
    shown = tuple(f.name for f in fields if f.repr)
    compared = _values([f.name for f in fields if f.compare])
    hashed = _values([f.name for f in fields if (f.compare if f.hash is None else f.hash)])
    frozen_names = frozenset(names)

    def __repr__(self: Any) -> str:
        return f"{self.__class__.__qualname__}({', '.join([f'{name}={getattr(self, name)!r}' for name in shown])})"

    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is self.__class__:
            return compared(self) == compared(other)
        return NotImplemented

    def __hash__(self: Any) -> int:
        return hash(hashed(self))

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in frozen_names:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in frozen_names:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    # Frozen slots: pickle and copy would restore them with setattr, which refuses.
    def __getstate__(self: Any) -> list[Any]:
        return [getattr(self, name) for name in names]

    def __setstate__(self: Any, state: Sequence[Any]) -> None:
        for name, value in zip(names, state):
            object.__setattr__(self, name, value)

    wanted: dict[Callable[..., Any], bool] = {
        __repr__: repr, __eq__: eq, __hash__: eq and frozen and not explicit_hash,
        __setattr__: frozen, __delattr__: frozen, __getstate__: frozen and slots, __setstate__: frozen and slots,
    }
    return {method.__name__: method for method, want in wanted.items() if want}
