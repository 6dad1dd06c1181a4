"""A Llama-style decoder-only LM built from the parallel layers.

    tokens -> VocabParallelEmbedding -> layer groups -> RMSNorm -> head -> vocab-parallel loss
    Block:  x + Attention(RMSNorm(x)),  then  x + MLP(RMSNorm(x))   (MLP: SwiGLU, or MoE)

One region, every axis manual. ``loss`` enters a single shard_map in which
every mesh axis in use (size > 1, and always "tensor") is manual, so every
collective is one the code asks for:

* "data" and "expert" split the batch rows. Parameters replicated over them
  get their gradients summed over them by JAX's varying/invariant typing (the
  backward of using an invariant weight with per-rank data is a psum).
* "tensor" splits each layer Megatron-style: per block and direction, two
  all-reduces of B·S·H, or with ``sequence_parallel`` activations split along
  the sequence between blocks and an all-gather + reduce-scatter instead.
* "expert" also holds the experts of MoE layers (all-to-all dispatch).
* "pipeline" holds chunks of layers (``parallel/pipeline.py``); the
  vocabulary of the embedding and of the head is split over ("pipeline",
  "tensor"), so no stage holds either table whole and no stage computes the
  whole head.

Layers are grouped (``moe_every`` layers, the last one MoE; or single dense
layers), stacked ``[virtual_stages, groups / virtual_stages, ...]`` and run
with ``jax.lax.scan``, so compile time does not grow with depth. ``remat``
picks what a layer keeps for its backward (``REMAT_SAVES``, tensors named with
``checkpoint_name`` in the layers' math); everything else is recomputed:

* ``none``: every matmul's input (norm outputs, q/k/v, attention output, MLP
  gate/up/hidden) and the softmax output (Megatron without recomputation);
* ``selective``: the same without the softmax: scores and softmax are
  recomputed (Korthikanti et al.'s selective recomputation);
* ``full``: only the residual stream (layer input, and after attention).

With ``sequence_parallel`` the saved norm outputs are the sequence shards, as
in Megatron-LM: the backward all-gathers them again (one all-gather of
``B·S·H`` per attention and MLP per layer, the forward's, run twice), so every
saved activation is 1/t of the sequence. No policy reruns an all-reduce or a
reduce-scatter.

``compute_dtype`` (bfloat16) applies to the embedding lookup and from there to
every activation: each layer computes in its input's dtype, casting its
float32 parameters as it reads them; norms, softmax, logits and the loss stay
float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.collectives import reduce_from_tensor_region
from lite_tp_jax.layers.attention import ParallelAttention
from lite_tp_jax.layers.cross_entropy import vocab_parallel_cross_entropy
from lite_tp_jax.layers.embedding import VocabParallelEmbedding
from lite_tp_jax.layers.mlp import ParallelMLP
from lite_tp_jax.layers.moe import MoEMLP
from lite_tp_jax.layers.norm import RMSNorm
from lite_tp_jax.mesh import AXES, DATA, EXPERT, PIPELINE, TENSOR
from lite_tp_jax.models.config import ModelConfig, Remat
from lite_tp_jax.parallel.pipeline import run_pipeline
from lite_tp_jax.sharding import enter_tensor_region, in_tensor_region, sequence_spec

BATCH_AXES = (DATA, EXPERT)  # the mesh axes that split batch rows


@functools.cache
def _head_init(hidden_size: int):
    """N(0, 1/hidden) for the output head; cached, so the sharded initialiser compiles once."""
    return nnx.initializers.normal(hidden_size**-0.5)


def region_axes(config: ModelConfig, mesh: Mesh) -> frozenset[str]:
    """The axes manual in the model's region: "tensor", those of size > 1, and
    "expert" whenever there are experts. (Axes of size 1 are left out, so no
    trivial collectives over them appear.)"""
    used = {axis for axis in AXES if mesh.shape[axis] > 1}
    return frozenset({TENSOR, *used, *([EXPERT] if config.moe_every else [])})


def zero_stats() -> dict[str, jax.Array]:
    """Per-layer MoE statistics, summed over batch rows: the load-balancing loss,
    dropped and all (token, choice) assignments. Zero for a dense layer."""
    return {name: jnp.zeros((), jnp.float32) for name in ("aux_loss", "dropped", "assignments")}


class Block(nnx.Module):
    """Pre-norm residual block: attention, then a SwiGLU MLP or a mixture of experts."""

    def __init__(self, config: ModelConfig, *, mesh: Mesh, moe: bool = False, rngs: nnx.Rngs):
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
            kernel=config.attention,
            rngs=rngs,
        )
        self.mlp_norm = RMSNorm(config.hidden_size, **norm)
        mlp = dict(mesh=mesh, sequence_parallel=config.sequence_parallel, rngs=rngs)
        self.mlp = (
            MoEMLP(
                config.hidden_size, config.ffn_hidden_size, num_experts=config.num_experts,
                top_k=config.top_k, capacity_factor=config.capacity_factor, **mlp,
            )
            if moe
            else ParallelMLP(config.hidden_size, config.ffn_hidden_size, activation="swiglu", **mlp)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``[B, S, H]`` (sharded along S with sequence parallelism). Returns the block output."""
        if in_tensor_region():
            return self.local(x)[0]
        spec = sequence_spec(x.ndim) if self.sequence_parallel else P()
        return enter_tensor_region(self, lambda self, x: self.local(x)[0], x, arg_specs=(spec,), out_specs=spec)

    def local(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        # checkpoint_name: what the remat policies may keep (REMAT_SAVES)
        x = x + self.attention(checkpoint_name(self.attention_norm(x), "attention_input"))
        x = checkpoint_name(x, "attention_residual")
        h = checkpoint_name(self.mlp_norm(x), "mlp_input")
        if isinstance(self.mlp, MoEMLP):
            y, stats = self.mlp(h)
            return x + y, stats
        return x + self.mlp(h), zero_stats()


class LayerGroup(nnx.Module):
    """The unit that is stacked and scanned: ``moe_every`` blocks, the last an
    MoE block (or one dense block)."""

    def __init__(self, config: ModelConfig, *, mesh: Mesh, rngs: nnx.Rngs):
        size = config.layers_per_group
        self.blocks = nnx.List(
            [Block(config, mesh=mesh, moe=bool(config.moe_every) and i == size - 1, rngs=rngs) for i in range(size)]
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        stats = zero_stats()
        for block in self.blocks:
            x, block_stats = block.local(x)
            stats = jax.tree.map(jnp.add, stats, block_stats)
        return x, stats


_RESIDUAL_STREAM = ("attention_residual",)  # and the layer input, which scan keeps anyway
_MATMUL_INPUTS = (
    "attention_input", "query", "key", "value", "attention_output",  # layers/attention.py
    "mlp_input", "mlp_gate", "mlp_up", "mlp_hidden",  # layers/mlp.py
    "moe_dispatched", "moe_combined",  # layers/moe.py: all-to-all outputs, never rerun
)
REMAT_SAVES: dict[str, tuple[str, ...]] = {
    "none": _RESIDUAL_STREAM + _MATMUL_INPUTS + ("attention_weights",),
    "selective": _RESIDUAL_STREAM + _MATMUL_INPUTS,
    "full": _RESIDUAL_STREAM,
}
"""The named tensors each remat setting keeps per layer for the backward."""


def remat_policy(remat: Remat):
    """The ``jax.checkpoint`` policy for a layer group: keep ``REMAT_SAVES[remat]``, recompute the rest."""
    if remat not in REMAT_SAVES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_SAVES)}, got {remat!r}.")
    return jax.checkpoint_policies.save_only_these_names(*REMAT_SAVES[remat])


