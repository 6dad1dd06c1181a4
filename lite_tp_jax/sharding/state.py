"""Weights in and out under logical shapes: ``export_state`` and ``import_state``.

Names are the dotted paths of the module's parameters (``"up.kernel"``,
``"layers.blocks.0.attention.query.kernel"``). Logical shapes differ from the
stored ones in two ways, both undone here:

* padding: a dimension split unevenly is stored padded at its end (see
  ``padding.py``); ``logical_shape`` metadata gives the unpadded trailing dims.
* stacking: stacked layers carry leading dims that the metadata does not
  describe (``[virtual_stages, groups / virtual_stages]`` for pipelining); the
  logical form merges them into one ``[groups]`` dim, so it does not depend on
  the pipeline layout.

``to_logical`` and ``to_physical`` are the device-side conversions that
checkpoints use; ``export_state`` / ``import_state`` go through host numpy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def flat_variables(tree: nnx.Module | nnx.State, sep: str = ".") -> dict[str, nnx.Variable]:
    """``{dotted path: Variable}`` of a module's parameters (or of any State)."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
    return {sep.join(str(part) for part in path): variable for path, variable in nnx.to_flat_state(state)}


def _trailing(variable: nnx.Variable) -> tuple[int, ...]:
    return tuple(variable.get_metadata().get("logical_shape", variable.shape))


def logical_shape(variable: nnx.Variable) -> tuple[int, ...]:
    """The shape a user sees: no padding, stacking dims merged into one."""
    trailing = _trailing(variable)
    stacking = variable.shape[: len(variable.shape) - len(trailing)]
    return ((math.prod(stacking),) if stacking else ()) + trailing


def spec_of(variable: nnx.Variable) -> P:
    return P(*(variable.get_metadata().get("out_sharding") or ()))


def logical_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """A sharding for the logical array: the stored spec on trailing dims that it
    divides evenly, replicated elsewhere (and on a merged stacking dim)."""
    shape, trailing = logical_shape(variable), _trailing(variable)
    stored = tuple(spec_of(variable)) + (None,) * len(variable.shape)
    entries = [None] * (len(shape) - len(trailing))
    for size, entry in zip(trailing, stored[len(variable.shape) - len(trailing):]):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        entries.append(entry if size % math.prod(mesh.shape[n] for n in names) == 0 else None)
    return NamedSharding(mesh, P(*entries))


def to_logical(variable: nnx.Variable) -> jax.Array:
    """The variable's value in logical form, on device."""
    value, trailing = variable[...], _trailing(variable)
    if value.shape == logical_shape(variable):
        return value
    return _logical_converter(tuple(value.shape), trailing)(value)


@functools.lru_cache(maxsize=None)
def _logical_converter(shape: tuple[int, ...], trailing: tuple[int, ...]):
    """One jitted function per layout, so each save does not compile anew."""
    stacking = len(shape) - len(trailing)
    logical = ((math.prod(shape[:stacking]),) if stacking else ()) + trailing

    def convert(v):
        v = v[(slice(None),) * stacking + tuple(slice(0, n) for n in trailing)]
        return v.reshape(logical)

    return jax.jit(convert)


def to_physical(variable: nnx.Variable, value: jax.Array | np.ndarray, mesh: Mesh) -> jax.Array:
    """A logical value converted to the variable's stored shape and sharding."""
    target = NamedSharding(mesh, spec_of(variable))
    if tuple(value.shape) == tuple(variable.shape):
        return jax.device_put(value, target)
    value = jax.device_put(value, logical_sharding(variable, mesh))
    return _physical_converter(tuple(variable.shape), _trailing(variable), target)(value)


@functools.lru_cache(maxsize=None)
def _physical_converter(shape: tuple[int, ...], trailing: tuple[int, ...], target: NamedSharding):
    stacking = shape[: len(shape) - len(trailing)]

    def convert(v):
        v = v.reshape(*stacking, *trailing)
        return jnp.pad(v, [(0, 0)] * len(stacking) + [(0, p - n) for n, p in zip(trailing, shape[len(stacking):])])

    return jax.jit(convert, out_shardings=target)


def export_state(tree: nnx.Module | nnx.State) -> dict[str, np.ndarray]:
    """The logical parameters of a module (or the gradient State that ``nnx.grad``
    returns for it) as host numpy arrays, keyed by dotted name."""
    return {name: np.asarray(jax.device_get(to_logical(v))) for name, v in flat_variables(tree).items()}


def import_state(module: nnx.Module, state: Mapping[str, np.ndarray]) -> None:
    """Loads logical arrays (as ``export_state`` returns them) onto the module's
    sharded parameters, padding uneven shards. Every parameter must be given
    with its logical shape; unknown names are an error. All entries are checked
    before any is written, so a failed import leaves the module unchanged."""
    params = flat_variables(module)
    missing = sorted(set(params) - set(state))
    unknown = sorted(set(state) - set(params))
    if missing or unknown:
        raise KeyError(
            f"import_state: state is missing {missing or 'nothing'} and has unknown "
            f"names {unknown or 'none'}; expected exactly the names of export_state(module)."
        )
    values = {}
    for name, variable in params.items():  # every entry is checked before any is written
        value = np.asarray(state[name])
        if value.shape != logical_shape(variable):
            raise ValueError(
                f"import_state: {name!r} has shape {value.shape}, expected {logical_shape(variable)}."
            )
        if not np.can_cast(value.dtype, variable.dtype, casting="same_kind"):
            raise ValueError(
                f"import_state: {name!r} has dtype {value.dtype}, expected {np.dtype(variable.dtype)} "
                f"(or a {np.dtype(variable.dtype).kind!r}-kind dtype that casts to it)."
            )
        values[name] = value.astype(variable.dtype)
    for name, variable in params.items():
        variable[...] = to_physical(variable, values[name], variable.get_metadata()["mesh"])


def rebind_mesh(graph, old: Mesh, new: Mesh) -> None:
    """Points every module attribute and parameter metadata of ``graph`` that
    holds ``old`` at ``new``: the same model, now run (and its arrays
    described) over the new mesh (a spare's takeover). Layers keep nothing
    else of their mesh but its axis sizes, which a takeover does not change."""
    for _, node in nnx.iter_graph(graph):
        if isinstance(node, nnx.Variable):
            if node.get_metadata().get("mesh") is old:
                node.set_metadata(mesh=new)
        elif isinstance(node, nnx.Pytree):
            for name, value in list(vars(node).items()):
                if value is old:
                    setattr(node, name, new)
