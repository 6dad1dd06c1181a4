"""Fully sharded data parallelism: parameters split over "fsdp", gathered where used.

"fsdp" ranks are data-parallel ranks (they split the token rows, like "data")
that also store each matrix split on one dim: the one the rule table names
(``sharding/table.py``: the dim no other axis splits), padded at its end when
fsdp does not divide it. AdamW moments follow their parameter, and so do the
gradients. Inside a model's region (``parallel/region.py``):

* a parameter of the stacked layer groups enters as its shard, and each scan
  iteration all-gathers its own group's shards (``gather_group``, called by
  ``models/stack.scan_states``), cast to the activations' dtype first (bf16
  halves the bytes). Under ``jax.checkpoint`` no policy keeps the gathered
  weights: the backward gathers them again (ZeRO-3), then reduce-scatters the
  group's gradient over "fsdp" (in float32), one per parameter per group;
* any other parameter (embedding, head, final norm) is all-gathered at region
  entry, once per step, and its gradient reduce-scattered after the backward.

With "data" > 1 as well (HSDP), the shards are replicated over "data": their
gradients are all-reduced over it at region entry (``broadcast_over``), a
shard's worth of bytes. Deterministic mode reduce-scatters in fixed rank
order (``collectives.reduce_scatter``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lite_tp_jax.core.axes import FSDP, entry_axes
from lite_tp_jax.core.collectives import all_gather, gather_replicated_over, reduce_scatter


def fsdp_dim(variable: nnx.Variable) -> int | None:
    """The dim (counted from the end, so stacking dims do not matter) that
    ``variable`` is stored split over "fsdp" on, when "fsdp" is manual here."""
    if FSDP not in jax.sharding.get_abstract_mesh().manual_axes:
        return None
    spec = tuple(variable.get_metadata().get("out_sharding") or ())  # one entry per stored dim
    for dim, entry in enumerate(spec):
        if FSDP in entry_axes(entry):
            return dim - len(spec)
    return None


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def gather_cast_over(x: jax.Array, axis: str, dim: int, dtype: Any) -> jax.Array:
    """Forward: ``x`` cast to ``dtype``, then all-gathered along ``dim`` (used per
    rank). Backward: the gradient cast back to ``x``'s dtype, then reduce-scattered
    (its sum over the ranks, this rank's shard kept): the sum runs in float32."""
    return all_gather(x.astype(dtype), axis, dim=dim)


def _gather_cast_fwd(x, axis, dim, dtype):
    return gather_cast_over(x, axis, dim, dtype), jnp.zeros((), x.dtype)


def _gather_cast_bwd(axis, dim, dtype, like, g):
    return (reduce_scatter(g.astype(like.dtype), axis, dim=dim),)


gather_cast_over.defvjp(_gather_cast_fwd, _gather_cast_bwd)


def gather_variable(variable: nnx.Variable, value: jax.Array, *, dtype: Any = None, per_rank: bool = True) -> jax.Array:
    """``value`` (``variable``'s fsdp shard) gathered over "fsdp" and trimmed to the
    size the layers expect (the padding never reaches them). ``dtype``: cast to it
    first, for floating matrices. ``per_rank``: the rows differ over "fsdp", so the
    backward reduce-scatters; otherwise each rank keeps its slice of the equal gradient."""
    dim = fsdp_dim(variable)
    if dim is None:
        return value
    if not per_rank:
        gathered = gather_replicated_over(value, FSDP, dim % value.ndim)
    else:
        cast = dtype is not None and jnp.issubdtype(value.dtype, jnp.floating)
        gathered = gather_cast_over(value, FSDP, dim % value.ndim, jnp.dtype(dtype if cast else value.dtype))
    logical = variable.get_metadata().get("logical_shape")
    size = logical[dim] if logical else gathered.shape[dim]
    if size == gathered.shape[dim]:
        return gathered
    return jax.lax.slice_in_dim(gathered, 0, size, axis=dim % gathered.ndim)


def gather_group(state: Any, dtype: Any) -> Any:
    """One layer group's variables (inside the layer scan) with every fsdp shard
    all-gathered: matrices cast to ``dtype`` (the activations') before the gather."""
    is_variable = lambda x: isinstance(x, nnx.Variable)
    if FSDP not in jax.sharding.get_abstract_mesh().manual_axes:
        return state
    return jax.tree.map(
        lambda v: v.replace(gather_variable(v, v[...], dtype=dtype if v.ndim >= 2 else None)), state, is_leaf=is_variable
    )
