"""JSON checked against, and read into, dataclass declarations: the one schema of the artifact contract.

A declaration's type hints say what each field holds (str, int, float, bool, an Enum, another
dataclass, ``X | None``, ``list[X]``, ``dict[K, V]`` with string or Enum keys); field metadata
adds what a type cannot say (a range, a pattern) as a json_checks Check on the value (``checked``)
or on each item of a list or dict (``items``). ``problems_of`` lists every way a value read from JSON
breaks a declaration, one readable line each; ``build`` turns a sound value into the dataclasses,
Enum keys and values included. Torch-free.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar, get_args, get_origin, get_type_hints

from moleflow_edge.json_checks import Check, is_object, number, text

__all__ = ["build", "checked", "problems_of", "record"]

CHECK, ITEMS = "check", "items"  # field metadata keys: a Check on the value, a Check on each item


def checked(check: Check | None = None, *, items: Check | None = None, **kwargs: Any) -> Any:
    """A dataclass field whose value (``check``) or each of whose items (``items``) must also pass a
    Check; ``kwargs`` go to dataclasses.field (default, default_factory)."""
    return field(metadata={CHECK: check, ITEMS: items}, **kwargs)


if TYPE_CHECKING:
    from typing import dataclass_transform  # Python 3.11, the version mypy checks

    _T = TypeVar("_T")

    @dataclass_transform(field_specifiers=(field, checked))
    def record(cls: type[_T]) -> type[_T]:
        """dataclasses.dataclass, declared so that a type checker reads ``checked(...)`` as a field
        (without a default unless it passes one), not as a default value."""
else:
    record = dataclass


def _integer(v: object) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) else f"must be an integer, got {v!r}"


def _boolean(v: object) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


_SCALARS: dict[object, Check] = {str: text(), int: _integer, float: number(-math.inf), bool: _boolean, dict: is_object}


def _optional(hint: object) -> tuple[object, bool]:
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(get_args(hint))
    return hint, False


def _is_enum(hint: object) -> TypeGuard[type[Enum]]:
    return isinstance(hint, type) and issubclass(hint, Enum)


def problems_of(cls: type, value: object, where: str = "", extra: frozenset[str] = frozenset()) -> list[str]:
    """Every way ``value`` breaks dataclass ``cls``'s declaration ([] when it is sound); ``extra``: keys
    allowed beside the declared fields (a signature)."""
    if not isinstance(value, dict):
        return [f"{where or cls.__name__}: must be an object, got {value!r}"]
    prefix = f"{where}: " if where else ""
    declared = {f.name: f for f in fields(cls)}
    found = [f"{prefix}unknown field {k!r}" for k in value if k not in declared and k not in extra]
    required = [n for n, f in declared.items() if f.default is MISSING and f.default_factory is MISSING]
    found += [f"{prefix}{name} is missing" for name in required if name not in value]
    hints = get_type_hints(cls)
    for name, f in declared.items():
        if name in value:
            at = f"{where}.{name}" if where else name
            found += _value_problems(hints[name], value[name], at, f.metadata.get(CHECK), f.metadata.get(ITEMS))
    return found


def _value_problems(
    hint: object, value: object, where: str, check: Check | None = None, items: Check | None = None
) -> list[str]:
    hint, optional = _optional(hint)
    if value is None and optional:
        return []
    if check is not None:  # a field's own check says more than its type (a range): it replaces the type's
        return [f"{where}: {msg}"] if (msg := check(value)) else []
    if is_dataclass(hint):
        return problems_of(hint, value, where)  # type: ignore[arg-type]
    origin, args = get_origin(hint), get_args(hint)
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: must be an object, got {type(value).__name__}"]
        key, item = args
        found = []
        if _is_enum(key):
            known = sorted(m.value for m in key)
            what = key.__name__.lower()
            found += [f"{where}: unknown {what} {k!r} (known: {known})" for k in value if k not in known]
        return found + [p for k, v in value.items() for p in _value_problems(item, v, f"{where}.{k}", items)]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: must be a list, got {type(value).__name__}"]
        return [p for i, v in enumerate(value) for p in _value_problems(args[0], v, f"{where}[{_label(i, v)}]", items)]
    check = text(*(m.value for m in hint)) if _is_enum(hint) else _SCALARS[hint]
    return [f"{where}: {msg}"] if (msg := check(value)) else []


def _label(index: int, item: object) -> str:
    """How a list item is named in a problem: by its ``name`` where it has one (a task), else its index."""
    name = item.get("name") if isinstance(item, dict) else None
    return repr(name) if isinstance(name, str) else str(index)


def build(hint: Any, value: Any) -> Any:
    """``value`` (sound JSON: ``problems_of`` found nothing) as ``hint`` declares it: dataclasses, Enums."""
    hint, _ = _optional(hint)
    if value is None:
        return None
    if is_dataclass(hint):
        hints = get_type_hints(hint)
        given = {f.name: build(hints[f.name], value[f.name]) for f in fields(hint) if f.name in value}
        return hint(**given)  # type: ignore[operator]
    origin, args = get_origin(hint), get_args(hint)
    if origin is dict:
        return {build(args[0], k): build(args[1], v) for k, v in value.items()}
    if origin is list:
        return [build(args[0], v) for v in value]
    return hint(value) if _is_enum(hint) else value
