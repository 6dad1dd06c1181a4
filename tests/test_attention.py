"""ParallelAttention against an unsharded jax.numpy reference, its parameter
layout under padding, and its communication read from HLO."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_matches_reference, max_relative_error, tp_mesh
from lite_tp_jax import ParallelAttention, export_state, import_state
from lite_tp_jax.core.hlo import summary
from lite_tp_jax.layers.rotary import apply_rotary

B, S, F, D = 2, 8, 16, 4  # batch, sequence, features, head_dim
THETA = 10_000.0


# --- the unsharded reference, from the logical weights only ----------------------


def rope_reference(x, theta):
    """Rotates pairs (x[i], x[i + d/2]) by position * theta^(-2i/d); angles in float64."""
    seq, dim = x.shape[1], x.shape[-1]
    half = dim // 2
    angle = np.arange(seq)[:, None] * theta ** (-2.0 * np.arange(half) / dim)  # [S, d/2]
    cos = np.cos(angle)[:, None, :].astype(np.float32)  # [S, 1, d/2], broadcast over heads
    sin = np.sin(angle)[:, None, :].astype(np.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@partial(jax.jit, static_argnames=("rope_theta", "causal"))  # one compilation per case, shared by its TP degrees
def attention_reference(weights, x, rope_theta=None, causal=True):
    """Causal (or bidirectional) grouped-query self-attention of x [B, S, F]; head counts read from the weights."""
    num_heads, head_dim = weights["query.kernel"].shape[1:]
    num_kv_heads = weights["key.kernel"].shape[1]

    def project(name):
        y = jnp.einsum("bsf,fhd->bshd", x, weights[f"{name}.kernel"])
        return y + weights[f"{name}.bias"] if f"{name}.bias" in weights else y

    q, k, v = project("query"), project("key"), project("value")
    if rope_theta is not None:
        q, k = rope_reference(q, rope_theta), rope_reference(k, rope_theta)
    group = num_heads // num_kv_heads  # query head j attends with kv head j // group
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    seq = x.shape[1]
    if causal:
        scores = jnp.where(np.tril(np.ones((seq, seq), bool)), scores, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    y = jnp.einsum("bqhd,hdf->bqf", o, weights["out.kernel"])
    return y + weights["out.bias"] if "out.bias" in weights else y


def randomize(layer, seed=0):
    """Random logical weights of unit-scale activations, non-zero biases (so a bias
    added on every rank instead of once, or to the wrong head, would show)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, value in sorted(export_state(layer).items()):
        if name.endswith("bias"):
            state[name] = 0.5 * rng.standard_normal(value.shape)
        else:
            fan_in = value.shape[0] * (value.shape[1] if name == "out.kernel" else 1)
            state[name] = rng.standard_normal(value.shape) / np.sqrt(fan_in)
    import_state(layer, {name: v.astype(np.float32) for name, v in state.items()})
    return layer


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((B, S, F)).astype(np.float32)


# --- values and gradients against the reference -----------------------------------

# (id, layer arguments, TP degrees). The comments say which sharding regime each TP degree hits;
# the TP degrees are chosen so that every regime is met once (each case compiles anew).
CASES = [
    # MHA, 6 heads, default head_dim 24 // 6: TP 1 and 3 even; TP 4 pads the heads (= kv groups)
    # to 8; TP 8 has fewer kv heads than ranks, so kv is replicated and the q heads padded to 8.
    ("mha_6_heads", dict(features=24, num_heads=6), (1, 3, 4, 8)),
    # GQA, more kv heads than ranks, uneven: kv 3 -> 4 padded, so q 12 -> 16; with biases and RoPE.
    ("gqa_12q_3kv_bias_rope", dict(num_heads=12, num_kv_heads=3, head_dim=D, use_bias=True, rope_theta=THETA), (2,)),
    # GQA, fewer kv heads than ranks: kv replicated; two q heads per rank at TP 4, one at TP 8.
    ("gqa_8q_2kv", dict(num_heads=8, num_kv_heads=2, head_dim=D), (4, 8)),
    # GQA 6 q / 2 kv: TP 3 even (kv replicated); TP 4 q padded to 8, rank 1 holds q heads of both kv heads.
    ("gqa_6q_2kv", dict(num_heads=6, num_kv_heads=2, head_dim=D), (3, 4)),
    # Sequence parallel with biases and RoPE: TP 2 pads kv 3 -> 4 and shards it; TP 4 replicates kv
    # (its biases' gradients summed over ranks too) and pads q 6 -> 8.
    (
        "sequence_parallel",
        dict(num_heads=6, num_kv_heads=3, head_dim=D, use_bias=True, rope_theta=THETA, sequence_parallel=True),
        (2, 4),
    ),
    # Bidirectional (an encoder's), the reference kernel, TP 3 with kv replicated.
    ("bidirectional", dict(num_heads=6, num_kv_heads=2, head_dim=D, causal=False, kernel="reference"), (3,)),
]


