"""A Llama-style decoder-only LM built from the parallel layers.

    tokens -> VocabParallelEmbedding -> layer groups -> Norm -> head -> vocab-parallel loss

``ModelConfig``'s variant fields give the other Hugging Face families the same
skeleton: LayerNorm for RMSNorm, a GeLU MLP, biases, learned positions added
after the embedding (GPT-2), RoPE scaling (Llama 3). The blocks are
``blocks.py``; what they keep for the backward, ``remat.py``.

One region, every axis in use manual. ``loss`` enters a single shard_map
through the public ``@region`` (``parallel/region.py``, as a user's model
does) in which every mesh axis of size > 1, and
always "tensor", is manual, so every collective is one the code asks for:

* "data", "expert" and "fsdp" split the batch rows. Parameters replicated over them
  enter the region through ``broadcast_over`` those axes, whose backward
  all-reduces their gradients once, after the layers' backward; the loss and
  MoE statistics are summed over them with ``sum_over``.
* "tensor" splits each layer Megatron-style: per block and direction, two
  all-reduces of B·S·H, or with ``sequence_parallel`` activations split along
  the sequence between blocks and an all-gather + reduce-scatter instead.
* "expert" also holds the experts of MoE layers (all-to-all dispatch).
* "pipeline" holds chunks of layers (``parallel/pipeline.py``); the
  vocabulary of the embedding and of the head is split over ("pipeline",
  "tensor"), so no stage holds either table whole and no stage computes the
  whole head.

Layer groups are stacked ``[virtual_stages, groups / virtual_stages, ...]``
and run with ``jax.lax.scan`` under ``jax.checkpoint``, so compile time does
not grow with depth. ``compute_dtype`` (bfloat16) applies to the embedding
lookup and from there to every activation: each layer computes in its input's
dtype, casting its float32 parameters as it reads them; norms, softmax, logits
and the loss stay float32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core.axes import CONTEXT, PIPELINE
from lite_tp_jax.core.collectives import sum_over
from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.layers.attention import KVCache
from lite_tp_jax.layers.cross_entropy import vocab_parallel_cross_entropy
from lite_tp_jax.layers.embedding import VocabParallelEmbedding
from lite_tp_jax.layers.moe import load_extremes
from lite_tp_jax.layers.masks import segment_positions
from lite_tp_jax.layers.positions import LearnedPositions
from lite_tp_jax.models.blocks import LayerGroup, make_norm
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.fit import batch_ranks, check_batch, check_layers_fit
from lite_tp_jax.models.remat import remat_policy
from lite_tp_jax.models.stack import scan_states, stack_blocks
from lite_tp_jax.parallel.fsdp import gather_group
from lite_tp_jax.parallel.pipeline import run_pipeline
from lite_tp_jax.parallel.region import (
    STATISTIC,
    enter_region,
    features,
    model_axes,
    model_row_axes,
    region,
    run_in_region,
    token_axes,
)
from lite_tp_jax.sharding.rules import PartitionRules, vocab_axes


@functools.cache
def _head_init(hidden_size: int):
    """N(0, 1/hidden) for the output head; cached, so the sharded initialiser compiles once."""
    return nnx.initializers.normal(hidden_size**-0.5)


def partition_rules(config: ModelConfig) -> PartitionRules:
    """The rule table for ``config``: its ``partition_rules`` overrides before Megatron's defaults."""
    return PartitionRules(dict(config.partition_rules))


def _stack_groups(config: ModelConfig, mesh: Mesh, rules: PartitionRules, rngs: nnx.Rngs) -> LayerGroup:
    """``[virtual_stages, groups / virtual_stages, ...]`` stacked layer groups, split
    as the rule table's "stacked" strategy says (dim 1 over "pipeline")."""
    return stack_blocks(
        lambda rngs: LayerGroup(config, mesh=mesh, rules=rules, rngs=rngs),
        config.num_layers // config.layers_per_group, mesh=mesh, rules=rules, laps=config.virtual_stages, rngs=rngs,
    )


