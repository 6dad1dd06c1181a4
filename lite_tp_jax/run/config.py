"""A run's config: nine sections, each a frozen dataclass with its fields'
ranges and its own rules, and ``Config`` with the rules between sections.

    model:        # lite_tp_jax.models.config.ModelConfig
      hidden_size: 64
    mesh:         # sizes of the mesh axes (one may be -1); spares
      tensor: 8
    train:        # optimisation: steps, batch, learning-rate schedule, AdamW
      steps: 60
    data:         # source: stdlib | text | tokens | tokenized (these need path, or sources); packing
      source: stdlib
    checkpoint:   # save every N steps, keep the newest K
      every: 20
    rollback:     # on a loss spike or non-finite step (train.on_spike / on_nonfinite: rollback)
      skip_batches: 50
    fault:        # inject a device failure (CPU testing of mesh.spares) or a loss spike
      fail_device: 1
      fail_step: 2
    logging:      # TensorBoard (on), Weights & Biases (a project name)
      wandb_project: null
    compile:      # the persistent compilation cache: on, where
      cache: true

Reading, overriding and writing YAML is ``config_file.py``. Every problem is a
``ConfigError`` with one sentence that names the full key path; a section's
rules raise ``FitError`` naming fields, shown with key paths (``explain``).
No jax here: ``lite-tp launch`` reads configs without loading it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, get_type_hints

from lite_tp_jax.core.axes import AXES, resolve_sizes
from lite_tp_jax.core.checks import ABOVE_ZERO, FRACTION, NON_NEGATIVE, POSITIVE, Range, ranged
from lite_tp_jax.core.errors import BadInput, FitError
from lite_tp_jax.models.config import ModelConfig


class ConfigError(BadInput):
    """A config problem, described in one sentence that names the key path."""


def _mesh_fields() -> list[tuple]:
    """One field per mesh axis (``core.axes.AXES``: declared there, once), then ``spares``."""
    axes = [(axis, int, ranged(1, Range(1, also=(-1,)))) for axis in AXES]
    return [*axes, ("spares", int, ranged(0, NON_NEGATIVE))]


def _requested(self) -> dict[str, int]:
    """``{axis: size}`` as written (one may be -1): what ``core.mesh.make_mesh_for`` takes."""
    return {axis: getattr(self, axis) for axis in AXES}


def _mesh_sizes(self, devices: int | None = None) -> dict[str, int]:
    """Every axis's size, a -1 inferred from ``devices`` (``core.axes.resolve_sizes``)."""
    return resolve_sizes(self.requested, devices)


def _devices_needed(self) -> int:
    """Devices this mesh and its spares take (an inferred axis counts as 1)."""
    return math.prod(max(getattr(self, axis), 1) for axis in AXES) + self.spares


def _mesh_check(self) -> None:
    inferred = [f"'mesh.{axis}'" for axis in AXES if getattr(self, axis) == -1]
    if len(inferred) > 1:
        raise ConfigError(
            f"at most one mesh axis may be -1 (inferred from the device count), got -1 for {' and '.join(inferred)}"
        )


MeshConfig = dataclasses.make_dataclass(
    "MeshConfig", _mesh_fields(), frozen=True,
    namespace={
        "requested": property(_requested), "sizes": _mesh_sizes, "devices_needed": _devices_needed, "check": _mesh_check,
    },
)
MeshConfig.__module__ = __name__
MeshConfig.__doc__ = """Axis sizes of the device mesh, one field per axis of ``core.axes.AXES``;
at most one may be -1 (inferred). ``spares`` devices are kept out of the mesh;
one takes a failed device's place (``runtime/spares.py``)."""

