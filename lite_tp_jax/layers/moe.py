"""Mixture of SwiGLU experts (Switch / GShard), expert-parallel over "expert"
and tensor-parallel (Megatron) inside each expert.

Math, per row ``b`` of the batch (one sequence = one routing group, so routing
never depends on the mesh and a sharded run equals the one-device run)::

    p[s, :]   = softmax(float32(x[s]) @ W_router)                 [S, E]
    e_c[s]    = c-th largest expert of p[s]                        c < k, any k <= E
    g_c[s]    = p[s, e_c]                  (k = 1, Switch)
              = p[s, e_c] / sum_c' p[s, e_c']   (k > 1, renormalised)
    C         = ceil(capacity_factor * S * k / E)   (capacity_factor None: dropless, no cap)
    slots     : all first choices of the row in sequence order, then all second
                choices, ...; (s, c) gets slot n[s, c] = how many earlier
                assignments of the row went to e_c[s]; kept iff n[s, c] < C
    expert(e, v) = (silu(v @ W_gate[e]) * (v @ W_up[e])) @ W_down[e]
    y[s]      = sum over kept c of g_c[s] expert(e_c[s], x[s])

Grouped dispatch (default, ``layers/grouped.py``): the kept (token, choice)
rows are sorted by expert, each expert runs on its rows only (``ragged_dot``:
FLOPs proportional to k·S), and the results are unsorted and combined. The
capacity mode is the same code with the rows over capacity sorted last and left
out. ``dispatch="one_hot"`` is GShard's ``[S, E, C]`` one-hot einsums (C = S
dropless), kept as the reference and the benchmark baseline.

A dropped (token, choice) contributes nothing (the residual connection outside
carries the token). The load-balancing loss (Switch, per routing group as in
GShard) is the mean over rows of ``aux_b = E * sum_e f_be P_be``, with
``f_be`` the fraction of row b's (token, choice) assignments routed to ``e``
(before dropping) and ``P_be`` the mean router probability of ``e`` over the
row. A sum over rows, it does not depend on how rows are split over ranks or
microbatches.

Parameters (``export_state`` names, logical shapes, PartitionSpecs)::

    router.kernel  [features, num_experts]          P()                        replicated
    gate.kernel    [num_experts, features, hidden]   P("expert", None, "tensor")
    up.kernel      [num_experts, features, hidden]   P("expert", None, "tensor")
    down.kernel    [num_experts, hidden, features]   P("expert", "tensor", None)

``hidden`` may be uneven over "tensor": it is padded and the padding zeroed
(``mask_padding``), as in ``ParallelMLP``. Expert ``e`` lives on expert rank
``e // (E / ep)``; within it, tensor rank ``t`` holds hidden shard ``t``.

Where things run (region with manual axes {"expert", "tensor"}; ep = expert
size, tp = tensor size, B_l = B / ep rows per expert rank, n = B_l * S * k)::

    x [B_l, S, H]  (or [B_l, S/tp, H] with sequence_parallel)
      -> copy_to_tensor_region / gather_from_sequence_region    none / all-gather B_l*S*H over "tensor"
      -> route, sort the n rows by expert (every tensor rank identically)   local
      -> all-to-all over "expert" of the group sizes            E ints
      -> exchange over "expert" (ragged GPU/TPU, padded CPU)    buffer [ep*n, H]
      -> local experts on their groups, hidden shard t (ragged_dot): partial sums over "tensor"
      -> the reverse exchange over "expert"                     -> [n, H]
      -> unsort, combine (linear: partial sums stay partial)    local
      -> reduce_from_tensor_region / reduce_scatter_to_sequence_region   all-reduce (or reduce-scatter) B_l*S*H

Forward collectives per layer: 1 small and 2 buffer-sized exchanges over
"expert" (the padded all-to-all moves ep*n*H elements each; the ragged one only
the rows received) and 1 all-reduce over "tensor" of B_l*S*H (with
sequence_parallel: 1 all-gather + 1 reduce-scatter), plus the statistics: an
all-reduce of 3 floats over "tensor" (it only turns values identical on every
tensor rank into a tensor-invariant type; dividing by tp keeps gradients
through the aux loss counted once) and, used standalone, the same over
"expert". Backward: 2 more exchanges (the transpose of an exchange is the
reverse exchange), 1 all-reduce of dx over "tensor" (or reduce-scatter), and
all-reduces of the router kernel's gradient ``[features, E]``: over "tensor"
where the router enters the tensor region (``copy_to_tensor_region``), and over
the batch axes where the model's region broadcasts replicated parameters
(``parallel/region.py``, ``broadcast_over``).

Relation to the spec's "Expert Parallelism: TP operations occur inside each
expert's MLP; tokens are routed to the appropriate TP shard": each expert is a
Megatron MLP (column-parallel gate/up, row-parallel down) over the "tensor"
group of the expert rank that owns it; the all-to-all over "expert" routes
every token to the expert rank owning its expert, where it reaches all tensor
ranks (TP shards) of that expert at once, since every tensor rank of a group
dispatches the same tokens. The tensor reduction of the row-parallel down
projection is delayed past the return all-to-all and the combine (both
linear), so it runs once per layer, on ``[B_l, S, H]`` rather than on the
expert rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from lite_tp_jax.core.collectives import (
    cast_for,
    all_reduce,
    broadcast_over,
    check_axis,
    copy_to_tensor_region,
    enter_tensor_parallel,
    exit_tensor_parallel,
    sum_over,
)
from lite_tp_jax.core.axes import BATCH_AXES, CONTEXT, EXPERT, TENSOR
from lite_tp_jax.core.checks import check_last_dim, check_positive_int, check_rank
from lite_tp_jax.core.errors import FitError
from lite_tp_jax.layers.grouped import EXCHANGES, grouped_experts, inverse_permutation, sort_by_expert
from lite_tp_jax.parallel.context import context_size
from lite_tp_jax.parallel.region import STATISTIC, Layout, ParallelLayer, sequence_or_replicated
from lite_tp_jax.sharding.padding import mask_padding
from lite_tp_jax.sharding.rules import MEGATRON, PartitionRules

default_kernel_init = nnx.initializers.lecun_normal()

DISPATCHES = ("grouped", "one_hot")
SCORINGS = ("softmax", "sigmoid")

# Module-level so that PartitionRules.param's jitted initialiser (static ``init``) is reused across layers.
# One fan-in per expert: the expert dimension is a batch dimension of the initialiser.
_expert_kernel_init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))


class _Weights(nnx.Module):
    """Holds one kernel, so that parameters are named ``router.kernel`` etc."""

    def __init__(self, kernel: nnx.Param):
        self.kernel = kernel


class ExpertBias(nnx.Param):
    """The per-expert routing bias of auxiliary-loss-free balancing (DeepSeek-V3).
    Its "gradient" is the load error ``load_e - mean load`` of the step (see
    ``MoEMLP``); ``TrainStep`` moves it by ``-bias_update_rate * sign(error)``
    instead of the optimizer, outside the gradient norm and clipping. Stored in
    checkpoints with the parameters."""


def _as_expert_bias(param: nnx.Param) -> ExpertBias:
    return ExpertBias(param.get_value(), **param.get_metadata())


class _SharedExpert(nnx.Module):
    """``shared.gate``, ``shared.up`` ``[features, shared_hidden]`` and ``shared.down``."""

    def __init__(self, gate: _Weights, up: _Weights, down: _Weights):
        self.gate, self.up, self.down = gate, up, down


def _all_to_all(x: jax.Array, split_axis: int, concat_axis: int) -> jax.Array:
    """All-to-all over "expert": ``split_axis`` is cut into ``ep`` chunks, chunk j
    goes to expert rank j, and the chunks received are concatenated along
    ``concat_axis`` in rank order. Autodiff's transpose is the reverse all-to-all.
    Nothing to exchange where "expert" is not manual (a model leaves an axis of
    size 1 to the partitioner)."""
    if EXPERT not in jax.sharding.get_abstract_mesh().manual_axes:
        return x
    return jax.lax.all_to_all(x, check_axis(EXPERT), split_axis, concat_axis, tiled=True)


def check_experts(num_experts: int, sizes: Mapping[str, int]) -> None:
    """Every expert rank holds whole experts (``sizes``: the mesh's axis sizes)."""
    if num_experts < 1 or num_experts % sizes[EXPERT]:
        raise FitError(
            "MoEMLP {num_experts} must be a positive multiple of {expert}, the expert axis "
            "size, so every expert rank holds whole experts",
            num_experts=num_experts, expert=sizes[EXPERT],
        )


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Slots per expert per routing group of ``num_tokens`` tokens."""
    if capacity_factor is None:
        return num_tokens
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def choose(
    logits: jax.Array, top_k: int, scoring: str = "softmax", norm_topk_prob: bool | None = None,
    bias: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing of ``logits [B, S, E]`` (float32): ``(probs [B, S, E],
    experts [B, S, k], gates [B, S, k])``. Scores: ``softmax(logits)``, or
    ``sigmoid(logits)`` (DeepSeek-V3); the gates are the chosen scores,
    renormalised to sum to 1 with ``norm_topk_prob`` (None: when ``top_k > 1``).
    ``probs``, for the load-balancing loss, are the scores normalised per token.
    ``bias [E]`` (auxiliary-loss-free balancing) is added to the scores for the
    choice of experts only: the gates are the unbiased scores, and no gradient
    reaches the bias."""
    if scoring == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        scores = probs = jax.nn.softmax(logits, axis=-1)
    if bias is None:
        gates, experts = jax.lax.top_k(scores, top_k)
    else:
        _, experts = jax.lax.top_k(scores + jax.lax.stop_gradient(bias), top_k)
        gates = jnp.take_along_axis(scores, experts, axis=-1)
    if top_k > 1 if norm_topk_prob is None else norm_topk_prob:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return probs, experts, gates


def slots(experts: jax.Array, num_experts: int) -> jax.Array:
    """GShard slot order, per row of ``experts [B, S, k]``: all first choices in
    sequence order, then all second choices, and so on; ``slot[b, s, c]`` = how
    many earlier assignments of row b went to ``experts[b, s, c]``."""
    taken = jnp.zeros((experts.shape[0], 1, num_experts), jnp.int32)  # slots used by earlier choices
    out = []
    for c in range(experts.shape[-1]):
        mask = jax.nn.one_hot(experts[..., c], num_experts, dtype=jnp.int32)  # [B, S, E]
        out.append(jnp.sum(mask * (taken + jnp.cumsum(mask, axis=1) - 1), axis=-1))
        taken = taken + jnp.sum(mask, axis=1, keepdims=True)
    return jnp.stack(out, axis=-1)


STANDALONE_STATS = ("aux_loss", "z_loss", "dropped", "dropped_fraction", "load_max", "load_min")


def load_extremes(load: jax.Array) -> dict[str, jax.Array]:
    """The busiest and the idlest expert's share of ``load [E]`` (assignments
    per expert, before dropping), relative to the mean: 1 and 1 when balanced."""
    mean = jnp.maximum(jnp.mean(load), 1e-9)
    return {"load_max": jnp.max(load) / mean, "load_min": jnp.min(load) / mean}


class MoEMLP(ParallelLayer):
    """A mixture of ``num_experts`` SwiGLU experts; ``__call__(x)`` returns ``(y, stats)``.

    ``x``: ``[batch, seq, features]``. ``stats`` from ordinary jit code: float32
    scalars, identical on every rank: ``aux_loss`` (the load-balancing loss,
    mean over rows), ``z_loss`` (the router z-loss, mean over rows of the
    tokens' mean squared logsumexp of the router logits), ``dropped`` (number
    of (token, choice) assignments over capacity), ``dropped_fraction``
    (``dropped`` / all assignments), ``load_max`` / ``load_min`` (the busiest /
    idlest expert's assignments over the mean). Inside a region (``local``):
    sums over this rank's rows of ``aux_loss``, ``z_loss``, ``dropped``,
    ``assignments`` and ``load [E]``, for the caller to reduce over its batch
    axes. See the module docstring.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = 1.25,
        dispatch: str = "grouped",
        exchange: str = "auto",
        scoring: str = "softmax",
        norm_topk_prob: bool | None = None,
        shared_hidden_features: int = 0,
        shared_gate: bool = False,
        expert_bias: bool = False,
        mesh: Mesh,
        sequence_parallel: bool = False,
        param_dtype: Any = jnp.float32,
        role: str = "moe",
        rules: PartitionRules = MEGATRON,
        rngs: nnx.Rngs,
    ):
        check_positive_int("MoEMLP", features=features, hidden_features=hidden_features, num_experts=num_experts)
        check_experts(num_experts, mesh.shape)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEMLP top_k must be between 1 and num_experts ({num_experts}), got {top_k}.")
        if dispatch not in DISPATCHES:
            raise ValueError(f"MoEMLP dispatch must be one of {DISPATCHES}, got {dispatch!r}.")
        if exchange not in EXCHANGES:
            raise ValueError(f"MoEMLP exchange must be one of {EXCHANGES}, got {exchange!r}.")
        if scoring not in SCORINGS:
            raise ValueError(f"MoEMLP scoring must be one of {SCORINGS}, got {scoring!r}.")
        if shared_hidden_features < 0 or (shared_gate and not shared_hidden_features):
            raise ValueError(
                f"MoEMLP shared_hidden_features must be >= 0 (0: no shared expert) and > 0 with shared_gate, "
                f"got {shared_hidden_features}."
            )
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(
                f"MoEMLP capacity_factor must be positive or None (dropless), got {capacity_factor}."
            )
        self.mesh = mesh
        self.features, self.hidden_features = features, hidden_features
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.dispatch, self.exchange = dispatch, exchange
        self.scoring, self.norm_topk_prob = scoring, norm_topk_prob
        self.shared_hidden_features = shared_hidden_features
        self.sequence_parallel = sequence_parallel
        e, h, f = num_experts, features, hidden_features
        param = partial(rules.param, mesh=mesh, dtype=param_dtype)
        self.router = _Weights(param(f"{role}.router", default_kernel_init, rngs.params(), (h, e), ("in", None)))
        self.gate = _Weights(param(f"{role}.gate", _expert_kernel_init, rngs.params(), (e, h, f), ("experts", "in", "out")))
        self.up = _Weights(param(f"{role}.up", _expert_kernel_init, rngs.params(), (e, h, f), ("experts", "in", "out")))
        self.down = _Weights(param(f"{role}.down", _expert_kernel_init, rngs.params(), (e, f, h), ("experts", "in", "out")))
        # The shared expert: a SwiGLU MLP on every token, tensor-parallel like ParallelMLP
        # (column gate/up, row down); its partial sums join the experts' before the one reduction.
        fs = shared_hidden_features
        self.shared = (
            _SharedExpert(
                *(_Weights(param(f"{role}.shared.{name}", default_kernel_init, rngs.params(), shape, ("in", "out")))
                  for name, shape in (("gate", (h, fs)), ("up", (h, fs)), ("down", (fs, h))))
            )
            if fs
            else None
        )
        self.expert_bias = _as_expert_bias(
            param(f"{role}.expert_bias", nnx.initializers.zeros_init(), rngs.params(), (e,), (None,))
        ) if expert_bias else None
        self.shared_gate = (
            _Weights(param(f"{role}.shared_gate", default_kernel_init, rngs.params(), (h, 1), ("in", None)))
            if shared_gate
            else None
        )

    def capacity(self, seq_len: int) -> int:
        """Slots per expert per row (routing group) of ``seq_len`` tokens."""
        return capacity(seq_len, self.num_experts, self.top_k, self.capacity_factor)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x``: ``[batch, seq, features]`` (logical) from ordinary jit code; the
        batch is split over "expert" (and the sequence over "tensor" with
        ``sequence_parallel``); the statistics are batch means. Inside a region,
        ``x`` is this rank's ``[batch/ep, seq(/tp), features]`` block and the
        statistics are row sums, for the caller to reduce over its batch axes."""
        return super().__call__(x)

    def layout(self, x: jax.Array) -> Layout:
        placement = sequence_or_replicated(self.sequence_parallel)
        stats = {name: STATISTIC for name in STANDALONE_STATS}
        return Layout((placement,), (placement.of(x.ndim), stats), required=(EXPERT,))

    def check(self, x: jax.Array) -> None:
        name = type(self).__name__
        check_last_dim(x, self.features, name)
        check_rank(x, 3, "[batch, seq, features]", name)

    def local(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One rank's math: ``x [B_l, S, H]`` (or ``[B_l, S/tp, H]`` with
        sequence_parallel), this expert rank's rows."""
        # Enter the tensor region once: backward, one all-reduce (or reduce-scatter) of dx.
        x = enter_tensor_parallel(x, self.sequence_parallel)
        rows, seq, _ = x.shape
        if context_size() > 1 and self.capacity_factor is not None:
            raise ValueError(
                "MoEMLP with the sequence split over 'context' must be dropless (capacity_factor=None): "
                "capacity slots count a row's tokens in sequence order."
            )
        num_experts, top_k, capacity_per_expert = self.num_experts, self.top_k, self.capacity(seq)

        # Route: full rows on every rank, so every tensor rank routes identically. The
        # router is replicated over "tensor": its gradient, a partial sum per rank, is all-reduced.
        router = copy_to_tensor_region(self.router.kernel[...])
        logits = x.astype(jnp.float32) @ router.astype(jnp.float32)
        bias = None if self.expert_bias is None else copy_to_tensor_region(self.expert_bias[...])
        probs, experts, gates = choose(logits, top_k, self.scoring, self.norm_topk_prob, bias)
        slot = slots(experts, num_experts) if self.capacity_factor is not None else None
        kept = slot < capacity_per_expert if slot is not None else jnp.ones(experts.shape, bool)
        if self.dispatch == "one_hot":
            y = self._one_hot(x, experts, gates, kept, slot, capacity_per_expert)
        else:
            y = self._grouped(x, experts, gates, kept)
        if self.shared is not None:
            y = y + self._shared(x)
        y = exit_tensor_parallel(y, self.sequence_parallel)
        assigned = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.int32), axis=(1, 2))  # [B_l, E]
        # [B_l]: router z-loss per row (this context rank's share of the row's mean)
        z = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)), axis=1) / (seq * context_size())
        sums = self._row_sums(probs, assigned, jnp.sum(~kept), z)
        if bias is not None:  # value 0; gradient w.r.t. the bias: this rank's load error (summed over ranks: the step's)
            load = jnp.sum(assigned, axis=0).astype(jnp.float32)
            error = jax.lax.stop_gradient(load - jnp.mean(load))
            balance = jnp.sum((bias - jax.lax.stop_gradient(bias)) * error)
            sums["balance"] = all_reduce(balance, TENSOR) / jax.lax.axis_size(TENSOR)  # as the other statistics
        return y, sums

    def _shared(self, x: jax.Array) -> jax.Array:
        """The shared expert on this rank's hidden shard (partial sums over
        "tensor"), times ``sigmoid(x @ shared_gate)`` where there is a gate."""
        hidden = self.shared_hidden_features
        w_gate = cast_for(mask_padding(self.shared.gate.kernel[...], 1, hidden), x)
        w_up = cast_for(mask_padding(self.shared.up.kernel[...], 1, hidden), x)
        w_down = cast_for(mask_padding(self.shared.down.kernel[...], 0, hidden), x)
        y = (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down
        if self.shared_gate is not None:
            gate = copy_to_tensor_region(self.shared_gate.kernel[...])
            y = y * jax.nn.sigmoid(x.astype(jnp.float32) @ gate.astype(jnp.float32)).astype(y.dtype)
        return y

    def _experts(self, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """This rank's experts on ``rows [m, H]`` grouped by expert (``group_sizes``
        rows each), on its hidden shard: partial sums over "tensor"."""
        hidden = self.hidden_features
        w_gate = cast_for(mask_padding(self.gate.kernel[...], 2, hidden), rows)
        w_up = cast_for(mask_padding(self.up.kernel[...], 2, hidden), rows)
        w_down = cast_for(mask_padding(self.down.kernel[...], 1, hidden), rows)
        h = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, group_sizes))
        h = h * jax.lax.ragged_dot(rows, w_up, group_sizes)
        return jax.lax.ragged_dot(h, w_down, group_sizes)

    def _grouped(self, x: jax.Array, experts: jax.Array, gates: jax.Array, kept: jax.Array) -> jax.Array:
        """Sort the kept (token, choice) rows by expert, run the experts as grouped
        matmuls wherever they live (``layers/grouped.py``), unsort, combine."""
        rows, seq, features = x.shape
        keys = jnp.where(kept, experts, self.num_experts).reshape(-1)  # [B_l * S * k], dropped last
        order, counts = sort_by_expert(keys, self.num_experts)
        sorted_rows = x.reshape(rows * seq, features)[order // self.top_k]
        out = grouped_experts(sorted_rows, counts, self._experts, self.exchange)
        out = out[inverse_permutation(order)].reshape(rows, seq, self.top_k, -1)
        weights = jnp.where(kept, gates, 0.0).astype(out.dtype)
        return jnp.einsum("bskh,bsk->bsh", out, weights)

    def _one_hot(
        self, x: jax.Array, experts: jax.Array, gates: jax.Array, kept: jax.Array, slot: jax.Array | None, capacity_per_expert: int
    ) -> jax.Array:
        """The GShard dispatch: one-hot ``[B_l, S, E, C]`` einsums (``C = S``
        dropless), every expert on ``C`` slots; kept as the reference and the
        benchmark baseline."""
        num_experts = self.num_experts
        if slot is None:  # dropless: slots in GShard order, all kept
            slot = slots(experts, num_experts)
        dispatch = jnp.einsum(
            "bske,bskc->bsec",
            jax.nn.one_hot(jnp.where(kept, experts, num_experts), num_experts, dtype=jnp.float32),
            jax.nn.one_hot(slot, capacity_per_expert, dtype=jnp.float32),
        )
        weights = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * jnp.where(kept, gates, 0.0)[..., None]
        combine = (dispatch * jnp.sum(weights, axis=2)[..., None]).astype(x.dtype)
        dispatch = dispatch.astype(x.dtype)
        expert_in = jnp.einsum("bsec,bsh->bech", dispatch, x)  # [B_l, E, C, H]
        expert_in = checkpoint_name(_all_to_all(expert_in, 1, 0), "moe_dispatched")  # [ep*B_l, E_l, C, H]
        local_experts = expert_in.shape[1]
        expert_in = jnp.swapaxes(expert_in, 0, 1).reshape(local_experts, -1, x.shape[-1])
        hidden = self.hidden_features
        w_gate = cast_for(mask_padding(self.gate.kernel[...], 2, hidden), expert_in)
        w_up = cast_for(mask_padding(self.up.kernel[...], 2, hidden), expert_in)
        w_down = cast_for(mask_padding(self.down.kernel[...], 1, hidden), expert_in)
        h = jax.nn.silu(jnp.einsum("eth,ehf->etf", expert_in, w_gate))
        h = h * jnp.einsum("eth,ehf->etf", expert_in, w_up)
        expert_out = jnp.einsum("etf,efh->eth", h, w_down)  # [E_l, ep*B_l*C, H]
        expert_out = expert_out.reshape(local_experts, -1, capacity_per_expert, expert_out.shape[-1])
        expert_out = checkpoint_name(_all_to_all(jnp.swapaxes(expert_out, 0, 1), 0, 1), "moe_combined")
        return jnp.einsum("bsec,bech->bsh", combine, expert_out.astype(combine.dtype))

    def _row_sums(self, probs: jax.Array, assigned: jax.Array, dropped: jax.Array, z: jax.Array) -> dict[str, jax.Array]:
        """Statistics summed over this rank's rows: ``aux_loss`` (each row's
        load-balancing loss; ``assigned [B_l, E]`` counts each row's (token,
        choice) pairs per expert), ``z_loss`` (each row's mean squared
        logsumexp of the router logits, ``z [B_l]``), ``dropped`` and
        ``assignments`` (counts of (token, choice) pairs), and ``load [E]``
        (pairs per expert). Every tensor rank computes the same values; the
        mean over "tensor" makes that their type (and counts the losses'
        gradients once). Summing over the ranks that split the rows is the caller's."""
        seq = probs.shape[1] * context_size()  # the whole row's tokens
        fraction = assigned.astype(jnp.float32) / (seq * self.top_k)  # [B_l, E]: this rank's share
        prob_sums = jnp.sum(probs, axis=1)  # [B_l, E]
        if context_size() > 1:  # the row's, over every context rank (backward: their cotangents summed)
            prob_sums = broadcast_over(sum_over(prob_sums, CONTEXT), CONTEXT)
        mean_prob = prob_sums / seq  # aux_b = E sum_e f_be P_be, f_be summed over the context ranks by the caller
        local = jnp.concatenate(
            [
                jnp.stack([
                    self.num_experts * jnp.sum(fraction * mean_prob),
                    jnp.sum(z),
                    jnp.sum(dropped).astype(jnp.float32),
                    jnp.float32(probs.shape[0] * seq * self.top_k),
                ]),
                jnp.sum(assigned, axis=0).astype(jnp.float32),
            ]
        )
        local = all_reduce(local, TENSOR) / jax.lax.axis_size(TENSOR)
        names = ("aux_loss", "z_loss", "dropped", "assignments")
        return {**{name: local[i] for i, name in enumerate(names)}, "load": local[len(names):]}

    def standalone(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``local``, with its row sums turned into batch means (standalone use)."""
        y, sums = self.local(x)
        row_axes = tuple(axis for axis in (*BATCH_AXES, CONTEXT) if axis in jax.typeof(sums["dropped"]).mat.varying)
        if row_axes:
            sums = {name: all_reduce(value, row_axes) for name, value in sums.items()}
        rows = x.shape[0] * math.prod(jax.lax.axis_size(axis) for axis in row_axes)
        return y, {
            "aux_loss": sums["aux_loss"] / rows,
            "z_loss": sums["z_loss"] / rows,
            "dropped": sums["dropped"],
            "dropped_fraction": sums["dropped"] / sums["assignments"],
            **load_extremes(sums["load"]),
        }
