"""The optimizer factory: any optax transformation over a model's parameters,
its state sharded like them; the run config's AdamW with warmup and cosine
decay (the built-in path); and the model + optimizer pair a run starts from.

The optimizer's moments carry their parameter's PartitionSpec (``nnx.Optimizer``
copies the metadata), so they are split exactly as the parameters are (over
"fsdp" too, with an fsdp axis); the step counts are put on the mesh,
replicated. With ``train.shard_optimizer`` (ZeRO-1, Megatron's distributed
optimizer) the moments alone are split over "data" as well, on their first dim
that divides (``moments_over_data``): the update runs on each rank's slice
and the new parameters are all-gathered over "data" (the partitioner's
collectives, outside the model's region). The table of modes:
``docs/architecture.md``, "Sharding parameters and optimizer state".
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from lite_tp_jax.core.axes import DATA, entry_axes, spec_entry
from lite_tp_jax.layers.moe import ExpertBias
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.factory import create_model
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.run.config import TrainConfig
from lite_tp_jax.sharding.rules import param_shardings


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``train.lr``, then cosine decay to ``lr * min_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.lr * train.min_lr_ratio,
    )


def _decay_mask(params: nnx.State) -> Any:
    """Weight decay for matrices (kernels, embeddings), not for norms or biases."""

    def decays(path, _):
        name = getattr(path[-1], "key", getattr(path[-1], "name", ""))
        if name == "value" and len(path) > 1:
            name = getattr(path[-2], "key", "")
        return name in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW; gradients arrive clipped by their global norm (``TrainStep``)."""
    return optax.adamw(
        learning_rate_schedule(train),
        b1=train.b1,
        b2=train.b2,
        weight_decay=train.weight_decay,
        mask=_decay_mask,
    )


OPTIMIZED = nnx.All(nnx.Param, nnx.Not(ExpertBias))
"""What the optimizer updates: the parameters but the MoE expert biases (``TrainStep`` moves those)."""


def moments_over_data(optimizer: nnx.Optimizer, mesh: Mesh) -> None:
    """ZeRO-1: every optimizer state array (AdamW's moments) also split over
    "data", on its first dim that the axes already there times "data" divide
    (an array with no such dim, a few norm scales at most, stays as it was)."""
    data = mesh.shape[DATA]
    for _, variable in nnx.to_flat_state(nnx.state(optimizer, nnx.optimizer.OptState)):
        spec = tuple(variable.get_metadata().get("out_sharding") or ())
        spec = spec + (None,) * (len(variable.shape) - len(spec))
        for dim, (size, entry) in enumerate(zip(variable.shape, spec)):
            axes = entry_axes(entry)
            if size % (math.prod(mesh.shape[a] for a in axes) * data) == 0:
                variable.set_metadata(out_sharding=(*spec[:dim], spec_entry((*axes, DATA)), *spec[dim + 1:]))
                break


def create_optimizer(model: nnx.Module, tx: optax.GradientTransformation, *, shard_over_data: bool = False) -> nnx.Optimizer:
    """Any optax transformation ``tx`` (AdamW: ``make_optimizer``) over ``model``'s
    parameters, its state on ``model.mesh`` sharded like them (and split over
    "data" too with ``shard_over_data``: ZeRO-1)."""
    optimizer = nnx.Optimizer(model, tx, wrt=OPTIMIZED)
    if shard_over_data and model.mesh.shape[DATA] > 1:
        moments_over_data(optimizer, model.mesh)
    state = nnx.state(optimizer)  # step counts start on one device: put them on the mesh, replicated
    nnx.update(optimizer, jax.device_put(state, param_shardings(state, model.mesh)))
    return optimizer


def create_model_and_optimizer(
    model_config: ModelConfig, train: TrainConfig, mesh: Mesh
) -> tuple[Transformer, nnx.Optimizer]:
    """A sharded model (initialised from ``train.seed``, identically for any mesh)
    and its optimizer; its moments split over "data" too with ``train.shard_optimizer``."""
    model_config = model_config.with_sequence_parallel(mesh.shape, train.seq_len)[0]  # "auto": by tensor and train.seq_len
    model = create_model(model_config, mesh, seed=train.seed)
    return model, create_optimizer(model, make_optimizer(train), shard_over_data=train.shard_optimizer)
