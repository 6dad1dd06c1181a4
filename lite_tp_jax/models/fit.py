"""Whether a model and its batches fit a mesh: the one owner of each fit check.

Each function takes the mesh's axis sizes as a mapping (``mesh.shape``, or a
planned mesh's sizes, before any device exists) and raises ``FitError``
naming the quantities by their config field, so the config layer can show
them as key paths (``'train.global_batch' (3)``) and the planner can show the
same sentence for a mesh it ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lite_tp_jax.core.axes import BATCH_AXES, CONTEXT, PIPELINE, TENSOR
from lite_tp_jax.core.errors import BadInput, FitError
from lite_tp_jax.layers.moe import check_experts
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.parallel.context import check_context_split
from lite_tp_jax.parallel.pipeline import check_schedule
from lite_tp_jax.parallel.region import check_sequence_split


def batch_ranks(sizes: Mapping[str, int]) -> int:
    """How many ranks split the token rows (the product of the batch axes)."""
    return math.prod(sizes[axis] for axis in BATCH_AXES)


def check_layers_fit(config: ModelConfig, sizes: Mapping[str, int]) -> None:
    """The layer groups split evenly into pipeline chunks; experts into expert ranks."""
    groups, laps, stages = config.num_layers // config.layers_per_group, config.virtual_stages, sizes[PIPELINE]
    if groups % (laps * stages):
        raise FitError(
            f"the {groups} layer groups ({{num_layers}} / max({{moe_every}}, 1)) must split evenly into "
            f"{{virtual_stages}} x {{pipeline}} chunks",
            num_layers=config.num_layers, moe_every=config.moe_every,
            virtual_stages=laps, pipeline=stages,
        )
    if config.moe_every:
        check_experts(config.num_experts, sizes)
    if config.moe_every and sizes.get(CONTEXT, 1) > 1 and config.capacity_factor is not None:
        raise FitError(
            "{capacity_factor} must be null (dropless) with {context} > 1: an expert's capacity slots count a "
            "row's tokens in sequence order, and context parallelism splits the sequence",
            capacity_factor=config.capacity_factor, context=sizes[CONTEXT],
        )


def check_batch(config: ModelConfig, sizes: Mapping[str, int], rows: int, seq_len: int, microbatches: int = 1) -> None:
    """A ``[rows, seq_len]`` token batch fits the mesh: rows split over the batch
    axes (then into pipeline microbatches), the sequence over "tensor" with
    sequence parallelism (and "context"), the sequence over "context", and
    within the learned position table."""
    ranks = batch_ranks(sizes)
    if rows % ranks:
        raise FitError(
            "{global_batch} must be divisible by {data} x {expert} x {fsdp}",
            global_batch=rows, **{axis: sizes[axis] for axis in BATCH_AXES},
        )
    context = sizes.get(CONTEXT, 1)
    if context > 1:
        check_context_split(seq_len, context, config.context_load_balance)
    if config.with_sequence_parallel(sizes, seq_len)[0].sequence_parallel:  # "auto" falls back instead
        check_sequence_split(seq_len, sizes[TENSOR], context=context)
    if config.position == "learned" and seq_len > config.max_positions:
        raise FitError(
            "{seq_len} exceeds {max_positions}, the size of the learned position table",
            seq_len=seq_len, max_positions=config.max_positions,
        )
    if sizes[PIPELINE] > 1:
        if (rows // ranks) % microbatches:
            raise FitError(
                f"{{global_batch}} / (data x expert x fsdp = {ranks}) rows per rank must be divisible by {{microbatches}}",
                global_batch=rows, microbatches=microbatches,
            )
        check_schedule(sizes[PIPELINE], microbatches, config.virtual_stages)


def check_kernel_backend(config: ModelConfig, backend: str) -> None:
    """BadInput when ``model.attention=cudnn`` cannot run here: cuDNN's flash kernel
    needs an NVIDIA GPU and 16-bit inputs (``backend``: ``jax.default_backend()``)."""
    if config.attention != "cudnn":
        return
    if backend != "gpu":
        raise BadInput(f"'model.attention' is cudnn, which needs an NVIDIA GPU with cuDNN, but this run's devices "
                       f"are {backend}; use auto (cudnn where it applies), xla or reference.")
    if config.compute_dtype not in ("bfloat16", "float16"):
        raise BadInput(f"'model.attention' is cudnn, which takes 16-bit inputs, but 'model.compute_dtype' is "
                       f"{config.compute_dtype}; set model.compute_dtype=bfloat16 or use model.attention=auto.")
