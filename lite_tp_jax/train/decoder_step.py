"""The built-in path: a ``TrainStep`` for the decoder (``models/transformer.py``)
with the run config's gradient clipping, accumulation, guard and schedule.

Its batch is ``(tokens, targets)``, or packed ``(tokens, targets, segments)``,
each ``[global_batch, seq]``; its loss is ``Transformer.loss`` with the config's
pipeline microbatches.
"""

from __future__ import annotations

from flax import nnx

from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.run.config import TrainConfig
from lite_tp_jax.run.optimizer import learning_rate_schedule
from lite_tp_jax.train.step import TrainStep


def decoder_step(model: Transformer, optimizer: nnx.Optimizer, train: TrainConfig) -> TrainStep:
    """``step((tokens, targets[, segments])) -> metrics`` for ``model``, as ``train`` configures it."""
    microbatches = train.microbatches

    def loss_fn(model: Transformer, batch):
        tokens, targets, *segments = batch
        return model.loss(tokens, targets, microbatches, *segments)

    return TrainStep(
        model, optimizer, loss_fn,
        grad_clip=train.grad_clip, grad_accum=train.grad_accum, deterministic=train.deterministic,
        # rollback (train/divergence.py) restores a checkpoint: the step itself behaves as under stop
        on_nonfinite="skip" if train.on_nonfinite == "skip" else "stop", schedule=learning_rate_schedule(train),
        bias_update_rate=model.config.bias_update_rate,
    )
