"""RMSNorm (Llama) and LayerNorm (GPT-2), run by every rank on the part of the
activation it holds.

The scale (and LayerNorm's bias) is replicated over "tensor". Without sequence parallelism every rank
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

from lite_tp_jax.core.collectives import copy_to_tensor_region
from lite_tp_jax.parallel.region import Layout, ParallelLayer, sequence_or_replicated
from lite_tp_jax.sharding.rules import MEGATRON, PartitionRules
from lite_tp_jax.core.checks import check_last_dim, check_positive_int

ones_init = nnx.initializers.ones_init()
zeros_init = nnx.initializers.zeros_init()


class RMSNorm(ParallelLayer):
    """``y = x / sqrt(mean(x**2) + eps) * scale`` over the last dim, computed in float32."""

    def __init__(
        self,
        features: int,
        *,
        mesh: Mesh,
        eps: float = 1e-5,
        sequence_parallel: bool = False,
        param_dtype: Any = jnp.float32,
        role: str = "norm",
        rules: PartitionRules = MEGATRON,
        rngs: nnx.Rngs,
    ):
        check_positive_int("RMSNorm", features=features)
        self.mesh, self.features, self.eps = mesh, features, eps
        self.sequence_parallel = sequence_parallel
        self.scale = rules.param(
            role, ones_init, rngs.params(), (features,), (None,), mesh, dtype=param_dtype, supports=("replicated",)
        )

    def layout(self, x: jax.Array) -> Layout:
        placement = sequence_or_replicated(self.sequence_parallel)
        return Layout((placement,), placement.of(x.ndim))

    def check(self, x: jax.Array) -> None:
        check_last_dim(x, self.features, type(self).__name__)

    def local(self, x: jax.Array) -> jax.Array:
        scale = self.scale[...]
        if self.sequence_parallel:
            scale = copy_to_tensor_region(scale)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(x.dtype)


class LayerNorm(RMSNorm):
    """``y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias`` over the last dim,
    computed in float32. Parallelism as ``RMSNorm``'s, for both parameters."""

    def __init__(
        self,
        features: int,
        *,
        mesh: Mesh,
        eps: float = 1e-5,
        sequence_parallel: bool = False,
        param_dtype: Any = jnp.float32,
        role: str = "norm",
        rules: PartitionRules = MEGATRON,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            features, mesh=mesh, eps=eps, sequence_parallel=sequence_parallel, param_dtype=param_dtype,
            role=role, rules=rules, rngs=rngs,
        )
        self.bias = rules.param(
            role, zeros_init, rngs.params(), (features,), (None,), mesh, dtype=param_dtype, supports=("replicated",)
        )

    def local(self, x: jax.Array) -> jax.Array:
        scale, bias = self.scale[...], self.bias[...]
        if self.sequence_parallel:
            scale, bias = copy_to_tensor_region(scale), copy_to_tensor_region(bias)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (normed * scale + bias).astype(x.dtype)
