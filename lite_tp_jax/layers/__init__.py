"""Parallel Flax NNX layers. Each layer's parameters carry their PartitionSpec
and are created sharded over the mesh."""

from lite_tp_jax.layers.attention import ParallelAttention
from lite_tp_jax.layers.cross_entropy import vocab_parallel_cross_entropy
from lite_tp_jax.layers.embedding import VocabParallelEmbedding
from lite_tp_jax.layers.linear import ColumnParallelLinear, RowParallelLinear
from lite_tp_jax.layers.mlp import ParallelMLP
from lite_tp_jax.layers.moe import MoEMLP
from lite_tp_jax.layers.norm import RMSNorm

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "ParallelMLP", "ParallelAttention",
    "VocabParallelEmbedding", "vocab_parallel_cross_entropy", "RMSNorm", "MoEMLP",
]
