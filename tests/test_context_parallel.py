"""Context parallelism (the sequence split over "context") against one device.

Layer: ParallelAttention per strategy at context 2 and 4 x tensor 1, 2 and 3
(uneven), with and without the load balance, GQA with fewer kv heads than
context ranks, packed documents and a sliding window; values and every
gradient against an unsharded jax.numpy reference, padding filled with NaN.
Model: three training steps' losses against one device for each strategy at
two meshes of the issue's four (every mesh met once), composed with remat,
sequence parallelism (auto), pipeline, experts, the sharded optimizer,
gradient accumulation and deterministic reductions; a checkpoint resumed onto
another context size. HLO: each strategy's collectives over "context".
"""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import max_relative_error, train_steps
from lite_tp_jax import ParallelAttention, export_state, import_state
from lite_tp_jax.core import hlo
from lite_tp_jax.core.mesh import make_mesh
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.parallel.context import sequence_order
from lite_tp_jax.parallel.region import run_in_region
from lite_tp_jax.run.config import TrainConfig

B, S, F, D = 2, 16, 16, 4  # batch, sequence, features, head_dim
THETA = 10_000.0


def mesh_of(**sizes):
    return make_mesh(devices=jax.devices()[: int(np.prod(list(sizes.values())))], **sizes)


def test_zigzag_order():
    """Rank r holds chunks r and 2n-1-r; unbalanced, chunk r; every position once."""
    assert sequence_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert sequence_order(8, 4).tolist() == [0, 7, 1, 6, 2, 5, 3, 4]
    assert sequence_order(8, 2, balanced=False).tolist() == list(range(8))


# --- the unsharded reference, from the logical weights only ----------------------


def rope(x, positions):
    """x [B, S, N, D] rotated by ``positions`` [B, S]: pairs (x[i], x[i + D/2]), angle pos * theta^(-2i/D)."""
    half = x.shape[-1] // 2
    angle = positions[..., None].astype(jnp.float32) * THETA ** (-2.0 * jnp.arange(half) / x.shape[-1])
    cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@jax.jit