@pytest.mark.parametrize(
    "kwargs, tp",
    [pytest.param(kwargs, tp, id=f"{name}-tp{tp}") for name, kwargs, tps in CASES for tp in tps],
)
def test_matches_reference(kwargs, tp):
    kwargs = dict(kwargs)
    features = kwargs.pop("features", F)
    layer = randomize(ParallelAttention(features, mesh=tp_mesh(tp), rngs=nnx.Rngs(0), **kwargs))
    x = np.random.default_rng(1).standard_normal((B, S, features)).astype(np.float32)
    reference = partial(attention_reference, rope_theta=kwargs.get("rope_theta"), causal=kwargs.get("causal", True))
    assert_matches_reference(layer, reference, x)


def logical_slice(variable):
    return tuple(slice(0, n) for n in variable.get_metadata()["logical_shape"])


@pytest.mark.parametrize(
    "num_kv_heads", [pytest.param(6, id="kv_sharded_padded"), pytest.param(2, id="kv_replicated_q_padded")]
)
def test_padding_is_masked(num_kv_heads, x):
    """At TP 4, 6 query heads are stored as 8 (and, with 6 kv heads, so are the kv
    heads). With NaN written into every padded entry, the output must still be the
    reference's and finite, and the padding's gradients exactly zero (else an
    optimizer would move it)."""
    # RoPE, so that the key bias has a gradient (without it, q . b_k is the same for every key
    # position and cancels in the softmax: its gradient is exactly zero).
    layer = ParallelAttention(
        F, 6, num_kv_heads=num_kv_heads, head_dim=D, use_bias=True, rope_theta=THETA, mesh=tp_mesh(4), rngs=nnx.Rngs(0)
    )
    randomize(layer)
    padded = 0
    for _, variable in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        value = np.asarray(variable[...]).copy()
        padded += value.size - value[logical_slice(variable)].size
        poisoned = np.full_like(value, np.nan)
        poisoned[logical_slice(variable)] = value[logical_slice(variable)]
        variable[...] = jax.device_put(poisoned, variable[...].sharding)
    assert padded > 0  # the configuration does pad

    loss, grads = nnx.jit(nnx.value_and_grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, x)
    expected = jnp.sum(attention_reference(export_state(layer), x, rope_theta=THETA) ** 2)
    assert np.isfinite(loss) and abs(loss - expected) <= 1e-5 * abs(expected)
    for path, variable in nnx.to_flat_state(grads):
        name = ".".join(map(str, path))
        value = np.asarray(variable[...]).copy()
        assert np.isfinite(value).all() and np.abs(value[logical_slice(variable)]).max() > 0, name
        value[logical_slice(variable)] = 0
        assert not value.any(), f"gradient of the padding of {name}"


# --- parameter layout, export / import ----------------------------------------------


def stored_shapes(layer):
    return {
        ".".join(map(str, path)): (v.shape, v.get_metadata()["out_sharding"])
        for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))
    }


