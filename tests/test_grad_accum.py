"""Gradient accumulation: k scanned micro-steps and one update equal the whole batch."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import max_relative_error, train_steps
from lite_tp_jax import export_state, make_mesh
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.run.config import ConfigError, TrainConfig
from lite_tp_jax.run.config_file import parse_config
from lite_tp_jax.train.fit import check_run_fits

MODEL = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=40)
TRAIN = TrainConfig(global_batch=8, seq_len=8, warmup_steps=1, lr=1e-2)
STEPS = 2


def train(mesh_axes: dict, **train_fields):
    """Losses of STEPS steps and the final weights."""
    train = dataclasses.replace(TRAIN, **train_fields)
    mesh = make_mesh(**mesh_axes, devices=jax.devices()[: int(np.prod(list(mesh_axes.values())))])
    losses, step, _ = train_steps(MODEL, train, mesh, STEPS)
    return losses, export_state(step.model)


@pytest.mark.parametrize(
    "mesh_axes, fields",
    [(dict(data=2, pipeline=2, tensor=2), dict(grad_accum=2, microbatches=2))],
    ids=["data2-pipeline2-tensor2-microbatches2-k2"],
)
def test_accumulated_step_equals_the_whole_batch(mesh_axes, fields):
    """4 rows per data rank: 2 micro-steps of 2 rows, each 2 pipeline microbatches of 1 row."""
    unsplit = {name: value for name, value in fields.items() if name != "grad_accum"}
    losses, weights = train(mesh_axes, **unsplit)
    losses_k, weights_k = train(mesh_axes, **fields)
    np.testing.assert_allclose(losses_k, losses, rtol=1e-5)
    for name in weights:
        assert max_relative_error(weights_k[name], weights[name]) <= 1e-5, name


def test_grad_accum_must_divide_the_rows_per_rank():
    config = parse_config({"mesh": {"data": 2}, "train": {"global_batch": 8, "grad_accum": 3}})
    with pytest.raises(ConfigError, match=r"rows per rank must be divisible by 'train.grad_accum' \(3\)"):
        check_run_fits(config, make_mesh(data=2, devices=jax.devices()[:2]).shape)
