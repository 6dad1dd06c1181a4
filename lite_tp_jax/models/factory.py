"""The model factory: a ``Transformer`` of a config on a mesh, with its rule
table; concrete (initialised from a seed, identically for any mesh) or
abstract (``nnx.eval_shape``: shapes, dtypes and shardings, no arrays)."""

from __future__ import annotations

from flax import nnx
from jax.sharding import Mesh

from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer, partition_rules


def create_model(config: ModelConfig, mesh: Mesh, *, seed: int = 0) -> Transformer:
    """A sharded ``Transformer``; each device computes only its own shards of the initial values."""
    return Transformer(config, mesh=mesh, rules=partition_rules(config), rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig, mesh: Mesh) -> Transformer:
    """The model as ``nnx.eval_shape`` builds it: to restore a checkpoint into, or to plan with."""
    return nnx.eval_shape(lambda: create_model(config, mesh))
