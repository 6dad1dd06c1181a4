"""The residual blocks of the decoder and the unit the layer scan stacks.

    Block:       x + Attention(Norm(x)),  then  x + MLP(Norm(x))   (MLP: SwiGLU/GeLU, or MoE)
    LayerGroup:  ``moe_every`` blocks, the last an MoE block (or one dense block)

Each block enters and leaves the tensor region inside its attention and MLP
(one all-reduce each per direction, or an all-gather and a reduce-scatter with
sequence parallelism); the tensors ``checkpoint_name`` marks are what the remat
policies (``remat.py``) may keep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from lite_tp_jax.layers.attention import KVCache, ParallelAttention
from lite_tp_jax.layers.mlp import ParallelMLP
from lite_tp_jax.layers.moe import MoEMLP
from lite_tp_jax.layers.norm import LayerNorm, RMSNorm
from lite_tp_jax.layers.rotary import RopeScaling
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.parallel.region import TOKENS, Layout, ParallelLayer, sequence_or_replicated
from lite_tp_jax.sharding.rules import PartitionRules


def make_norm(config: ModelConfig, *, mesh: Mesh, rules: PartitionRules, rngs: nnx.Rngs, role: str = "norm") -> RMSNorm | LayerNorm:
    """The model's normalisation layer: RMSNorm, or LayerNorm with ``norm: layer``."""
    norm = LayerNorm if config.norm == "layer" else RMSNorm
    return norm(
        config.hidden_size, mesh=mesh, eps=config.norm_eps, sequence_parallel=config.sequence_parallel,
        role=role, rules=rules, rngs=rngs,
    )


def rope_scaling(config: ModelConfig) -> RopeScaling | None:
    if config.rope_scaling == "none":
        return None
    return RopeScaling(
        config.rope_scaling, config.rope_scaling_factor, config.rope_low_freq_factor,
        config.rope_high_freq_factor, config.rope_original_max_positions,
    )


def zero_stats(num_experts: int) -> dict[str, jax.Array]:
    """Per-layer MoE statistics, summed over batch rows: the load-balancing and
    router z-losses, dropped and all (token, choice) assignments, the
    assignments per expert ``load [num_experts]``, and ``balance`` (0, carrying
    the expert biases' load errors as their gradient). Zero for a dense layer."""
    scalars = {name: jnp.zeros((), jnp.float32) for name in ("aux_loss", "z_loss", "dropped", "assignments", "balance")}
    return {**scalars, "load": jnp.zeros((num_experts,), jnp.float32)}


class Block(ParallelLayer):
    """Pre-norm residual block: attention, then a SwiGLU MLP or a mixture of experts."""

    def __init__(
        self, config: ModelConfig, *, mesh: Mesh, moe: bool = False, rules: PartitionRules | None = None, rngs: nnx.Rngs
    ):
        rules = rules or PartitionRules(dict(config.partition_rules))
        self.mesh, self.sequence_parallel = mesh, config.sequence_parallel
        self.num_experts = config.num_experts
        self.attention_norm = make_norm(config, mesh=mesh, rules=rules, rngs=rngs)
        self.attention = ParallelAttention(
            config.hidden_size,
            config.num_heads,
            mesh=mesh,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.resolved_head_dim,
            use_bias=config.qkv_bias,
            out_bias=config.out_bias,
            sequence_parallel=config.sequence_parallel,
            rope_theta=config.rope_theta if config.position == "rope" else None,
            rope_scaling=rope_scaling(config),
            qk_norm_eps=config.norm_eps if config.qk_norm else None,
            kernel=config.attention,
            sliding_window=config.sliding_window,
            context_parallel=config.context_parallel,
            context_load_balance=config.context_load_balance,
            rules=rules,
            rngs=rngs,
        )
        self.mlp_norm = make_norm(config, mesh=mesh, rules=rules, rngs=rngs)
        mlp = dict(mesh=mesh, sequence_parallel=config.sequence_parallel, rules=rules, rngs=rngs)
        self.mlp = (
            MoEMLP(
                config.hidden_size, config.expert_ffn_size, num_experts=config.num_experts,
                top_k=config.top_k, capacity_factor=config.capacity_factor, scoring=config.router_scoring,
                norm_topk_prob=config.norm_topk_prob, shared_hidden_features=config.shared_expert_size,
                shared_gate=config.shared_expert_gate, expert_bias=config.bias_update_rate > 0, **mlp,
            )
            if moe
            else ParallelMLP(
                config.hidden_size, config.ffn_hidden_size, activation=config.activation,
                use_bias=config.mlp_bias, **mlp,
            )
        )

    def __call__(self, x: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        """``x``: ``[B, S, H]`` (sharded along S with sequence parallelism); ``segments``:
        ``[B, S]`` document ids of packed rows (whole on every tensor rank). Returns the block output."""
        placement = sequence_or_replicated(self.sequence_parallel)
        inputs = (placement,) if segments is None else (placement, TOKENS)
        args = (x,) if segments is None else (x, segments)
        return self.run(lambda self, *args: self.local(*args)[0], Layout(inputs, placement.of(x.ndim)), *args)

    def local(self, x: jax.Array, segments: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        # checkpoint_name: what the remat policies may keep (REMAT_SAVES)
        h = checkpoint_name(self.attention_norm(x), "attention_input")
        x = x + (self.attention(h) if segments is None else self.attention(h, segments))
        x = checkpoint_name(x, "attention_residual")
        h = checkpoint_name(self.mlp_norm(x), "mlp_input")
        if isinstance(self.mlp, MoEMLP):
            y, stats = self.mlp(h)
            return x + y, {**zero_stats(self.num_experts), **stats}
        return x + self.mlp(h), zero_stats(self.num_experts)

    def decode(self, x, cache: KVCache, layer: tuple, cursor, start) -> tuple[jax.Array, KVCache]:
        """``local`` with the attention extending and reading the KV cache (its buffers ``cache.key[layer]``)."""
        h, cache = self.attention.decode(self.attention_norm(x), cache, layer, cursor, start)
        x = x + h
        y = self.mlp(self.mlp_norm(x))
        return x + (y[0] if isinstance(self.mlp, MoEMLP) else y), cache


class LayerGroup(nnx.Module):
    """The unit that is stacked and scanned: ``moe_every`` blocks, the last an
    MoE block (or one dense block)."""

    def __init__(self, config: ModelConfig, *, mesh: Mesh, rules: PartitionRules, rngs: nnx.Rngs):
        size = config.layers_per_group
        self.blocks = nnx.List(
            [
                Block(config, mesh=mesh, moe=bool(config.moe_every) and i == size - 1, rules=rules, rngs=rngs)
                for i in range(size)
            ]
        )

    def __call__(self, x: jax.Array, segments: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        stats = zero_stats(self.blocks[0].num_experts)
        for i, block in enumerate(self.blocks):
            if i:  # kept, or the backward would rerun the previous block's reduction to get it back
                x = checkpoint_name(x, "block_input")
            x, block_stats = block.local(x, segments)
            stats = jax.tree.map(jnp.add, stats, block_stats)
        return x, stats

    def decode(self, x, cache: KVCache, group: jax.Array, cursor, start) -> tuple[jax.Array, KVCache]:
        """``cache``: every layer's buffers ``[groups, blocks, B, slots, kv heads,
        head_dim]``; block i of this group uses ``[group, i]``."""
        for i, block in enumerate(self.blocks):
            x, cache = block.decode(x, cache, (group, i), cursor, start)
        return x, cache
