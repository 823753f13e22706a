"""Typed dataclass configs from plain dicts (YAML), with errors that name the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value is wrong; `key` is its dotted path, e.g. `train.steps`."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"config error at '{key}': {problem}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(_join(prefix, unknown[0]), f"unknown key; allowed keys are: {', '.join(sorted(fields))}")
    values = {name: _coerce(hints[name], data[name], _join(prefix, name)) for name in data}
    return cls(**values)


def to_dict(config: Any) -> dict:
    """The plain-dict form of a dataclass config (what a YAML file would hold)."""
    return dataclasses.asdict(config)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override to a raw config dict; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(assignment, "overrides look like section.key=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parents[: i + 1]), "is a value, not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(e.problem)
        raise ConfigError(key, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"got {value!r}; allowed values are: {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    return _coerce_scalar(hint, value, key)


def _coerce_scalar(hint: type, value: Any, key: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `3e-4` as a string
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(key, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
