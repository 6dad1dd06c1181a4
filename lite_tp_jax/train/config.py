"""Typed training configs, loaded from YAML and checked field by field.

A config file has up to six sections; any missing section or key takes its
default::

    model:        # lite_tp_jax.models.config.ModelConfig
      hidden_size: 64
    mesh:         # sizes of the (data, pipeline, expert, tensor) axes (one may be -1); spares
      tensor: 8
    train:        # optimisation: steps, batch, learning-rate schedule, AdamW
      steps: 60
    data:         # source: stdlib | text | tokens (the last two need path)
      source: stdlib
    checkpoint:   # save every N steps, keep the newest K
      every: 20
    fault:        # inject a device failure (CPU testing of mesh.spares)
      fail_device: 1
      fail_step: 2

``load_config(path, overrides)`` reads a file, applies ``"section.key=value"``
overrides (values parsed as YAML: ``true``, ``4``, ``1e-3``, ``null``) and returns
a frozen :class:`Config`. Every problem raises :class:`ConfigError` with one
sentence that names the full key path and what would be right. Types are checked
from the dataclass annotations; value ranges and a few cheap cross-field rules
are listed in this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.plan.rules import PartitionRules

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FaultConfig",
    "MeshConfig",
    "ModelConfig",
    "SECTIONS",
    "TrainConfig",
    "config_to_dict",
    "dump_config",
    "key_path",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """A config problem, described in one sentence that names the key path."""


@dataclass(frozen=True)
class MeshConfig:
    """Axis sizes of the device mesh; at most one may be -1 (inferred).

    ``spares`` devices are kept out of the mesh; one takes a failed device's
    place (``lite_tp_jax/fault/spare.py``).
    """

    data: int = 1
    pipeline: int = 1
    expert: int = 1
    tensor: int = 1
    spares: int = 0


NonFinitePolicy = Literal["stop", "skip"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with linear warmup then cosine decay to lr * min_lr_ratio."""

    steps: int = 100
    seed: int = 0
    global_batch: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    microbatches: int = 1  # pipeline microbatches per step (per data-parallel replica)
    # Gradient accumulation: each rank's rows run as grad_accum micro-steps (a
    # scan), their gradients averaged into one update; each micro-step is split
    # into `microbatches` again under pipeline parallelism.
    grad_accum: int = 1
    # ZeRO-1 over "data": parameters and AdamW moments stored split over the
    # data-parallel ranks (gathered on use, gradients reduce-scattered).
    shard_optimizer: bool = False
    deterministic: bool = False  # reductions in fixed rank order: same bits on any process layout
    on_nonfinite: NonFinitePolicy = "stop"  # a NaN/inf loss or gradient norm: stop (exit 1) or skip the update


