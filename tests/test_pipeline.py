"""Pipeline schedules: exact against running the layers in order, and the
activation bytes that cross a stage boundary, read from HLO."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import max_relative_error
from lite_tp_jax import export_state, import_state, make_mesh
from lite_tp_jax.core.hlo import collectives, collectives_per_step
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.parallel.pipeline import bubble_fraction, run_pipeline

LAYERS, WIDTH = 8, 4


def sequential(weights, x):
    for w in weights:
        x = jnp.tanh(x @ w)
    return x


def stage_fn(chunk, x):
    y, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, chunk)
    return y, jnp.sum(y)


def pipelined(mesh, laps):
    def body(chunks, x):
        return run_pipeline(stage_fn, chunks, x)

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "pipeline"), P()), out_specs=(P(), P()), axis_names={"pipeline"})
    return lambda weights, x: f(weights.reshape(laps, LAYERS // laps, WIDTH, WIDTH), x)


@pytest.mark.parametrize("stages, laps, microbatches", [(2, 1, 1), (2, 1, 3), (4, 1, 4), (2, 2, 2), (4, 2, 5)])
def test_schedule_equals_running_the_layers_in_order(stages, laps, microbatches):
    mesh = make_mesh(pipeline=stages, devices=jax.devices()[:stages])
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((LAYERS, WIDTH, WIDTH)).astype(np.float32) * 0.5
    x = rng.standard_normal((microbatches, 2, WIDTH)).astype(np.float32)
    run = pipelined(mesh, laps)

    out, aux = jax.jit(run)(weights, x)
    expected = sequential(weights, x)
    assert max_relative_error(out, expected) <= 1e-6
    # aux: each chunk's sum(y), counted once per microbatch and chunk
    chunk_sums = [sequential(weights[: (c + 1) * LAYERS // (stages * laps)], x).sum() for c in range(stages * laps)]
    assert abs(float(aux) - float(sum(chunk_sums))) <= 1e-4 * abs(float(sum(chunk_sums)))

    grads = jax.jit(jax.grad(lambda w, x: jnp.sum(run(w, x)[0] ** 2), argnums=(0, 1)))(weights, x)
    expected_grads = jax.jit(jax.grad(lambda w, x: jnp.sum(sequential(w, x) ** 2), argnums=(0, 1)))(weights, x)
    for g, e in zip(grads, expected_grads):
        assert max_relative_error(g, e) <= 1e-5


def test_circular_schedule_needs_enough_microbatches():
    mesh = make_mesh(pipeline=4, devices=jax.devices()[:4])
    weights = np.zeros((LAYERS, WIDTH, WIDTH), np.float32)
    with pytest.raises(ValueError, match=r"microbatches \(2\) must be at least pipeline \(4\) for the circular schedule"):
        pipelined(mesh, 2)(weights, np.zeros((2, 2, WIDTH), np.float32))


def test_bubble_fraction_formula():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 4, laps=2) == pytest.approx(3 / 11)
    assert bubble_fraction(1, 8) == 0


SMALL = ModelConfig(
    vocab_size=48, hidden_size=16, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=24, sequence_parallel=False
)
B, S = 8, 8


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, SMALL.vocab_size, (B, S + 1)), jnp.int32)


def model_loss_and_grads(config, mesh, tokens, microbatches, weights=None):
    model = Transformer(config, mesh=mesh, rngs=nnx.Rngs(0))
    if weights is not None:
        import_state(model, weights)
    graphdef, state = nnx.split(model)

    def loss(state):
        return nnx.merge(graphdef, state).loss(tokens[:, :-1], tokens[:, 1:], microbatches)[0]

    fn = jax.jit(jax.value_and_grad(loss))
    value, grads = fn(state)
    return float(value), export_state(grads), fn.lower(state).compile().as_text()


@pytest.fixture(scope="module")
def one_device(tokens):
    mesh = make_mesh(devices=jax.devices()[:1])
    weights = export_state(Transformer(SMALL, mesh=mesh, rngs=nnx.Rngs(0)))
    loss, grads, _ = model_loss_and_grads(SMALL, mesh, tokens, 1)
    return weights, loss, grads


@pytest.mark.parametrize(
    "sizes, microbatches, changes",
    [
        (dict(pipeline=2, tensor=2), 4, {}),  # GPipe
        (dict(pipeline=2, tensor=2), 2, dict(virtual_stages=2)),  # circular
        (dict(pipeline=4, tensor=2), 4, dict(sequence_parallel=True)),
        (dict(data=2, pipeline=2, tensor=2), 2, dict(tie_embeddings=True)),
        (dict(pipeline=2, tensor=3), 2, dict(remat="selective")),  # uneven tensor split inside each stage
    ],
    ids=["gpipe", "circular", "p4-sp", "data2-tied", "tensor3-remat"],
)
def test_pipelined_model_equals_one_device(tokens, one_device, sizes, microbatches, changes):
    weights, loss_1, grads_1 = one_device
    config = dataclasses.replace(SMALL, **changes)
    if config.tie_embeddings:  # a different model: compare with its own one-device run
        mesh1 = make_mesh(devices=jax.devices()[:1])
        weights = export_state(Transformer(config, mesh=mesh1, rngs=nnx.Rngs(0)))
        loss_1, grads_1, _ = model_loss_and_grads(config, mesh1, tokens, 1)
    devices = int(np.prod(list(sizes.values())))
    mesh = make_mesh(**sizes, devices=jax.devices()[:devices])
    loss, grads, hlo = model_loss_and_grads(config, mesh, tokens, microbatches, weights)
    assert abs(loss - loss_1) <= 1e-5 * abs(loss_1)
    for name in grads_1:
        assert max_relative_error(grads[name], grads_1[name]) <= 1e-5, name

    # One ppermute per tick each way, of one microbatch's activation (1/TP of it with SP).
    rows = B // sizes.get("data", 1) // microbatches
    seq = S // sizes["tensor"] if config.sequence_parallel else S
    permutes = [c for c in collectives(hlo) if c.kind == "collective-permute"]
    assert [c.shape for c in permutes] == [(rows, seq, SMALL.hidden_size)] * 2
    # ... and each runs once per tick: v*m + p - 1 ticks forward, as many backward.
    ticks = config.virtual_stages * microbatches + sizes["pipeline"] - 1
    runs = [n for c, n in collectives_per_step(hlo) if c.kind == "collective-permute"]
    assert runs == [ticks, ticks]
