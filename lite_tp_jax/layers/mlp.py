"""The tensor-parallel MLP: column-parallel up projection(s), activation,
row-parallel down projection.

    x (replicated) -> [up_i, gate_i] = x @ W_up[:, i], x @ W_gate[:, i]     no communication
                   -> h_i = act(gate_i) * up_i   (or act(up_i))             local
                   -> y = all-reduce(h_i @ W_down[i, :]) + b                one all-reduce

Backward mirrors it: one all-reduce for the input gradient. The hidden
activation never leaves its rank. With ``sequence_parallel`` the input and
output are sharded along the sequence: an all-gather on entry and a
reduce-scatter on exit replace the all-reduce (backward: the mirror images).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from lite_tp_jax.core.collectives import enter_tensor_parallel
from lite_tp_jax.layers.linear import ColumnParallelLinear, RowParallelLinear
from lite_tp_jax.parallel.region import Layout, ParallelLayer, sequence_or_replicated
from lite_tp_jax.sharding.rules import MEGATRON, PartitionRules
from lite_tp_jax.core.checks import check_last_dim, check_positive_int

MLPActivation = Literal["swiglu", "gelu"]


class ParallelMLP(ParallelLayer):
    """``swiglu``: ``down(silu(gate(x)) * up(x))`` (Llama); ``gelu``: ``down(gelu(up(x)))`` (GPT-2)."""

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        mesh: Mesh,
        activation: MLPActivation = "swiglu",
        use_bias: bool = False,
        sequence_parallel: bool = False,
        param_dtype: Any = jnp.float32,
        role: str = "mlp",
        rules: PartitionRules = MEGATRON,
        rngs: nnx.Rngs,
    ):
        check_positive_int("ParallelMLP", features=features, hidden_features=hidden_features)
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"ParallelMLP activation must be 'swiglu' or 'gelu', got {activation!r}.")
        self.mesh = mesh
        self.features, self.activation = features, activation
        self.sequence_parallel = sequence_parallel
        common = dict(mesh=mesh, use_bias=use_bias, param_dtype=param_dtype, rules=rules, rngs=rngs)
        self.gate = (
            ColumnParallelLinear(features, hidden_features, role=f"{role}.gate", **common)
            if activation == "swiglu"
            else None
        )
        self.up = ColumnParallelLinear(features, hidden_features, role=f"{role}.up", **common)
        self.down = RowParallelLinear(
            hidden_features, features, sequence_parallel=sequence_parallel, role=f"{role}.down", **common
        )

    def layout(self, x: jax.Array) -> Layout:
        """``x`` and the result: ``[..., seq, features]``, replicated over "tensor" (or
        sharded along ``seq`` with ``sequence_parallel``)."""
        placement = sequence_or_replicated(self.sequence_parallel)
        return Layout((placement,), placement.of(x.ndim))

    def check(self, x: jax.Array) -> None:
        check_last_dim(x, self.features, type(self).__name__)

    def local(self, x: jax.Array) -> jax.Array:
        # Enter the region once for gate and up, so backward has one collective for dx.
        x = enter_tensor_parallel(x, self.sequence_parallel)
        # Named for the remat policies (models/transformer.py): what the backward keeps.
        up = checkpoint_name(self.up(x), "mlp_up")
        if self.gate is not None:
            h = jax.nn.silu(checkpoint_name(self.gate(x), "mlp_gate")) * up
        else:
            h = jax.nn.gelu(up)
        return self.down(checkpoint_name(h, "mlp_hidden"))
