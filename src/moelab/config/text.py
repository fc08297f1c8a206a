"""Command-line overrides: ``a.b.c=value`` text parsed by the type of the field it sets."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import yaml

from moelab.config.convert import (
    ConfigError,
    _config_class,
    _convert,
    _init_fields,
    _is_union,
    _join,
    _tagged_member,
    _tagged_members,
    _type_name,
    _unknown_key,
    first_member,
    map_items,
)

_NONE_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


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


def _parse_text(raw: str, tp: Any, path: str) -> Any:
    """Parse command-line text ``raw`` as a value of type ``tp`` (error names ``path``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    text = raw.strip()
    if tp is Any:
        try:
            return yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:  # an unclosed [ or {: say so, with the field
            raise ConfigError(
                path, f"could not parse {raw!r}: {yaml_problem(e, lines=False)}"
            ) from None
    if _is_union(tp):
        if text.lower() in _NONE_WORDS and type(None) in args:
            return None
        return first_member(tp, lambda member: _parse_text(raw, member, path), path, repr(raw))
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
        return map_items(items, tp, path, _parse_text, repr(raw))
    if origin is dict or dataclasses.is_dataclass(tp):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(
                path, f"could not parse {raw!r} as a mapping: {yaml_problem(e, lines=False)}"
            ) from None
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


def yaml_problem(err: yaml.YAMLError, lines: bool = True) -> str:
    """One line for a YAML parser's error (its own text spans several): the problem and where
    (``line L, column C``, 1-based; the column only for one-line override values)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return problem
    if not lines:
        return f"{problem} (column {mark.column + 1})"
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text
