"""train.shard_optimizer (ZeRO-1 over "data": the AdamW moments alone split over
the data-parallel ranks): the same training as the replicated optimizer, 1/data
of the moments' bytes per device, parameters whole, and checkpoints that
restore either way. (Parameters and gradients split too: "fsdp", tests/test_fsdp.py.)"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import max_relative_error, train_steps
from lite_tp_jax import export_state, make_mesh
from lite_tp_jax.core.hlo import collectives_per_step
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.run.checkpoint import Checkpointer
from lite_tp_jax.run.config import TrainConfig
from lite_tp_jax.run.optimizer import create_model_and_optimizer

# Sizes divisible by data x tensor, so that every moment can be split over "data".
MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, ffn_hidden_size=64)
TRAIN = TrainConfig(global_batch=8, seq_len=8, warmup_steps=1, lr=1e-2)
STEPS = 2


def mesh_of(**axes):
    return make_mesh(**axes, devices=jax.devices()[: int(np.prod(list(axes.values())))])


def train(mesh, shard_optimizer: bool, **fields):
    """Losses of STEPS steps, the final weights, and the step's collectives."""
    train = dataclasses.replace(TRAIN, shard_optimizer=shard_optimizer, **fields)
    losses, step, last_batch = train_steps(MODEL, train, mesh, STEPS)
    hlo = step.lower(tuple(last_batch)).compile().as_text()
    return losses, export_state(step.model), collectives_per_step(hlo), (step.model, step.optimizer)


def bytes_by_kind(found):
    """Bytes per step by kind, of arrays (scalars, the loss and gradient-norm sums, left out)."""
    out = {}
    for collective, runs in found:
        if collective.elements > 1:
            out[collective.kind] = out.get(collective.kind, 0) + collective.bytes * runs
    return out


MESHES = {"data2-tensor4": (dict(data=2, tensor=4), {}), "data2-pipeline2-tensor2": (dict(data=2, pipeline=2, tensor=2), dict(microbatches=2))}