class Transformer(nnx.Module):
    """Decoder-only LM. ``loss(tokens, targets, microbatches=1)`` for training,
    ``__call__(tokens)`` for logits."""

    def __init__(self, config: ModelConfig, *, mesh: Mesh, rules: PartitionRules | None = None, rngs: nnx.Rngs):
        # "auto" is the training run's choice (create_model_and_optimizer, by tensor and train.seq_len); a
        # model built directly runs as written, off unless true (generation needs it off)
        config = replace(config, sequence_parallel=config.sequence_parallel is True)
        check_layers_fit(config, mesh.shape)
        rules = rules or partition_rules(config)
        self.config, self.mesh = config, mesh
        self.axes, self.batch_axes = model_axes(mesh), model_row_axes(mesh)
        # the axes that split the tokens: the loss and statistics are summed over them
        self.token_axes = token_axes(mesh, self.batch_axes)
        self.context_balance = config.context_load_balance  # how the region lays the sequence over "context"
        self.vocab_axes = vocab_axes(mesh)
        sp = config.sequence_parallel
        dtype = jnp.dtype(config.compute_dtype)  # of every activation, from the embedding lookup on
        table = dict(mesh=mesh, sequence_parallel=sp, rules=rules, rngs=rngs)
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, role="embedding", dtype=dtype, **table)
        self.positions = (
            LearnedPositions(
                config.max_positions, config.hidden_size, mesh=mesh, sequence_parallel=sp,
                context_load_balance=config.context_load_balance, rules=rules, rngs=rngs,
            )
            if config.position == "learned"
            else None
        )
        self.layers = _stack_groups(config, mesh, rules, rngs)
        self.final_norm = make_norm(config, mesh=mesh, rules=rules, rngs=rngs, role="final_norm")
        self.head = (
            None
            if config.tie_embeddings
            else VocabParallelEmbedding(
                config.vocab_size, config.hidden_size,
                embedding_init=_head_init(config.hidden_size), role="head", **table,
            )
        )

    @property
    def moe_layers(self) -> int:
        return self.config.num_layers // self.config.moe_every if self.config.moe_every else 0

    # --- entry points ---------------------------------------------------------

    def __call__(self, tokens: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, S, vocab]`` for int tokens ``[B, S]`` (B split over "data" x "expert" x "fsdp");
        ``segments``: packed documents' ids, as in ``loss``."""
        self._check(tokens, tokens, segments=segments)
        output = features(self.config.vocab_size, self.vocab_axes).of(3)
        positions = self._segment_positions(segments)
        return enter_region(
            self, lambda self, tokens, segments, positions: self.local_logits(tokens, 1, segments, positions)[0],
            tokens, segments, positions, output=output,
        )

    def loss(
        self, tokens: jax.Array, targets: jax.Array, microbatches: int = 1, segments: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """Mean next-token cross-entropy over the counted targets plus
        ``aux_loss_weight`` x the MoE load-balancing loss; and metrics
        (``cross_entropy``, ``trained_tokens``: the counted targets,
        ``aux_loss``, ``dropped_fraction``).

        A target below 0 is not counted (padding, the target that would cross
        a document boundary, a prompt token of instruction data). ``segments``
        ``[B, S]``: the document id of each token of packed rows; attention
        stays within a document and positions restart at each
        (``layers/masks.py``). ``microbatches``: pipeline microbatches per
        data-parallel rank (no effect without pipeline parallelism). The
        result does not depend on the mesh."""
        self._check(tokens, targets, microbatches, segments)
        return self.local_loss(tokens, targets, microbatches, segments, self._segment_positions(segments))

    def _segment_positions(self, segments: jax.Array | None) -> jax.Array | None:
        """Learned positions of packed documents, restarting at each (from the whole
        rows, before a context mesh splits them; RoPE's are the attention's)."""
        return None if segments is None or self.positions is None else segment_positions(segments)

    # --- generation with a KV cache ----------------------------------------------

    def new_cache(self, batch: int, slots: int) -> KVCache:
        """Zeroed cache buffers ``[layer groups, blocks, batch, slots, kv heads, head_dim]``
        for ``batch`` rows (split over "data" x "expert" x "fsdp") and ``slots`` positions,
        the kv heads split over "tensor" as the attention layers split them."""
        self._check_cached(batch)
        attention = self.layers.blocks[0].attention
        groups = self.config.num_layers // self.config.layers_per_group
        shape = (groups, self.config.layers_per_group, batch, slots, attention.cache_heads, attention.head_dim)
        sharding = jax.sharding.NamedSharding(self.mesh, self.cache_spec)
        zeros = jax.jit(lambda: jnp.zeros(shape, self.embed.embedding.dtype), out_shardings=sharding)
        return KVCache(zeros(), zeros())

    def prefill(self, tokens: jax.Array, start: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Runs the prompts ``tokens [B, P]`` (left-padded: row b's prompt starts
        at ``start[b]``) once, filling cache slots ``0 .. P-1``. Returns the logits
        ``[B, vocab]`` of the last position, and the cache."""
        return self.decode(tokens, jnp.zeros((), jnp.int32), start, cache)

    def decode(self, tokens: jax.Array, cursor: jax.Array, start: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Extends every row by ``tokens [B, S]`` (S = 1 when decoding) in cache
        slots ``cursor .. cursor+S-1``; returns the logits ``[B, vocab]`` of the
        last one, and the cache. One region: the model's collectives, no others."""
        self._check_cached(tokens.shape[0])
        rows = P(self.batch_axes)
        logits, cache = run_in_region(
            self, lambda self, *args: self.local_decode(*args), tokens, cursor, start, cache, mesh=self.mesh,
            arg_specs=(rows, P(), rows, self.cache_spec), out_specs=(P(self.batch_axes, self.vocab_axes), self.cache_spec),
            row_axes=self.batch_axes, axes=self.axes,
        )
        return logits[:, : self.config.vocab_size], cache

    def local_decode(self, tokens, cursor, start, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One rank's math for ``decode``: this rank's vocabulary slice of the last
        position's logits ``[B, vocab_i]``, and its cache shards."""
        x = self.embed(tokens)
        if self.positions is not None:  # learned positions: row b's token in slot t is at t - start[b]
            slots = cursor + jnp.arange(tokens.shape[1])
            positions = jnp.clip(slots[None, :] - start[:, None], 0, self.config.max_positions - 1)
            x = x + jnp.take(self.positions.embedding[...], positions, axis=0).astype(x.dtype)
        graphdef, stacked = nnx.split(self.layers)
        stacked = jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), stacked)  # [v, G/v] -> [G]

        def one_group(carry, group):  # the cache is carried whole and updated in place
            group_state, index = group
            group_state = gather_group(group_state, carry[0].dtype)  # fsdp: this group's weights
            return nnx.merge(graphdef, group_state).decode(*carry, index, cursor, start), None

        groups = jax.tree.leaves(stacked)[0].shape[0]
        (x, cache), _ = jax.lax.scan(one_group, (x, cache), (stacked, jnp.arange(groups)))
        x = self.final_norm(x[:, -1:])
        head = self.embed if self.head is None else self.head
        return head.local_attend(x)[:, 0], cache

    @property
    def cache_spec(self) -> P:
        """PartitionSpec of the cache buffers: rows over the batch axes in use, kv heads as the attention splits them."""
        attention_spec = tuple(self.layers.blocks[0].attention.cache_spec)
        return P(None, None, self.batch_axes or None, *attention_spec[1:])

    def _check_cached(self, batch: int) -> None:
        if self.mesh.shape[CONTEXT] > 1:
            raise BadInput(
                f"Generation with a KV cache does not split the sequence, but this model's mesh has context "
                f"{self.mesh.shape[CONTEXT]}; build it with mesh.context=1 (the parameters are the same)."
            )
        if self.mesh.shape[PIPELINE] > 1 or self.config.sequence_parallel:
            raise BadInput(
                "Generation with a KV cache needs a model built with mesh.pipeline=1 and "
                "sequence_parallel=false (the parameters are the same; restore them onto such a mesh)."
            )
        rows = batch_ranks(self.mesh.shape)
        if batch % rows:
            raise BadInput(f"batch {batch} must be divisible by mesh data x expert x fsdp = {rows}.")

    # --- one rank's math --------------------------------------------------------

    @region(output=(STATISTIC, STATISTIC))
    def local_loss(self, tokens, targets, microbatches, segments=None, positions=None):
        """The loss is the mean over the counted targets of the *global* batch:
        this rank's sum of token losses and its count of counted targets are
        summed over the axes that split the tokens ("data", "expert" and
        "context": ``sum_over``, one all-reduce of the pair) and divided after.
        On a context mesh ``tokens``, ``targets``, ``segments`` and ``positions``
        are this rank's slots of the sequence (``parallel/context.py``). So every rank's
        gradient is d(its token sum)/dθ over the global count, and the
        gradients' sum over those axes (``broadcast_over``'s backward) is the
        global mean's, however the counted tokens fall over the ranks."""
        logits, stats = self.local_logits(tokens, microbatches, segments, positions)
        token_losses = vocab_parallel_cross_entropy(logits, targets, self.config.vocab_size, vocab_axes=self.vocab_axes)
        counted = targets >= 0
        # this rank's sum of token losses and its count, reduced together: one all-reduce,
        # ordered after the forward like the statistics' (an independent one could meet
        # the layers' collectives in another order on another rank)
        totals = jnp.stack([jnp.where(counted, token_losses, 0.0).sum(), counted.sum().astype(jnp.float32)])
        sums = dict(stats)  # over this rank's rows
        if self.token_axes:
            totals = sum_over(totals, self.token_axes)
            sums = {name: sum_over(value, self.token_axes) for name, value in sums.items()}
        rows = tokens.shape[0] * math.prod(self.mesh.shape[axis] for axis in self.batch_axes)
        trained_tokens = jax.lax.stop_gradient(totals[1])
        cross_entropy = totals[0] / jnp.maximum(trained_tokens, 1.0)
        aux_loss = sums["aux_loss"] / (rows * max(self.moe_layers, 1))
        z_loss = sums["z_loss"] / (rows * max(self.moe_layers, 1))
        metrics = {
            "cross_entropy": cross_entropy,
            "trained_tokens": trained_tokens,  # the counted targets of the global batch
            "aux_loss": aux_loss,
            "dropped_fraction": sums["dropped"] / jnp.maximum(sums["assignments"], 1.0),
        }
        if self.moe_layers:  # the expert loads summed over the MoE layers
            extremes = load_extremes(sums["load"])
            metrics.update(z_loss=z_loss, expert_load_max=extremes["load_max"], expert_load_min=extremes["load_min"])
        # + 0 whose gradient w.r.t. each layer's expert bias is the step's load error (aux-free balancing)
        loss = cross_entropy + self.config.aux_loss_weight * aux_loss + sums["balance"]
        if self.config.router_z_loss_weight:
            loss = loss + self.config.router_z_loss_weight * z_loss
        return loss, metrics

    def local_logits(self, tokens, microbatches, segments=None, positions=None):
        """This rank's vocabulary slice of the logits for its batch rows, and MoE stats.
        ``positions``: the learned positions of packed documents (``_segment_positions``)."""
        x = self.embed(tokens)
        if self.positions is not None:
            if positions is None and segments is not None:
                positions = segment_positions(segments)
            x = self.positions(x) if positions is None else self.positions(x, positions)
        x, stats = self._run_layers(x, microbatches, segments)
        x = self.final_norm(x)
        head = self.embed if self.head is None else self.head
        return head.local_attend(x), stats

    def _run_layers(self, x, microbatches, segments=None):
        graphdef, stacked = nnx.split(self.layers)

        def run_chunk(chunk, x):
            return scan_states(graphdef, chunk, x, remat_policy(self.config.remat), segments)

        if self.mesh.shape[PIPELINE] == 1:  # all layers here, in order: [v, G/v] -> [G]
            return run_chunk(jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), stacked), x)
        rows = x.shape[0]  # divisible by microbatches: check_batch
        # microbatch k takes rows k, k+m, k+2m, ...: a local reshape, whatever the batch sharding
        x = x.reshape(rows // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
        y, stats = run_pipeline(run_chunk, stacked, x)
        return y.swapaxes(0, 1).reshape(rows, *y.shape[2:]), stats

    def _check(self, tokens: jax.Array, targets: jax.Array, microbatches: int = 1, segments: jax.Array | None = None) -> None:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}.")
        if tokens.shape != targets.shape:
            raise ValueError(f"targets shape {targets.shape} must equal tokens shape {tokens.shape}.")
        if segments is not None:
            if segments.shape != tokens.shape or not jnp.issubdtype(segments.dtype, jnp.integer):
                raise ValueError(f"segments must be integer ids shaped like tokens {tokens.shape}, got {segments.dtype}{list(segments.shape)}.")
            if self.mesh.shape[PIPELINE] > 1:
                raise BadInput(
                    "packed documents (segment ids) need mesh.pipeline = 1: the pipeline stages do not "
                    "carry the segment ids yet; set data.packing=false or mesh.pipeline=1."
                )
        check_batch(self.config, self.mesh.shape, tokens.shape[0], tokens.shape[1], microbatches)
