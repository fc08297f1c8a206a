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
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from moelab.config.convert import (
    ConfigError,
    _config_class,
    _convert,
    _show,
    _tagged_members,
    check,
    from_dict,
    to_dict,
)
from moelab.config.text import apply_overrides, parse_override, yaml_problem

__all__ = [
    "Config",
    "ConfigError",
    "apply_overrides",
    "check",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "to_dict",
    "yaml_problem",
]

C = TypeVar("C")


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
        data = read_yaml(source)
        if data is None:  # a run's config.yaml emptied by a crash must not load as the defaults
            raise ConfigError("", f"{source}: the file is empty (no configuration in it)")
        if not isinstance(data, Mapping):
            raise ConfigError(
                "", f"{source}: expected a YAML mapping at top level, got {_show(data)}"
            )
    else:
        data = source or {}
    data = apply_overrides(cls, data, overrides)
    return from_dict(cls, data)


def read_yaml(path: str | Path) -> Any:
    """The data of a YAML file (None for an empty one); ConfigError with the file, line and column
    for text that is not YAML or not UTF-8, and for a file that cannot be read."""
    try:
        text = Path(path).read_text("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            "", f"{path}: not UTF-8 text (byte {err.start}); is it a YAML file?"
        ) from None
    except OSError as err:
        raise ConfigError("", f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path}: not valid YAML ({yaml_problem(err)})") from None


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (``{"model.ffn.top_k": 1, ...}``): the names overrides
    use, for comparing two configs key by key."""
    if not isinstance(data, Mapping):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
