"""Eight fake CPU devices for every test; must run before jax initialises."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lite_tp_jax.mesh import make_mesh  # noqa: E402

TP_DEGREES = (1, 2, 3, 4, 8)


def tp_mesh(tensor: int):
    """A mesh of the first ``tensor`` devices, all on the "tensor" axis."""
    return make_mesh(tensor=tensor, devices=jax.devices()[:tensor])


def max_relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: the error relative to the array's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
