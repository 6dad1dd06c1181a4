"""VocabParallelEmbedding (lookup and tied head) and vocab_parallel_cross_entropy
against unsharded jax.numpy references built from the exported logical table,
at every TP degree, with uneven vocabularies; plus the collectives they compile to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import TP_DEGREES, max_relative_error, tp_mesh
from lite_tp_jax import (
    VocabParallelEmbedding,
    export_state,
    import_state,
    vocab_parallel_cross_entropy,
)
from lite_tp_jax.core.hlo import collectives, summary
from lite_tp_jax.parallel.region import run_in_region

TOL = 1e-5
B, S, H, V = 2, 8, 6, 50  # V = 50 is uneven at TP 3, 4 and 8


# --- helpers ------------------------------------------------------------------


def make_layer(tp, vocab=V, features=H, *, sequence_parallel=False, seed=0):
    """A layer whose table is a unit-scale random logical table (TP-independent).
    Its padding rows (if any) are then set to NaN: the layer must mask them
    before every use, so they never reach a result or a gradient."""
    layer = VocabParallelEmbedding(
        vocab, features, mesh=tp_mesh(tp), sequence_parallel=sequence_parallel, rngs=nnx.Rngs(seed)
    )
    table = np.random.default_rng(seed + 1).standard_normal((vocab, features)).astype(np.float32)
    import_state(layer, {"embedding": table})
    raw = np.array(layer.embedding[...])
    raw[vocab:] = np.nan
    layer.embedding[...] = jax.device_put(raw, layer.embedding[...].sharding)
    return layer, table


def token_ids(rng, vocab, shape=(B, S)):
    """Random ids that include both ends of the vocabulary and a repeated id."""
    ids = rng.integers(0, vocab, shape).astype(np.int32)
    ids[0, 0], ids[0, 1], ids[-1, -1], ids[-1, -2] = 0, vocab - 1, vocab - 1, vocab - 1
    return ids


def table_grad(grads):
    """The logical table gradient, after checking the padded rows got none."""
    raw = np.asarray(grads["embedding"][...])
    logical = export_state(grads)["embedding"]
    assert not np.any(raw[logical.shape[0]:]), "padding rows received gradient"
    return logical


def ref_loss_per_token(logits, targets):
    """-log softmax(logits)[target], unsharded."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]


def assert_close(actual, expected, what):
    err = max_relative_error(actual, expected)
    assert err <= TOL, f"{what}: max relative error {err:.2e} > {TOL}"


# --- embedding lookup ---------------------------------------------------------


@pytest.mark.parametrize("tp", TP_DEGREES)
def test_embedding_forward_and_table_gradient(tp, rng):
    layer, table = make_layer(tp)
    graphdef, state = nnx.split(layer)
    ids = token_ids(rng, V)
    c = rng.standard_normal((B, S, H)).astype(np.float32)

    def loss(state, ids):
        out = nnx.merge(graphdef, state)(ids)
        return jnp.sum(out * c), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state, ids)

    assert np.array_equal(export_state(layer)["embedding"], table)
    assert_close(out, jnp.take(table, ids, axis=0), "embedding output")
    ref_grad = jax.grad(lambda w: jnp.sum(jnp.take(w, ids, axis=0) * c))(table)
    assert_close(table_grad(grads), ref_grad, "table gradient")


# --- tied output head -----------------------------------------------------------


@pytest.mark.parametrize("tp", TP_DEGREES)
def test_attend_forward_and_gradients(tp, rng):
    layer, table = make_layer(tp)
    graphdef, state = nnx.split(layer)
    x = rng.standard_normal((B, S, H)).astype(np.float32)
    c = rng.standard_normal((B, S, V)).astype(np.float32)

    def loss(state, x):
        logits = nnx.merge(graphdef, state).attend(x)
        return jnp.sum(logits * c), logits

    (_, logits), (grads, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)

    assert logits.shape == (B, S, V)
    assert_close(logits, x @ table.T, "logits")
    ref_gw, ref_gx = jax.grad(lambda w, x: jnp.sum((x @ w.T) * c), argnums=(0, 1))(table, x)
    assert_close(table_grad(grads), ref_gw, "table gradient")
    assert_close(gx, ref_gx, "input gradient")


# --- cross-entropy ----------------------------------------------------------------


