"""A Llama-style decoder-only LM built from the tensor-parallel layers.

    tokens -> VocabParallelEmbedding -> L x Block -> RMSNorm -> head -> vocab-parallel loss
    Block:  x + Attention(RMSNorm(x)),  then  x + SwiGLU MLP(RMSNorm(x))

The whole forward runs in one tensor-parallel region (a shard_map over
"tensor"; "data" stays automatic), so activations never leave their ranks
between layers. Per block and direction there are two all-reduces of B·S·H;
with ``sequence_parallel`` the activations between blocks are sharded along
the sequence and each all-reduce becomes an all-gather (entering attention or
the MLP) plus a reduce-scatter (leaving it). The logits stay split over the
vocabulary and go straight into ``vocab_parallel_cross_entropy``.

Blocks are stacked (``nnx.vmap``) and run with ``jax.lax.scan``, so compile
time does not grow with depth. ``remat`` picks what the backward pass
recomputes: ``full`` saves only the collectives' outputs, ``selective`` also
the matmul outputs; no policy runs a collective twice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.collectives import COLLECTIVE_OUTPUT
from lite_tp_jax.layers.attention import ParallelAttention
from lite_tp_jax.layers.cross_entropy import vocab_parallel_cross_entropy
from lite_tp_jax.layers.embedding import VocabParallelEmbedding
from lite_tp_jax.layers.linear import ColumnParallelLinear
from lite_tp_jax.layers.mlp import ParallelMLP
from lite_tp_jax.layers.norm import RMSNorm
from lite_tp_jax.models.config import ModelConfig, Remat
from lite_tp_jax.sharding import (
    check_sequence_divisible,
    enter_tensor_region,
    feature_spec,
    in_tensor_region,
    sequence_spec,
)


class Block(nnx.Module):
    """Pre-norm residual block: attention then SwiGLU MLP, both tensor-parallel."""

    def __init__(self, config: ModelConfig, *, mesh: Mesh, rngs: nnx.Rngs):
        self.mesh, self.sequence_parallel = mesh, config.sequence_parallel
        norm = dict(mesh=mesh, eps=config.norm_eps, sequence_parallel=config.sequence_parallel, rngs=rngs)
        self.attention_norm = RMSNorm(config.hidden_size, **norm)
        self.attention = ParallelAttention(
            config.hidden_size,
            config.num_heads,
            mesh=mesh,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.resolved_head_dim,
            sequence_parallel=config.sequence_parallel,
            rope_theta=config.rope_theta,
            rngs=rngs,
        )
        self.mlp_norm = RMSNorm(config.hidden_size, **norm)
        self.mlp = ParallelMLP(
            config.hidden_size,
            config.ffn_hidden_size,
            mesh=mesh,
            activation="swiglu",
            sequence_parallel=config.sequence_parallel,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``[B, S, H]`` (``[B, S/TP, H]`` per rank with sequence parallelism)."""
        if in_tensor_region():
            return self.local(x)
        spec = P()
        if self.sequence_parallel:
            check_sequence_divisible(x, self.mesh, type(self).__name__)
            spec = sequence_spec(x.ndim)
        return enter_tensor_region(self, type(self).local, x, arg_specs=(spec,), out_specs=spec)

    def local(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def remat_policy(remat: Remat):
    """The ``jax.checkpoint`` policy for a block, or None for no rematerialisation."""
    never_recompute_collectives = jax.checkpoint_policies.save_only_these_names(COLLECTIVE_OUTPUT)
    if remat == "none":
        return None
    if remat == "full":
        return never_recompute_collectives
    if remat == "selective":
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable, never_recompute_collectives
        )
    raise ValueError(f"remat must be one of none, full, selective, got {remat!r}.")


class Transformer(nnx.Module):
    """Decoder-only LM. ``loss(tokens, targets)`` for training, ``__call__`` for logits."""

    def __init__(self, config: ModelConfig, *, mesh: Mesh, rngs: nnx.Rngs):
        self.config, self.mesh = config, mesh
        sp = config.sequence_parallel
        self.embed = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, mesh=mesh, sequence_parallel=sp, rngs=rngs
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, mesh=mesh, rngs=rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(
            config.hidden_size, mesh=mesh, eps=config.norm_eps, sequence_parallel=sp, rngs=rngs
        )
        self.head = (
            None
            if config.tie_embeddings
            else ColumnParallelLinear(
                config.hidden_size, config.vocab_size, mesh=mesh, use_bias=False,
                sequence_parallel=sp, rngs=rngs,
            )
        )

    # --- entry points (enter the tensor-parallel region once) -----------------

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``[B, S, vocab]`` for int tokens ``[B, S]``, sharded over "tensor" on vocab."""
        self._check_tokens(tokens)
        logits = enter_tensor_region(
            self, type(self).local_logits, tokens, arg_specs=(P(),), out_specs=feature_spec(3)
        )
        return logits[..., : self.config.vocab_size]

    def loss(self, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean next-token cross-entropy over ``[B, S]`` tokens (a float32 scalar)."""
        self._check_tokens(tokens)
        if tokens.shape != targets.shape:
            raise ValueError(f"targets shape {targets.shape} must equal tokens shape {tokens.shape}.")
        if in_tensor_region():
            return jnp.mean(self.local_token_losses(tokens, targets))
        per_token = enter_tensor_region(
            self, type(self).local_token_losses, tokens, targets, arg_specs=(P(), P()), out_specs=P()
        )
        return jnp.mean(per_token)

    # --- one rank's math -------------------------------------------------------

    def local_token_losses(self, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        return vocab_parallel_cross_entropy(self.local_logits(tokens), targets, self.config.vocab_size)

    def local_logits(self, tokens: jax.Array) -> jax.Array:
        """This rank's vocabulary slice of the logits, ``[B, S, vocab/TP]``."""
        x = self.embed(tokens)
        x = self.final_norm(self._run_blocks(x))
        return self.embed.attend(x) if self.head is None else self.head(x)

    def _run_blocks(self, x: jax.Array) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)

        def one_block(x, block_state):
            return nnx.merge(graphdef, block_state)(x), None

        policy = remat_policy(self.config.remat)
        if policy is not None:
            one_block = jax.checkpoint(one_block, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(one_block, x, stacked)
        return x

    def _check_tokens(self, tokens: jax.Array) -> None:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}.")
        if self.config.sequence_parallel:
            check_sequence_divisible(tokens[..., None], self.mesh, "Transformer")