NonFinitePolicy = Literal["stop", "skip", "rollback"]
SpikePolicy = Literal["stop", "rollback", "ignore"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with linear warmup then cosine decay to lr * min_lr_ratio."""

    steps: int = ranged(100, POSITIVE)
    seed: int = ranged(0, NON_NEGATIVE)  # numpy's seed sequences reject negative seeds
    global_batch: int = ranged(8, POSITIVE)
    seq_len: int = ranged(64, POSITIVE)
    lr: float = ranged(3e-3, NON_NEGATIVE)
    min_lr_ratio: float = ranged(0.1, FRACTION)
    warmup_steps: int = ranged(10, NON_NEGATIVE)
    weight_decay: float = ranged(0.1, NON_NEGATIVE)
    b1: float = ranged(0.9, Range(0, 1, hi_open=True))
    b2: float = ranged(0.95, Range(0, 1, hi_open=True))
    grad_clip: float = ranged(1.0, ABOVE_ZERO)
    microbatches: int = ranged(1, POSITIVE)  # pipeline microbatches per step (per data-parallel replica)
    # Gradient accumulation: each rank's rows run as grad_accum micro-steps (a
    # scan), their gradients averaged into one update; each micro-step is split
    # into `microbatches` again under pipeline parallelism.
    grad_accum: int = ranged(1, POSITIVE)
    # ZeRO-1 over "data": the AdamW moments stored split over the data-parallel
    # ranks (parameters and gradients are not; for those, mesh.fsdp).
    shard_optimizer: bool = False
    deterministic: bool = False  # reductions in fixed rank order: same bits on any process layout
    # A NaN/inf loss, gradient norm or update: stop (exit 1), skip the update, or
    # roll back to a checkpoint before the spike (``rollback`` section; train/divergence.py).
    on_nonfinite: NonFinitePolicy = "stop"
    # A loss spike: a loss above spike_factor x the median of the last spike_window
    # finite losses (spike_factor null: no spike detection).
    spike_window: int = ranged(20, POSITIVE)
    spike_factor: float | None = ranged(3.0, Range(1, lo_open=True))
    on_spike: SpikePolicy = "stop"


DataSource = Literal["stdlib", "text", "tokens", "tokenized"]


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from (see ``lite_tp_jax.train.data``).

    ``stdlib``: Python's own standard-library sources as bytes (no download).
    ``text``: ``path`` is a file, a directory (*.txt, *.md, *.py, recursively)
    or a glob; byte-level tokens. ``tokens``: ``path`` is a 1-D integer .npy.
    ``tokenized``: ``path`` is a corpus directory of ``lite-tp tokenize``, or
    ``sources`` a mixture of them, ``[{path: a, weight: 0.7}, ...]``, each
    weight > 0 (the proportions are the weights over their sum).
    ``packing``: whole documents packed into rows, attending within themselves
    only (a file is a document of ``stdlib`` and ``text``; ``tokens`` is one).
    """

    source: DataSource = "stdlib"
    path: str | None = None
    sources: tuple[tuple[str, float], ...] = ()
    packing: bool = False

    def check(self) -> None:
        if self.sources:
            if self.source != "tokenized" or self.path is not None:
                raise ConfigError(
                    f"'data.sources' is a mixture of tokenized corpora: set data.source=tokenized and "
                    f"data.path=null, got data.source={self.source!r} and data.path={self.path!r}"
                )
            total = sum(weight for _, weight in self.sources)
            bad = next(((i, w) for i, (_, w) in enumerate(self.sources) if not w > 0), None)
            if bad is not None:
                why = " (the weights sum to 0)" if total == 0 else "; remove a source rather than weigh it 0" if bad[1] == 0 else ""
                raise ConfigError(f"'data.sources[{bad[0]}].weight' must be > 0, got {bad[1]!r}{why}")
            return
        if self.source in ("text", "tokens", "tokenized") and self.path is None:
            what = {"text": "a file, a directory or a glob", "tokens": "a .npy file of token ids",
                    "tokenized": "a corpus directory of lite-tp tokenize, or data.sources"}[self.source]
            raise ConfigError(f"'data.path' is required when 'data.source' is {self.source!r} ({what})")
        if self.source == "tokens" and not self.path.endswith(".npy"):
            raise ConfigError(
                f"'data.path' must name a .npy file when 'data.source' is 'tokens', got {self.path!r}"
            )
        if self.source == "stdlib" and self.path is not None:
            raise ConfigError(
                f"'data.path' is {self.path!r} but 'data.source' is 'stdlib', which ignores it; "
                f"set data.source=text (or tokens), or data.path=null"
            )


@dataclass(frozen=True)
class CheckpointConfig:
    """Save every ``every`` steps; keep the newest ``keep`` checkpoints."""

    every: int = ranged(50, POSITIVE)
    keep: int = ranged(2, POSITIVE)


@dataclass(frozen=True)
class RollbackConfig:
    """What a rollback does (``train.on_spike`` or ``train.on_nonfinite`` set to
    ``rollback``): reload the newest checkpoint at least ``steps_before`` steps
    before the spike start, skip the next ``skip_batches`` batches (null: the
    batches from that checkpoint to the spike start, inclusive), go on; at most
    ``max`` times per ``lite-tp train``, then stop."""

    steps_before: int = ranged(0, NON_NEGATIVE)
    skip_batches: int | None = ranged(None, NON_NEGATIVE)
    max: int = ranged(3, NON_NEGATIVE)


@dataclass(frozen=True)
class FaultConfig:
    """An injected failure of device ``fail_device`` (a device id in the mesh)
    when step ``fail_step`` starts, in the first run on a run directory only
    (a restart does not fail again); a fake CPU device cannot fail by itself.
    ``spike_step``: that step's learning rate is multiplied by 1e4, once (the
    first time the step runs in the first run on a run directory): a loss spike
    for testing ``train.on_spike``."""

    fail_device: int | None = ranged(None, NON_NEGATIVE)
    fail_step: int | None = ranged(None, POSITIVE)
    spike_step: int | None = ranged(None, POSITIVE)

    def check(self) -> None:
        if (self.fail_device is None) != (self.fail_step is None):
            given, missing = ("fail_device", "fail_step") if self.fail_step is None else ("fail_step", "fail_device")
            raise ConfigError(f"'fault.{given}' is set but 'fault.{missing}' is not; an injected failure needs both")


WANDB_FORBIDDEN = "/\\#?%:"
"""Characters Weights & Biases refuses in a project name."""


@dataclass(frozen=True)
class LoggingConfig:
    """What a run writes for people to watch, besides ``metrics.jsonl`` (always
    written, the source of truth: the others are written from its records):
    TensorBoard event files under ``RUN_DIR/tensorboard``, and, when
    ``wandb_project`` names one, a Weights & Biases run (``pip install wandb``;
    offline when W&B cannot be reached). See ``lite_tp_jax/train/sinks.py``."""

    tensorboard: bool = True
    wandb_project: str | None = None

    def check(self) -> None:
        project = self.wandb_project
        if project is None:
            return
        bad = sorted({c for c in project if c in WANDB_FORBIDDEN})
        if not project.strip() or len(project) > 128 or bad:
            why = f"contains {' '.join(repr(c) for c in bad)}" if bad else f"is {project!r}"
            raise ConfigError(
                f"'logging.wandb_project' {why}; it must be a W&B project name of 1 to 128 characters "
                f"without {' '.join(WANDB_FORBIDDEN)}, or null for no W&B run"
            )


@dataclass(frozen=True)
class CompileConfig:
    """JAX's persistent compilation cache (``lite_tp_jax/runtime/compile_cache.py``):
    a rerun, a restarted worker or ``lite-tp generate`` of the same program
    loads it instead of compiling. On by default; ``cache: false`` turns it
    off; ``cache_dir`` null means ``$JAX_COMPILATION_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/lite_tp_jax/jax`` (``~/.cache/lite_tp_jax/jax``)."""

    cache: bool = True
    cache_dir: str | None = None

    def check(self) -> None:
        if self.cache_dir is not None and not self.cache_dir.strip():
            raise ConfigError(
                "'compile.cache_dir' is empty; give a directory for the compilation cache, or null for the default"
            )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    def check(self) -> None:
        """Each section's rules, then the rules between sections; ConfigError naming key paths."""
        for name in SECTIONS:
            section = getattr(self, name)
            try:
                if hasattr(section, "check"):
                    section.check()
            except FitError as error:
                raise explain(error) from None
        fault = self.fault
        if fault.fail_step is not None and fault.fail_step > self.train.steps:
            raise ConfigError(
                f"'fault.fail_step' ({fault.fail_step}) is past 'train.steps' ({self.train.steps}), "
                f"so the failure would never happen; choose a step from 1 to {self.train.steps}"
            )
        if fault.spike_step is not None and fault.spike_step > self.train.steps:
            raise ConfigError(
                f"'fault.spike_step' ({fault.spike_step}) is past 'train.steps' ({self.train.steps}), "
                f"so the spike would never happen; choose a step from 1 to {self.train.steps}"
            )


SECTIONS: dict[str, type] = dict(get_type_hints(Config))
"""Section name -> its dataclass, in file order."""


def key_path(field_name: str) -> str:
    """``'section.field'`` of the first section with a field ``field_name`` (for
    messages of checks that name quantities by field, ``FitError``)."""
    for section, cls in SECTIONS.items():
        if field_name in {f.name for f in dataclasses.fields(cls)}:
            return f"'{section}.{field_name}'"
    return field_name


def explain(error: FitError) -> ConfigError:
    """A ``FitError`` as the config layer says it: each field as its key path."""
    return ConfigError(error.format(key_path))
