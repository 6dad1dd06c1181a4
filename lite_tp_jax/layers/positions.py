"""Learned absolute position embeddings (GPT-2's ``wpe``), added to the token
embedding.

The table ``embedding [max_positions, features]`` is replicated. Each rank adds
the rows of the positions it holds: all of ``0..S-1``, or with
``sequence_parallel`` its own sequence shard's (starting at ``rank * S/tp``).
No communication forward; backward, the table's gradient is summed over the
ranks whose rows differ (with ``sequence_parallel``, an all-reduce over
"tensor" that JAX's varying/invariant typing inserts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.mesh import TENSOR
from lite_tp_jax.sharding import call_local, check_last_dim, default_embedding_init, sharded_param


class LearnedPositions(nnx.Module):
    """``x + embedding[positions]`` for ``x [B, S, features]``, positions ``0..S-1``."""

    def __init__(
        self,
        max_positions: int,
        features: int,
        *,
        mesh: Mesh,
        sequence_parallel: bool = False,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.mesh, self.max_positions, self.features = mesh, max_positions, features
        self.sequence_parallel = sequence_parallel
        self.embedding = sharded_param(
            default_embedding_init, rngs.params(), (max_positions, features), P(), mesh, dtype=param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        check_last_dim(x, self.features, type(self).__name__)
        if x.ndim < 2 or x.shape[-2] > self.max_positions:
            raise ValueError(
                f"{type(self).__name__} holds {self.max_positions} positions; got a sequence of shape {tuple(x.shape)}."
            )
        return call_local(self, x)

    def local(self, x: jax.Array) -> jax.Array:
        """``x``: this rank's ``[..., S (or S/tp), features]``."""
        seq = x.shape[-2]
        first = jax.lax.axis_index(TENSOR) * seq if self.sequence_parallel else 0
        rows = jax.lax.dynamic_slice_in_dim(self.embedding[...], first, seq, axis=0)
        return x + rows.astype(x.dtype)
