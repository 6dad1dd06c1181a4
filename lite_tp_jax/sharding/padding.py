"""Uneven shards: a split dimension is stored padded at its end.

The spec allows shards of unequal size (sum of n_i = n); JAX shardings need
equal ones. So a parameter dimension split over k ranks is stored padded to the
next multiple of k (``sharding.rules.padded_size``): rank i holds logical indices
``[i*s, (i+1)*s)`` and the last ranks hold fewer real ones. Layers zero the
padding (``mask_padding``) before every use, so padding never reaches a result
or a gradient whatever it holds (tests fill it with NaN); ``export_state``
slices it away. Users only see logical shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lite_tp_jax.core.collectives import Axis
from lite_tp_jax.core.axes import TENSOR


def mask_padding(x: jax.Array, dim: int, logical: int, axis: Axis = TENSOR) -> jax.Array:
    """Zeroes the entries of this rank's shard that lie past ``logical`` along ``dim``.

    ``x`` is one rank's shard of a dimension padded to ``axis_size * x.shape[dim]``.
    A no-op (traced away) when the dimension divides evenly.
    """
    local = x.shape[dim]
    if local * jax.lax.axis_size(axis) == logical:
        return x
    index = jax.lax.axis_index(axis) * local + jnp.arange(local)
    shape = [1] * x.ndim
    shape[dim] = local
    return jnp.where((index < logical).reshape(shape), x, jnp.zeros((), x.dtype))
