"""Checkpoints with orbax-checkpoint, restorable onto any mesh.

What is saved is the logical state: every variable of (model, optimizer) with
the padding of uneven shards sliced away, under its dotted path, plus a small
JSON ``progress`` record (step and data position). On restore each array is
read straight into the current mesh's sharding (orbax reads only the slices a
device needs) and padded for the current TP degree. So a run saved at TP 4
resumes at TP 2, TP 8, TP 3 or data 2 x tensor 4.

Saves are atomic: orbax writes to a temporary directory and renames it when
complete, so a crash during a save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from lite_tp_jax.state import flat_variables, logical_sharding, logical_shape, to_logical, to_physical


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model being restored."""


class Checkpointer:
    """Saves and restores (model, optimizer) state under ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
        )
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "progress"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: nnx.State, progress: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({name: to_logical(v) for name, v in flat_variables(state, "/").items()}),
                progress=ocp.args.JsonSave(progress),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, state: nnx.State, mesh: Mesh, step: int | None = None) -> tuple[nnx.State, dict[str, Any]]:
        """Reads checkpoint ``step`` (default: latest) into a state shaped and
        sharded like ``state``; returns it with the progress record."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        variables = flat_variables(state, "/")
        target = {
            name: jax.ShapeDtypeStruct(logical_shape(v), v.dtype, sharding=logical_sharding(v, mesh))
            for name, v in variables.items()
        }
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"Checkpoint {step} in {self.directory} does not match this model "
                f"(different model config?): {str(error).splitlines()[0]}"
            ) from error
        for name, variable in variables.items():
            variable.set_value(to_physical(variable, restored.state[name], mesh))  # also fills an abstract (eval_shape) state
        return state, dict(restored.progress)
