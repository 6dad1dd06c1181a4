"""What a mesh costs before it runs: memory per device and communication per step.

``plan(config)`` reads the parameters of the real model, built abstractly
(``nnx.eval_shape``: no array is allocated), and each parameter's stored shape
and ``out_sharding``: parameter and optimizer bytes per device are exact. The
collectives of one training step are written out as Megatron's formulas, one
``Transfer`` each, in the measure ``lite_tp_jax.core.hlo.collectives_per_step``
counts on the compiled step: result bytes per device, as often as the step runs
them (tests hold the two within 1%). Activations are an estimate.

Symbols: d, p, e, f, c, t the mesh sizes; B = global_batch / (d e f) rows per
rank, m microbatches (pipeline only) of b = B / m rows, S sequence, S_c = S / c
the slots of a context rank (every activation, token and target below holds S_c
where one device would hold S), H hidden, F ffn, V vocabulary, E experts, C
expert capacity, L layers in G scanned groups, v virtual stages, T = v m + p - 1
pipeline ticks; h_q, h_k the query and kv heads of a tensor rank (k/v taken per
query head, h_k = h_q, when replicated), D head_dim; f32 = 4 bytes.

    where                    forward                          backward
    each block, t > 1        2 all-reduce b S H  over t       2 all-reduce b S H
      with SP                2 all-gather b S H + 2 reduce-scatter b S/t H, both ways;
                             backward, 2 more all-gathers b S H (inputs kept as sequence shards, re-gathered)
    MoE block, e > 1         2 all-to-all e b S k H over e    2 all-to-all
                             (the grouped exchange's buffers: every rank's b S k (token,
                             choice) rows, room for all of them from each of the e ranks;
                             on GPU/TPU ragged, only the rows received move) + 1 all-to-all
                             of the E group sizes (forward)
    attention, c > 1 (``model.context_parallel``), per block:
      all_gather             2 all-gather b S h_k D over c    2 reduce-scatter b S_c h_k D, and the
                                                              2 all-gathers again (K, V are not kept)
      ring                   2(n-1) collective-permute        2(n-1) of dK, dV (float32) and of K, V, and the
                             b S_c h_k D (K, V), n-1 of S_c   forward's 2(n-1) again (the scan keeps no lse; at
                             key positions                    n = 2 XLA shares them); key positions alike
      all_to_all             4 all-to-all b S_c h D over c    4 all-to-all (transposes) + 3 again
                                                              (remat full: + 4 again)
                             (q, k, v, out; h = h_q, h_k, h_k, h_q, or every one h_q padded to a
                             multiple of c when the kv heads do not divide by c)
    MoE block, c > 1         1 all-reduce b E over c          1 all-reduce b E (router probabilities per row)
    pipeline, each tick      1 collective-permute b S' H      1 collective-permute  (S' = S/t with SP)
    pipeline in/out          all-reduce B S' H over p         all-reduce B S' H over p
    embedding lookup         all-reduce B S H over vocab axes (SP: reduce-scatter over t,
                             all-reduce over p)               (SP: all-gather over t)
    head (attend)            (SP: all-gather B S H over t)    all-reduce B S H over vocab axes
                                                              not yet per-rank (SP: + reduce-scatter)
    cross-entropy            3 all-reduce B S over vocab axes
    gradients, in the layers a weight replicated over "tensor" but used per tensor rank
                             (k/v kernels when kv heads < t, the router, norm scales with
                             SP): all-reduce of its gradient over t, per use (in a pipeline,
                             this tick's chunk at every tick)
    gradients, at entry      per parameter, once: its shard, all-reduced over the batch axes
                             (d, e, f) and "context" it is replicated on
    fsdp, layer groups       per stacked matrix and group run: all-gather of one group's
                             weights (compute dtype) forward, again backward (remat), and
                             a reduce-scatter of its f32 gradient (one shard) backward
    fsdp, other parameters   all-gather of the whole (f32) once forward, reduce-scatter
                             of its gradient once backward (embedding, head)
    ZeRO-1 (shard_optimizer) each parameter whose moments split over "data": all-gather of
                             the updated parameter over "data" (GSPMD, after the update)
    (all of the above once per micro-step with gradient accumulation k, but the ZeRO-1 gather)

Scalars (loss statistics, the gradient norm) are left out: a few hundred bytes.
XLA:CPU widens bf16 collectives to f32 when it compiles, so on fake CPU
devices the fsdp gathers of a bf16 model measure twice the bytes predicted.

Peak memory per device (``peak_bytes``, every mode; the table in
docs/architecture.md): parameters + gradients + optimizer state as stored
(exact, from the model), plus what a step holds gathered for a while: with
fsdp two layer groups' gathered weights (one in use, the next one's gather in
flight) and one group's gradient before its reduce-scatter, and the embedding
and head gathered; plus the activations (an estimate).
Neither are collectives over groups of one device, which ``hlo.bytes_by_axis``
labels "none": compiled, but they move nothing (an MoE model keeps "expert" in
its region even at size 1, and its gradient sums over it remain in the HLO).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lite_tp_jax.analysis.profiles import DeviceProfile
from lite_tp_jax.core import hlo
from lite_tp_jax.core.axes import AXES, BATCH_AXES, CONTEXT, DATA, EXPERT, FSDP, PIPELINE, TENSOR, describe, entry_axes
from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.layers.moe import capacity as moe_capacity
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.factory import partition_rules
from lite_tp_jax.models.fit import batch_ranks
from lite_tp_jax.models.flops import training_flops_per_step
from lite_tp_jax.run.config import Config, ConfigError, TrainConfig
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.fit import check_run_fits
from lite_tp_jax.train.decoder_step import decoder_step

F32 = 4


# --- parameters, from the model built abstractly -------------------------------


@dataclass(frozen=True)
class Parameter:
    """One parameter as stored: ``shape`` padded (and stacked), ``spec`` its PartitionSpec."""

    name: str
    shape: tuple[int, ...]
    spec: tuple
    strategy: str
    role: str
    bytes_per_device: int
    fsdp_shard: int = 0  # elements of one group's (or the whole, unstacked) fsdp shard per device
    fsdp_gathered: int = 0  # the same gathered over "fsdp" (0: not split over it)
    scanned: bool = False  # of the stacked layer groups: gathered per group, in the scan
    moments_over_data: bool = False  # ZeRO-1: its moments split over "data"

    @property
    def sharded_axes(self) -> tuple[str, ...]:
        return tuple(a for entry in self.spec for a in entry_axes(entry))


def abstract_model_and_optimizer(model: ModelConfig, train: TrainConfig, mesh):
    """The model and optimizer as ``nnx.eval_shape`` builds them: shapes,
    dtypes and metadata, no arrays."""
    return nnx.eval_shape(lambda: create_model_and_optimizer(model, train, mesh))


def _variables(tree) -> list[tuple[str, object]]:
    return [(".".join(map(str, path)), v) for path, v in nnx.to_flat_state(nnx.state(tree))]


def shard_bytes(variable, mesh) -> int:
    """Bytes of one device's shard of a variable, from its shape and ``out_sharding``."""
    spec = tuple(variable.get_metadata().get("out_sharding") or ())
    shape = list(variable.shape)
    for i, entry in enumerate(spec):
        for axis in entry_axes(entry):
            shape[i] = -(-shape[i] // mesh.shape[axis])
    return math.prod(shape) * np.dtype(variable.dtype).itemsize


def _shard_shape(shape, spec, mesh, skip: str | None = None) -> list[int]:
    shape = list(shape)
    for i, entry in enumerate(spec):
        for axis in entry_axes(entry):
            if axis != skip:
                shape[i] = -(-shape[i] // mesh.shape[axis])
    return shape


def parameters(model_obj, mesh, optimizer=None) -> list[Parameter]:
    """Every parameter of ``model_obj`` with its bytes per device, its fsdp shard
    and gathered sizes (per layer group, for the stacked ones), and whether
    ``optimizer`` splits its moments over "data" (ZeRO-1)."""
    over_data = set()
    if optimizer is not None:
        for name, v in _variables(nnx.state(optimizer, nnx.optimizer.OptState)):
            if DATA in {a for e in v.get_metadata().get("out_sharding") or () for a in entry_axes(e)}:
                over_data.add(name.split(".mu.", 1)[-1].split(".nu.", 1)[-1])  # opt_state.0.mu.<parameter>
    out = []
    for name, v in _variables(nnx.state(model_obj, nnx.Param)):
        metadata = v.get_metadata()
        spec = tuple(metadata.get("out_sharding") or ())
        role = str(metadata.get("role") or name.rsplit(".", 2)[-2])
        lead = len(v.shape) - len(metadata.get("logical_shape", v.shape)) if metadata.get("scanned") else 0
        shard, gathered = 0, 0
        if FSDP in {a for e in spec for a in entry_axes(e)}:
            shard = math.prod(_shard_shape(v.shape, spec, mesh)[lead:])
            gathered = math.prod(_shard_shape(v.shape, spec, mesh, skip=FSDP)[lead:])
        zero1 = name in over_data
        out.append(Parameter(name, tuple(v.shape), spec, str(metadata["strategy"]), role, shard_bytes(v, mesh),
                             shard, gathered, bool(lead), zero1))
    return out


def optimizer_bytes(optimizer, mesh) -> int:
    """Bytes per device of the optimizer state (AdamW moments sharded like their parameter, counters)."""
    state = nnx.state(optimizer, nnx.optimizer.OptState)
    return sum(shard_bytes(v, mesh) for _, v in _variables(state))


# --- collectives: Megatron's formulas ------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One collective's result bytes per device per step (all its runs together)."""

    what: str
    kind: str
    axes: tuple[str, ...]
    phase: str  # forward | backward
    bytes: int


def _ordered(axes: Iterable[str], sizes: dict[str, int]) -> tuple[str, ...]:
    axes = set(axes)
    return tuple(a for a in AXES if a in axes and sizes.get(a, 1) > 1)


def capacity(model: ModelConfig, seq: int) -> int:
    return moe_capacity(seq, model.num_experts, model.top_k, model.capacity_factor)


@dataclass(frozen=True)
class _Step:
    """The sizes one device's step is made of (the module docstring's symbols)."""

    model: ModelConfig
    sizes: dict[str, int]
    S: int  # the slots of a context rank (S_c; the sequence without "context")
    H: int  # hidden
    B: int  # rows per rank
    b: int  # rows per microbatch
    ticks: int  # pipeline ticks (1 without a pipeline)
    group_runs: int  # layer groups one device runs
    s_local: int  # the sequence a rank holds between blocks (S/t with SP)

    @classmethod
    def of(cls, model: ModelConfig, train: TrainConfig, sizes: dict[str, int]) -> _Step:
        p, t, c = sizes[PIPELINE], sizes[TENSOR], sizes.get(CONTEXT, 1)
        model = model.with_sequence_parallel(sizes, train.seq_len)[0]
        rows = train.global_batch // batch_ranks(sizes)
        m, v = (train.microbatches if p > 1 else 1), model.virtual_stages
        groups = model.num_layers // model.layers_per_group
        ticks = v * m + p - 1 if p > 1 else 1
        group_runs = ticks * groups // (v * p) if p > 1 else groups
        seq = train.seq_len // c
        s_local = seq // t if model.sequence_parallel else seq
        return cls(model, sizes, seq, model.hidden_size, rows, rows // m, ticks, group_runs, s_local)

    @property
    def pipelined(self) -> bool:
        return self.sizes[PIPELINE] > 1

    @property
    def reruns(self) -> bool:
        """Whether the backward recomputes a block's forward (remat) with the exchanges
        whose results are not kept: not where XLA merges the recomputation with the
        forward (one layer group, no pipeline: the layer scan runs once, so forward
        and backward share one computation, and prevent_cse is off)."""
        return self.pipelined or self.group_runs > 1


class _Transfers(list):
    """The collectives found so far; ``add`` skips those over no axis in use."""

    def __init__(self, sizes: dict[str, int]):
        super().__init__()
        self.sizes = sizes

    def add(self, what, kind, axes, phase, elements, runs=1, itemsize=F32):
        axes = _ordered(axes, self.sizes)
        if axes and elements and runs:
            self.append(Transfer(what, kind, axes, phase, int(elements) * itemsize * runs))


def _block_transfers(out: _Transfers, step: _Step) -> None:
    """Attention and MLP (or MoE) each enter and leave the tensor region once per block."""
    blocks = step.group_runs * step.model.layers_per_group
    b, S, H = step.b, step.S, step.H
    for phase in ("forward", "backward"):
        if step.model.sequence_parallel:
            out.add("blocks: sequence all-gathers", "all-gather", [TENSOR], phase, b * S * H, 2 * blocks)
            out.add("blocks: sequence reduce-scatters", "reduce-scatter", [TENSOR], phase, b * step.s_local * H, 2 * blocks)
            if phase == "backward" and step.reruns:  # the blocks keep their inputs' sequence shards and gather them again
                out.add("blocks: re-gathered inputs", "all-gather", [TENSOR], phase, b * S * H, 2 * blocks)
        else:
            out.add("blocks: all-reduces", "all-reduce", [TENSOR], phase, b * S * H, 2 * blocks)
        if step.model.moe_every:
            out.add("MoE: dispatch and return", "all-to-all", [EXPERT], phase,
                    step.sizes[EXPERT] * b * S * step.model.top_k * H, 2 * step.group_runs)
    if step.model.moe_every:
        out.add("MoE: group sizes", "all-to-all", [EXPERT], "forward", step.model.num_experts, step.group_runs)
        out.add("MoE: statistics", "all-reduce", [TENSOR], "forward", 3, step.group_runs)
        for phase in ("forward", "backward"):
            out.add("MoE: router probabilities per row", "all-reduce", [CONTEXT], phase,
                    b * step.model.num_experts, step.group_runs)
    _context_transfers(out, step, blocks)


def attention_heads(model: ModelConfig, tensor: int) -> tuple[int, int]:
    """``(h_q, h_k)``: the query heads of a tensor rank and the kv heads its
    attention computes with (``layers/attention.py``: kv heads split with their
    query groups, padded; or, replicated, taken per query head)."""
    q, kv = model.num_heads, model.num_kv_heads
    kv_split = partition_rules(model).strategy("attention.key", ("column", "replicated")) == "column" and kv >= tensor
    if kv_split:
        kv_padded = -(-kv // tensor) * tensor
        return kv_padded * (q // kv) // tensor, kv_padded // tensor
    heads = -(-q // tensor)
    return heads, heads


def _context_transfers(out: _Transfers, step: _Step, blocks: int) -> None:
    """Attention over "context" (``model.context_parallel``): the exchanges of K/V or heads per block."""
    c = step.sizes.get(CONTEXT, 1)
    if c == 1:
        return
    h_q, h_k = attention_heads(step.model, step.sizes[TENSOR])
    row = step.b * step.S * step.model.resolved_head_dim  # one head of this rank's slots
    rerun = step.reruns
    if step.model.context_parallel == "ring":
        # backward: the forward ring again (the layer scan keeps no lse: the kernel's output is
        # recomputed; at n = 2 XLA shares its one permute with the backward ring's), then the backward ring
        for phase, rings in (("forward", 1), ("backward", 2 if c > 2 and rerun else 1)):
            out.add("attention: K, V round the ring", "collective-permute", [CONTEXT], phase, row * h_k,
                    2 * (c - 1) * rings * blocks)
            out.add("attention: key positions round the ring", "collective-permute", [CONTEXT], phase, step.S,
                    (c - 1) * rings * blocks)
        out.add("attention: dK, dV round the ring", "collective-permute", [CONTEXT], "backward", row * h_k,
                2 * (c - 1) * blocks)
    elif step.model.context_parallel == "all_gather":
        for phase, runs in (("forward", 2 * blocks), ("backward", 2 * blocks * rerun)):  # backward: K, V gathered again
            out.add("attention: K, V all-gathers over context", "all-gather", [CONTEXT], phase, c * row * h_k, runs)
        out.add("attention: K, V gradients", "reduce-scatter", [CONTEXT], "backward", row * h_k, 2 * blocks)
    else:  # all_to_all (Ulysses)
        if h_k % c or h_q % c:
            h_q = h_k = -(-h_q // c) * c
        forward = row * (2 * h_q + 2 * h_k)
        out.add("attention: q, k, v, out all-to-alls over context", "all-to-all", [CONTEXT], "forward", forward, blocks)
        # q, k, v exchanged again for the recomputed attention; with remat full its output too
        again = (row * (h_q + 2 * h_k) + (row * h_q if step.model.remat == "full" else 0)) * rerun
        out.add("attention: all-to-alls (transposes, q k v again)", "all-to-all", [CONTEXT], "backward",
                forward + again, blocks)


def _pipeline_transfers(out: _Transfers, step: _Step) -> None:
    """One hand-over per tick each way; the inputs in and the outputs out."""
    if step.pipelined:
        for phase in ("forward", "backward"):
            out.add("pipeline: hand-over per tick", "collective-permute", [PIPELINE], phase,
                    step.b * step.s_local * step.H, step.ticks)
            out.add("pipeline: inputs and outputs", "all-reduce", [PIPELINE], phase, step.B * step.s_local * step.H)


def _vocabulary_transfers(out: _Transfers, step: _Step) -> None:
    """Embedding lookup, output head and vocabulary-parallel cross-entropy."""
    whole, shard = step.B * step.S * step.H, step.B * step.s_local * step.H
    vocab_axes = (PIPELINE, TENSOR) if step.pipelined else (TENSOR,)
    if step.model.sequence_parallel:
        out.add("embedding: reduce-scatter", "reduce-scatter", [TENSOR], "forward", shard)
        out.add("embedding: all-reduce over stages", "all-reduce", [PIPELINE], "forward", shard)
        out.add("embedding: all-gather", "all-gather", [TENSOR], "backward", whole)
        out.add("head: sequence all-gather", "all-gather", [TENSOR], "forward", whole)
        out.add("head: reduce-scatter", "reduce-scatter", [TENSOR], "backward", shard)
        out.add("head: input gradient", "all-reduce", [PIPELINE], "backward", whole)
    else:
        out.add("embedding: all-reduce", "all-reduce", vocab_axes, "forward", whole)
        out.add("head: input gradient", "all-reduce", vocab_axes, "backward", whole)
    out.add("cross-entropy: max, sum, target", "all-reduce", vocab_axes, "forward", step.B * step.S, 3)


def _gradient_transfers(out: _Transfers, step: _Step, params: list[Parameter]) -> None:
    """Inside the layers, per use: the "tensor" sum of a weight replicated over
    "tensor" but used per tensor rank (the router, k/v kernels with fewer kv
    heads than ranks; norms only with SP, since without it their input is the
    same on every rank). At region entry, once: each parameter's shard summed
    over the batch axes it is replicated on (``parallel/region.py``)."""
    for param in params:
        per_tensor_rank = param.strategy == "replicated" and (step.model.sequence_parallel or not param.role.endswith("norm"))
        grad = param.bytes_per_device // F32
        if per_tensor_rank:
            stacked_in_pipeline = param.name.startswith("layers.") and step.pipelined
            # in a pipeline, this tick's chunk of the stacked layers, every tick
            inside, runs = (grad // step.model.virtual_stages, step.ticks) if stacked_in_pipeline else (grad, 1)
            out.add(f"gradient of {param.name} over tensor", "all-reduce", [TENSOR], "backward", inside, runs)
        batch = [a for a in (*BATCH_AXES, CONTEXT) if a not in param.sharded_axes]
        out.add(f"gradient of {param.name}", "all-reduce", batch, "backward", grad)


def compute_itemsize(model: ModelConfig) -> int:
    """Bytes of one element in the model's compute dtype (what fsdp gathers move)."""
    return jnp.dtype(model.compute_dtype).itemsize


def _hoisted(step: _Step) -> bool:
    """A pipeline stage whose chunk is one layer group (v = 1): the forward
    gather is the same every tick, and XLA hoists it out of the tick loop."""
    groups = step.model.num_layers // step.model.layers_per_group
    return step.pipelined and step.model.virtual_stages == 1 and groups == step.sizes[PIPELINE]


def _fsdp_transfers(out: _Transfers, step: _Step, params: list[Parameter], grad_accum: int) -> None:
    """Stacked matrices: one group's weights gathered per group run, forward and
    again backward (no remat policy keeps them), and one reduce-scatter of the
    group's float32 gradient. Others: gathered once forward, reduce-scattered once."""
    itemsize = compute_itemsize(step.model)
    for param in params:
        if not param.fsdp_gathered:
            continue
        if param.scanned:
            runs = step.group_runs * grad_accum
            for phase in ("forward", "backward"):
                out.add(f"fsdp: {param.name}, one group", "all-gather", [FSDP], phase, param.fsdp_gathered,
                        grad_accum if phase == "forward" and _hoisted(step) else runs, itemsize)
        else:
            runs = grad_accum
            out.add(f"fsdp: {param.name}", "all-gather", [FSDP], "forward", param.fsdp_gathered, runs)
        out.add(f"fsdp: gradient of {param.name}", "reduce-scatter", [FSDP], "backward", param.fsdp_shard, runs)


def _zero1_transfers(out: _Transfers, params: list[Parameter]) -> None:
    """ZeRO-1: each rank updates its slice of a parameter whose moments are split
    over "data"; the updated parameter is all-gathered over "data" (GSPMD)."""
    for param in params:
        if param.moments_over_data:
            out.add(f"ZeRO-1: updated {param.name}", "all-gather", [DATA], "backward", param.bytes_per_device // F32)


def transfers(model: ModelConfig, train: TrainConfig, sizes: dict[str, int], params: list[Parameter]) -> list[Transfer]:
    """Every collective of one training step on one device, by Megatron's formulas (module docstring)."""
    model = model.with_sequence_parallel(sizes, train.seq_len)[0]
    step, out = _Step.of(model, train, sizes), _Transfers(sizes)
    _block_transfers(out, step)
    _pipeline_transfers(out, step)
    _vocabulary_transfers(out, step)
    _gradient_transfers(out, step, params)
    _fsdp_transfers(out, step, params, train.grad_accum)
    _zero1_transfers(out, params)
    return list(out)


def peak_bytes(model: ModelConfig, train: TrainConfig, sizes: dict[str, int], params: list[Parameter],
               optimizer: int) -> dict[str, int]:
    """Peak memory per device (module docstring): the stored state, the gradients
    (twice with gradient accumulation: the sum and a micro-step's), the gathered
    weights in flight, the activations; and their sum, ``peak``."""
    stored = sum(p.bytes_per_device for p in params)
    itemsize = compute_itemsize(model)
    groups = [p for p in params if p.scanned and p.fsdp_gathered]
    per_group = sum(p.fsdp_gathered for p in groups)  # elements of one layer group's gathered weights
    gathered = 2 * per_group * itemsize + per_group * F32  # two groups' weights, one group's gradient
    gathered += sum(p.fsdp_gathered * F32 for p in params if p.fsdp_gathered and not p.scanned)
    parts = {
        "parameters": stored,
        "gradients": stored * (2 if train.grad_accum > 1 else 1),
        "optimizer": optimizer,
        "gathered": gathered,
        "activations": activation_bytes(model, train, sizes),
    }
    return {**parts, "peak": sum(parts.values())}


def bytes_by_axis(items: Iterable[Transfer]) -> dict[str, int]:
    """``{"data+tensor": bytes, ...}``, labelled as ``lite_tp_jax.core.hlo.axes_label`` does."""
    out: dict[str, int] = {}
    for item in items:
        out[hlo.axes_label(item.axes)] = out.get(hlo.axes_label(item.axes), 0) + item.bytes
    return dict(sorted(out.items()))


# --- activations: an estimate ------------------------------------------------------


def activation_bytes(model: ModelConfig, train: TrainConfig, sizes: dict[str, int]) -> int:
    """Bytes per device kept for the backward pass: an estimate.

    Per layer and microbatch, Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", eqs. 2-6), scaled from 2- to
    4-byte activations (its dropout masks kept as slack): ``S b H (10 + 24/t + 5 a S / (H t))``
    (no SP), ``S b H (34/t + 5 a S / (H t))`` (SP); ``selective`` drops the
    attention term, ``full`` keeps the block input (``2 S b H``, /t with SP).
    A pipeline stage keeps every tick's activations of its chunk. Plus the
    logits slice and its softmax: ``2 B S V / (t p)``. With "context" every
    term holds S_c = S / c tokens, and the attention term's scores are of S_c
    queries against all S keys (none with the ring).
    """
    model = model.with_sequence_parallel(sizes, train.seq_len)[0]
    p, t, c = sizes[PIPELINE], sizes[TENSOR], sizes.get(CONTEXT, 1)
    S, H, a = train.seq_len // c, model.hidden_size, model.num_heads
    B = train.global_batch // batch_ranks(sizes)
    m = train.microbatches if p > 1 else 1
    b = B // m
    sp = model.sequence_parallel
    # the ring keeps no scores (its backward recomputes them from lse, one sub-block at a time)
    attention = 0 if c > 1 and model.context_parallel == "ring" else 5 * a * train.seq_len / (H * t)
    if model.remat == "full":
        per_layer = 2 * S * b * H / (t if sp else 1)
    else:
        dense = 34 / t if sp else 10 + 24 / t
        per_layer = S * b * H * (dense + (0 if model.remat == "selective" else attention))
    per_layer *= F32 / 2  # the paper's 2-byte values -> 4-byte
    groups = model.num_layers // model.layers_per_group
    v = model.virtual_stages
    layer_runs = ((v * m + p - 1) * groups // (v * p) if p > 1 else groups) * model.layers_per_group
    logits = 2 * B * S * (-(-model.vocab_size // (t * p))) * F32
    return int(per_layer * layer_runs + logits)


# --- the plan ----------------------------------------------------------------------


def check_mesh(config: Config, sizes: dict[str, int]) -> str | None:
    """Why ``sizes`` cannot run ``config`` (the training run's own fit checks,
    ``train/fit.py``, in one sentence with key paths), or None. An expert axis
    without experts is refused too: it runs, as more data parallelism, but a
    ranking should not list the same mesh twice."""
    if sizes[EXPERT] > 1 and not config.model.moe_every:
        return "an expert axis > 1 needs a mixture-of-experts model (model.moe_every > 0)"
    try:
        check_run_fits(config, sizes)
    except ConfigError as error:
        return str(error)
    return None


def plan(config: Config, sizes: dict[str, int]) -> dict:
    """The plan of one mesh as a JSON-ready dict (see the module docstring)."""
    problem = check_mesh(config, sizes)
    if problem:
        raise ConfigError(f"mesh {describe(sizes)} cannot run this config: {problem}")
    data = sizes[DATA] if config.train.shard_optimizer else 1  # ZeRO-1 splits the moments over "data"
    params, opt = _layout(config.model, config.train, tuple((axis, sizes[axis] if axis != DATA else data) for axis in AXES))
    items = transfers(config.model, config.train, sizes, params)
    memory = peak_bytes(config.model, config.train, sizes, params, opt)
    groups: dict[str, dict] = {}
    for param in params:
        group = groups.setdefault(_group_name(param.name), {"strategy": set(), "parameters": 0, "param_bytes_per_device": 0})
        group["strategy"].add(param.strategy)
        group["parameters"] += 1
        group["param_bytes_per_device"] += param.bytes_per_device
    param_total = sum(p.bytes_per_device for p in params)
    for group in groups.values():
        group["strategy"] = "/".join(sorted(group["strategy"]))
        group["optimizer_bytes_per_device"] = round(opt * group["param_bytes_per_device"] / max(param_total, 1))
    return {
        "mesh": sizes,
        "partition_rules": [{"roles": pattern, "strategy": strategy, "split": {dim: list(axes) if isinstance(axes, tuple)
                                                                              else axes for dim, axes in split.items()}}
                             for pattern, strategy, split in partition_rules(config.model).describe()],
        "param_bytes_per_device": param_total,
        "optimizer_bytes_per_device": opt,
        "activation_bytes_per_device": memory["activations"],
        "peak_bytes_per_device": memory["peak"],
        "memory_per_device": memory,
        "collective_bytes_per_step_per_device": sum(i.bytes for i in items),
        "collective_bytes_by_axis": bytes_by_axis(items),
        "collective_bytes_by_phase": {
            phase: bytes_by_axis(i for i in items if i.phase == phase) for phase in ("forward", "backward")
        },
        "parameter_groups": groups,
        "parameters": [asdict(p) | {"spec": [list(e) if isinstance(e, tuple) else e for e in p.spec]} for p in params],
        "collectives": [asdict(i) for i in items],
        "flops_per_step_per_device": flops_per_step(config.model, config.train) / math.prod(sizes.values()),
    }


@functools.lru_cache(maxsize=64)
def _layout(model: ModelConfig, train: TrainConfig, sizes: tuple[tuple[str, int], ...]):
    """Parameters and optimizer bytes per device. No parameter is split over
    "data" (only ZeRO-1's moments), so the caller passes data 1 otherwise and
    one abstract model serves every data size."""
    mesh = make_mesh_for(dict(sizes))
    model_obj, optimizer = abstract_model_and_optimizer(model, train, mesh)
    return parameters(model_obj, mesh, optimizer), optimizer_bytes(optimizer, mesh)


def _group_name(name: str) -> str:
    """``layers.blocks.0.attention.query.kernel`` -> ``layers.blocks.0.attention.query``
    (block 0 of every stacked layer group)."""
    return name.rsplit(".", 1)[0]


# --- ranking meshes by a roofline estimate -----------------------------------------


def flops_per_step(model: ModelConfig, train: TrainConfig) -> float:
    """Model FLOPs of one training step, all devices together (``models/flops.py``:
    6 N per token plus causal attention counted half)."""
    return training_flops_per_step(model, train.global_batch, train.seq_len)


def _wire_factor(kind: str, n: int) -> float:
    """Bytes each device sends per result byte, for ring algorithms over n ranks."""
    return {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": n - 1,
            "all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind]


def estimate_step_seconds(config: Config, sizes: dict[str, int], planned: dict, profile: DeviceProfile) -> dict:
    """Roofline: matmul FLOPs over peak (stretched by the pipeline bubble), plus
    each collective's wire bytes over the link of its slowest axis ("tensor"
    within a node while it fits in one, "context" while tensor x context does,
    "fsdp" while tensor x context x fsdp does, the others across nodes)."""
    compute = planned["flops_per_step_per_device"] / profile.peak_flops
    p, m, v = sizes[PIPELINE], config.train.microbatches, config.model.virtual_stages
    bubble = (p - 1) / (v * m + p - 1) if p > 1 else 0.0
    compute /= 1 - bubble
    comm = 0.0
    # "tensor" innermost, then "context", then "fsdp": each within a node while the axes inside it fit in one
    t, c, f = sizes[TENSOR], sizes.get(CONTEXT, 1), sizes.get(FSDP, 1)
    within = {TENSOR: t <= profile.devices_per_node, CONTEXT: t * c <= profile.devices_per_node,
              FSDP: t * c * f <= profile.devices_per_node}
    for item in planned["collectives"]:
        n = math.prod(sizes[a] for a in item["axes"])
        bandwidth = min(profile.intra_node_bytes_per_s if within.get(a) else profile.inter_node_bytes_per_s
                        for a in item["axes"])
        comm += item["bytes"] * _wire_factor(item["kind"], n) / bandwidth
    return {"compute_s": compute, "communication_s": comm, "bubble_fraction": bubble, "step_s": compute + comm}


def factorisations(devices: int) -> list[dict[str, int]]:
    """Every assignment of sizes to the mesh axes whose product is ``devices``."""
    divisors = [k for k in range(1, devices + 1) if devices % k == 0]
    out = []
    for outer in itertools.product(divisors, repeat=len(AXES) - 1):
        if devices % math.prod(outer) == 0:
            out.append(dict(zip(AXES, (*outer, devices // math.prod(outer)))))
    return out


def rank_meshes(config: Config, devices: int, memory_gb: float, profile: DeviceProfile) -> list[dict]:
    """Every valid mesh of ``devices`` (fsdp among the axes), fastest estimate
    first (then the least memory); ``fits``: the peak (``peak_bytes``: parameters, gradients, optimizer,
    gathered weights, activations) within ``memory_gb`` (10^9 bytes)."""
    rows = []
    for sizes in factorisations(devices):
        if check_mesh(config, sizes):
            continue
        planned = plan(config, sizes)
        memory = planned["peak_bytes_per_device"]
        rows.append({"mesh": sizes, "memory_bytes_per_device": memory, "fits": memory <= memory_gb * 1e9,
                     "collective_bytes_per_step_per_device": planned["collective_bytes_per_step_per_device"],
                     **estimate_step_seconds(config, sizes, planned, profile)})
    return sorted(rows, key=lambda r: (not r["fits"], r["step_s"], r["memory_bytes_per_device"]))  # ties: less memory first


# --- checking against the compiled step, and text for the terminal -------------------


def compiled_bytes_by_axis(config: Config, sizes: dict[str, int]) -> dict[str, int]:
    """``hlo.bytes_by_axis`` of the real training step, lowered for abstract
    state (nothing is materialised) and compiled."""
    mesh = make_mesh_for(sizes)
    model_obj, optimizer = abstract_model_and_optimizer(config.model, config.train, mesh)
    tokens = jax.ShapeDtypeStruct((config.train.global_batch, config.train.seq_len), np.int32,
                                  sharding=batch_sharding(mesh))
    text = decoder_step(model_obj, optimizer, config.train).lower((tokens, tokens)).compile().as_text()
    return hlo.bytes_by_axis(text, mesh)


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def format_plan(planned: dict) -> str:
    lines = ["partition rules as applied (first match wins):"]
    for rule in planned["partition_rules"]:
        split = ", ".join(f"{dim} over {'+'.join(axes) if isinstance(axes, list) else axes}"
                          for dim, axes in rule["split"].items()) or "-"
        lines.append(f"  {rule['roles']:20s} {rule['strategy']:14s} {split}")
    lines += ["", f"mesh {describe(planned['mesh'])}: per device", "",
             f"{'parameter group':40s} {'strategy':22s} {'parameters':>14s} {'optimizer':>14s}"]
    for name, group in planned["parameter_groups"].items():
        lines.append(f"{name:40s} {group['strategy']:22s} {mib(group['param_bytes_per_device']):>14s} "
                     f"{mib(group['optimizer_bytes_per_device']):>14s}")
    lines += [f"{'total':63s} {mib(planned['param_bytes_per_device']):>14s} "
              f"{mib(planned['optimizer_bytes_per_device']):>14s}",
              f"activations (estimate): {mib(planned['activation_bytes_per_device'])}",
              "peak per device: " + " + ".join(f"{k} {mib(v)}" for k, v in planned["memory_per_device"].items()
                                              if k != "peak") + f" = {mib(planned['peak_bytes_per_device'])}", "",
              "collectives per step (result bytes per device):",
              f"{'mesh axes':24s} {'forward':>14s} {'backward':>14s} {'total':>14s}"]
    phases = planned["collective_bytes_by_phase"]
    for axes, total in planned["collective_bytes_by_axis"].items():
        lines.append(f"{axes:24s} {mib(phases['forward'].get(axes, 0)):>14s} "
                     f"{mib(phases['backward'].get(axes, 0)):>14s} {mib(total):>14s}")
    lines.append(f"{'total':56s} {mib(planned['collective_bytes_per_step_per_device']):>14s}")
    return "\n".join(lines)


def format_ranking(rows: list[dict], profile: DeviceProfile, memory_gb: float) -> str:
    axes = " ".join(f"{axis[:4]:>5s}" for axis in AXES)
    lines = [f"meshes ranked by a roofline estimate on {profile.name} ({memory_gb:g} GB per device):",
             f"{axes} {'step ms':>10s} {'compute':>9s} {'comm':>9s} {'bubble':>7s} {'memory':>12s}  fits"]
    for r in rows:
        sizes = " ".join(f"{r['mesh'][axis]:5d}" for axis in AXES)
        lines.append(f"{sizes} {r['step_s'] * 1e3:10.3f} "
                     f"{r['compute_s'] * 1e3:9.3f} {r['communication_s'] * 1e3:9.3f} {r['bubble_fraction']:7.2f} "
                     f"{mib(r['memory_bytes_per_device']):>12s}  {'yes' if r['fits'] else 'NO'}")
    return "\n".join(lines)
