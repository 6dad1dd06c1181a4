"""export_state / import_state: logical names and shapes, round trips, clear errors."""

import numpy as np
import pytest
from flax import nnx

from conftest import tp_mesh
from lite_tp_jax import ParallelMLP, export_state, import_state


@pytest.fixture(scope="module")
def mlp():
    return ParallelMLP(8, 30, mesh=tp_mesh(4), rngs=nnx.Rngs(0))


def test_logical_names_and_shapes(mlp):
    shapes = {name: value.shape for name, value in export_state(mlp).items()}
    assert shapes == {"gate.kernel": (8, 30), "up.kernel": (8, 30), "down.kernel": (30, 8)}


def test_round_trip_across_tp_degrees(mlp):
    rng = np.random.default_rng(0)
    state = {name: rng.standard_normal(v.shape).astype(np.float32) for name, v in export_state(mlp).items()}
    import_state(mlp, state)
    for name, value in export_state(mlp).items():
        np.testing.assert_array_equal(value, state[name])
    other = ParallelMLP(8, 30, mesh=tp_mesh(3), rngs=nnx.Rngs(1))
    import_state(other, export_state(mlp))
    for name, value in export_state(other).items():
        np.testing.assert_array_equal(value, state[name])
    # the stored padding stays zero
    assert np.all(np.asarray(mlp.up.kernel[...])[:, 30:] == 0)


def test_gradients_export_with_logical_shapes(mlp):
    grads = nnx.grad(lambda m, x: m(x).sum())(mlp, np.ones((2, 4, 8), np.float32))
    assert {k: v.shape for k, v in export_state(grads).items()} == {
        k: v.shape for k, v in export_state(mlp).items()
    }


def test_missing_and_unknown_names(mlp):
    state = export_state(mlp)
    del state["up.kernel"]
    state["up.kernal"] = np.zeros((8, 30), np.float32)
    with pytest.raises(KeyError, match=r"missing \['up.kernel'\] and has unknown names \['up.kernal'\]"):
        import_state(mlp, state)


def test_wrong_shape(mlp):
    state = export_state(mlp)
    state["down.kernel"] = np.zeros((32, 8), np.float32)
    with pytest.raises(ValueError, match=r"'down.kernel' has shape \(32, 8\), expected \(30, 8\)"):
        import_state(mlp, state)