@pytest.fixture(scope="module")
def runs():
    """(replicated, sharded) training runs per mesh, computed once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            axes, fields = MESHES[name]
            mesh = mesh_of(**axes)
            cache[name] = mesh, train(mesh, False, **fields), train(mesh, True, **fields)
        return cache[name]

    return get


@pytest.mark.parametrize("name", MESHES)
def test_sharded_optimizer_trains_like_the_replicated_one(runs, name):
    """Losses and weights after 2 steps equal within 1e-5. The gradients are
    all-reduced over "data" as before; each rank updates its slice of the
    moments and the new parameters are all-gathered over "data" (ZeRO-1): the
    all-gathers added are the parameters' bytes, nothing else moves."""
    mesh, (losses, weights, replicated, (model, _)), (losses_z, weights_z, sharded, _) = runs(name)
    np.testing.assert_allclose(losses_z, losses, rtol=1e-5)
    for name in weights:
        assert max_relative_error(weights_z[name], weights[name]) <= 1e-5, name
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # parameters are never split over "data"
        assert "data" not in str(v.get_metadata().get("out_sharding")), v

    before, after = bytes_by_kind(replicated), bytes_by_kind(sharded)
    assert after["all-reduce"] == before["all-reduce"]
    gathered = after.get("all-gather", 0) - before.get("all-gather", 0)
    assert 0 < gathered <= sum(
        int(np.prod(jax.sharding.NamedSharding(mesh, P(*(v.get_metadata().get("out_sharding") or ()))).shard_shape(v.shape))) * 4
        for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def optimizer_bytes_per_device(mesh, shard_optimizer: bool) -> int:
    train = dataclasses.replace(TRAIN, shard_optimizer=shard_optimizer)
    _, optimizer = nnx.eval_shape(lambda: create_model_and_optimizer(MODEL, train, mesh))
    total = 0
    for path, variable in nnx.to_flat_state(nnx.state(optimizer)):
        if not any(part in ("mu", "nu") for part in path):
            continue
        spec = P(*(variable.get_metadata().get("out_sharding") or ()))
        shard = jax.sharding.NamedSharding(mesh, spec).shard_shape(variable.shape)
        total += int(np.prod(shard)) * variable.dtype.itemsize
    return total


@pytest.mark.parametrize("data", [2, 4])
def test_optimizer_bytes_per_device_fall_as_one_over_data(data):
    mesh = mesh_of(data=data, tensor=2)
    replicated, sharded = optimizer_bytes_per_device(mesh, False), optimizer_bytes_per_device(mesh, True)
    assert sharded * data == replicated


def save(directory, model_and_optimizer):
    model, optimizer = model_and_optimizer
    checkpointer = Checkpointer(directory, keep=1)
    checkpointer.save(STEPS, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, {"position": STEPS})
    checkpointer.close()  # saves are asynchronous: sealed here


def test_checkpoints_restore_with_or_without_it(runs, tmp_path):
    """Saved sharded, restored replicated (and the reverse): the same logical values."""
    mesh, _, (_, _, _, (model, optimizer)) = runs("data2-tensor4")
    state = nnx.state((model, optimizer))
    save(tmp_path / "sharded", (model, optimizer))
    plain = create_model_and_optimizer(MODEL, TRAIN, mesh)
    Checkpointer(tmp_path / "sharded", keep=1).restore({"model": nnx.state(plain[0]), "optimizer": nnx.state(plain[1])}, mesh)
    expected = export_state(state)
    for name, value in export_state(nnx.state(plain)).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[name]), err_msg=name)

    save(tmp_path / "plain", plain)
    sharded = create_model_and_optimizer(MODEL, dataclasses.replace(TRAIN, shard_optimizer=True), mesh)
    Checkpointer(tmp_path / "plain", keep=1).restore({"model": nnx.state(sharded[0]), "optimizer": nnx.state(sharded[1])}, mesh)
    for name, value in export_state(nnx.state(sharded)).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[name]), err_msg=name)


def test_llama_8b_at_data8_tensor8_stores_one_eighth_per_device():
    """llama-8b at data 8 x tensor 8 (an abstract mesh: shapes only, nothing
    allocated): parameters 3.74 GiB and AdamW moments 7.48 GiB per device
    replicated over "data"; with shard_optimizer exactly 1/8 of the moments,
    the parameters unchanged."""
    from jax.sharding import AbstractMesh, AxisType

    from lite_tp_jax.core.axes import AXES
    from lite_tp_jax.run.config_file import load_config

    config = load_config("configs/llama-8b.yaml", ["mesh.data=8", "mesh.tensor=8"])
    mesh = AbstractMesh(tuple(config.mesh.sizes().values()), AXES, axis_types=(AxisType.Auto,) * len(AXES))
    per_device = {}
    for shard in (False, True):
        train = dataclasses.replace(config.train, shard_optimizer=shard)
        model, optimizer = nnx.eval_shape(lambda: create_model_and_optimizer(config.model, train, mesh))
        sizes = {"params": 0, "moments": 0}
        for path, variable in nnx.to_flat_state(nnx.state((model, optimizer))):
            if not getattr(variable, "shape", ()):
                continue
            spec = P(*(variable.get_metadata().get("out_sharding") or ()))
            shard_shape = jax.sharding.NamedSharding(mesh, spec).shard_shape(variable.shape)
            kind = "moments" if any(part in ("mu", "nu") for part in path) else "params"
            sizes[kind] += int(np.prod(shard_shape)) * variable.dtype.itemsize
        per_device[shard] = sizes
    assert round(per_device[False]["params"] / 2**30, 2) == 3.74
    assert per_device[False]["moments"] == 2 * per_device[False]["params"]
    assert per_device[True]["moments"] * 8 == per_device[False]["moments"]
    assert per_device[True]["params"] == per_device[False]["params"]
