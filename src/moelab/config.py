"""Typed configuration: nested keyword-only dataclasses built from dicts / YAML / the command line.

Every moelab config (model, training, data) is a tree of ``@dataclass(kw_only=True)`` classes that
inherit :class:`Config`. This module turns plain data into such a tree and back, and makes every
mistake a :class:`ValueError` that names the dotted field and what would have been allowed::

    model.ffn: unknown key 'topk' (did you mean 'top_k'?); allowed keys: activation, d_hidden, ...
    model.ffn.kind: must be one of 'dense', 'moe', 'peer', 'pkm', got 'mo'
    model.n_heads: expected int, got str '8x'
    model.ffn.top_k: must be <= num_experts * granularity (8), got 9      (a validate() hook)

Supported field types: ``int``, ``float`` (ints are widened), ``bool``, ``str``, ``Literal[...]``,
``X | None``, unions (tried in order), ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` and
nested :class:`Config` dataclasses.

Command-line overrides are dotted ``key=value`` strings (``model.ffn.top_k=2``); the value is parsed
from the field's declared type (``none``/``null`` for None, ``true``/``false`` for bools,
``[1,2]`` or ``1,2`` for lists), so ``1e6`` is a float for a float field and text for a str one.
Overrides are applied to the *raw dict* before the dataclasses are built, so values a config derives
from others (``None`` = "auto" fields) follow the overridden ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "apply_overrides",
    "check",
    "dump_yaml",
    "from_dict",
    "load_config",
    "parse_override",
    "to_dict",
]

C = TypeVar("C")

_NONE_WORDS = ("none", "null", "~")
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


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


@dataclasses.dataclass(kw_only=True)
class Config:
    """Base of every typed config: validation on construction, dict / YAML round trips.

    Subclasses are ``@dataclasses.dataclass(kw_only=True)`` and override :meth:`validate` for
    range and cross-field checks (use :func:`check`, which names the field). ``validate`` runs on
    every construction, also from Python, so a config object in hand is always a valid one.
    """

    def __post_init__(self) -> None:
        # Nested sections may be given as plain dicts also from Python: ModelConfig(ffn={...}).
        hints = None
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                hints = hints or typing.get_type_hints(type(self))
                tp = hints[f.name]
                if _config_class(tp) is not None or _tagged_members(tp):
                    setattr(self, f.name, _convert(value, tp, f.name))
        self.validate()

    # Fields for which an explicit null (written by older versions) means "the default".
    null_means_default: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        """Range and cross-field checks; raise :class:`ConfigError` (via :func:`check`)."""

    def dict_fields(self) -> list[str]:
        """Fields written by :func:`to_dict` (all by default; a config may omit unused options)."""
        return [f.name for f in dataclasses.fields(self)]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None, overrides: Iterable[str] = ()) -> C:
        return load_config(cls, data or {}, overrides)

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, overrides: Iterable[str] = ()) -> C:
        return load_config(cls, Path(path), overrides)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        return dump_yaml(self, path)

    def with_overrides(self: C, overrides: Iterable[str]) -> C:
        """A new config with dotted overrides applied (to this config's dict form)."""
        return load_config(type(self), to_dict(self), overrides)


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
        errors = []
        for member in args:
            if member is type(None):
                continue
            try:
                return _convert(value, member, path)
            except ConfigError as e:
                errors.append(e.message)
        if len(errors) == 1:
            raise ConfigError(path, errors[0])
        raise ConfigError(path, f"expected {_type_name(tp)}, got {_show(value)}")
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
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
            return tuple(
                _convert(v, a, f"{path}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        out = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
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
    if isinstance(obj, Config):
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


def dump_yaml(obj: Any, path: str | Path | None = None) -> str:
    """YAML text of a config (in field order), also written to ``path`` when given."""
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def load_config(
    cls: type[C], source: Mapping[str, Any] | str | Path | None, overrides: Iterable[str] = ()
) -> C:
    """Build ``cls`` from a dict or a YAML file, after applying dotted ``overrides`` to the data."""
    if isinstance(source, str | Path):
        text = Path(source).read_text()
        data = yaml.safe_load(text)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                "", f"{source}: expected a YAML mapping at top level, got {_show(data)}"
            )
    else:
        data = source or {}
    data = apply_overrides(cls, data, overrides)
    return from_dict(cls, data)


# --------------------------------------------------------------------------- command-line overrides


def parse_override(text: str) -> tuple[str, str]:
    """``"a.b.c=value"`` -> ``("a.b.c", "value")``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("", f"override must look like 'a.b.c=value', got {text!r}")
    return key, value.strip()


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` set, the value parsed from the field's type.

    Unknown keys are reported at the level where they occur, with that level's allowed keys. In a
    tagged union (``model.ffn``) the section's current ``kind`` decides the allowed keys; setting
    ``kind`` to another value drops the keys the new kind does not have (``model.ffn.kind=peer``
    on a MoE preset keeps ``num_experts`` and ``top_k``, forgets ``router``). A ``dict`` field takes
    one more level: ``model.ffn.router_options.p=0.4``.
    """
    out = _deep_copy(data)
    for text in overrides:
        key, raw = parse_override(text)
        parts = key.split(".")
        node, node_cls, path = out, cls, ""
        members: Mapping[Any, type] = {}  # set while node is a tagged-union section
        for i, part in enumerate(parts):
            fields = _init_fields(node_cls)
            if part not in fields:
                raise ConfigError(path, _unknown_key(part, fields, node_cls, members))
            tp = typing.get_type_hints(node_cls)[part]
            path = _join(path, part)
            last = i == len(parts) - 1
            if last and part == "kind" and members:
                kind = _parse_text(raw, Literal[tuple(members)], path)
                keep = _init_fields(members[kind])
                for name in [k for k in node if k not in keep]:
                    del node[name]
                node[part] = kind
                break
            if last:
                node[part] = _parse_text(raw, tp, path)
                break
            if typing.get_origin(tp) is dict and i == len(parts) - 2:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                value_tp = (typing.get_args(tp) or (str, Any))[1]
                child[parts[-1]] = _parse_text(raw, value_tp, _join(path, parts[-1]))
                break
            tagged = _tagged_members(tp)
            sub_cls = _config_class(tp) if not tagged else None
            if sub_cls is None and not tagged:
                raise ConfigError(path, f"is a {_type_name(tp)}, it has no field {parts[i + 1]!r}")
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}  # a section left at its default (or None): start from its defaults
                node[part] = child
            if tagged:
                sub_cls, members = _tagged_member(tagged, child, path), tagged
            else:
                members = {}
            node, node_cls = child, sub_cls
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_deep_copy(v) for v in data]
    return data


