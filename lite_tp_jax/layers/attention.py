"""Causal self-attention with its heads split over "tensor" (Megatron-LM style).

    x (replicated) -> q_i, k_i, v_i = x @ W_q[:, heads_i], x @ W_k[:, kv_i], x @ W_v[:, kv_i]   no communication
                   -> (RoPE on q_i, k_i)                                                    local
                   -> o_i = softmax(mask(q_i k_i^T / sqrt(head_dim))) v_i                   local, per head (attention_core)
                   -> y = all-reduce(o_i @ W_out[heads_i]) + b                              one all-reduce

Backward mirrors it: one all-reduce of the input gradient (the three
projections enter the region together, ``copy_to_tensor_region``). With
``sequence_parallel`` x and y are sharded along the sequence (dim -2): an
all-gather on entry and a reduce-scatter on exit replace the all-reduce
(backward: a reduce-scatter of dx and an all-gather of dy). The positions of
RoPE are those of the full, gathered sequence.

The mask (``masks.py``) is causal, with ``sliding_window`` (Mistral, Qwen2)
keys at most ``sliding_window - 1`` positions back, and with ``segments``
(packed documents) keys of the query's own document only; the KV cache decode
masks with the same function.

``attention_core`` is the one place scores and softmax are computed; ``kernel``
picks ``jax.nn.dot_product_attention``'s implementation (``auto``, ``xla``,
``cudnn``: the flash kernel on GPU) or the plain ``reference``. Projections run
in the input's dtype (kernels are cast to it: bfloat16 compute, float32 master
weights); scores and softmax in float32.

Parameters, as ``export_state`` names them (Flax layout, ``x @ W``)::

    name          logical shape                      split over "tensor"  Megatron name         spec's words
    query.kernel  [features, num_heads, head_dim]    heads                ColumnParallelLinear  "row partitioning"
    key.kernel    [features, num_kv_heads, head_dim] kv heads (or none)   ColumnParallelLinear  "row partitioning"
    value.kernel  [features, num_kv_heads, head_dim] kv heads (or none)   ColumnParallelLinear  "row partitioning"
    out.kernel    [num_heads, head_dim, features]    heads                RowParallelLinear     "column partitioning"

With ``use_bias``: ``query.bias [num_heads, head_dim]``, ``key.bias`` and
``value.bias [num_kv_heads, head_dim]`` split like their kernels, and
``out.bias [features]`` replicated, added once after the reduction
(``out_bias`` overrides ``use_bias`` for ``out.bias`` alone: Qwen2 has q/k/v
biases and none on the output). With ``qk_norm_eps`` (Qwen3): ``query_norm.scale``
and ``key_norm.scale [head_dim]``, replicated: each query and key head is
RMS-normalised over head_dim before RoPE (local; backward, an all-reduce of the
two scales' gradients over "tensor").

The unit of sharding is a kv group: one kv head and the ``num_heads //
num_kv_heads`` query heads that attend with it (query head ``j`` uses kv head
``j // group``). Any TP degree works:

* ``num_kv_heads >= tp``: the kv heads are padded at the end to a multiple of
  tp and the query heads with them (``padded kv heads * group``), so every rank
  holds whole groups. Padded groups are zeroed (``mask_padding``) on the head
  dim of the q/k/v kernels and biases and of ``out.kernel``.
* ``num_kv_heads < tp``: k/v kernels are replicated over "tensor"; the query
  heads are padded to a multiple of tp and split. Each rank projects, for
  each of its query heads, kv head ``global_q // group`` (clamped for padded
  query heads): only those kernel columns, when that is fewer than all.
  Padded query heads are zeroed on ``query`` and ``out.kernel``, so they add
  nothing to y or to any gradient.
  The replicated kernels enter the region explicitly per rank
  (``copy_to_tensor_region``), so their gradients are all-reduced over
  "tensor" (``features * num_kv_heads * head_dim`` each).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core.collectives import (
    all_gather,
    all_to_all,
    cast_for,
    copy_to_tensor_region,
    enter_tensor_parallel,
    exit_tensor_parallel,
    gather_over,
)
from lite_tp_jax.layers.masks import attention_mask, dot_product_arguments, segment_positions
from lite_tp_jax.layers.ring_attention import ring_attention
from lite_tp_jax.layers.rotary import RopeScaling, apply_rotary
from lite_tp_jax.core.axes import CONTEXT, TENSOR
from lite_tp_jax.sharding.padding import mask_padding
from lite_tp_jax.parallel.context import all_positions, context_size, local_positions, natural_order
from lite_tp_jax.parallel.region import TOKENS, Layout, ParallelLayer, sequence_or_replicated
from lite_tp_jax.sharding.rules import MEGATRON, PartitionRules, padded_size
from lite_tp_jax.core.checks import check_heads, check_last_dim, check_positive_int, check_rank

zeros_init = nnx.initializers.zeros_init()

# Module-level so that PartitionRules.param's jitted initialiser (static ``init``) is reused across layers.
_projection_kernel_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
_out_kernel_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)


AttentionKernel = Literal["auto", "xla", "cudnn", "reference"]
ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)
ContextStrategy = Literal["all_gather", "ring", "all_to_all"]
CONTEXT_STRATEGIES: tuple[str, ...] = get_args(ContextStrategy)


def attention_core(
    q: jax.Array, k: jax.Array, v: jax.Array, kernel: AttentionKernel = "auto", causal: bool = True, *,
    window: int | None = None, segments: jax.Array | None = None,
    q_positions: jax.Array | None = None, k_positions: jax.Array | None = None,
    q_segments: jax.Array | None = None, k_segments: jax.Array | None = None,
) -> jax.Array:
    """``softmax(mask(q k^T / sqrt(D))) v`` per head, one rank's heads, no communication
    (``causal=False``: every position attends to every other, as in an encoder).

    ``q``: ``[B, Sq, N, D]``; ``k``, ``v``: ``[B, Sk, K, D]`` with ``K`` dividing
    ``N`` (query head ``n`` attends with kv head ``n // (N / K)``). Scores and
    softmax are float32; the result has ``v``'s dtype. The mask is
    ``masks.attention_mask``: ``causal``, a sliding ``window`` and document
    segments (a query sees keys of its own segment only), of positions
    ``0..S-1`` and ``segments`` ``[B, S]`` (self-attention over a whole
    sequence), or of the global ``q_positions`` / ``k_positions`` (``[S]``) and
    ``q_segments`` / ``k_segments`` (``[B, S]``) of any query and key blocks
    (context parallelism: a rank's queries against gathered or exchanged keys).

    ``kernel``: ``reference`` is the plain einsum / softmax below, whose softmax
    output is named ``attention_weights`` for the remat policies; the others
    are ``jax.nn.dot_product_attention`` with ``implementation`` ``xla``,
    ``cudnn`` (the fused flash kernel: GPU, 16-bit dtypes; ``[S, S]`` is never
    materialised, except a segment mask, passed as a bias) or ``auto`` (None:
    cudnn where it applies, else xla); causality and the window reach them as
    ``is_causal`` and ``local_window_size`` (``masks.dot_product_arguments``),
    or, with explicit positions, as a boolean ``mask``.
    """
    seq, head_dim = q.shape[1], q.shape[-1]
    if q_positions is None:
        positions = jnp.arange(seq)
        q_positions = k_positions = positions
        q_segments = k_segments = segments
        if kernel != "reference":
            implementation = None if kernel == "auto" else kernel
            masking = dot_product_arguments(seq, k.shape[1], causal=causal, window=window, segments=segments)
            return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **masking)
    visible = attention_mask(
        q_positions, k_positions, causal=causal, window=window, q_segments=q_segments, k_segments=k_segments
    )  # [Sq, Sk] or [B, Sq, Sk]
    if kernel != "reference":
        implementation = None if kernel == "auto" else kernel
        mask = visible[:, None] if visible.ndim == 3 else visible[None, None]
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation, mask=mask)
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(head_dim))
    logits = jnp.where(visible[:, None] if visible.ndim == 3 else visible, logits, jnp.finfo(jnp.float32).min)
    weights = checkpoint_name(jax.nn.softmax(logits, axis=-1).astype(v.dtype), "attention_weights")
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class KVCache(NamedTuple):
    """Keys and values of cached positions, ``[..., batch, slots, kv heads, head_dim]``
    (stacked over layers by the model). Split over "tensor" on the kv heads
    like ``key.kernel`` (padded heads included), or replicated when
    ``num_kv_heads < tp``; see ``ParallelAttention.cache_spec``."""

    key: jax.Array
    value: jax.Array


class _Projection(nnx.Module):
    """Holds one projection's ``kernel`` (and ``bias``) under its name; the math
    is in ``ParallelAttention.local``."""

    def __init__(self, kernel: nnx.Param, bias: nnx.Param | None):
        self.kernel = kernel
        self.bias = bias


def _check_heads(features, num_heads, num_kv_heads, head_dim, rope_theta) -> None:
    name = "ParallelAttention"
    sizes = {"features": features, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
    if head_dim is not None:
        sizes["head_dim"] = head_dim
    check_positive_int(name, **sizes)
    if rope_theta is not None and not rope_theta > 0:
        raise ValueError(f"{name} rope_theta must be positive (e.g. 10000.0), got {rope_theta!r}.")
    check_heads(num_heads, num_kv_heads, features, head_dim, rope=rope_theta is not None)


_KV_SUPPORTS = ("column", "replicated")


def _kv_layout(rules: PartitionRules, role: str, num_heads: int, num_kv_heads: int, tp: int) -> tuple[bool, int, int]:
    """``(kv_sharded, padded kv heads, padded query heads)``. kv heads are split
    whole over "tensor" with their query groups (padded in whole groups), or
    replicated when there are fewer of them than ranks (or the rules say so),
    and then only the query heads are split (padded alone)."""
    kv_strategy = rules.strategy(f"{role}.key", _KV_SUPPORTS)
    if kv_strategy != rules.strategy(f"{role}.value", _KV_SUPPORTS):
        raise ValueError(
            f"ParallelAttention needs one strategy for {role}.key and {role}.value, got "
            f"{kv_strategy!r} and {rules.strategy(f'{role}.value', _KV_SUPPORTS)!r}; set both in partition_rules."
        )
    if kv_strategy == "column" and num_kv_heads >= tp:
        kv_padded = padded_size(num_kv_heads, tp)
        return True, kv_padded, kv_padded * (num_heads // num_kv_heads)
    return False, num_kv_heads, padded_size(num_heads, tp)


def _projection(name, heads, padded_heads, *, rules, role, mesh, dtype, rngs, use_bias, features, head_dim, strategy=None):
    """The ``[features, heads, head_dim]`` kernel (and ``[heads, head_dim]`` bias) of
    one of q, k, v, split over "tensor" on the heads (padded to ``padded_heads``)."""
    supports = ("column",) if name == "query" else _KV_SUPPORTS
    param = partial(rules.param, f"{role}.{name}", mesh=mesh, dtype=dtype, strategy=strategy, supports=supports)
    kernel = param(
        _projection_kernel_init, rngs.params(), (features, heads, head_dim), ("in", "out", None),
        padded_shape=(features, padded_heads, head_dim),
    )
    bias = (
        param(zeros_init, rngs.params(), (heads, head_dim), ("out", None), padded_shape=(padded_heads, head_dim))
        if use_bias
        else None
    )
    return _Projection(kernel, bias)


class _Norm(nnx.Module):
    """Holds one norm scale, so that it is named ``query_norm.scale``."""

    def __init__(self, scale: nnx.Param):
        self.scale = scale


class ParallelAttention(ParallelLayer):
    """Causal multi-head (or grouped-query) self-attention, heads split over "tensor";
    bidirectional (an encoder's) with ``causal=False``."""

    def __init__(
        self,
        features: int,
        num_heads: int,
        *,
        mesh: Mesh,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        use_bias: bool = False,
        out_bias: bool | None = None,
        sequence_parallel: bool = False,
        rope_theta: float | None = None,
        rope_scaling: RopeScaling | None = None,
        kernel: AttentionKernel = "auto",
        qk_norm_eps: float | None = None,
        causal: bool = True,
        sliding_window: int | None = None,
        context_parallel: ContextStrategy = "all_gather",
        context_load_balance: bool = True,
        param_dtype: Any = jnp.float32,
        role: str = "attention",
        rules: PartitionRules = MEGATRON,
        rngs: nnx.Rngs,
    ):
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"ParallelAttention kernel must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}.")
        if sliding_window is not None and not (isinstance(sliding_window, int) and sliding_window >= 1):
            raise ValueError(
                f"ParallelAttention sliding_window must be a positive int (keys within that many positions), got {sliding_window!r}."
            )
        if context_parallel not in CONTEXT_STRATEGIES:
            raise ValueError(
                f"ParallelAttention context_parallel must be one of {', '.join(CONTEXT_STRATEGIES)}, got {context_parallel!r}."
            )
        self.attention_kernel, self.causal, self.sliding_window = kernel, causal, sliding_window
        self.context_parallel, self.context_balance = context_parallel, context_load_balance
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_heads(features, num_heads, num_kv_heads, head_dim, rope_theta)
        features, num_heads, num_kv_heads = int(features), int(num_heads), int(num_kv_heads)
        self.mesh = mesh
        self.features, self.num_heads, self.num_kv_heads = features, num_heads, num_kv_heads
        self.head_dim = features // num_heads if head_dim is None else int(head_dim)
        self.group = num_heads // num_kv_heads
        self.sequence_parallel, self.rope_theta, self.rope_scaling = sequence_parallel, rope_theta, rope_scaling
        self.kv_sharded, kv_padded, heads_padded = _kv_layout(rules, role, num_heads, num_kv_heads, mesh.shape[TENSOR])
        projection = partial(
            _projection, rules=rules, role=role, mesh=mesh, dtype=param_dtype, rngs=rngs, use_bias=use_bias,
            features=features, head_dim=self.head_dim,
        )
        kv_override = None if self.kv_sharded else "replicated"
        self.query = projection("query", num_heads, heads_padded)
        self.key = projection("key", num_kv_heads, kv_padded, strategy=kv_override)
        self.value = projection("value", num_kv_heads, kv_padded, strategy=kv_override)
        # Qwen3: an RMSNorm over head_dim of every query and key head, its scale shared by the heads.
        self.qk_norm_eps = qk_norm_eps
        norm_scale = partial(
            rules.param, mesh=mesh, dtype=param_dtype, init=nnx.initializers.ones_init(), supports=("replicated",)
        )
        self.query_norm, self.key_norm = (
            (_Norm(norm_scale(f"{role}.{name}_norm", key=rngs.params(), shape=(self.head_dim,), dims=(None,)))
             for name in ("query", "key"))
            if qk_norm_eps is not None
            else (None, None)
        )
        out = partial(rules.param, f"{role}.out", mesh=mesh, dtype=param_dtype, supports=("row",))
        self.out = _Projection(
            out(
                _out_kernel_init, rngs.params(), (num_heads, self.head_dim, features), ("in", None, "out"),
                padded_shape=(heads_padded, self.head_dim, features),
            ),
            out(zeros_init, rngs.params(), (features,), ("out",)) if (use_bias if out_bias is None else out_bias) else None,
        )

    def layout(self, x: jax.Array, segments: jax.Array | None = None) -> Layout:
        """``x`` and the result: ``[B, S, features]``, replicated over "tensor" (or
        sharded along ``S`` with ``sequence_parallel``); ``segments`` ``[B, S]``
        whole on every tensor rank."""
        placement = sequence_or_replicated(self.sequence_parallel)
        return Layout((placement,) if segments is None else (placement, TOKENS), placement.of(x.ndim))

    def check(self, x: jax.Array, segments: jax.Array | None = None) -> None:
        name = type(self).__name__
        check_last_dim(x, self.features, name)
        check_rank(x, 3, "[batch, seq, features]", name)
        if segments is not None and (segments.ndim != 2 or segments.shape[0] != x.shape[0]):
            raise ValueError(f"{name} segments must be [batch, seq] ids, got shape {tuple(segments.shape)} for x {tuple(x.shape)}.")

    def local(self, x: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        """One rank's math: ``x`` full (replicated over "tensor"), or its sequence
        shard with ``sequence_parallel``. Returns the same. ``segments`` ``[B, S]``
        (the whole sequence): packed documents, each attending to itself only,
        its RoPE positions restarting at 0 (``masks.segment_positions``)."""
        # Enter the region once for q, k and v, so backward has one collective for dx.
        x = enter_tensor_parallel(x, self.sequence_parallel)
        seq = x.shape[-2]  # this context rank's slots (the whole sequence without "context"), also with sequence_parallel

        q = self._project(self.query, x, self.num_heads)  # [B, S, local heads, D]
        if self.kv_sharded:  # [B, S, local kv heads, D]
            k, v = (self._project(p, x, self.num_kv_heads) for p in (self.key, self.value))
        else:  # [B, S, local heads, D]: each local query head's kv head (a group of 1)
            k, v = (self._project_per_query_head(p, x, q.shape[2]) for p in (self.key, self.value))
        q, k = self._qk_norm(q, k)
        if context_size() == 1:
            if self.rope_theta is not None:
                positions = jnp.arange(seq) if segments is None else segment_positions(segments)
                q = apply_rotary(q, positions, self.rope_theta, self.rope_scaling)
                k = apply_rotary(k, positions, self.rope_theta, self.rope_scaling)
            q, k, v = (checkpoint_name(t, name) for t, name in zip((q, k, v), ("query", "key", "value")))
            o = attention_core(q, k, v, self.attention_kernel, self.causal, window=self.sliding_window, segments=segments)
        else:
            o = self._context_attention(q, k, v, segments)
        o = checkpoint_name(o, "attention_output")  # [B, S, local heads, D]

        out_kernel = cast_for(mask_padding(self.out.kernel[...], 0, self.num_heads), o)
        partial_sums = jnp.einsum("bqhd,hdf->bqf", o, out_kernel)
        y = exit_tensor_parallel(partial_sums, self.sequence_parallel)
        if self.out.bias is not None:  # per-rank on sequence shards: its gradient is all-reduced
            bias = cast_for(self.out.bias[...], y)
            y = y + (copy_to_tensor_region(bias) if self.sequence_parallel else bias)
        return y

    # --- context parallelism: the sequence split over "context" (parallel/context.py) ---

    def _context_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None) -> jax.Array:
        """Attention of this context rank's queries ``q [B, S_l, heads, D]`` over the
        whole sequence, whose other slots are on the other context ranks
        (``context_parallel``: ``all_gather`` K and V, pass them round the ``ring``
        (``ring_attention.py``), or ``all_to_all`` heads for sequence). Positions
        are global (RoPE, the mask); ``segments [B, S_l]`` are this rank's, all-gathered
        over "context" (ints, ``B x S``) for the positions they restart (and the mask)."""
        seq, balanced = q.shape[1], self.context_balance
        positions = local_positions(seq, balanced)  # [S_l]: the global position of each slot
        every = all_positions(seq, balanced)  # [S]: of every slot, in rank order
        all_segments = None if segments is None else all_gather(segments, CONTEXT, dim=1)
        if self.rope_theta is not None:
            rope = positions
            if segments is not None:  # positions restart per document, counted in the natural order
                rope = jnp.take(segment_positions(natural_order(all_segments, balanced)), positions, axis=1)
            q = apply_rotary(q, rope, self.rope_theta, self.rope_scaling)
            k = apply_rotary(k, rope, self.rope_theta, self.rope_scaling)
        q, k, v = (checkpoint_name(t, name) for t, name in zip((q, k, v), ("query", "key", "value")))
        masking = dict(causal=self.causal, window=self.sliding_window)
        if self.context_parallel == "ring":  # K, V passed round the ring; the segments travel with them
            return ring_attention(
                q, k, v, axis_name=CONTEXT, q_positions=positions, k_positions=positions,
                q_segments=segments, k_segments=segments, **masking,
            )
        if self.context_parallel == "all_gather":
            # K and V of every slot, used per rank: backward, a reduce-scatter of their gradients
            k, v = gather_over(k, CONTEXT, 1), gather_over(v, CONTEXT, 1)
            return attention_core(
                q, k, v, self.attention_kernel, q_positions=positions, k_positions=every,
                q_segments=segments, k_segments=all_segments, **masking,
            )
        return self._all_to_all_attention(q, k, v, every, all_segments, masking)

    def _all_to_all_attention(self, q, k, v, every, all_segments, masking) -> jax.Array:
        """Ulysses: an all-to-all over "context" turns the sequence split into a
        head split (q, k, v: ``[B, S_l, h, D]`` -> ``[B, S, h/n, D]``), attention
        runs over the whole sequence on h/n heads, and one more all-to-all turns
        the result back. Heads go to ranks in kv groups when this rank's kv heads
        divide by n; otherwise k/v are taken per query head and the heads padded
        with zeros to a multiple of n (a zero head's output is zero, then dropped)."""
        ranks, heads = context_size(), q.shape[2]
        if not (k.shape[2] % ranks == 0 and heads % ranks == 0):
            if k.shape[2] != heads:  # query head j uses local kv head j // group
                k, v = (jnp.repeat(t, heads // t.shape[2], axis=2) for t in (k, v))
            pad = [(0, 0), (0, 0), (0, -heads % ranks), (0, 0)]
            q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
        q, k, v = (all_to_all(t, CONTEXT, split_dim=2, concat_dim=1) for t in (q, k, v))
        o = attention_core(
            q, k, v, self.attention_kernel, q_positions=every, k_positions=every,
            q_segments=all_segments, k_segments=all_segments, **masking,
        )
        return all_to_all(o, CONTEXT, split_dim=1, concat_dim=2)[:, :, :heads]

    def _qk_norm(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """RMSNorm over head_dim of each query and key head (with ``qk_norm_eps``).
        The scales are replicated over "tensor" and used per rank: their
        gradients are all-reduced (``copy_to_tensor_region``)."""
        if self.qk_norm_eps is None:
            return q, k

        def norm(t, scale):
            scale = scale[...]
            if TENSOR in jax.typeof(t).mat.varying:
                scale = copy_to_tensor_region(scale)
            t32 = t.astype(jnp.float32)
            normed = t32 * jax.lax.rsqrt(jnp.mean(t32 * t32, axis=-1, keepdims=True) + self.qk_norm_eps)
            return (normed * scale).astype(t.dtype)

        return norm(q, self.query_norm.scale), norm(k, self.key_norm.scale)

    # --- generation with a KV cache ---------------------------------------------

    @property
    def cache_heads(self) -> int:
        """kv heads held by the cache, all ranks together (padded when split over "tensor")."""
        return padded_size(self.num_kv_heads, self.mesh.shape[TENSOR]) if self.kv_sharded else self.num_kv_heads

    @property
    def cache_spec(self) -> P:
        """How ``[batch, slots, kv heads, head_dim]`` cache buffers split over "tensor"."""
        return P(None, None, TENSOR if self.kv_sharded else None, None)

    def decode(
        self, x: jax.Array, cache: KVCache, layer: tuple, cursor: jax.Array, start: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """One rank's math with a KV cache (generation; no gradients).

        ``x [B, S, features]`` (replicated over "tensor") holds the new tokens of
        cache slots ``cursor .. cursor+S-1`` in every row (the prompt at
        ``cursor = 0``, then one token per step). Row ``b`` starts at slot
        ``start[b]`` (left padding), so a token in slot ``t`` has position
        ``t - start[b]`` for RoPE and attends to the slots ``start[b] .. t``.
        ``cache`` holds the buffers of every layer, ``[..., B, slots, kv heads,
        head_dim]``; this layer's are ``cache.key[layer]`` (this rank's kv
        heads, or all of them when they are replicated). The new keys and
        values are written there first (in place, into fixed-size buffers),
        then read with the rest. Returns ``(y, cache)``; communication: the
        one all-reduce of ``local``.
        """
        new = x.shape[1]
        new_slots = cursor + jnp.arange(new)
        positions = new_slots[None, :] - start[:, None]  # [B, S]
        q = self._project(self.query, x, self.num_heads)
        if self.kv_sharded:
            k, v = self._project(self.key, x, self.num_kv_heads), self._project(self.value, x, self.num_kv_heads)
        else:  # all kv heads, the same on every rank: kept invariant, so the cache is stored replicated
            k, v = self._project_replicated(self.key, x), self._project_replicated(self.value, x)
        q, k = self._qk_norm(q, k)
        if self.rope_theta is not None:
            q = apply_rotary(q, positions, self.rope_theta, self.rope_scaling)
            k = apply_rotary(k, positions, self.rope_theta, self.rope_scaling)
        at = (*layer, 0, cursor, 0, 0)
        cache = KVCache(*(
            jax.lax.dynamic_update_slice(buffer, new_entries.astype(buffer.dtype)[(None,) * len(layer)], at)
            for buffer, new_entries in zip(cache, (k, v))
        ))
        keys, values = cache.key[layer], cache.value[layer]  # [B, slots, kv heads, D]

        logits = self._scores(q, keys) / jnp.sqrt(jnp.float32(self.head_dim))  # [B, local heads, S, slots]
        key_slots = jnp.arange(keys.shape[1])
        # slots before a row's start hold left padding: segment 0, the row's tokens segment 1
        filled = (key_slots[None, :] >= start[:, None]).astype(jnp.int32)  # [B, slots]
        visible = attention_mask(
            new_slots, key_slots, window=self.sliding_window,
            q_segments=jnp.ones((x.shape[0], new), jnp.int32), k_segments=filled,
        )  # [B, S, slots]
        logits = jnp.where(visible[:, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
        o = self._mix(weights, values)

        out_kernel = mask_padding(self.out.kernel[...], 0, self.num_heads)
        y = exit_tensor_parallel(jnp.einsum("bqhd,hdf->bqf", o, out_kernel), sequence_parallel=False)
        if self.out.bias is not None:
            y = y + self.out.bias[...]
        return y, cache

    @staticmethod
    def _project_replicated(projection: _Projection, x: jax.Array) -> jax.Array:
        """``x @ kernel (+ bias)`` of a projection replicated over "tensor", without
        entering the region (no gradient flows when generating)."""
        y = jnp.einsum("bsf,fhd->bshd", x, projection.kernel[...])
        return y if projection.bias is None else y + projection.bias[...]

    def _scores(self, q: jax.Array, keys: jax.Array) -> jax.Array:
        """``q [B, S, local heads, D]`` . ``keys [B, T, kv heads, D]`` -> ``[B, local heads, S, T]``
        (float32); with sharded kv heads grouped, so the keys are not repeated per query head."""
        b, s, h, d = q.shape
        if self.kv_sharded:
            grouped = q.reshape(b, s, h // self.group, self.group, d)
            scores = jnp.einsum("bskgd,btkd->bkgst", grouped, keys, preferred_element_type=jnp.float32)
            return scores.reshape(b, h, s, keys.shape[1])
        keys = self._kv_per_query_head(keys, h)
        return jnp.einsum("bshd,bthd->bhst", q, keys, preferred_element_type=jnp.float32)

    def _mix(self, weights: jax.Array, values: jax.Array) -> jax.Array:
        """``weights [B, local heads, S, T]`` x ``values [B, T, kv heads, D]`` -> ``[B, S, local heads, D]``."""
        b, h, s, t = weights.shape
        if self.kv_sharded:
            grouped = weights.reshape(b, h // self.group, self.group, s, t)
            return jnp.einsum("bkgst,btkd->bskgd", grouped, values).reshape(b, s, h, values.shape[-1])
        return jnp.einsum("bhst,bthd->bshd", weights, self._kv_per_query_head(values, h))

    @staticmethod
    def _project(projection: _Projection, x: jax.Array, logical_heads: int) -> jax.Array:
        """``x @ kernel (+ bias)`` per head, the head dim split over "tensor": its
        padded heads (beyond ``logical_heads``) are zeroed first."""
        kernel = mask_padding(cast_for(projection.kernel[...], x), 1, logical_heads)
        bias = None if projection.bias is None else mask_padding(cast_for(projection.bias[...], x), 0, logical_heads)
        y = jnp.einsum("bsf,fhd->bshd", x, kernel)
        return y if bias is None else y + bias

    def _project_per_query_head(self, projection: _Projection, x: jax.Array, local_heads: int) -> jax.Array:
        """A k (or v) projection replicated over "tensor": ``[B, S, local_heads, D]``,
        the kv head of each of this rank's query heads. Used by every rank, so its
        gradient is all-reduced. Where this rank has fewer query heads than there
        are kv heads, only the kernel columns they use are multiplied (at TP 8
        with 4 kv heads, a quarter of the work of projecting them all)."""
        kernel = copy_to_tensor_region(cast_for(projection.kernel[...], x))
        bias = None if projection.bias is None else copy_to_tensor_region(cast_for(projection.bias[...], x))
        if local_heads >= self.num_kv_heads:  # project every kv head once, then pick
            y = jnp.einsum("bsf,fhd->bshd", x, kernel)
            return self._kv_per_query_head(y if bias is None else y + bias, local_heads)
        index = self._kv_index(local_heads)
        y = jnp.einsum("bsf,fhd->bshd", x, jnp.take(kernel, index, axis=1))
        return y if bias is None else y + jnp.take(bias, index, axis=0)

    def _kv_index(self, local_heads: int) -> jax.Array:
        """With kv replicated over "tensor": the kv head of each of this rank's
        ``local_heads`` query heads (global q head j uses kv head j // group,
        clamped for padded q heads)."""
        first = jax.lax.axis_index(TENSOR) * local_heads
        return jnp.minimum((first + jnp.arange(local_heads)) // self.group, self.num_kv_heads - 1)

    def _kv_per_query_head(self, kv: jax.Array, local_heads: int) -> jax.Array:
        """With kv replicated over "tensor": ``kv [B, S, kv heads, D]`` picked for this
        rank's ``local_heads`` query heads, ``[B, S, local_heads, D]``."""
        return jnp.take(kv, self._kv_index(local_heads), axis=2)
