"""The vocabulary-parallel embedding (Megatron-LM's ``VocabParallelEmbedding``),
usable as a tied output head.

The table ``embedding [vocab, features]`` is split on the vocabulary over
``vocab_axes`` (default "tensor"; a pipeline-parallel model uses
("pipeline", "tensor") so that no stage holds the whole table), padded at its
end to a multiple of the number of ranks (see ``sharding.py``): rank i holds
rows ``[i*v, (i+1)*v)``. The same class is the output head (``attend``),
tied to the input embedding or as a table of its own.

    lookup    ids (replicated) -> rows of this rank's range, zeros elsewhere
              -> all-reduce (or reduce-scatter along the sequence)       one collective
    attend    x (replicated) -> x @ table_i.T = this rank's logits slice no communication

Backward, the lookup needs no collective (each rank scatter-adds into its own
rows); ``attend`` all-reduces the input gradient (``copy_to_tensor_region``),
or reduce-scatters it with ``sequence_parallel``. The logits slice feeds
``vocab_parallel_cross_entropy`` without ever being gathered.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.collectives import (
    cast_for,
    copy_to_tensor_region,
    gather_from_sequence_region,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
)
from lite_tp_jax.mesh import TENSOR
from lite_tp_jax.sharding import (
    axes_size,
    Initializer,
    check_last_dim,
    check_sequence_divisible,
    default_embedding_init,
    enter_tensor_region,
    in_tensor_region,
    mask_padding,
    padded_size,
    sequence_spec,
    sharded_param,
)


def check_integer_ids(ids: jax.Array, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"{name} expects integer token ids, got dtype {jnp.result_type(ids)}.")


class VocabParallelEmbedding(nnx.Module):
    """``table[ids]`` with the table ``[num_embeddings, features]`` split on the
    vocabulary over "tensor".

    Ids outside ``[0, num_embeddings)`` cannot raise an error under jit: they
    produce a zero vector (no rank owns them) and receive no gradient.

    With ``sequence_parallel`` the output is sharded along the sequence (the last
    dimension of ``ids``): a reduce-scatter replaces the all-reduce, and
    ``attend`` takes its input sharded along the sequence (all-gathered first).
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        mesh: Mesh,
        sequence_parallel: bool = False,
        vocab_axes: tuple[str, ...] = (TENSOR,),
        embedding_init: Initializer = default_embedding_init,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        self.mesh = mesh
        self.dtype = dtype  # of the looked-up vectors (the compute dtype); None: param_dtype
        self.num_embeddings, self.features = num_embeddings, features
        self.sequence_parallel = sequence_parallel
        if TENSOR not in vocab_axes:
            raise ValueError(f"vocab_axes must include 'tensor', got {vocab_axes}.")
        self.vocab_axes = tuple(vocab_axes)
        self.region_axes = frozenset(vocab_axes)
        self.other_vocab_axes = tuple(a for a in vocab_axes if a != TENSOR)
        vocab_padded = padded_size(num_embeddings, axes_size(mesh, self.vocab_axes))
        self.embedding = sharded_param(
            embedding_init, rngs.params(), (num_embeddings, features), P(self.vocab_axes, None), mesh,
            padded_shape=(vocab_padded, features), dtype=param_dtype,
        )

    def _table(self) -> jax.Array:
        return mask_padding(self.embedding[...], 0, self.num_embeddings, self.vocab_axes)

    def _output_struct(self, ids: jax.Array) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((*ids.shape, self.features), self.dtype or self.embedding.dtype)

    # --- lookup -------------------------------------------------------------

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids``: integer ``[..., seq]``, replicated over "tensor". Returns
        ``[..., seq, features]`` (replicated, or sharded along ``seq`` with
        ``sequence_parallel``: this rank's shard inside a tensor region)."""
        check_integer_ids(ids, type(self).__name__)
        if in_tensor_region():
            return self.local(ids)
        out_spec = P()
        if self.sequence_parallel:
            check_sequence_divisible(self._output_struct(ids), self.mesh, type(self).__name__)
            out_spec = sequence_spec(ids.ndim + 1)
        return enter_tensor_region(
            self, type(self).local, ids, arg_specs=(P(),), out_specs=out_spec, axes=self.region_axes
        )

    def local(self, ids: jax.Array) -> jax.Array:
        """One rank's math: ``ids`` full (replicated over "tensor")."""
        check_integer_ids(ids, type(self).__name__)
        if self.sequence_parallel:
            check_sequence_divisible(self._output_struct(ids), self.mesh, type(self).__name__)
        table = self._table()
        table = table if self.dtype is None else cast_for(table, ids, self.dtype)
        rows = table.shape[0]
        local_ids = ids - jax.lax.axis_index(self.vocab_axes) * rows
        mine = (local_ids >= 0) & (local_ids < rows)
        vectors = jnp.take(table, jnp.where(mine, local_ids, 0), axis=0)
        partial_sums = jnp.where(mine[..., None], vectors, jnp.zeros((), vectors.dtype))
        if self.sequence_parallel:
            partial_sums = reduce_scatter_to_sequence_region(partial_sums, TENSOR, -2)
            return reduce_from_tensor_region(partial_sums, self.other_vocab_axes) if self.other_vocab_axes else partial_sums
        return reduce_from_tensor_region(partial_sums, self.vocab_axes)

    # --- tied output head -----------------------------------------------------

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits ``x @ table.T`` of a tied output head. ``x``: ``[..., seq, features]``,
        replicated over "tensor" (or sharded along ``seq`` with ``sequence_parallel``).

        Inside a tensor region: this rank's ``[..., seq, vocab_i]`` slice of the
        padded vocabulary (padded entries are 0; ``vocab_parallel_cross_entropy``
        masks them). From ordinary jit code: the logical ``[..., seq, vocab]``
        logits, sharded over "tensor" on the last dimension."""
        check_last_dim(x, self.features, f"{type(self).__name__}.attend")
        if in_tensor_region():
            return self.local_attend(x)
        in_spec = P()
        if self.sequence_parallel:
            check_sequence_divisible(x, self.mesh, f"{type(self).__name__}.attend")
            in_spec = sequence_spec(x.ndim)
        logits = enter_tensor_region(
            self, type(self).local_attend, x, arg_specs=(in_spec,),
            out_specs=P(*([None] * (x.ndim - 1)), self.vocab_axes), axes=self.region_axes,
        )
        return logits[..., : self.num_embeddings]

    def local_attend(self, x: jax.Array) -> jax.Array:
        """One rank's math for ``attend``."""
        check_last_dim(x, self.features, f"{type(self).__name__}.attend")
        if self.sequence_parallel:
            x = gather_from_sequence_region(x, TENSOR, -2)
        x = copy_to_tensor_region(x, self.vocab_axes)  # no-op for axes already per-rank
        return jnp.matmul(x, cast_for(self._table(), x).T, preferred_element_type=jnp.float32)
