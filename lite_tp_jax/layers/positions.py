"""Learned absolute position embeddings (GPT-2's ``wpe``), added to the token
embedding.

The table ``embedding [max_positions, features]`` is replicated (role
"positions" in the rule table). Each rank adds the rows of the positions it
holds: all of ``0..S-1``, or with ``sequence_parallel`` its own sequence
shard's (starting at ``rank * S/tp``), so the table's gradient is then a
partial sum per rank, all-reduced over "tensor" in the backward pass
(``copy_to_tensor_region``), as for the norms. With the sequence split over
"context" (``parallel/context.py``) a rank's tokens are at the global positions
of its slots (``context_load_balance``: chunks r and 2n-1-r). No communication forward.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from lite_tp_jax.core.collectives import copy_to_tensor_region
from lite_tp_jax.core.axes import TENSOR
from lite_tp_jax.parallel.context import context_size, local_positions
from lite_tp_jax.parallel.region import TOKENS, Layout, ParallelLayer, sequence_or_replicated
from lite_tp_jax.sharding.rules import MEGATRON, PartitionRules
from lite_tp_jax.core.checks import check_last_dim

_position_init = nnx.initializers.normal(stddev=0.02)


class LearnedPositions(ParallelLayer):
    """``x + embedding[positions]`` for ``x [B, S, features]``, positions ``0..S-1``."""

    def __init__(
        self,
        max_positions: int,
        features: int,
        *,
        mesh: Mesh,
        sequence_parallel: bool = False,
        param_dtype: Any = jnp.float32,
        role: str = "positions",
        context_load_balance: bool = True,
        rules: PartitionRules = MEGATRON,
        rngs: nnx.Rngs,
    ):
        self.mesh, self.max_positions, self.features = mesh, max_positions, features
        self.sequence_parallel, self.context_balance = sequence_parallel, context_load_balance
        self.embedding = rules.param(
            role, _position_init, rngs.params(), (max_positions, features), (None, None), mesh, dtype=param_dtype,
            supports=("replicated",),
        )

    def layout(self, x: jax.Array, positions: jax.Array | None = None) -> Layout:
        placement = sequence_or_replicated(self.sequence_parallel)
        return Layout((placement,) if positions is None else (placement, TOKENS), placement.of(x.ndim))

    def check(self, x: jax.Array, positions: jax.Array | None = None) -> None:
        check_last_dim(x, self.features, type(self).__name__)
        if x.ndim < 2 or x.shape[-2] > self.max_positions:
            raise ValueError(
                f"{type(self).__name__} holds {self.max_positions} positions; got a sequence of shape {tuple(x.shape)}."
            )

    def local(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """``x``: this rank's ``[B, S (or S/tp), features]``. ``positions``: ``[B, S]``
        (this context rank's slots, whole over "tensor": packed documents restart at
        0, ``masks.segment_positions``), default the slots' global positions
        (``0..S-1`` without "context"); with ``sequence_parallel`` this rank adds its shard's."""
        table, seq = self.embedding[...], x.shape[-2]
        first = 0
        if self.sequence_parallel:
            table, first = copy_to_tensor_region(table), jax.lax.axis_index(TENSOR) * seq
        if positions is None:
            if context_size() == 1:
                return x + jax.lax.dynamic_slice_in_dim(table, first, seq, axis=0).astype(x.dtype)
            tp = jax.lax.axis_size(TENSOR) if self.sequence_parallel else 1
            positions = local_positions(seq * tp, self.context_balance)[None]
        mine = jax.lax.dynamic_slice_in_dim(positions, first, seq, axis=-1)
        return x + jnp.take(table, mine, axis=0).astype(x.dtype)