@pytest.mark.parametrize("tp,vocab", [(t, V) for t in TP_DEGREES] + [(8, 13)])
def test_cross_entropy_forward_and_logits_gradient(tp, vocab, rng):
    """(8, 13): padded to 16, so the last rank holds only padding."""
    mesh = tp_mesh(tp)
    logits = 3 * rng.standard_normal((B, S, vocab)).astype(np.float32)
    targets = token_ids(rng, vocab)
    w = rng.standard_normal((B, S)).astype(np.float32)

    def loss(logits):
        per_token = vocab_parallel_cross_entropy(logits, targets, vocab, mesh=mesh)
        return jnp.sum(per_token * w), per_token

    (_, per_token), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(logits)

    assert per_token.shape == (B, S) and per_token.dtype == jnp.float32
    assert_close(per_token, ref_loss_per_token(logits, targets), "per-token loss")
    ref_g = jax.grad(lambda l: jnp.sum(ref_loss_per_token(l, targets) * w))(logits)
    assert_close(g, ref_g, "logits gradient")


def test_out_of_range_ids_and_targets(rng):
    """Documented behaviour: ids outside [0, vocab) give zero vectors and no
    gradient; targets outside it give a loss of log-sum-exp (gradient softmax).
    At TP 4, V = 50 is padded to 52, so 50 and 51 exercise the padded rows."""
    layer, table = make_layer(4)
    graphdef, state = nnx.split(layer)
    bad = [-1, 50, 51, 52, 1000]
    ids = token_ids(rng, V)
    ids[1, : len(bad)] = bad
    c = rng.standard_normal((B, S, H)).astype(np.float32)

    def loss(state):
        out = nnx.merge(graphdef, state)(ids)
        return jnp.sum(out * c), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    valid = (ids >= 0) & (ids < V)
    ref_out = np.where(valid[..., None], table[np.clip(ids, 0, V - 1)], 0)
    assert not np.any(np.asarray(out)[~valid])
    assert_close(out, ref_out, "embedding output")
    ref_grad = np.zeros_like(table)
    np.add.at(ref_grad, ids[valid], c[valid])
    assert_close(table_grad(grads), ref_grad, "table gradient")

    logits = 3 * rng.standard_normal((B, S, V)).astype(np.float32)
    mesh = layer.mesh
    (_, per_token), g = jax.jit(jax.value_and_grad(
        lambda l: (lambda t: (jnp.sum(t), t))(vocab_parallel_cross_entropy(l, ids, V, mesh=mesh)),
        has_aux=True,
    ))(logits)

    def ref(l):
        lse = jax.nn.logsumexp(l, axis=-1)
        picked = jnp.take_along_axis(l, np.clip(ids, 0, V - 1)[..., None], axis=-1)[..., 0]
        return lse - jnp.where(valid, picked, 0.0)

    assert_close(per_token, ref(logits), "per-token loss")
    assert_close(g, jax.grad(lambda l: jnp.sum(ref(l)))(logits), "logits gradient")


# --- sequence parallel ----------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_embedding_and_attend(tp, rng):
    """Lookup ends in a reduce-scatter along the sequence; attend all-gathers it."""
    layer, table = make_layer(tp, sequence_parallel=True)
    graphdef, state = nnx.split(layer)
    ids = token_ids(rng, V)
    x = rng.standard_normal((B, S, H)).astype(np.float32)
    c1 = rng.standard_normal((B, S, H)).astype(np.float32)
    c2 = rng.standard_normal((B, S, V)).astype(np.float32)

    def loss(state, x):
        m = nnx.merge(graphdef, state)
        out, logits = m(ids), m.attend(x)
        return jnp.sum(out * c1) + jnp.sum(logits * c2), (out, logits)

    (_, (out, logits)), (grads, gx) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    )(state, x)

    assert out.sharding.is_equivalent_to(NamedSharding(layer.mesh, P(None, "tensor", None)), 3)
    assert_close(out, jnp.take(table, ids, axis=0), "embedding output")
    assert_close(logits, x @ table.T, "logits")

    def ref(w, x):
        return jnp.sum(jnp.take(w, ids, axis=0) * c1) + jnp.sum((x @ w.T) * c2)

    ref_gw, ref_gx = jax.grad(ref, argnums=(0, 1))(table, x)
    assert_close(table_grad(grads), ref_gw, "table gradient")
    assert_close(gx, ref_gx, "input gradient")


# --- end to end in one region ---------------------------------------------------------


