"""The vocabulary-parallel embedding (Megatron-LM's ``VocabParallelEmbedding``),
usable as a tied output head.

The table ``embedding [vocab, features]`` is split on the vocabulary over
``vocab_axes`` (default "tensor"; a pipeline-parallel model uses
("pipeline", "tensor") so that no stage holds the whole table), padded at its
end to a multiple of the number of ranks (see ``padding.py``): rank i holds
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

from lite_tp_jax.core.collectives import (
    cast_for,
    copy_to_tensor_region,
    gather_from_sequence_region,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
    sum_over,
)
from lite_tp_jax.core.axes import TENSOR
from lite_tp_jax.sharding.padding import mask_padding
from lite_tp_jax.parallel.region import (
    TOKENS,
    Layout,
    ParallelLayer,
    features,
    sequence_or_replicated,
)
from lite_tp_jax.sharding.rules import MEGATRON, Initializer, PartitionRules
from lite_tp_jax.core.checks import check_last_dim, check_positive_int

default_embedding_init: Initializer = nnx.initializers.normal(stddev=0.02)


def check_integer_ids(ids: jax.Array, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"{name} expects integer token ids, got dtype {jnp.result_type(ids)}.")


class VocabParallelEmbedding(ParallelLayer):
    """``table[ids]`` with the table ``[num_embeddings, features]`` split on the
    vocabulary (the rule table's "vocab" strategy: over "tensor", and over
    ("pipeline", "tensor") on a pipelined mesh).

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
        embedding_init: Initializer = default_embedding_init,
        param_dtype: Any = jnp.float32,
        role: str = "embedding",
        rules: PartitionRules = MEGATRON,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        check_positive_int("VocabParallelEmbedding", num_embeddings=num_embeddings, features=features)
        self.mesh = mesh
        self.dtype = dtype  # of the looked-up vectors (the compute dtype); None: param_dtype
        self.num_embeddings, self.features = num_embeddings, features
        self.sequence_parallel = sequence_parallel
        self.embedding = rules.param(
            role, embedding_init, rngs.params(), (num_embeddings, features), ("vocab", "features"), mesh, dtype=param_dtype,
            supports=("vocab",),
        )
        vocab_entry = self.embedding.get_metadata()["out_sharding"][0]
        self.vocab_axes = (vocab_entry,) if isinstance(vocab_entry, str) else tuple(vocab_entry)
        self.other_vocab_axes = tuple(a for a in self.vocab_axes if a != TENSOR)

    def _table(self) -> jax.Array:
        return mask_padding(self.embedding[...], 0, self.num_embeddings, self.vocab_axes)

    # --- lookup -------------------------------------------------------------

    def layout(self, ids: jax.Array) -> Layout:
        """``ids`` ``[..., seq]`` replicated over "tensor"; the vectors
        ``[..., seq, features]`` replicated (or sharded along ``seq`` with ``sequence_parallel``)."""
        return Layout((TOKENS,), sequence_or_replicated(self.sequence_parallel).of(ids.ndim + 1))

    def check(self, ids: jax.Array) -> None:
        check_integer_ids(ids, type(self).__name__)

    def local(self, ids: jax.Array) -> jax.Array:
        """One rank's math: ``ids`` full (replicated over "tensor")."""
        table = self._table()
        table = table if self.dtype is None else cast_for(table, ids, self.dtype)
        rows = table.shape[0]
        local_ids = ids - jax.lax.axis_index(self.vocab_axes) * rows
        mine = (local_ids >= 0) & (local_ids < rows)
        vectors = jnp.take(table, jnp.where(mine, local_ids, 0), axis=0)
        partial_sums = jnp.where(mine[..., None], vectors, jnp.zeros((), vectors.dtype))
        if self.sequence_parallel:
            partial_sums = reduce_scatter_to_sequence_region(partial_sums, TENSOR, -2)
            return sum_over(partial_sums, self.other_vocab_axes) if self.other_vocab_axes else partial_sums
        return reduce_from_tensor_region(partial_sums, self.vocab_axes)

    # --- tied output head -----------------------------------------------------

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits ``x @ table.T`` of a tied output head. ``x``: ``[..., seq, features]``,
        replicated over "tensor" (or sharded along ``seq`` with ``sequence_parallel``).

        Inside a region: this rank's ``[..., seq, vocab_i]`` slice of the padded
        vocabulary (padded entries are 0; ``vocab_parallel_cross_entropy`` masks
        them). From ordinary jit code: the logical ``[..., seq, vocab]`` logits,
        sharded over the vocabulary axes on the last dimension."""
        check_last_dim(x, self.features, f"{type(self).__name__}.attend")
        layout = Layout(
            (sequence_or_replicated(self.sequence_parallel),), features(self.num_embeddings, self.vocab_axes).of(x.ndim)
        )
        return self.run(type(self).local_attend, layout, x)

    def local_attend(self, x: jax.Array) -> jax.Array:
        """One rank's math for ``attend``."""
        if self.sequence_parallel:
            x = gather_from_sequence_region(x, TENSOR, -2)
        x = copy_to_tensor_region(x, self.vocab_axes)  # no-op for axes already per-rank
        return jnp.matmul(x, cast_for(self._table(), x).T, preferred_element_type=jnp.float32)
