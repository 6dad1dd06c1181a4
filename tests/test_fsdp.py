"""Fully sharded data parallelism ("fsdp" axis, ``parallel/fsdp.py``): the same
training as one device, every matrix stored split over "fsdp", gathered one
layer group at a time inside the layer scan, gradients reduce-scattered there;
checkpoints restore across fsdp sizes and onto meshes without it."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import max_relative_error, model_loss_and_grads
from lite_tp_jax import export_state, import_state, make_mesh
from lite_tp_jax.core.axes import FSDP, entry_axes
from lite_tp_jax.analysis import planner
from lite_tp_jax.core.hlo import bytes_by_axis, collectives_per_step
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.run.checkpoint import Checkpointer
from lite_tp_jax.run.config import TrainConfig
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.decoder_step import decoder_step

# 20 features: stored padded to 21 over fsdp 3 and to 24 over fsdp 8, trimmed on use
MODEL = ModelConfig(vocab_size=61, hidden_size=20, head_dim=6, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=40, remat="full")
MOE = dataclasses.replace(MODEL, moe_every=2, num_experts=4, top_k=2)  # one layer group: a dense and an MoE block
TRAIN = TrainConfig(global_batch=24, seq_len=8, warmup_steps=1, lr=1e-2)
STEPS = 3

CASES = {  # name: (model, mesh, train fields)
    "fsdp8": (MODEL, dict(fsdp=8), {}),
    "fsdp4-tensor2-sp": (dataclasses.replace(MODEL, sequence_parallel=True), dict(fsdp=4, tensor=2), {}),
    "data2-fsdp2-tensor2-accum2-deterministic": (MODEL, dict(data=2, fsdp=2, tensor=2),
                                                 dict(grad_accum=2, deterministic=True)),
    "fsdp2-pipeline2-tensor2": (MODEL, dict(fsdp=2, pipeline=2, tensor=2), dict(microbatches=2)),
    "moe-fsdp2-expert2-tensor2": (MOE, dict(fsdp=2, expert=2, tensor=2), {}),
    "uneven-fsdp3-tensor2": (MODEL, dict(fsdp=3, tensor=2), {}),
}


def mesh_of(**axes):
    return make_mesh(**axes, devices=jax.devices()[: int(np.prod(list(axes.values()) or [1]))])


def train(model, train_config, mesh):
    """``STEPS`` steps of a fresh ``TrainStep`` on seeded random batches: the
    losses and gradient norms per step, the step, and the last batch."""
    step = decoder_step(*create_model_and_optimizer(model, train_config, mesh), train_config)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(STEPS):
        tokens = rng.integers(0, model.vocab_size, (train_config.global_batch, train_config.seq_len + 1)).astype(np.int32)
        batch = tuple(jax.device_put(a, batch_sharding(mesh)) for a in (tokens[:, :-1], tokens[:, 1:]))
        metrics = step(batch)
        history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return np.array(history), step, batch


@pytest.fixture(scope="module")
def runs():
    """``STEPS`` training steps per case and on one device, each computed once."""
    cache = {}

    def get(model, axes, fields):
        key = (model, tuple(sorted(axes.items())), tuple(sorted(fields.items())))
        if key not in cache:
            mesh = mesh_of(**axes)
            cache[key] = mesh, train(model, dataclasses.replace(TRAIN, **fields), mesh)
        return cache[key]

    return get


@pytest.mark.parametrize("name", CASES)
def test_losses_and_gradient_norms_equal_one_device(runs, name):
    """Each step's loss and global gradient norm (AdamW would hide a gradient
    off by a factor; the norm does not) equal one device's. Gradient
    accumulation and sequence parallelism equal the plain step on one device."""
    model, axes, fields = CASES[name]
    _, (history, step, _) = runs(model, axes, fields)
    _, (expected, _, _) = runs(dataclasses.replace(model, sequence_parallel=False), {}, {})
    np.testing.assert_allclose(history, expected, rtol=1e-5)
    split = [n for n, v in nnx.to_flat_state(nnx.state(step.model, nnx.Param))
             if FSDP in {a for e in v.get_metadata().get("out_sharding") or () for a in entry_axes(e)}]
    assert any("layers" in str(n) for n in split) and any("embed" in str(n) for n in split)


def _nan_padding(model):
    """Every padded entry of ``model``'s parameters set to NaN."""
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        logical = tuple(v.get_metadata()["logical_shape"])
        lead = len(v.shape) - len(logical)
        mask = np.zeros(v.shape, bool)
        for d, n in enumerate(logical):
            mask[(slice(None),) * (lead + d) + (slice(n, None),)] = True
        if mask.any():
            v[...] = jax.numpy.where(mask, np.nan, v[...])


