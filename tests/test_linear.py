"""Column- and row-parallel linear layers against ``x @ W + b`` on one device."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from conftest import TP_DEGREES, assert_matches_reference, tp_mesh
from lite_tp_jax import ColumnParallelLinear, RowParallelLinear, export_state


def linear_reference(weights, x):
    y = x @ weights["kernel"]
    return y + weights["bias"] if "bias" in weights else y


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((2, 8, 6)).astype(np.float32)


@pytest.mark.parametrize("tp", TP_DEGREES)
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_uneven(tp, gather_output, x):
    layer = ColumnParallelLinear(6, 10, mesh=tp_mesh(tp), gather_output=gather_output, rngs=nnx.Rngs(0))
    assert_matches_reference(layer, linear_reference, x)


@pytest.mark.parametrize("tp", TP_DEGREES)
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_uneven(tp, input_is_parallel):
    x = np.random.default_rng(2).standard_normal((2, 8, 10)).astype(np.float32)
    layer = RowParallelLinear(10, 6, mesh=tp_mesh(tp), input_is_parallel=input_is_parallel, rngs=nnx.Rngs(0))
    assert_matches_reference(layer, linear_reference, x)


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_pair(tp, x):
    column = ColumnParallelLinear(6, 12, mesh=tp_mesh(tp), sequence_parallel=True, rngs=nnx.Rngs(0))
    row = RowParallelLinear(12, 6, mesh=tp_mesh(tp), sequence_parallel=True, use_bias=False, rngs=nnx.Rngs(1))
    assert_matches_reference(column, linear_reference, x)
    assert_matches_reference(row, linear_reference, np.asarray(x @ np.ones((6, 12), np.float32)))


def test_without_bias(x):
    layer = ColumnParallelLinear(6, 10, mesh=tp_mesh(4), use_bias=False, rngs=nnx.Rngs(0))
    assert set(export_state(layer)) == {"kernel"}
    assert_matches_reference(layer, linear_reference, x)


def test_parameters_are_created_sharded():
    layer = ColumnParallelLinear(6, 10, mesh=tp_mesh(4), rngs=nnx.Rngs(0))
    kernel = layer.kernel[...]
    assert kernel.shape == (6, 12)  # stored padded to a multiple of TP 4
    assert [s.data.shape for s in kernel.addressable_shards] == [(6, 3)] * 4
    assert nnx.get_partition_spec(nnx.state(layer))["kernel"].get_value() == PartitionSpec(None, "tensor")
    assert export_state(layer)["kernel"].shape == (6, 10)
    np.testing.assert_array_equal(np.asarray(kernel)[:, 10:], 0)


def test_initialisation_does_not_depend_on_tp():
    one = export_state(RowParallelLinear(10, 6, mesh=tp_mesh(1), rngs=nnx.Rngs(3)))
    three = export_state(RowParallelLinear(10, 6, mesh=tp_mesh(3), rngs=nnx.Rngs(3)))
    for name in one:
        np.testing.assert_array_equal(one[name], three[name])


def test_wrong_input_shape_is_a_clear_error():
    layer = ColumnParallelLinear(6, 10, mesh=tp_mesh(2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ColumnParallelLinear expects inputs whose last dimension is 6, got shape \(2, 5\)"):
        layer(jnp.ones((2, 5)))
    row = RowParallelLinear(10, 6, mesh=tp_mesh(2), sequence_parallel=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sequence length seq_len \(\d+\) must be divisible by tensor \(2\)"):
        row(jnp.ones((2, 3, 10)))