def _stack_groups(config: ModelConfig, mesh: Mesh, rngs: nnx.Rngs) -> LayerGroup:
    """``[virtual_stages, groups / virtual_stages, ...]`` stacked layer groups,
    dim 1 split over "pipeline". Initialised as ``[groups, ...]`` and reshaped,
    so the values do not depend on the pipeline layout."""
    groups, laps, stages = config.num_layers // config.layers_per_group, config.virtual_stages, mesh.shape[PIPELINE]
    if groups % (laps * stages):
        raise ValueError(
            f"{groups} layer groups (num_layers / max(moe_every, 1)) do not split into "
            f"virtual_stages ({laps}) x pipeline ({stages}) equal chunks."
        )

    @nnx.split_rngs(splits=groups)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def create(rngs: nnx.Rngs) -> LayerGroup:
        return LayerGroup(config, mesh=mesh, rngs=rngs)

    stacked = create(rngs)
    variables = [variable for _, variable in nnx.to_flat_state(nnx.state(stacked))]
    specs = [(None, PIPELINE, *tuple(v.get_metadata()["out_sharding"])[1:]) for v in variables]
    reshaped = jax.jit(
        lambda values: [v.reshape(laps, groups // laps, *v.shape[1:]) for v in values],
        out_shardings=[jax.sharding.NamedSharding(mesh, P(*spec)) for spec in specs],
    )([v[...] for v in variables])
    for variable, value, spec in zip(variables, reshaped, specs):
        variable.set_value(value)
        variable.set_metadata(out_sharding=spec)
    return stacked


class Transformer(nnx.Module):
    """Decoder-only LM. ``loss(tokens, targets, microbatches=1)`` for training,
    ``__call__(tokens)`` for logits."""

    def __init__(self, config: ModelConfig, *, mesh: Mesh, rngs: nnx.Rngs):
        self.config, self.mesh = config, mesh
        self.axes = region_axes(config, mesh)
        self.batch_axes = tuple(axis for axis in BATCH_AXES if axis in self.axes)
        self.vocab_axes = tuple(axis for axis in (PIPELINE, TENSOR) if axis in self.axes)
        sp = config.sequence_parallel
        dtype = jnp.dtype(config.compute_dtype)  # of every activation, from the embedding lookup on
        table = dict(mesh=mesh, sequence_parallel=sp, vocab_axes=self.vocab_axes, dtype=dtype, rngs=rngs)
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **table)
        self.layers = _stack_groups(config, mesh, rngs)
        self.final_norm = RMSNorm(config.hidden_size, mesh=mesh, eps=config.norm_eps, sequence_parallel=sp, rngs=rngs)
        self.head = (
            None
            if config.tie_embeddings
            else VocabParallelEmbedding(
                config.vocab_size, config.hidden_size,
                embedding_init=_head_init(config.hidden_size), **table,
            )
        )

    @property
    def moe_layers(self) -> int:
        return self.config.num_layers // self.config.moe_every if self.config.moe_every else 0

    # --- entry points ---------------------------------------------------------

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``[B, S, vocab]`` for int tokens ``[B, S]`` (B split over "data" x "expert")."""
        self._check(tokens, tokens)
        rows = P(self.batch_axes)
        logits = enter_tensor_region(
            self, lambda self, t: self.local_logits(t, 1)[0], tokens,
            arg_specs=(rows,), out_specs=P(self.batch_axes, None, self.vocab_axes), axes=self.axes,
        )
        return logits[..., : self.config.vocab_size]

    def loss(self, tokens: jax.Array, targets: jax.Array, microbatches: int = 1) -> tuple[jax.Array, dict]:
        """Mean next-token cross-entropy plus ``aux_loss_weight`` x the MoE
        load-balancing loss; and metrics (``cross_entropy``, ``aux_loss``,
        ``dropped_fraction``). ``microbatches``: pipeline microbatches per
        data-parallel rank (no effect without pipeline parallelism). The
        result does not depend on the mesh."""
        self._check(tokens, targets)
        rows = P(self.batch_axes)
        return enter_tensor_region(
            self, lambda self, t, y: self.local_loss(t, y, microbatches), tokens, targets,
            arg_specs=(rows, rows), out_specs=(P(), P()), axes=self.axes,
        )

    # --- one rank's math --------------------------------------------------------

    def local_loss(self, tokens, targets, microbatches):
        logits, stats = self.local_logits(tokens, microbatches)
        token_losses = vocab_parallel_cross_entropy(logits, targets, self.config.vocab_size, vocab_axes=self.vocab_axes)
        sums = {"cross_entropy": token_losses.sum(), **stats}  # over this rank's rows
        if self.batch_axes:
            sums = {name: reduce_from_tensor_region(value, self.batch_axes) for name, value in sums.items()}
        rows = tokens.shape[0] * math.prod(self.mesh.shape[axis] for axis in self.batch_axes)
        cross_entropy = sums["cross_entropy"] / (rows * tokens.shape[1])
        aux_loss = sums["aux_loss"] / (rows * max(self.moe_layers, 1))
        metrics = {
            "cross_entropy": cross_entropy,
            "aux_loss": aux_loss,
            "dropped_fraction": sums["dropped"] / jnp.maximum(sums["assignments"], 1.0),
        }
        return cross_entropy + self.config.aux_loss_weight * aux_loss, metrics

    def local_logits(self, tokens, microbatches):
        """This rank's vocabulary slice of the logits for its batch rows, and MoE stats."""
        x = self.embed(tokens)
        x, stats = self._run_layers(x, microbatches)
        x = self.final_norm(x)
        head = self.embed if self.head is None else self.head
        return head.local_attend(x), stats

    def _run_layers(self, x, microbatches):
        graphdef, stacked = nnx.split(self.layers)

        def one_group(x, group_state):
            return nnx.merge(graphdef, group_state)(x)

        one_group = jax.checkpoint(one_group, policy=remat_policy(self.config.remat), prevent_cse=False)

        def run_chunk(chunk, x):
            x, stats = jax.lax.scan(one_group, x, chunk)
            return x, jax.tree.map(lambda s: s.sum(0), stats)

        if self.mesh.shape[PIPELINE] == 1:  # all layers here, in order: [v, G/v] -> [G]
            return run_chunk(jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), stacked), x)
        rows = x.shape[0]
        if rows % microbatches:
            raise ValueError(
                f"The {rows} batch rows per data-parallel rank do not split into {microbatches} microbatches."
            )
        # microbatch k takes rows k, k+m, k+2m, ...: a local reshape, whatever the batch sharding
        x = x.reshape(rows // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
        y, stats = run_pipeline(run_chunk, stacked, x)
        return y.swapaxes(0, 1).reshape(rows, *y.shape[2:]), stats

    def _check(self, tokens: jax.Array, targets: jax.Array) -> None:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}.")
        if tokens.shape != targets.shape:
            raise ValueError(f"targets shape {targets.shape} must equal tokens shape {tokens.shape}.")
        rows = math.prod(self.mesh.shape[a] for a in BATCH_AXES)
        if tokens.shape[0] % rows:
            raise ValueError(f"batch {tokens.shape[0]} must be divisible by mesh data x expert = {rows}.")
        if self.config.sequence_parallel and tokens.shape[1] % self.mesh.shape[TENSOR]:
            raise ValueError(
                f"sequence length {tokens.shape[1]} must be divisible by mesh tensor "
                f"({self.mesh.shape[TENSOR]}) with sequence_parallel."
            )
