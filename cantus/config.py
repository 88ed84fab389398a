"""Typed loading of ``params.yaml`` sections into frozen dataclasses.

Each stage declares its hyperparameters as a frozen dataclass. ``load_section``
reads one top-level section of a params file and builds that dataclass,
recursing into nested dataclass fields. An unknown key, a missing key or a
value of the wrong type raises ``ConfigError`` naming the full dotted key, so a
typo fails at start-up instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """Invalid configuration: the message names the offending key."""


def read_params(path: str | Path) -> dict[str, Any]:
    """Read a params YAML file into a dict (raises ConfigError if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file not found: {p}")
    with p.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return data


def load_section(path: str | Path, section: str, cls: type[T]) -> T:
    """Build ``cls`` from section ``section`` of the params file ``path``."""
    data = read_params(path)
    if section not in data:
        raise ConfigError(f"{path}: missing section '{section}'")
    return from_dict(cls, data[section], prefix=section)


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{_join(prefix, unknown[0])}'"
            f" (known keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            has_default = (f.default is not dataclasses.MISSING
                           or f.default_factory is not dataclasses.MISSING)
            if has_default:
                continue
            raise ConfigError(f"missing key '{key}'")
        kwargs[name] = _coerce(hints[name], data[name], key)
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"'{key}': bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"'{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return types.MappingProxyType(dict(value))
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config dataclass (tuples as lists)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, types.MappingProxyType | dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def config_hash(cfg: Any, length: int = 16) -> str:
    """Stable short hash of a config dataclass, for cache keys."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