def reference(weights, x, segments, window):
    """Causal GQA self-attention with RoPE; a query sees keys of its own segment
    within ``window`` positions, RoPE positions restarting at each segment."""
    heads, kv_heads = weights["query.kernel"].shape[1], weights["key.kernel"].shape[1]
    q, k, v = (jnp.einsum("bsf,fhd->bshd", x, weights[f"{n}.kernel"]) for n in ("query", "key", "value"))
    index = jnp.arange(x.shape[1])
    starts = jax.lax.cummax(jnp.where(jnp.diff(segments, prepend=-1, axis=1) != 0, index, 0), axis=1)
    q, k = rope(q, index - starts), rope(k, index - starts)
    k, v = (jnp.repeat(t, heads // kv_heads, axis=2) for t in (k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    distance = index[:, None] - index[None, :]
    visible = (distance >= 0) & (distance < window) & (segments[:, :, None] == segments[:, None, :])
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return jnp.einsum("bqhd,hdf->bqf", o, weights["out.kernel"])


def logical_slice(variable):
    return tuple(slice(0, n) for n in variable.get_metadata()["logical_shape"])


def random_layer(layer, seed=0):
    """Random logical weights; every padded entry filled with NaN (it must never reach a result)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, value in sorted(export_state(layer).items()):
        fan_in = value.shape[0] * (value.shape[1] if name == "out.kernel" else 1)
        state[name] = (rng.standard_normal(value.shape) / np.sqrt(fan_in)).astype(np.float32)
    import_state(layer, state)
    for _, variable in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        value = np.asarray(variable[...]).copy()
        poisoned = np.full_like(value, np.nan)
        poisoned[logical_slice(variable)] = value[logical_slice(variable)]
        variable[...] = jax.device_put(poisoned, variable[...].sharding)
    return layer


# (strategy, context, tensor, load balance, heads, kv heads, packed documents + window). The comments
# say which head layout each meets; the TP 2 cases with 3 kv heads store 4 (NaN-filled padding).
LAYER_CASES = [
    ("all_gather", 2, 1, False, 4, 2, False),
    ("all_gather", 2, 2, True, 6, 3, False),  # kv 3 -> 4 padded, sharded
    ("all_gather", 2, 3, True, 4, 2, True),  # uneven TP 3: kv replicated, q 4 -> 6 padded
    ("all_gather", 4, 1, True, 4, 2, False),  # 2 kv heads, 4 context ranks
    ("all_gather", 4, 2, False, 8, 2, True),
    ("all_to_all", 2, 1, False, 8, 4, True),  # heads go to ranks in kv groups
    ("all_to_all", 2, 2, True, 6, 3, False),  # 4 q / 2 kv heads a rank (padded): in kv groups
    ("all_to_all", 4, 1, True, 4, 1, False),  # 1 kv head < 4: k/v per query head
    ("all_to_all", 4, 2, False, 6, 2, True),  # 3 q heads a rank: padded to 4, k/v per query head
    ("ring", 2, 1, True, 4, 2, False),
    ("ring", 2, 2, True, 6, 3, True),  # kv 3 -> 4 padded; segments travel round the ring
    ("ring", 4, 1, False, 4, 1, False),  # 1 kv head < 4 ranks
    ("ring", 4, 2, True, 8, 2, False),
]


@pytest.mark.parametrize(
    "strategy, context, tensor, balanced, heads, kv_heads, packed",
    [pytest.param(*case, id=f"{case[0]}-c{case[1]}-t{case[2]}{'-zigzag' if case[3] else ''}-q{case[4]}kv{case[5]}"
                  f"{'-packed' if case[6] else ''}") for case in LAYER_CASES],
)
def test_attention_matches_one_device(strategy, context, tensor, balanced, heads, kv_heads, packed):
    layer = random_layer(ParallelAttention(
        F, heads, num_kv_heads=kv_heads, head_dim=D, rope_theta=THETA, sliding_window=5 if packed else None,
        context_parallel=strategy, context_load_balance=balanced, mesh=mesh_of(context=context, tensor=tensor),
        rngs=nnx.Rngs(0),
    ))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, S, F)).astype(np.float32)
    segments = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32) if packed else np.zeros((B, S), np.int32)
    cotangent = rng.standard_normal((B, S, F)).astype(np.float32)

    def loss(layer, x):
        y = layer(x, jnp.asarray(segments)) if packed else layer(x)
        return jnp.sum(y * cotangent), y

    (_, y), (grads, dx) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(layer, x)
    weights = export_state(layer)
    reference_loss = lambda w, x: (jnp.sum(reference(w, x, segments, 5 if packed else S) * cotangent), None)
    y_ref = reference(weights, x, segments, 5 if packed else S)
    (_, _), (grads_ref, dx_ref) = jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True)(weights, x)
    assert max_relative_error(y, y_ref) <= 1e-5, "forward"
    assert max_relative_error(dx, dx_ref) <= 1e-5, "gradient of x"
    for path, variable in nnx.to_flat_state(grads):
        name = ".".join(map(str, path))
        value = np.asarray(variable[...]).copy()
        assert max_relative_error(value[logical_slice(variable)], grads_ref[name]) <= 1e-5, f"gradient of {name}"
        value[logical_slice(variable)] = 0
        assert np.isfinite(value).all() and not value.any(), f"gradient of the padding of {name}"


# --- communication, read from the compiled forward ---------------------------------


def forward_collectives(strategy, context, heads, kv_heads):
    """The collectives over "context" of one attention forward, inside a region
    (x already split over "context"), at tensor 1."""
    mesh = mesh_of(context=context)
    layer = ParallelAttention(F, heads, num_kv_heads=kv_heads, head_dim=D, context_parallel=strategy, mesh=mesh,
                              rngs=nnx.Rngs(0))
    spec = P(None, "context")
    fn = jax.jit(lambda layer, x: run_in_region(layer, lambda m, x: m(x), x, mesh=mesh, arg_specs=[spec],
                                                out_specs=spec, row_axes=("context",)))
    x = jax.device_put(np.zeros((B, S, F), np.float32), jax.sharding.NamedSharding(mesh, spec))
    text = jax.jit(lambda state, x: fn(nnx.merge(nnx.graphdef(layer), state), x)).lower(nnx.state(layer), x).compile().as_text()
    # (kind, elements) once per run: a collective in a loop body (the ring's steps) as often as the loop runs
    return [(c.kind, c.elements) for c, runs in hlo.collectives_per_step(text, mesh) if c.axes == ("context",)
            for _ in range(runs)]


def test_hlo_all_gather_gathers_k_and_v_once_each():
    """K and V ([B, S, 2 kv heads, D], the whole sequence) all-gathered once each; nothing else over context."""
    assert sorted(forward_collectives("all_gather", 2, 4, 2)) == [("all-gather", B * S * 2 * D)] * 2


def test_hlo_ring_passes_k_and_v_n_minus_1_times():
    """At n = 4: 3 collective-permutes each of K and V ([B, S/4, 2 kv heads, D]) and 3 of the
    keys' positions (S/4 ints); nothing else over context."""
    found = forward_collectives("ring", 4, 4, 2)
    assert sorted(found) == sorted([("collective-permute", B * S // 4 * 2 * D)] * 6 + [("collective-permute", S // 4)] * 3)


def test_hlo_all_to_all_four_exchanges():
    """q, k, v to heads and the output back: four all-to-alls of this rank's [B, S/n, heads, D]."""
    found = forward_collectives("all_to_all", 2, 4, 2)
    assert sorted(found) == sorted([("all-to-all", B * S // 2 * 4 * D)] * 2 + [("all-to-all", B * S // 2 * 2 * D)] * 2)


# --- the model: training losses against one device ----------------------------------

DENSE = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48)
MOE = replace(DENSE, moe_every=2, num_experts=4, top_k=2, capacity_factor=None)
TRAIN = TrainConfig(global_batch=4, seq_len=16, warmup_steps=1, lr=1e-2)

# (strategy, mesh, model and train changes): each strategy at two of the meshes, each mesh at least once.
MODEL_CASES = [
    ("ring", dict(data=2, context=2, tensor=2), {}, {}),
    ("ring", dict(context=4, tensor=2), dict(remat="full"), {}),
    ("all_gather", dict(data=2, context=2, tensor=2), dict(remat="full"), dict(shard_optimizer=True)),
    ("all_gather", dict(pipeline=2, context=2, tensor=2), dict(remat="selective"), dict(microbatches=2)),
    ("all_to_all", dict(context=4, tensor=2), dict(context_load_balance=False), dict(grad_accum=2, deterministic=True)),
    ("all_to_all", dict(expert=2, context=2, tensor=2), dict(moe=True), {}),
    # with FSDP: each layer group gathered over "fsdp" inside the scan, K/V passed round "context"
    ("ring", dict(fsdp=2, context=2, tensor=2), dict(remat="full"), {}),
]


@pytest.fixture(scope="module")
def one_device():
    mesh = mesh_of()
    return {moe: train_steps(MOE if moe else DENSE, TRAIN, mesh, 3)[0] for moe in (False, True)}


@pytest.fixture(scope="module")
def trained(request):
    """Runs each model case once: (losses, step, last batch), by case index."""
    cache = {}

    def run(index):
        if index not in cache:
            strategy, sizes, model_changes, train_changes = MODEL_CASES[index]
            model_changes = dict(model_changes)
            config = replace(MOE if model_changes.pop("moe", False) else DENSE, context_parallel=strategy, **model_changes)
            cache[index] = train_steps(config, replace(TRAIN, **train_changes), mesh_of(**sizes), 3)
        return cache[index]

    return run


@pytest.mark.parametrize("index", range(len(MODEL_CASES)),
                         ids=[f"{c[0]}-" + "x".join(f"{k}{v}" for k, v in c[1].items()) for c in MODEL_CASES])
def test_training_losses_match_one_device(index, one_device, trained):
    losses, step, _ = trained(index)
    expected = one_device[step.model.config.moe_every > 0]
    assert step.model.config.sequence_parallel  # "auto" at tensor 2
    assert np.abs(losses - expected).max() <= 1e-5 * np.abs(expected).max(), (losses, expected)


@pytest.mark.parametrize("index", [1, 3, 5], ids=lambda i: MODEL_CASES[i][0])
def test_planner_predicts_the_compiled_step(index, trained):
    """The planner's bytes per device by mesh axes, for each strategy, against the
    compiled training step of a model case (the persistent cache loads it)."""
    from lite_tp_jax.analysis import planner
    from lite_tp_jax.run.config import Config, MeshConfig

    _, step, batch = trained(index)
    strategy, sizes, model_changes, train_changes = MODEL_CASES[index]
    config = Config(model=step.model.config, mesh=MeshConfig(**sizes), train=replace(TRAIN, **train_changes))
    predicted = planner.plan(config, config.mesh.sizes())["collective_bytes_by_axis"]
    compiled = hlo.bytes_by_axis(step.lower(batch).compile().as_text(), step.model.mesh)
    assert any("context" in axes for axes in predicted)
    for axes in (set(predicted) | set(compiled)) - {"none"}:  # "none": groups of one device, which move nothing
        measured = compiled.get(axes, 0)
        assert abs(predicted.get(axes, 0) - measured) <= max(0.01 * measured, 256), (axes, predicted, compiled)


def test_checkpoint_resumes_onto_another_context_size(tmp_path, trained):
    assert MODEL_CASES[2][1] == dict(data=2, context=2, tensor=2) and MODEL_CASES[4][1] == dict(context=4, tensor=2)
    """Saved at context 2 x data 2 x tensor 2 (all_gather, ZeRO-1), restored at context
    4 x tensor 2 (all_to_all): the parameters are the same, and the next step's loss too."""
    from lite_tp_jax.analysis.planner import abstract_model_and_optimizer
    from lite_tp_jax.run.checkpoint import Checkpointer
    from lite_tp_jax.sharding.rules import batch_sharding
    from lite_tp_jax.train.decoder_step import decoder_step

    _, step, batch = trained(2)
    checkpointer = Checkpointer(tmp_path, keep=1)
    checkpointer.save(3, {"model": nnx.state(step.model), "optimizer": nnx.state(step.optimizer)}, {})
    checkpointer.close()
    strategy, sizes, model_changes, train_changes = MODEL_CASES[4]  # its program is compiled already
    train, mesh = replace(TRAIN, **train_changes), mesh_of(**sizes)
    model, optimizer = abstract_model_and_optimizer(replace(DENSE, context_parallel=strategy, **model_changes), train, mesh)
    restoring = Checkpointer(tmp_path, keep=1)
    restoring.restore({"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, mesh)
    restoring.close()
    for name, value in export_state(model).items():
        np.testing.assert_array_equal(value, export_state(step.model)[name], err_msg=name)
    rows = np.random.default_rng(5).integers(0, DENSE.vocab_size, (TRAIN.global_batch, TRAIN.seq_len + 1)).astype(np.int32)
    here = float(step((jax.device_put(rows[:, :-1], batch[0].sharding), jax.device_put(rows[:, 1:], batch[0].sharding)))["loss"])
    placed = [jax.device_put(a, batch_sharding(mesh)) for a in (rows[:, :-1], rows[:, 1:])]
    there = float(decoder_step(model, optimizer, train)(tuple(placed))["loss"])
    assert abs(here - there) <= 1e-5 * abs(here)
