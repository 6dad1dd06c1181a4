"""``plan(step, batch)``: where each parameter of any model built from the
layers lives, and what one training step of it communicates.

Parameters: each one's logical shape, the spec it carries (``out_sharding``,
from the rule table) and its bytes per device, from its stored (padded) shape
divided over the axes that split it; exact, and the same on every device. The
collectives: those of the ``TrainStep`` compiled for ``batch`` (a step already
run on such batches is not compiled again; ``hlo.collectives_per_step``: per
device, as often as one step runs them, and the mesh axes each spans).
``lite-tp plan`` predicts the decoder's with formulas (``planner.py``); for a
user's model the compiled step is the source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flax import nnx

from lite_tp_jax.core import hlo
from lite_tp_jax.core.axes import entry_axes
from lite_tp_jax.sharding.state import flat_variables, logical_shape
from lite_tp_jax.train.step import TrainStep


@dataclass(frozen=True)
class ParameterPlacement:
    """One parameter: its logical shape (stacked blocks: ``[count * ..., ...]`` as
    ``export_state`` gives it), its spec, its bytes on each device."""

    name: str
    logical_shape: tuple[int, ...]
    spec: tuple
    bytes_per_device: int


@dataclass(frozen=True)
class StepCollective:
    """One collective of a training step: per device, ``runs`` times per step."""

    kind: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    runs: int
    bytes_per_device: int


@dataclass(frozen=True)
class ModelPlan:
    mesh: dict[str, int]
    parameters: list[ParameterPlacement]
    collectives: list[StepCollective]

    @property
    def parameter_bytes_per_device(self) -> int:
        return sum(p.bytes_per_device for p in self.parameters)

    @property
    def communication_bytes_per_device(self) -> int:
        return sum(c.bytes_per_device for c in self.collectives)

    def __str__(self) -> str:
        lines = [f"mesh {self.mesh}", f"parameters: {self.parameter_bytes_per_device:,} bytes per device"]
        lines += [
            f"  {p.name:<40} {str(list(p.logical_shape)):<18} {str(p.spec):<28} {p.bytes_per_device:>10,} B"
            for p in self.parameters
        ]
        lines.append(f"collectives per step: {self.communication_bytes_per_device:,} bytes per device")
        lines += [
            f"  {c.kind:<15} over {'+'.join(c.axes) or 'none':<12} {str(list(c.shape)):<18} x{c.runs:<4} {c.bytes_per_device:>10,} B"
            for c in self.collectives
        ]
        return "\n".join(lines)


def _bytes_per_device(variable: nnx.Variable, mesh) -> int:
    spec = tuple(variable.get_metadata().get("out_sharding") or ())
    parts = math.prod(mesh.shape[name] for entry in spec for name in entry_axes(entry))
    return math.prod(variable.shape) // parts * variable.dtype.itemsize


def plan(step: TrainStep, batch: Any) -> ModelPlan:
    """The placement of ``step.model``'s parameters on its mesh and the collectives
    of one run of ``step`` on ``batch`` (arrays, or ``jax.ShapeDtypeStruct``s)."""
    model, mesh = step.model, step.mesh
    parameters = [
        ParameterPlacement(
            name, logical_shape(variable),
            tuple(variable.get_metadata().get("out_sharding") or ()), _bytes_per_device(variable, mesh),
        )
        for name, variable in flat_variables(model).items()
    ]
    text = step.lower(batch).compile().as_text()
    counted: dict[tuple, int] = {}
    for collective, runs in hlo.collectives_per_step(text, mesh):
        key = (collective.kind, collective.shape, collective.axes, collective.bytes)
        counted[key] = counted.get(key, 0) + runs
    collectives = [
        StepCollective(kind, shape, axes, runs, size * runs)
        for (kind, shape, axes, size), runs in sorted(counted.items(), key=lambda item: -item[0][3] * item[1])
    ]
    return ModelPlan(dict(mesh.shape), parameters, collectives)