def _loss_and_grads(model, tokens):
    graphdef, state = nnx.split(model)
    loss = lambda state: nnx.merge(graphdef, state).loss(tokens[:, :-1], tokens[:, 1:])[0]  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    return float(value), export_state(grads)


def test_gradients_equal_one_device():
    """fsdp 3 x tensor 2 (uneven): one step's loss and every logical gradient
    equal one device's; the padding (the fsdp dim's, and tensor's) is NaN and
    reaches nothing."""
    model_config, axes, _ = CASES["uneven-fsdp3-tensor2"]
    tokens = np.random.default_rng(3).integers(0, model_config.vocab_size, (24, 9)).astype(np.int32)
    reference, loss_ref, grads_ref, _ = model_loss_and_grads(model_config, mesh_of(), tokens)
    model = Transformer(model_config, mesh=mesh_of(**axes), rngs=nnx.Rngs(0))
    import_state(model, export_state(reference))
    _nan_padding(model)
    loss, grads = _loss_and_grads(model, tokens)
    assert abs(loss / loss_ref - 1) <= 1e-5
    for n, g in grads.items():
        assert max_relative_error(g, grads_ref[n]) <= 1e-5, n


def _group_shapes(model, mesh):
    """Per stacked parameter split over fsdp: (its shard, one group's gathered
    shard), without the stacking dims; and the same for the other parameters."""
    scanned, entry = [], []
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = tuple(v.get_metadata().get("out_sharding") or ())
        if FSDP not in {a for e in spec for a in entry_axes(e)}:
            continue
        without = tuple(None if e == FSDP else tuple(a for a in entry_axes(e) if a != FSDP) or None for e in spec)
        shard = NamedSharding(mesh, P(*spec)).shard_shape(v.shape)
        whole = NamedSharding(mesh, P(*without)).shard_shape(v.shape)
        lead = len(v.shape) - len(v.get_metadata()["logical_shape"]) if v.get_metadata().get("scanned") else 0
        (scanned if lead else entry).append((shard[lead:], whole[lead:]))
    return scanned, entry


def test_hlo_gathers_one_group_per_scan_iteration(runs):
    """fsdp 4 x tensor 2, 2 layer groups: each stacked matrix is all-gathered over
    "fsdp" inside the layer loop (forward, and again in the backward under
    remat), one group's shard each time; its gradient reduce-scattered once per
    group in the backward loop; the embedding and head gathered once; nothing
    gathers the whole stack. The planner predicts the bytes by axis (within 1%)."""
    model_config, axes, fields = CASES["fsdp4-tensor2-sp"]
    mesh, (_, step, batch) = runs(model_config, axes, fields)
    text = step.lower(tuple(batch)).compile().as_text()
    params = planner.parameters(step.model, mesh, step.optimizer)
    predicted = planner.bytes_by_axis(planner.transfers(model_config, TRAIN, dict(mesh.shape), params))
    compiled = bytes_by_axis(text, mesh)
    for label in set(predicted) | set(compiled):  # scalars (loss statistics, grad norm) are not predicted
        assert abs(predicted.get(label, 0) - compiled.get(label, 0)) <= max(0.01 * compiled.get(label, 0), 64), label
    found = [(c, runs_) for c, runs_ in collectives_per_step(text, mesh)
             if c.axes == (FSDP,) and c.kind in ("all-gather", "reduce-scatter")]
    groups = model_config.num_layers // model_config.layers_per_group
    scanned, entry = _group_shapes(step.model, mesh)
    gathers_in_loop = sorted(c.shape for c, n in found if c.kind == "all-gather" and n == groups)
    assert gathers_in_loop == sorted(2 * [whole for _, whole in scanned])
    scatters_in_loop = sorted(c.shape for c, n in found if c.kind == "reduce-scatter" and n == groups)
    assert scatters_in_loop == sorted(shard for shard, _ in scanned)
    once = sorted((c.kind, c.shape) for c, n in found if n == 1)
    assert once == sorted([("all-gather", whole) for _, whole in entry] + [("reduce-scatter", s) for s, _ in entry])
    assert len(found) == len(gathers_in_loop) + len(scatters_in_loop) + len(once)  # none over the whole stack


