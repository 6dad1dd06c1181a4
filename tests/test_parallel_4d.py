"""4D parallelism: pipeline x expert x tensor (x data) training equals one device."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import max_relative_error
from lite_tp_jax import export_state, import_state
from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.run.checkpoint import Checkpointer
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.train.data import Batches, load_tokens
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.decoder_step import decoder_step

TINY_MOE = Path(__file__).resolve().parents[1] / "configs" / "tiny-moe.yaml"
STEPS = 3
# Every MoE layer with a gated shared expert (48: uneven over tensor 3), the router z-loss and
# auxiliary-loss-free balancing (expert biases, moved after each step).
COMMON = [f"train.steps={STEPS}", "train.seq_len=32", "model.shared_expert_size=48", "model.shared_expert_gate=true",
          "model.router_z_loss_weight=0.01", "model.bias_update_rate=0.01"]
DROPLESS = "model.capacity_factor=null"


def run(overrides, tokens):
    """Per-step metrics of a few training steps, the gradients of the first step
    (for the expert biases: the load errors) and the expert biases after the steps."""
    config = load_config(TINY_MOE, [*COMMON, *overrides])
    mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
    model, optimizer = create_model_and_optimizer(config.model, config.train, mesh)
    batches = Batches(tokens, config.train.global_batch, config.train.seq_len, config.train.seed)
    batch = [jax.device_put(a, batch_sharding(mesh)) for a in batches.batch(0)]

    def loss(model):
        return model.loss(*batch, config.train.microbatches)[0]

    first_grads = export_state(nnx.jit(nnx.grad(loss))(model))
    step = decoder_step(model, optimizer, config.train)
    history = []
    for position in range(STEPS):
        metrics = step(tuple(jax.device_put(a, batch_sharding(mesh)) for a in batches.batch(position)))
        history.append({name: float(value) for name, value in metrics.items()})
    biases = {name: value for name, value in export_state(model).items() if name.endswith("expert_bias")}
    return history, first_grads, biases


@pytest.fixture(scope="module")
def tokens():
    return load_tokens(load_config(TINY_MOE).data, 256)


@pytest.fixture(scope="module")
def one_device(tokens):
    """The one-device runs, by routing: capacity 1.25 (the config's) or dropless."""
    runs = {}
    return lambda dropless: runs.setdefault(dropless, run(["mesh.tensor=1", *[DROPLESS] * dropless], tokens))


@pytest.mark.parametrize(
    "overrides",
    [
        ["mesh.pipeline=2", "mesh.expert=2", "mesh.tensor=2", DROPLESS],
        ["mesh.pipeline=2", "mesh.tensor=4"],
        ["mesh.expert=4", "mesh.tensor=2", "model.sequence_parallel=true"],
    ],
    ids=["pipeline2-expert2-tensor2-dropless", "pipeline2-tensor4", "expert4-tensor2-sp"],
)
def test_training_equals_one_device(tokens, one_device, overrides):
    dropless = DROPLESS in overrides
    expected_history, expected_grads, expected_biases = one_device(dropless)
    history, grads, biases = run(overrides, tokens)
    names = ("loss", "cross_entropy", "aux_loss", "z_loss", "grad_norm", "dropped_fraction", "expert_load_max",
             "expert_load_min")
    for name in names:
        got, want = [h[name] for h in history], [h[name] for h in expected_history]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
    assert (expected_history[0]["dropped_fraction"] > 0) != dropless  # capacity really drops tokens here
    for name, value in expected_grads.items():
        assert max_relative_error(grads[name], value) <= 1e-4, name
    assert expected_biases and biases.keys() == expected_biases.keys()
    for name, value in expected_biases.items():  # sums of signs of integer load errors: exactly equal
        np.testing.assert_array_equal(biases[name], value, err_msg=name)
        assert np.abs(value).max() > 0, name  # the biases did move


def test_checkpoint_restores_across_4d_meshes(tmp_path):
    bias = "model.bias_update_rate=0.01"  # the expert biases are in the checkpoint too
    saved_on = load_config(TINY_MOE, ["mesh.pipeline=2", "mesh.expert=2", "mesh.tensor=2", bias])
    model, optimizer = create_model_and_optimizer(saved_on.model, saved_on.train, make_mesh_for(saved_on.mesh.requested, spares=saved_on.mesh.spares))
    rng = np.random.default_rng(0)
    import_state(model, {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in export_state(model).items()})
    checkpointer = Checkpointer(tmp_path, keep=1)
    checkpointer.save(1, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, {"step": 1, "data_position": 1})
    saved = export_state(nnx.state((model, optimizer)))
    assert any(name.endswith("expert_bias") for name in saved)
    for overrides in (["mesh.expert=4", "mesh.tensor=2"], ["mesh.pipeline=2", "mesh.tensor=3", "model.virtual_stages=1"]):
        target = load_config(TINY_MOE, [*overrides, bias])
        mesh = make_mesh_for(target.mesh.requested, spares=target.mesh.spares)
        other = create_model_and_optimizer(target.model, target.train, mesh)
        checkpointer.restore({"model": nnx.state(other[0]), "optimizer": nnx.state(other[1])}, mesh)
        restored = export_state(nnx.state(other))
        for name in saved:
            np.testing.assert_array_equal(restored[name], saved[name], err_msg=f"{overrides} {name}")
