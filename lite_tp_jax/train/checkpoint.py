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
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.state import logical_shape


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model being restored."""


def _flat_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    return {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def _spec(variable: nnx.Variable) -> P:
    return P(*(variable.get_metadata().get("out_sharding") or ()))


def to_logical(state: nnx.State) -> dict[str, jax.Array]:
    """Flat ``{path: array}`` of logical (unpadded) arrays."""
    out = {}
    for name, variable in _flat_variables(state).items():
        value, logical = variable[...], logical_shape(variable)
        if value.shape != logical:
            value = jax.jit(lambda x, shape=logical: x[tuple(slice(0, n) for n in shape)])(value)
        out[name] = value
    return out


def _restore_sharding(shape: tuple[int, ...], spec: P, mesh: Mesh) -> NamedSharding:
    """``spec`` where it divides ``shape`` evenly, replicated on the dims where it does not."""
    entries = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        parts = 1
        for name in names:
            parts *= mesh.shape[name]
        entries.append(entry if size % parts == 0 else None)
    return NamedSharding(mesh, P(*entries))


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
                state=ocp.args.StandardSave(to_logical(state)),
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
        variables = _flat_variables(state)
        target = {
            name: jax.ShapeDtypeStruct(
                logical_shape(v), v.dtype, sharding=_restore_sharding(logical_shape(v), _spec(v), mesh)
            )
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
            value = restored.state[name]
            sharding = NamedSharding(mesh, _spec(variable))
            if value.shape == variable.shape:
                variable[...] = jax.device_put(value, sharding)
            else:
                pad = [(0, p - n) for n, p in zip(value.shape, variable.shape)]
                variable[...] = jax.jit(lambda x, pad=pad: jnp.pad(x, pad), out_shardings=sharding)(value)
        return state, dict(restored.progress)
