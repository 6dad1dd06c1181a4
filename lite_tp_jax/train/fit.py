"""Whether a training run fits a mesh: the model's fit checks (``models/fit.py``)
plus gradient accumulation's. ``lite-tp train`` and ``lite-tp plan`` both ask
here; errors name config fields (``FitError``), shown as key paths by the
config layer."""

from __future__ import annotations

from collections.abc import Mapping

from lite_tp_jax.core.axes import DATA, PIPELINE
from lite_tp_jax.core.errors import FitError
from lite_tp_jax.models.fit import batch_ranks, check_batch, check_layers_fit
from lite_tp_jax.run.config import Config, TrainConfig, explain


def check_grad_accum(train: TrainConfig, sizes: Mapping[str, int]) -> None:
    """Each rank's rows split into ``grad_accum`` micro-steps, each into the
    pipeline's ``microbatches``."""
    ranks = batch_ranks(sizes)
    rows, k = train.global_batch // ranks, train.grad_accum
    if rows % k:
        raise FitError(
            f"{{global_batch}} / (data x expert x fsdp = {ranks}) rows per rank must be divisible by {{grad_accum}}",
            global_batch=train.global_batch, grad_accum=k,
        )
    if k > 1 and sizes[PIPELINE] > 1 and (rows // k) % train.microbatches:
        raise FitError(
            f"{{global_batch}} / (data x expert x fsdp = {ranks}) / {{grad_accum}} rows per micro-step "
            f"must be divisible by {{microbatches}}",
            global_batch=train.global_batch, grad_accum=k, microbatches=train.microbatches,
        )


def check_shard_optimizer(train: TrainConfig, sizes: Mapping[str, int]) -> None:
    """ZeRO-1 splits the moments over "data": with one data rank it would do nothing."""
    if train.shard_optimizer and sizes[DATA] == 1:
        raise FitError(
            "{shard_optimizer} splits the AdamW moments over {data}, so it needs {data.name} > 1; "
            "set {shard_optimizer.name}=false, or use mesh.fsdp to split parameters, gradients and moments",
            shard_optimizer=True, data=1,
        )


def check_run_fits(config: Config, sizes: Mapping[str, int]) -> None:
    """The model, its batches and gradient accumulation fit a mesh of ``sizes``;
    a ``ConfigError`` naming the key paths otherwise."""
    train = config.train
    try:
        check_layers_fit(config.model, sizes)
        microbatches = train.microbatches if train.grad_accum == 1 else 1  # each micro-step is checked below
        check_batch(config.model, sizes, train.global_batch, train.seq_len, microbatches)
        check_grad_accum(train, sizes)
        check_shard_optimizer(train, sizes)
    except FitError as error:
        raise explain(error) from None