def test_layout_under_padding():
    T = "tensor"
    # kv heads >= tp: kv 3 -> 4 padded groups of 2 q heads, so 8 stored q heads.
    layer = ParallelAttention(F, 6, num_kv_heads=3, head_dim=D, use_bias=True, mesh=tp_mesh(2), rngs=nnx.Rngs(0))
    assert stored_shapes(layer) == {
        "query.kernel": ((F, 8, D), (None, T, None)), "query.bias": ((8, D), (T, None)),
        "key.kernel": ((F, 4, D), (None, T, None)), "key.bias": ((4, D), (T, None)),
        "value.kernel": ((F, 4, D), (None, T, None)), "value.bias": ((4, D), (T, None)),
        "out.kernel": ((8, D, F), (T, None, None)), "out.bias": ((F,), ()),
    }
    # kv heads < tp: kv replicated, q heads 6 -> 8.
    layer = ParallelAttention(F, 6, num_kv_heads=2, head_dim=D, use_bias=True, mesh=tp_mesh(4), rngs=nnx.Rngs(0))
    assert stored_shapes(layer) == {
        "query.kernel": ((F, 8, D), (None, T, None)), "query.bias": ((8, D), (T, None)),
        "key.kernel": ((F, 2, D), ()), "key.bias": ((2, D), ()),
        "value.kernel": ((F, 2, D), ()), "value.bias": ((2, D), ()),
        "out.kernel": ((8, D, F), (T, None, None)), "out.bias": ((F,), ()),
    }
    assert {name: v.shape for name, v in export_state(layer).items()} == {
        "query.kernel": (F, 6, D), "query.bias": (6, D),
        "key.kernel": (F, 2, D), "key.bias": (2, D),
        "value.kernel": (F, 2, D), "value.bias": (2, D),
        "out.kernel": (6, D, F), "out.bias": (F,),
    }


def test_round_trip_across_tp_degrees():
    layer = randomize(ParallelAttention(F, 6, num_kv_heads=3, head_dim=D, use_bias=True, mesh=tp_mesh(2), rngs=nnx.Rngs(0)))
    state = export_state(layer)
    other = ParallelAttention(F, 6, num_kv_heads=3, head_dim=D, use_bias=True, mesh=tp_mesh(4), rngs=nnx.Rngs(1))
    import_state(other, state)
    exported = export_state(other)
    assert exported.keys() == state.keys()
    for name, value in exported.items():
        np.testing.assert_array_equal(value, state[name])
    # the stored padding stays zero: heads 6, 7 of query, out; kv head 3 of key at TP 2
    assert not np.asarray(layer.query.kernel[...])[:, 6:].any()
    assert not np.asarray(layer.out.kernel[...])[6:].any()
    assert not np.asarray(layer.key.kernel[...])[:, 3:].any()
    assert np.asarray(layer.key.kernel[...])[:, :3].any()


def test_initialisation_does_not_depend_on_tp():
    # TP 2 pads the kv heads 3 -> 4 and shards them; TP 4 replicates them and pads the q heads.
    a = export_state(ParallelAttention(F, 6, num_kv_heads=3, head_dim=D, use_bias=True, mesh=tp_mesh(2), rngs=nnx.Rngs(0)))
    b = export_state(ParallelAttention(F, 6, num_kv_heads=3, head_dim=D, use_bias=True, mesh=tp_mesh(4), rngs=nnx.Rngs(0)))
    for name in a:  # same draws; the last bit may differ: the suite compiles with LLVM's cheap pipeline
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7)


# --- rotary embeddings ----------------------------------------------------------------


def test_apply_rotary_matches_half_split_reference():
    x = np.random.default_rng(2).standard_normal((B, S, 3, 8)).astype(np.float32)
    expected = rope_reference(x, THETA)
    assert max_relative_error(apply_rotary(x, jnp.arange(S), THETA), expected) <= 1e-6
    batched = jnp.broadcast_to(jnp.arange(S), (B, S))  # positions [B, S] give the same
    assert max_relative_error(apply_rotary(x, batched, THETA), expected) <= 1e-6
    # position 0 is the identity; a rotation keeps each pair's norm
    np.testing.assert_allclose(apply_rotary(x, jnp.zeros(S, int), THETA), x)
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rotary(x, jnp.arange(S), THETA), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rotary(x[..., :3], jnp.arange(S), THETA)


