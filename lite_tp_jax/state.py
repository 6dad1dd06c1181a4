"""Weights in and out under logical shapes: ``export_state`` and ``import_state``.

Names are the dotted paths of the module's parameters (``"up.kernel"``,
``"blocks.attention.query.kernel"``); shapes are the logical ones, without the
padding that uneven shards add (see ``sharding.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _params(tree: nnx.Module | nnx.State) -> list[tuple[str, nnx.Variable]]:
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
    return [
        (".".join(str(part) for part in path), variable)
        for path, variable in nnx.to_flat_state(state)
    ]


def logical_shape(variable: nnx.Variable) -> tuple[int, ...]:
    """The unpadded shape. ``logical_shape`` metadata describes the trailing
    dims; leading dims added by stacking layers (``nnx.vmap``) are never padded."""
    shape = tuple(variable.shape)
    trailing = tuple(variable.get_metadata().get("logical_shape", shape))
    return shape[: len(shape) - len(trailing)] + trailing


def export_state(tree: nnx.Module | nnx.State) -> dict[str, np.ndarray]:
    """The logical parameters of a module (or the gradient State that ``nnx.grad``
    returns for it) as host numpy arrays, keyed by dotted name."""
    out = {}
    for name, variable in _params(tree):
        value = np.asarray(jax.device_get(variable[...]))
        out[name] = value[tuple(slice(0, n) for n in logical_shape(variable))]
    return out


def import_state(module: nnx.Module, state: Mapping[str, np.ndarray]) -> None:
    """Loads logical arrays (as ``export_state`` returns them) onto the module's
    sharded parameters, padding uneven shards. Every parameter must be given
    with its logical shape; unknown names are an error."""
    params = _params(module)
    known = {name for name, _ in params}
    missing = sorted(known - set(state))
    unknown = sorted(set(state) - known)
    if missing or unknown:
        raise KeyError(
            f"import_state: state is missing {missing or 'nothing'} and has unknown "
            f"names {unknown or 'none'}; expected exactly the names of export_state(module)."
        )
    for name, variable in params:
        value = np.asarray(state[name])
        logical = logical_shape(variable)
        if value.shape != logical:
            raise ValueError(
                f"import_state: {name!r} has shape {value.shape}, expected {logical}."
            )
        padded = np.pad(value, [(0, p - n) for n, p in zip(logical, variable.shape)])
        metadata = variable.get_metadata()
        sharding = NamedSharding(metadata["mesh"], P(*metadata.get("out_sharding", ())))
        variable[...] = jax.device_put(padded.astype(variable.dtype), sharding)
