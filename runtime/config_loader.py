"""Strict conversion of nested plain dicts (from YAML and ``key=value`` overrides) into typed dataclasses.

Every failure raises :class:`ConfigError` naming the dotted key, the offending value and what is allowed,
before any work starts. Supported field types: bool, int, float, str, ``Literal[...]``, ``Optional[T]``,
``list[T]``, ``tuple[T, ...]``, ``dict[str, T]`` and nested dataclasses.

Numeric fields declare their allowed values where they are defined, with :func:`bounded` (a :class:`Range` in the
field's metadata); :func:`from_dict` checks every given value against it right after coercion, before the
dataclass (and its cross-field ``__post_init__`` checks) is built. ``tests/test_config_ranges.py`` fails for a
numeric field without a declared range. YAML files are read with a loader that refuses duplicated keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key, value or file is invalid; the message says which and what is allowed."""


RANGE_KEY = "range"


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (of each element for a list/tuple field; ``None`` always passes, the type
    decides whether it is allowed). ``ge``/``gt``/``le``/``lt`` bound an interval; ``also`` lists values allowed
    outside it (e.g. ``0`` = automatic); ``choices`` replaces the interval by a fixed set. Floats must be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()
    choices: tuple | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo = f">= {self.ge!r}" if self.ge is not None else f"> {self.gt!r}" if self.gt is not None else ""
        hi = f"<= {self.le!r}" if self.le is not None else f"< {self.lt!r}" if self.lt is not None else ""
        if lo and hi:
            left, bottom = ("[", self.ge) if self.ge is not None else ("(", self.gt)
            close, top = ("]", self.le) if self.le is not None else (")", self.lt)
            text = f"in {left}{bottom!r}, {top!r}{close}"
        else:
            text = lo or hi or "a finite number"
        return " or ".join([*(f"{a!r}" for a in self.also), text])

    def allows(self, v: Any) -> bool:
        if self.choices is not None:
            return v in self.choices
        if v in self.also:
            return True
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def check(self, key: str, value: Any) -> None:
        """Raise ConfigError naming ``key`` unless ``value`` (or each of its items) is allowed."""
        if value is None:
            return
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self.check(f"{key}[{i}]", v)
            return
        if not self.allows(value):
            finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
            raise ConfigError(f"{key}: must be {finite}{self.describe()}, got {value!r}")


def bounded(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **limits: Any) -> Any:
    """``dataclasses.field`` with a declared :class:`Range` (keywords ``ge gt le lt also choices``), e.g.
    ``batch_size: int = bounded(64, ge=1)``."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={RANGE_KEY: Range(**limits)})


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get(RANGE_KEY)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: invalid value {value!r}; allowed values: {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, value, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        return _coerce_sequence(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = get_args(tp)[1] if get_args(tp) else Any
        return {str(k): coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(tp, value, key)


def _coerce_union(tp: Any, value: Any, key: str) -> Any:
    """``Optional[T]`` / ``A | B``: None where allowed, else the first member type that accepts ``value``."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if value is None and len(args) < len(get_args(tp)):
        return None
    errors = []
    for a in args:
        try:
            return coerce(a, value, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {get_args(tp)}")


def _coerce_sequence(tp: Any, value: Any, key: str) -> list | tuple:
    """``list[T]``, ``tuple[T, ...]`` and fixed-length ``tuple[A, B]``; items are named ``key[i]`` in errors."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)} ({value!r})")
        return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    out = [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    """bool, int, float and str (and ``Any``, which passes ``value`` through); no silent truthiness or rounding."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-5' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        moved = getattr(cls, "moved_keys", {})  # optional ClassVar: old key -> the dotted key that replaces it
        for key in unknown:
            if key in moved:
                raise ConfigError(f"config key {where}{key} has moved: set {moved[key]} instead")
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!r}; "
            f"known keys in {prefix or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = coerce(hints[name], value, key)
        rng = field_range(fields[name])
        if rng is not None:
            rng.check(key, kwargs[name])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict/list tree (YAML- and JSON-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; ``over`` wins. Lists are replaced, not merged."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (plain YAML lets the last one win silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicated key {key!r} on line {line} (first on line {seen[key]}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that raises ``yaml.YAMLError`` for a duplicated mapping key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str) -> dict:
    """Read a YAML config file; ConfigError (naming the file) unless it is a readable text file holding a mapping
    without duplicated keys."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; pass a YAML file (e.g. configs/exp/dino_demo.yaml)")
    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load_unique(f.read()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (not valid UTF-8); pass a YAML file") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"config file {path}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> dict:
    """``a.b.c=value`` -> ``{'a': {'b': {'c': parsed}}}``; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must have the form key=value (e.g. optim.lr=0.05)")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = safe_load_unique(raw) if raw != "" else ""
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"override {item!r}: {e.problem}") from None
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out