def test_bf16_gathers_half_the_bytes_and_reduces_in_float32():
    """With bfloat16 compute each group's matrices are cast before the gather and
    the gradients reduce-scattered in float32. Read from the lowered program
    (what the code asks for): XLA:CPU widens bf16 collectives to f32 when it compiles."""
    from lite_tp_jax.analysis.planner import abstract_model_and_optimizer
    from lite_tp_jax.sharding.rules import batch_sharding
    from lite_tp_jax.train.decoder_step import decoder_step

    mesh = mesh_of(fsdp=4)
    model, optimizer = abstract_model_and_optimizer(dataclasses.replace(MODEL, compute_dtype="bfloat16"), TRAIN, mesh)
    tokens = jax.ShapeDtypeStruct((8, 8), np.int32, sharding=batch_sharding(mesh))
    text = decoder_step(model, optimizer, TRAIN).lower((tokens, tokens)).as_text()
    result = lambda op: re.findall(rf'"stablehlo\.{op}".*?-> tensor<[\dx]*x(\w+)>', text, re.S)  # noqa: E731
    scanned, entry = _group_shapes(model, mesh)
    gathers, scatters = result("all_gather"), result("reduce_scatter")
    assert sorted(gathers) == sorted(["bf16"] * 2 * len(scanned) + ["f32"] * len(entry))  # forward, re-gathered
    assert set(scatters) == {"f32"} and len(scatters) == len(scanned) + len(entry)


def _save(directory, model, optimizer):
    checkpointer = Checkpointer(directory, keep=1)
    checkpointer.save(STEPS, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, {"position": STEPS})
    checkpointer.close()


@pytest.mark.parametrize("target", [dict(data=2, fsdp=2, tensor=2), {}])
def test_checkpoints_restore_across_fsdp_sizes(runs, tmp_path, target):
    """Saved at fsdp 4 x tensor 2: restored at fsdp 2 (HSDP), and on one device (no fsdp)."""
    model_config, axes, fields = CASES["fsdp4-tensor2-sp"]
    _, (_, step, _) = runs(model_config, axes, fields)
    _save(tmp_path, step.model, step.optimizer)
    expected = export_state(nnx.state((step.model, step.optimizer)))
    model, optimizer = create_model_and_optimizer(model_config, TRAIN, mesh_of(**target))
    Checkpointer(tmp_path, keep=1).restore({"model": nnx.state(model), "optimizer": nnx.state(optimizer)},
                                           model.mesh)
    restored = export_state(nnx.state((model, optimizer)))
    assert restored.keys() == expected.keys()
    for name, value in restored.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[name]), err_msg=name)


def test_spare_takes_over_an_fsdp_shard_from_its_data_replica():
    """HSDP (data 2 x fsdp 2): a failed device's fsdp shard is copied from the
    same fsdp rank of the other data replica, values intact; with data 1 no
    device holds it, so the run must restart (DeviceLost)."""
    from lite_tp_jax.runtime.spares import DeviceLost, take_over

    devices = jax.devices()
    value = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    mesh = make_mesh(data=2, fsdp=2, devices=devices[:4])
    array = jax.device_put(value, NamedSharding(mesh, P(FSDP)))
    failed = mesh.devices.flat[1]  # data 0, fsdp 1
    taken = take_over([array], ["w"], mesh, failed, [devices[4]], pool_size=1)
    assert devices[4] in taken.mesh.devices.flat and failed not in taken.mesh.devices.flat
    assert taken.event["replica"] == mesh.devices.flat[3].id  # data 1, fsdp 1
    np.testing.assert_array_equal(np.asarray(taken.arrays[0]), value)

    alone = make_mesh(fsdp=4, devices=devices[:4])
    with pytest.raises(DeviceLost, match="mesh.data is 1"):
        take_over([jax.device_put(value, NamedSharding(alone, P(FSDP)))], ["w"], alone, devices[1], [devices[4]],
                  pool_size=1)


def test_generation_gathers_each_group_too():
    """The prefill with the KV cache at fsdp 3 x tensor 2 (``local_decode``, the
    one path of prefill and decode steps, gathering one layer group at a time)
    gives one device's next tokens."""
    from lite_tp_jax.inference.generator import Generator

    one = Transformer(MODEL, mesh=mesh_of(), rngs=nnx.Rngs(0))
    sharded = Transformer(MODEL, mesh=mesh_of(fsdp=3, tensor=2), rngs=nnx.Rngs(0))
    import_state(sharded, export_state(one))
    prompts = [[1, 2, 3], [4, 5], [6]]
    expected = np.stack(list(Generator(one).stream(prompts, 1)), axis=1)
    np.testing.assert_array_equal(np.stack(list(Generator(sharded).stream(prompts, 1)), axis=1), expected)
