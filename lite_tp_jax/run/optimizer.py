"""The optimizer factory: any optax transformation over a model's parameters,
its state sharded like them; the run config's AdamW with warmup and cosine
decay (the built-in path); and the model + optimizer pair a run starts from.

The optimizer's moments carry their parameter's PartitionSpec (``nnx.Optimizer``
copies the metadata), so they are split exactly as the parameters are; the
step counts are put on the mesh, replicated. With ``train.shard_optimizer``
(ZeRO-1, Megatron's distributed optimizer) the parameters, and so the moments,
are stored split over "data" (``PartitionRules.shard_over_data``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

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


def create_optimizer(model: nnx.Module, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """Any optax transformation ``tx`` (AdamW: ``make_optimizer``) over ``model``'s
    parameters, its state on ``model.mesh`` sharded like them."""
    optimizer = nnx.Optimizer(model, tx, wrt=OPTIMIZED)
    state = nnx.state(optimizer)  # step counts start on one device: put them on the mesh, replicated
    nnx.update(optimizer, jax.device_put(state, param_shardings(state, model.mesh)))
    return optimizer


def create_model_and_optimizer(
    model_config: ModelConfig, train: TrainConfig, mesh: Mesh
) -> tuple[Transformer, nnx.Optimizer]:
    """A sharded model (initialised from ``train.seed``, identically for any mesh)
    and its optimizer; parameters split over "data" too with ``train.shard_optimizer``."""
    model_config = model_config.with_sequence_parallel(mesh.shape, train.seq_len)[0]  # "auto": by tensor and train.seq_len
    model = create_model(model_config, mesh, seed=train.seed, shard_over_data=train.shard_optimizer)
    return model, create_optimizer(model, make_optimizer(train))
