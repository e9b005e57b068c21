"""Typed, frozen, validated configuration dataclasses and their (de)serialisation.

Every config in bdmtool is a frozen dataclass deriving from :class:`Config`. ``from_dict`` rejects
unknown keys and wrong types with the dotted key name in the message, ``to_dict`` produces plain
JSON-able values, and ``with_overrides(["a.b=3"])`` applies command-line style overrides. This module
imports no torch so that the exporter and the CLI can read checkpoint specs cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and the fix."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from JSON or a CLI string) to the annotated type ``tp`` or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number):  # NaN/inf would train NaN weights and write invalid JSON
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: frozen dataclass with strict dict round-trip and a ``validate`` hook."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # Normalise lists to tuples so configs stay hashable and compare equal after a round-trip.
            if isinstance(value, list):
                object.__setattr__(self, f.name, _coerce(value, hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the key when a value is out of range. Subclasses override."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix or cls.__name__} must be a mapping, got {type(data).__name__}")
        hints = get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} key(s) {[prefix + k for k in unknown]}; valid keys: {sorted(names)}"
            )
        kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def missing_section_hint(cls, section: str) -> str:
        """How a user gets the optional ``section`` into a spec (``with_overrides``' error). Subclasses override."""
        return ""

    def with_overrides(self: C, overrides: typing.Iterable[str]) -> C:
        """Apply ``key.sub=value`` strings (the CLI's ``--set``); unknown keys are errors."""
        data = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
            key, raw = item.split("=", 1)
            node = data
            parts = key.strip().split(".")
            for p in parts[:-1]:
                if p in node and node[p] is None:  # an optional section this spec does not have
                    hint = self.missing_section_hint(p)
                    raise ConfigError(f"config key {key!r}: this spec has no {p!r} section" + (f"; {hint}" if hint else ""))
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"unknown config key {key!r}")
                node = node[p]
            if parts[-1] not in node:
                raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
            node[parts[-1]] = _parse_scalar(raw.strip())
        return type(self).from_dict(data)


def _parse_scalar(raw: str) -> Any:
    """Parse a CLI override value: JSON if it parses (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def check(cond: bool, message: str) -> None:
    """Raise ConfigError(message) when ``cond`` is false: the one-liner used by ``validate`` methods."""
    if not cond:
        raise ConfigError(message)
