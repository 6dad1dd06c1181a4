"""RMSNorm against the unsharded formula; with sequence parallelism its scale
gradient is a sum over the sequence shards (one all-reduce backward)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_matches_reference, tp_mesh
from lite_tp_jax import RMSNorm, import_state
from lite_tp_jax.core.hlo import summary


def rms_norm_reference(weights, x):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * weights["scale"]


@pytest.mark.parametrize("tp, sequence_parallel", [(1, False), (3, False), (2, True), (4, True), (8, True)])
def test_matches_reference(tp, sequence_parallel):
    norm = RMSNorm(12, mesh=tp_mesh(tp), sequence_parallel=sequence_parallel, rngs=nnx.Rngs(0))
    import_state(norm, {"scale": np.linspace(0.5, 1.5, 12, dtype=np.float32)})
    x = np.random.default_rng(0).standard_normal((2, 8, 12)).astype(np.float32)
    assert_matches_reference(norm, rms_norm_reference, x)


def test_sequence_parallel_scale_gradient_is_one_all_reduce():
    norm = RMSNorm(12, mesh=tp_mesh(4), sequence_parallel=True, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(norm)
    x = jnp.ones((2, 8, 12))

    def loss(state, x, cotangent):
        return jnp.sum(cotangent * nnx.merge(graphdef, state)(x))

    hlo = jax.jit(jax.grad(loss)).lower(state, x, x).compile().as_text()
    assert summary(hlo) == {"all-reduce": [12]}  # the scale's gradient, summed over the 4 shards