# --- communication read from the compiled HLO ------------------------------------------


def compiled_collectives(layer, x, *, backward: bool):
    graphdef, state = nnx.split(layer)
    cotangent = jnp.ones(x.shape)

    def loss(state, x, cotangent):
        return jnp.sum(cotangent * nnx.merge(graphdef, state)(x))

    fn = jax.value_and_grad(loss, argnums=(0, 1)) if backward else loss
    return summary(jax.jit(fn).lower(state, x, cotangent).compile().as_text())


def test_hlo_one_all_reduce_forward_one_backward(x):
    layer = ParallelAttention(F, 8, num_kv_heads=4, head_dim=D, mesh=tp_mesh(4), rngs=nnx.Rngs(0))
    # The output is replicated, so the loss reduces it on every device with no collective.
    assert compiled_collectives(layer, x, backward=False) == {"all-reduce": [B * S * F]}
    assert compiled_collectives(layer, x, backward=True) == {"all-reduce": [B * S * F, B * S * F]}


def test_hlo_replicated_kv_kernels_gradients_are_summed(x):
    """2 kv heads at TP 4: the replicated k/v kernels' gradients are all-reduced
    (the transpose of the implicit pcast), one F * 2 * D array each."""
    layer = ParallelAttention(F, 8, num_kv_heads=2, head_dim=D, mesh=tp_mesh(4), rngs=nnx.Rngs(0))
    both = compiled_collectives(layer, x, backward=True)
    assert both.keys() == {"all-reduce"}
    assert sorted(both["all-reduce"]) == sorted([B * S * F] * 2 + [F * 2 * D] * 2)


def test_hlo_sequence_parallel_replaces_all_reduce(x):
    layer = ParallelAttention(
        F, 8, num_kv_heads=4, head_dim=D, sequence_parallel=True, mesh=tp_mesh(4), rngs=nnx.Rngs(0)
    )
    forward = compiled_collectives(layer, x, backward=False)
    both = compiled_collectives(layer, x, backward=True)
    # The output is sharded along the sequence, so the scalar loss sums the shards'
    # partial sums: one 1-element all-reduce, which is the loss's and not the layer's.
    assert forward == {"all-gather": [B * S * F], "reduce-scatter": [B * S * F // 4], "all-reduce": [1]}
    assert sorted(both["all-gather"]) == [B * S * F] * 2
    assert sorted(both["reduce-scatter"]) == [B * S * F // 4] * 2
    assert both["all-reduce"] == [1]
    assert both.keys() == {"all-gather", "reduce-scatter", "all-reduce"}


# --- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be a multiple of num_kv_heads \(4\).*\[1, 2, 3, 6\]"),
        (dict(num_heads=0), "num_heads must be a positive integer, got 0"),
        (dict(num_heads=4, num_kv_heads=-2), "num_kv_heads must be a positive integer, got -2"),
        (dict(num_heads=4, head_dim=0), "head_dim must be a positive integer, got 0"),
        (dict(num_heads=3), r"hidden_size \(16\) must be a multiple of num_heads \(3\) while head_dim is null"),
        (dict(num_heads=4, head_dim=3, rope_theta=THETA), r"head_dim \(3\) must be even with RoPE"),
        (dict(num_heads=4, rope_theta=-1.0), "rope_theta must be positive"),
    ],
)
def test_bad_head_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelAttention(F, mesh=tp_mesh(2), rngs=nnx.Rngs(0), **kwargs)


def test_bad_inputs(x):
    layer = ParallelAttention(F, 8, num_kv_heads=4, head_dim=D, mesh=tp_mesh(4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="last dimension is 16"):
        layer(x[..., :12])
    with pytest.raises(ValueError, match=r"\[batch, seq, features\]"):
        layer(x[0])
    sequence_parallel = ParallelAttention(
        F, 8, num_kv_heads=4, head_dim=D, sequence_parallel=True, mesh=tp_mesh(4), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match=r"the sequence length seq_len \(6\) must be divisible by tensor \(4\)"):
        sequence_parallel(x[:, :6])
