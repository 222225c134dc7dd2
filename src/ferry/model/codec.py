"""JSON codec for the model's frozen dataclasses.

The store holds JSON; the rest of the code holds typed dataclasses. ``decode`` is the parsing
boundary: it checks types as it goes and raises InvalidSpec on anything it cannot map, so no
untyped dict escapes past it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from functools import cache
from typing import Any, TypeVar, cast

from ferry.model.errors import InvalidSpec

T = TypeVar("T")


def to_data(obj: object) -> Any:
    """Turn a dataclass (or enum, tuple, list, dict) into JSON-compatible data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_data(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_data(v) for k, v in obj.items()}
    return obj


def encode(obj: object) -> str:
    return json.dumps(to_data(obj), sort_keys=True, separators=(",", ":"))


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_data(tp: Any, data: Any, where: str = "value") -> Any:
    """Build a value of type ``tp`` from JSON data, checking as it goes."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_data(arg, data, where)
            except InvalidSpec as err:
                errors.append(str(err))
        raise InvalidSpec(f"{where}: {'; '.join(errors)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, list):
            raise InvalidSpec(f"{where}: expected a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_data(args[0], x, f"{where}[{i}]") for i, x in enumerate(data))
        if len(args) != len(data):
            raise InvalidSpec(f"{where}: expected {len(args)} items")
        pairs = enumerate(zip(args, data, strict=True))
        return tuple(from_data(a, x, f"{where}[{i}]") for i, (a, x) in pairs)
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if not isinstance(data, dict):
            raise InvalidSpec(f"{where}: expected an object")
        return {from_data(key_t, k, where): from_data(val_t, v, f"{where}.{k}")
                for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError as err:
            raise InvalidSpec(f"{where}: {data!r} is not a valid {tp.__name__}") from err
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_from(tp, data, where)
    if tp is float:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
        raise InvalidSpec(f"{where}: expected a number, got {data!r}")
    if tp in (int, str, bool):
        if type(data) is not tp:
            raise InvalidSpec(f"{where}: expected {tp.__name__}, got {data!r}")
        return data
    if tp is type(None):
        if data is not None:
            raise InvalidSpec(f"{where}: expected null")
        return None
    raise InvalidSpec(f"{where}: cannot decode type {tp!r}")


def _dataclass_from(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InvalidSpec(f"{where}: expected an object for {cls.__name__}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = from_data(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidSpec(f"{where}: missing field {f.name!r}")
    return cls(**kwargs)


def decode(cls: type[T], text: str | bytes) -> T:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidSpec(f"not valid JSON for {cls.__name__}: {err}") from err
    return cast(T, from_data(cls, data, cls.__name__))