@pytest.mark.parametrize(
    "tp,vocab,features,sequence_parallel",
    [(3, V, H, False), (4, V, H, True), (4, 50257, 8, False)],
    ids=["tp3", "tp4-sequence-parallel", "tp4-vocab50257"],
)
def test_embedding_attend_cross_entropy_in_one_region(tp, vocab, features, sequence_parallel, rng):
    """ids -> embedding -> tanh -> tied head -> loss, all inside one shard_map:
    the logits stay vocab-sharded, the table gets gradient from both uses."""
    layer, table = make_layer(tp, vocab, features, sequence_parallel=sequence_parallel)
    graphdef, state = nnx.split(layer)
    ids, targets = token_ids(rng, vocab, (B, 4)), token_ids(rng, vocab, (B, 4))

    def body(m, ids, targets):
        logits = m.attend(jnp.tanh(m(ids)))
        return jnp.mean(vocab_parallel_cross_entropy(logits, targets, vocab))

    def loss(state):
        return run_in_region(
            nnx.merge(graphdef, state), body, ids, targets, mesh=layer.mesh,
            arg_specs=(P(), P()), out_specs=P(), row_axes=(), axes=frozenset({"tensor"}),
        )

    value, grads = jax.jit(jax.value_and_grad(loss))(state)

    def ref(w):
        logits = jnp.tanh(jnp.take(w, ids, axis=0)) @ w.T
        return jnp.mean(ref_loss_per_token(logits, targets))

    ref_value, ref_grad = jax.value_and_grad(ref)(table)
    assert_close(value, ref_value, "loss")
    assert_close(table_grad(grads), ref_grad, "table gradient")


# --- compiled communication ---------------------------------------------------------


def test_cross_entropy_communicates_only_token_statistics():
    """Forward + backward from vocab-sharded logits: only all-reduces of B*S
    elements (max, sum of exp, target logit), never the logits."""
    mesh, b, s, vocab = tp_mesh(4), 2, 3, 64
    sharded = NamedSharding(mesh, P(None, None, "tensor"))
    logits = jax.device_put(np.zeros((b, s, vocab), np.float32), sharded)
    targets = jax.device_put(np.zeros((b, s), np.int32), NamedSharding(mesh, P()))

    def f(logits, targets):
        return jnp.sum(vocab_parallel_cross_entropy(logits, targets, vocab, mesh=mesh))

    hlo = jax.jit(jax.value_and_grad(f)).lower(logits, targets).compile().as_text()
    found = collectives(hlo)
    assert all(c.kind == "all-reduce" and c.elements == b * s for c in found), summary(hlo)
    assert 2 <= len(found) <= 3, summary(hlo)


def test_embedding_communicates_one_all_reduce():
    """Forward: one all-reduce of B*S*H; backward: nothing (the table gradient is local)."""
    b, s, h = 2, 3, 5
    layer, _ = make_layer(4, 64, h)
    graphdef, state = nnx.split(layer)
    ids = np.zeros((b, s), np.int32)
    c = np.ones((b, s, h), np.float32)

    def f(state, ids):
        return jnp.sum(nnx.merge(graphdef, state)(ids) * c)

    hlo = jax.jit(jax.value_and_grad(f)).lower(state, ids).compile().as_text()
    found = collectives(hlo)
    assert [(c.kind, c.elements) for c in found] == [("all-reduce", b * s * h)], summary(hlo)


# --- bad input ------------------------------------------------------------------------


def test_bad_input_is_an_error():
    layer, _ = make_layer(2, sequence_parallel=True)
    with pytest.raises(ValueError, match="last dimension is 6"):
        layer.attend(jnp.zeros((B, S, H + 1)))
    with pytest.raises(TypeError, match="integer"):
        layer(jnp.zeros((B, S), jnp.float32))
    with pytest.raises(ValueError, match="divisible"):
        layer(jnp.zeros((B, 3), jnp.int32))

    logits, targets = jnp.zeros((B, S, V)), jnp.zeros((B, S), jnp.int32)
    with pytest.raises(ValueError, match="mesh"):
        vocab_parallel_cross_entropy(logits, targets, V)
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_cross_entropy(logits, targets.astype(jnp.float32), V, mesh=layer.mesh)
    with pytest.raises(ValueError, match="do not match"):
        vocab_parallel_cross_entropy(logits, targets[:, :-1], V, mesh=layer.mesh)
    with pytest.raises(ValueError, match="last dimension is 49"):
        vocab_parallel_cross_entropy(logits, targets, V - 1, mesh=layer.mesh)
