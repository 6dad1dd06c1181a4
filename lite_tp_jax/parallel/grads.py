"""The global gradient norm with one all-reduce, and clipping by it.

Gradients are sharded like their parameters. Left to the partitioner, a norm
over them is one all-reduce per parameter (a partial sum of squares over the
devices that split it). Here each device sums the squares of the shards it
holds, in a fixed order, counting a replicated shard only on its first replica
(rank 0 of every axis it is replicated over); then one all-reduce of that
scalar over the whole mesh (``collectives.all_reduce``, so deterministic mode
covers it). Padding is zero and adds nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core.collectives import all_reduce, to_varying
from lite_tp_jax.core.axes import AXES


def _split_axes(spec: tuple) -> set[str]:
    return {name for entry in spec if entry is not None for name in ((entry,) if isinstance(entry, str) else entry)}


def global_norm(grads: Any, mesh: Mesh) -> jax.Array:
    """``sqrt(sum of squares)`` of every element of ``grads`` (a State of Variables
    carrying ``out_sharding``), each counted once; one scalar all-reduce."""
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    variables = jax.tree.leaves(grads, is_leaf=is_variable)
    specs = [tuple(v.get_metadata().get("out_sharding") or ()) for v in variables]

    def body(*shards):
        total = jnp.zeros((), jnp.float32)
        for shard, spec in zip(shards, specs):
            replicated = [axis for axis in AXES if axis not in _split_axes(spec) and mesh.shape[axis] > 1]
            first = jnp.all(jnp.array([jax.lax.axis_index(axis) == 0 for axis in replicated] or [True]))
            total = total + jnp.where(first, jnp.sum(jnp.square(shard.astype(jnp.float32))), 0.0)
        return jnp.sqrt(all_reduce(to_varying(total, AXES), AXES))

    return jax.shard_map(
        body, mesh=mesh, in_specs=tuple(P(*spec) for spec in specs), out_specs=P(), axis_names=set(AXES)
    )(*(v[...] for v in variables))


def clip_by_norm(grads: Any, norm: jax.Array, max_norm: float) -> Any:
    """``grads`` scaled by ``max_norm / norm`` where ``norm`` exceeds ``max_norm``
    (``optax.clip_by_global_norm``'s rule, with the norm computed once, above)."""
    trigger = norm < max_norm
    return jax.tree.map(lambda g: jnp.where(trigger, g, (g / norm.astype(g.dtype)) * max_norm), grads)
