"""Tensor-parallel Flax NNX layers. Each layer's parameters carry their
PartitionSpec and are created sharded over the mesh."""

from lite_tp_jax.layers.linear import ColumnParallelLinear, RowParallelLinear
from lite_tp_jax.layers.mlp import ParallelMLP

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ParallelMLP"]
