"""Configs as YAML: reading, overrides, type and range checks, writing.

``load_config(path, overrides)`` reads a file, applies ``"section.key=value"``
overrides (values parsed as YAML: ``true``, ``4``, ``1e-3``, ``null``) and returns
a checked, frozen :class:`Config`. Types are checked from the sections'
annotations and ranges from their fields (``core.checks.ranged``); then each
section's own rules and the rules between sections (``Config.check``). Every
problem raises :class:`ConfigError` with one sentence that names the full key
path and what would be right. No jax here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from lite_tp_jax.core.checks import range_of
from lite_tp_jax.run.config import SECTIONS, Config, ConfigError
from lite_tp_jax.runtime.run_dir import atomic_write

_PAIRS = tuple[tuple[str, str], ...]
_SOURCES = tuple[tuple[str, float], ...]  # data.sources: a list of {path, weight} in YAML


def _show(value: Any) -> str:
    """A value as the user would write it in YAML (strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for ``T | None``; (hint, False) otherwise."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(hint)):
            return args[0], True
    return hint, False


def _expected(key: str, hint: Any, bounds) -> str:
    base, optional = _strip_optional(hint)
    if base is bool:
        text = "true or false"
    elif base is int:
        text = "an integer" + bounds.describe()
    elif base is float:
        text = "a number" + bounds.describe()
    elif base is str:
        text = "a string"
    elif get_origin(base) is Literal:
        text = "one of " + ", ".join(_show(a) if isinstance(a, bool) else str(a) for a in get_args(base))
    elif base == _PAIRS:
        text = "a mapping of strings to strings"
    elif base == _SOURCES:
        text = "a list of {path: <corpus directory>, weight: <number>} mappings"
    else:  # pragma: no cover - a programming error, not a user error
        raise TypeError(f"no check for the annotation {hint!r} of {key!r}")
    return text + (" or null" if optional else "")


def _check_value(key: str, value: Any, hint: Any, bounds) -> Any:
    """Returns ``value`` (floats normalised to float) or raises ConfigError."""
    base, optional = _strip_optional(hint)
    if value is None:
        ok = optional
    elif base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and bounds.contains(value)
    elif base is float:
        number: float | None = None
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        ok = number is not None and math.isfinite(number) and bounds.contains(number)
        if ok or (number is not None and isinstance(value, str)):
            value = number  # also in the message: "got -0.001", not "got '-1e-3'"
    elif base is str:
        ok = isinstance(value, str)
    elif get_origin(base) is Literal:
        ok = any(type(value) is type(a) and value == a for a in get_args(base))
    elif base == _PAIRS:  # a YAML mapping, kept as (key, value) pairs in order (hashable)
        pairs = value.items() if isinstance(value, Mapping) else value
        try:
            value = tuple((k, v) for k, v in pairs)
            ok = all(isinstance(k, str) and isinstance(v, str) for k, v in value)
        except (TypeError, ValueError):
            ok = False
    elif base == _SOURCES:
        value, ok = _sources(value)
    else:  # pragma: no cover
        raise TypeError(f"no check for the annotation {hint!r} of {key!r}")
    if not ok:
        raise ConfigError(f"{key!r} must be {_expected(key, hint, bounds)}, got {_show(value)}")
    return value


def _sources(value: Any) -> tuple[Any, bool]:
    """A YAML list of ``{path, weight}`` mappings as ``((path, weight), ...)`` (hashable)."""
    if isinstance(value, (list, tuple)) and all(
        isinstance(item, Mapping) and set(item) == {"path", "weight"} and isinstance(item["path"], str)
        and isinstance(item["weight"], (int, float)) and not isinstance(item["weight"], bool)
        and math.isfinite(item["weight"])
        for item in value
    ):
        return tuple((item["path"], float(item["weight"])) for item in value), True
    return value, False


def _unknown_section(name: Any) -> ConfigError:
    return ConfigError(f"unknown section {name!r}; allowed: {', '.join(SECTIONS)}")


def _not_a_mapping(name: str, value: Any) -> ConfigError:
    return ConfigError(f"section {name!r} must be a mapping of keys to values, got {_show(value)}")


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:  # "model:" with nothing under it
        raw = {}
    if not isinstance(raw, Mapping):
        raise _not_a_mapping(name, raw)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key {f'{name}.{key}'!r}; allowed keys in {name!r}: {', '.join(fields)}"
            )
        kwargs[key] = _check_value(f"{name}.{key}", value, hints[key], range_of(fields[key]))
    return cls(**kwargs)


# --------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------


def _apply_overrides(raw: dict, overrides: Sequence[str]) -> None:
    for item in overrides:
        shape = (
            f"override {item!r} must look like KEY=VALUE with KEY as section.key, "
            f"e.g. 'train.steps=200'"
        )
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(shape)
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(shape)
        section, name = parts
        if section not in SECTIONS:
            raise _unknown_section(section)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r} has a value that is not valid YAML") from None
        # A string field takes the text as written: data.path=2024 is the
        # directory "2024", not the integer.
        hint = get_type_hints(SECTIONS[section]).get(name)
        takes_str = hint is not None and _strip_optional(hint)[0] is str
        if takes_str and value is not None and not isinstance(value, str):
            value = text.strip()
        current = raw.get(section)
        if current is None:
            current = {}
        elif not isinstance(current, Mapping):
            raise _not_a_mapping(section, current)
        raw[section] = {**current, name: value}


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def parse_config(mapping: Mapping | None, overrides: Sequence[str] = ()) -> Config:
    """Builds a checked Config from a mapping of sections (e.g. parsed YAML).

    ``overrides`` are ``"section.key=value"`` strings applied on top; ``None``
    (an empty YAML document) means all defaults.
    """
    if isinstance(overrides, str):
        overrides = (overrides,)
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(
            f"a config must be a mapping of sections ({', '.join(SECTIONS)}), got {_show(mapping)}"
        )
    raw = dict(mapping)
    _apply_overrides(raw, overrides)
    for name in raw:
        if name not in SECTIONS:
            raise _unknown_section(name)
    config = Config(**{name: _build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()})
    config.check()
    return config


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config file, applies ``overrides``, and checks everything."""
    path = Path(path)
    where = repr(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {where} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {where} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {where} is not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"config file {where} cannot be read ({error.strerror})") from None
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "a syntax error"
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {where} is not valid YAML: {problem}{at}") from None
    if mapping is None:
        raise ConfigError(f"config file {where} is empty; give at least one section ({', '.join(SECTIONS)}), "
                          f"e.g. start from configs/tiny.yaml")
    if not isinstance(mapping, dict):
        raise ConfigError(
            f"config file {where} must hold a YAML mapping of sections "
            f"({', '.join(SECTIONS)}), got a {type(mapping).__name__}"
        )
    return parse_config(mapping, overrides)


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dicts (section -> key -> value), in field order; pairs as mappings."""
    sections = dataclasses.asdict(config)
    for section, cls in SECTIONS.items():
        for name, hint in get_type_hints(cls).items():
            if hint == _PAIRS:
                sections[section][name] = dict(sections[section][name])
            elif hint == _SOURCES:
                sections[section][name] = [{"path": p, "weight": w} for p, w in sections[section][name]]
    return sections


def dump_config(config: Config, path: str | os.PathLike) -> None:
    """Writes ``config`` as YAML that ``load_config`` reads back equal.

    The write is atomic (``runtime.run_dir.atomic_write``); missing parent
    directories are created.
    """
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
    atomic_write(path, text)
