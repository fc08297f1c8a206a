"""Plain data → typed config trees and back, with errors that name the dotted field.

The type-directed core of :mod:`moelab.config` (``from_dict`` and ``_convert`` recurse into each
other; tagged unions pick their class by ``kind``)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

C = TypeVar("C")

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration error tied to a (dotted) field; outer levels prefix their own path."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}" if field else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error seen from the enclosing config (``prefix.field``)."""
        return ConfigError(_join(prefix, self.field), self.message)


def check(condition: bool, field: str, message: str) -> None:
    """Raise a :class:`ConfigError` on ``field`` unless ``condition`` holds (for validate hooks)."""
    if not condition:
        raise ConfigError(field, message)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


# ----------------------------------------------------------------------------- building from data


def from_dict(
    cls: type[C], data: Any, path: str = "", siblings: Mapping[str, type] | None = None
) -> C:
    """Build config dataclass ``cls`` from plain data, type-checking every field.

    ``path`` is the dotted name of ``data`` inside the enclosing config, used in error messages;
    ``siblings`` are the other members of a tagged union (by ``kind``), named in the message when
    a key belongs to one of them.
    """
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping of {cls.__name__} fields, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(path, _unknown_key(key, fields, cls, siblings))
    kwargs: dict[str, Any] = {}
    null_default = getattr(cls, "null_means_default", ())
    for name, f in fields.items():
        if name in null_default and data.get(name, 0) is None:
            continue
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "required field is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(path) from None
    except (ValueError, TypeError) as e:  # a plain error from a validate hook or a layer check
        raise ConfigError(path, str(e)) from None


def _unknown_key(
    key: Any,
    fields: Iterable[str],
    cls: type | None = None,
    siblings: Mapping[str, type] | None = None,
) -> str:
    names = sorted(fields)
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    kind = ""
    if siblings and cls is not None:
        own = _kind_of(cls)
        kind = f" for kind {own!r}"
        others = [k for k, c in siblings.items() if k != own and key in _init_fields(c)]
        if others:
            hint = f" (an option of kind {' / '.join(repr(k) for k in others)})"
    return f"unknown key {key!r}{kind}{hint}; allowed keys: {', '.join(names)}"


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _kind_of(cls: type) -> Any:
    return _init_fields(cls)["kind"].default


def _tagged_members(tp: Any) -> dict[Any, type]:
    """``{kind: class}`` when ``tp`` is a union of config dataclasses told apart by a ``kind``
    field with a default (a tagged union: ``DenseConfig | MoEConfig``); else empty."""
    if not _is_union(tp):
        return {}
    members = [m for m in typing.get_args(tp) if m is not type(None)]
    if len(members) < 2 or not all(dataclasses.is_dataclass(m) for m in members):
        return {}
    if not all("kind" in _init_fields(m) for m in members):
        return {}
    return {_kind_of(m): m for m in members}


def _tagged_member(members: Mapping[Any, type], data: Mapping[str, Any], path: str) -> type:
    """The member of a tagged union that ``data`` describes (no ``kind``: the first member)."""
    kind = data.get("kind", next(iter(members)))
    if kind not in members:
        choices = ", ".join(repr(k) for k in members)
        raise ConfigError(_join(path, "kind"), f"must be one of {choices}, got {kind!r}")
    return members[kind]


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def first_member(tp: Any, attempt: Callable[[Any], Any], path: str, shown: str) -> Any:
    """The result of ``attempt(member)`` for the first member of union ``tp`` (None left out) that
    does not raise a :class:`ConfigError`; else an error naming ``path`` (the member's own message
    when there is one member, ``expected A | B`` otherwise)."""
    errors = []
    for member in typing.get_args(tp):
        if member is type(None):
            continue
        try:
            return attempt(member)
        except ConfigError as e:
            errors.append(e.message)
    if len(errors) == 1:
        raise ConfigError(path, errors[0])
    raise ConfigError(path, f"expected {_type_name(tp)}, got {shown}")


def map_items(
    values: list[Any], tp: Any, path: str, convert: Callable[[Any, Any, str], Any], shown: str
) -> list[Any] | tuple[Any, ...]:
    """``convert(item, item_type, "path[i]")`` over the items of a ``list[X]``, ``tuple[X, ...]``
    or fixed ``tuple[X, Y]`` value (``shown``: how the value reads in a wrong-length error)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(values) != len(args):
            raise ConfigError(path, f"expected {len(args)} items, got {shown}")
        return tuple(
            convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(values, args, strict=True))
        )
    item = args[0] if args else Any
    out = [convert(v, item, f"{path}[{i}]") for i, v in enumerate(values)]
    return tuple(out) if origin is tuple else out


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` (converting where lossless) or raise naming ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(path, f"expected None, got {_show(value)}")
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        members = _tagged_members(tp)
        if members:
            if any(isinstance(value, m) for m in members.values()):
                return value
            if not isinstance(value, Mapping):
                raise ConfigError(path, f"expected a mapping with a 'kind', got {_show(value)}")
            return from_dict(_tagged_member(members, value, path), value, path, members)
        return first_member(tp, lambda member: _convert(value, member, path), path, _show(value))
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(path, f"must be one of {choices}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list ({_type_name(tp)}), got {_show(value)}")
        return map_items(list(value), tp, path, _convert, str(len(value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {_show(value)}")
        kt, vt = args if args else (Any, Any)
        return {
            _convert(k, kt, path): _convert(v, vt, _join(path, str(k))) for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {_show(value)}")


# ------------------------------------------------------------------------------- back to plain data


def to_dict(obj: Any) -> Any:
    """Plain dicts / lists / scalars (YAML- and JSON-safe) of a config tree."""
    if callable(getattr(obj, "dict_fields", None)):  # a Config
        return {name: to_dict(getattr(obj, name)) for name in obj.dict_fields()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _config_class(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``Sub`` or ``Sub | None``), if any (not a tagged union)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp) and not _tagged_members(tp):
        for member in typing.get_args(tp):
            if dataclasses.is_dataclass(member):
                return member
    return None