def _config_class(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``Sub`` or ``Sub | None``), if any (not a tagged union)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp) and not _tagged_members(tp):
        for member in typing.get_args(tp):
            if dataclasses.is_dataclass(member):
                return member
    return None


def _parse_text(raw: str, tp: Any, path: str) -> Any:
    """Parse command-line text ``raw`` as a value of type ``tp`` (error names ``path``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    text = raw.strip()
    if tp is Any:
        return yaml.safe_load(text) if text else ""
    if _is_union(tp):
        if text.lower() in _NONE_WORDS and type(None) in args:
            return None
        errors = []
        for member in args:
            if member is type(None):
                continue
            try:
                return _parse_text(raw, member, path)
            except ConfigError as e:
                errors.append(e.message)
        if len(errors) == 1:
            raise ConfigError(path, errors[0])
        raise ConfigError(path, f"expected {_type_name(tp)}, got {raw!r}")
    if tp is type(None):
        if text.lower() in _NONE_WORDS:
            return None
        raise ConfigError(path, f"expected none, got {raw!r}")
    if origin is Literal:
        for choice in args:
            if str(choice) == _unquote(text):
                return choice
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(path, f"must be one of {choices}, got {raw!r}")
    if origin in (list, tuple):
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        items = [s.strip() for s in inner.split(",")] if inner.strip() else []
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ConfigError(path, f"expected {len(args)} items, got {raw!r}")
            return tuple(
                _parse_text(s, a, f"{path}[{i}]")
                for i, (s, a) in enumerate(zip(items, args, strict=True))
            )
        item = args[0] if args else Any
        return [_parse_text(s, item, f"{path}[{i}]") for i, s in enumerate(items)]
    if origin is dict or dataclasses.is_dataclass(tp):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(path, f"could not parse {raw!r} as a mapping: {e}") from None
        return _convert(value, tp, path) if origin is dict else value
    if tp is bool:
        low = text.lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
        raise ConfigError(path, f"expected a bool (true/false), got {raw!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:  # allow 1e6 and 1_000_000.0 when they are whole numbers
            as_float = float(text)
        except ValueError:
            as_float = None
        if as_float is not None and as_float.is_integer():
            return int(as_float)
        raise ConfigError(path, f"expected int, got {raw!r}")
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(path, f"expected float, got {raw!r}") from None
    if tp is str:
        return _unquote(text)
    raise ConfigError(path, f"cannot parse a {_type_name(tp)} from the command line")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text
