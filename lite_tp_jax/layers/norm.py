"""RMSNorm, run by every rank on the part of the activation it holds.

The scale is replicated over "tensor". Without sequence parallelism every rank
normalises the same full activation and gets the same scale gradient: no
communication. With ``sequence_parallel`` each rank normalises its sequence
shard (1/TP of the work), so its scale gradient is a partial sum, all-reduced
over "tensor" in the backward pass (``copy_to_tensor_region``), as in Megatron-LM.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.collectives import copy_to_tensor_region
from lite_tp_jax.sharding import (
    call_local,
    check_last_dim,
    ones_init,
    sharded_param,
)
from lite_tp_jax.validate import check_positive_int


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x**2) + eps) * scale`` over the last dim, computed in float32."""

    def __init__(
        self,
        features: int,
        *,
        mesh: Mesh,
        eps: float = 1e-5,
        sequence_parallel: bool = False,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive_int("RMSNorm", features=features)
        self.mesh, self.features, self.eps = mesh, features, eps
        self.sequence_parallel = sequence_parallel
        self.scale = sharded_param(ones_init, rngs.params(), (features,), P(), mesh, dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_last_dim(x, self.features, type(self).__name__)
        return call_local(self, x)

    def local(self, x: jax.Array) -> jax.Array:
        scale = self.scale[...]
        if self.sequence_parallel:
            scale = copy_to_tensor_region(scale)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(x.dtype)
