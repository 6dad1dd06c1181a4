"""ParallelMLP against the unsharded MLP, and its communication read from HLO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TP_DEGREES, assert_matches_reference, tp_mesh
from lite_tp_jax import ParallelMLP, export_state, import_state
from lite_tp_jax.core.hlo import summary

B, S, H, F = 2, 8, 16, 30  # F = 30: uneven at TP 4 and 8


def mlp_reference(weights, x):
    up = x @ weights["up.kernel"]
    if "gate.kernel" in weights:
        hidden = jax.nn.silu(x @ weights["gate.kernel"]) * up
    else:
        hidden = jax.nn.gelu(up + weights["up.bias"])
    y = hidden @ weights["down.kernel"]
    return y + weights["down.bias"] if "down.bias" in weights else y


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((B, S, H)).astype(np.float32)


@pytest.mark.parametrize("tp", TP_DEGREES)
def test_swiglu(tp, x):
    layer = ParallelMLP(H, F, mesh=tp_mesh(tp), activation="swiglu", rngs=nnx.Rngs(0))
    assert_matches_reference(layer, mlp_reference, x)


@pytest.mark.parametrize("tp", TP_DEGREES)
def test_gelu_with_bias(tp, x):
    layer = ParallelMLP(H, F, mesh=tp_mesh(tp), activation="gelu", use_bias=True, rngs=nnx.Rngs(0))
    # Non-zero biases, so a bias added on every rank (instead of once) would show.
    state = export_state(layer)
    import_state(layer, {name: np.full_like(v, 0.1) if name.endswith("bias") else v for name, v in state.items()})
    assert_matches_reference(layer, mlp_reference, x)


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel(tp, x):
    layer = ParallelMLP(H, F, mesh=tp_mesh(tp), sequence_parallel=True, rngs=nnx.Rngs(0))
    assert_matches_reference(layer, mlp_reference, x)


def compiled_collectives(layer, x, *, backward: bool):
    graphdef, state = nnx.split(layer)
    cotangent = jnp.ones((B, S, H))

    def loss(state, x, cotangent):
        return jnp.sum(cotangent * nnx.merge(graphdef, state)(x))

    fn = jax.value_and_grad(loss, argnums=(0, 1)) if backward else loss
    return summary(jax.jit(fn).lower(state, x, cotangent).compile().as_text())


def test_hlo_one_all_reduce_forward_one_backward(x):
    layer = ParallelMLP(H, 32, mesh=tp_mesh(4), rngs=nnx.Rngs(0))
    assert compiled_collectives(layer, x, backward=False) == {"all-reduce": [B * S * H]}
    assert compiled_collectives(layer, x, backward=True) == {"all-reduce": [B * S * H, B * S * H]}


def test_hlo_sequence_parallel_replaces_all_reduce(x):
    layer = ParallelMLP(H, 32, mesh=tp_mesh(4), sequence_parallel=True, rngs=nnx.Rngs(0))
    forward = compiled_collectives(layer, x, backward=False)
    both = compiled_collectives(layer, x, backward=True)
    # The scalar loss of a sequence-sharded output is summed across shards: one 1-element all-reduce.
    assert forward == {"all-gather": [B * S * H], "reduce-scatter": [B * S * H // 4], "all-reduce": [1]}
    assert sorted(both["all-gather"]) == [B * S * H] * 2
    assert sorted(both["reduce-scatter"]) == [B * S * H // 4] * 2
    assert both["all-reduce"] == [1]


def test_bad_activation():
    with pytest.raises(ValueError, match="activation must be 'swiglu' or 'gelu', got 'relu'"):
        ParallelMLP(H, F, mesh=tp_mesh(2), activation="relu", rngs=nnx.Rngs(0))