DataSource = Literal["stdlib", "text", "tokens"]


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from (see ``lite_tp_jax.train.data``).

    ``stdlib``: Python's own standard-library sources as bytes (no download).
    ``text``: ``path`` is a file, a directory (*.txt, *.md, *.py, recursively)
    or a glob; byte-level tokens. ``tokens``: ``path`` is a 1-D integer .npy.
    """

    source: DataSource = "stdlib"
    path: str | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    """Save every ``every`` steps; keep the newest ``keep`` checkpoints."""

    every: int = 50
    keep: int = 2


@dataclass(frozen=True)
class FaultConfig:
    """An injected failure of device ``fail_device`` (a device id in the mesh)
    when step ``fail_step`` starts, in the first run on a run directory only
    (a restart does not fail again); a fake CPU device cannot fail by itself."""

    fail_device: int | None = None
    fail_step: int | None = None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


#: section name -> its dataclass, in file order.
SECTIONS: dict[str, type] = dict(get_type_hints(Config))


# --------------------------------------------------------------------------
# Value ranges (types come from the annotations)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo < value rather than lo <= value
    hi_open: bool = False
    also: tuple[Any, ...] = ()  # values accepted outside the range (mesh: -1)

    def contains(self, value: float) -> bool:
        if value in self.also:
            return True
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None and not (self.lo_open or self.hi_open):
            text = f" between {self.lo:g} and {self.hi:g}"
        else:
            parts = []
            if self.lo is not None:
                parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
            if self.hi is not None:
                parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
            text = (" " + " and ".join(parts)) if parts else ""
        if self.also:
            text += " (or " + ", ".join(_show(v) for v in self.also) + ")"
        return text


_POSITIVE = _Range(1)
_NON_NEGATIVE = _Range(0)
_ABOVE_ZERO = _Range(0, lo_open=True)
_FRACTION = _Range(0, 1)

_RANGES: dict[str, _Range] = {
    "model.vocab_size": _POSITIVE,
    "model.hidden_size": _POSITIVE,
    "model.num_layers": _POSITIVE,
    "model.num_heads": _POSITIVE,
    "model.num_kv_heads": _POSITIVE,
    "model.head_dim": _POSITIVE,
    "model.ffn_hidden_size": _POSITIVE,
    "model.rope_theta": _ABOVE_ZERO,
    "model.norm_eps": _ABOVE_ZERO,
    "model.moe_every": _NON_NEGATIVE,
    "model.num_experts": _POSITIVE,
    "model.top_k": _Range(1, 2),
    "model.capacity_factor": _ABOVE_ZERO,
    "model.aux_loss_weight": _NON_NEGATIVE,
    "model.virtual_stages": _POSITIVE,
    "model.max_positions": _POSITIVE,
    "model.rope_scaling_factor": _ABOVE_ZERO,
    "model.rope_low_freq_factor": _ABOVE_ZERO,
    "model.rope_high_freq_factor": _ABOVE_ZERO,
    "model.rope_original_max_positions": _POSITIVE,
    **{f"mesh.{f.name}": _Range(1, also=(-1,)) for f in dataclasses.fields(MeshConfig)},
    "mesh.spares": _NON_NEGATIVE,
    "train.steps": _POSITIVE,
    "train.seed": _NON_NEGATIVE,  # numpy's seed sequences reject negative seeds
    "train.global_batch": _POSITIVE,
    "train.seq_len": _POSITIVE,
    "train.lr": _NON_NEGATIVE,
    "train.min_lr_ratio": _FRACTION,
    "train.warmup_steps": _NON_NEGATIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.b1": _Range(0, 1, hi_open=True),
    "train.b2": _Range(0, 1, hi_open=True),
    "train.grad_clip": _ABOVE_ZERO,
    "train.microbatches": _POSITIVE,
    "train.grad_accum": _POSITIVE,
    "checkpoint.every": _POSITIVE,
    "checkpoint.keep": _POSITIVE,
    "fault.fail_device": _NON_NEGATIVE,
    "fault.fail_step": _POSITIVE,
}


_PAIRS = tuple[tuple[str, str], ...]


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


def _expected(key: str, hint: Any) -> str:
    base, optional = _strip_optional(hint)
    bounds = _RANGES.get(key, _Range())
    if base is bool:
        text = "true or false"
    elif base is int:
        text = "an integer" + bounds.describe()
    elif base is float:
        text = "a number" + bounds.describe()
    elif base is str:
        text = "a string"
    elif get_origin(base) is Literal:
        text = "one of " + ", ".join(str(a) for a in get_args(base))
    elif base == _PAIRS:
        text = "a mapping of strings to strings"
    else:  # pragma: no cover - a programming error, not a user error
        raise TypeError(f"no check for the annotation {hint!r} of {key!r}")
    return text + (" or null" if optional else "")


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Returns ``value`` (floats normalised to float) or raises ConfigError."""
    base, optional = _strip_optional(hint)
    bounds = _RANGES.get(key, _Range())
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
    else:  # pragma: no cover
        raise TypeError(f"no check for the annotation {hint!r} of {key!r}")
    if not ok:
        raise ConfigError(f"{key!r} must be {_expected(key, hint)}, got {_show(value)}")
    return value


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
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in allowed:
            raise ConfigError(
                f"unknown key {f'{name}.{key}'!r}; allowed keys in {name!r}: {', '.join(allowed)}"
            )
        kwargs[key] = _check_value(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _check_cross_field(config: Config) -> None:
    model, mesh, data = config.model, config.mesh, config.data
    if model.num_heads % model.num_kv_heads:
        raise ConfigError(
            f"'model.num_heads' ({model.num_heads}) must be a multiple of "
            f"'model.num_kv_heads' ({model.num_kv_heads})"
        )
    if model.head_dim is None and model.hidden_size % model.num_heads:
        raise ConfigError(
            f"'model.hidden_size' ({model.hidden_size}) must be a multiple of 'model.num_heads' "
            f"({model.num_heads}) while 'model.head_dim' is null; set model.head_dim or change the sizes"
        )
    if model.moe_every and model.num_layers % model.moe_every:
        raise ConfigError(
            f"'model.num_layers' ({model.num_layers}) must be a multiple of 'model.moe_every' "
            f"({model.moe_every}): every moe_every-th layer is an MoE layer"
        )
    if model.moe_every and model.activation != "swiglu":
        raise ConfigError(
            f"'model.activation' must be 'swiglu' with experts ('model.moe_every' > 0): "
            f"experts are SwiGLU MLPs, got {model.activation!r}"
        )
    if model.position == "learned" and config.train.seq_len > model.max_positions:
        raise ConfigError(
            f"'train.seq_len' ({config.train.seq_len}) exceeds 'model.max_positions' "
            f"({model.max_positions}), the size of the learned position table"
        )
    try:
        PartitionRules(dict(model.partition_rules))
    except ValueError as error:
        raise ConfigError(f"'model.partition_rules': {error}") from None
    inferred = [f"'mesh.{f.name}'" for f in dataclasses.fields(mesh) if getattr(mesh, f.name) == -1]
    if len(inferred) > 1:
        raise ConfigError(
            f"at most one mesh axis may be -1 (inferred from the device count), "
            f"got -1 for {' and '.join(inferred)}"
        )
    fault = config.fault
    if (fault.fail_device is None) != (fault.fail_step is None):
        given, missing = ("fail_device", "fail_step") if fault.fail_step is None else ("fail_step", "fail_device")
        raise ConfigError(f"'fault.{given}' is set but 'fault.{missing}' is not; an injected failure needs both")
    if fault.fail_step is not None and fault.fail_step > config.train.steps:
        raise ConfigError(
            f"'fault.fail_step' ({fault.fail_step}) is past 'train.steps' ({config.train.steps}), "
            f"so the failure would never happen; choose a step from 1 to {config.train.steps}"
        )
    if data.source in ("text", "tokens") and data.path is None:
        what = "a file, a directory or a glob" if data.source == "text" else "a .npy file of token ids"
        raise ConfigError(f"'data.path' is required when 'data.source' is {data.source!r} ({what})")
    if data.source == "tokens" and not data.path.endswith(".npy"):
        raise ConfigError(
            f"'data.path' must name a .npy file when 'data.source' is 'tokens', got {data.path!r}"
        )
    if data.source == "stdlib" and data.path is not None:
        raise ConfigError(
            f"'data.path' is {data.path!r} but 'data.source' is 'stdlib', which ignores it; "
            f"set data.source=text (or tokens), or data.path=null"
        )


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
    _check_cross_field(config)
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
    if mapping is not None and not isinstance(mapping, dict):
        raise ConfigError(
            f"config file {where} must hold a YAML mapping of sections "
            f"({', '.join(SECTIONS)}), got a {type(mapping).__name__}"
        )
    return parse_config(mapping, overrides)


def key_path(field_name: str) -> str:
    """``'section.field'`` of the first section with a field ``field_name`` (for
    messages of checks that name quantities by field, ``validate.FitError``)."""
    for section, cls in SECTIONS.items():
        if field_name in {f.name for f in dataclasses.fields(cls)}:
            return f"'{section}.{field_name}'"
    return field_name


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dicts (section -> key -> value), in field order; pairs as mappings."""
    sections = dataclasses.asdict(config)
    for section, cls in SECTIONS.items():
        for name, hint in get_type_hints(cls).items():
            if hint == _PAIRS:
                sections[section][name] = dict(sections[section][name])
    return sections


def dump_config(config: Config, path: str | os.PathLike) -> None:
    """Writes ``config`` as YAML that ``load_config`` reads back equal.

    The write is atomic: a temporary file in the same directory, then
    ``os.replace``. Missing parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
