"""Records kept on disk (stored files' metadata, batches) read back into their dataclasses, every field checked
against its declared type: a hand-edited or damaged record is refused by name instead of serving a string where a
number belongs (which 500'd every later listing)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def from_record(cls: type[T], raw: object) -> T:
    """`cls(**raw)`; ValueError naming the first field missing, unknown or of another type than declared."""
    if not isinstance(raw, dict):
        raise ValueError(f"not a JSON object but {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name, value in raw.items():
        if name not in fields:
            raise ValueError(f"unknown field {name!r}")
        if not _matches(value, hints[name]):
            raise ValueError(f"field {name!r} is {value!r}, not {hints[name]}"[:200])
    missing = [
        name
        for name, field in fields.items()
        if name not in raw and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"field {missing[0]!r} is missing")
    return cls(**raw)


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if origin is list:
        return isinstance(value, list) and all(_matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    raise TypeError(f"records.from_record cannot check a field of type {hint}")
